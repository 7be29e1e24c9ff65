"""Time the ADA augment pipe: milliseconds per batch for a forward pass, and for a forward pass plus
the double backward that R1 takes through it.

Example: OMP_NUM_THREADS=1 python bench/augment.py --augpipe bgc --p 0.2 --batch 8 --res 32,64,256
"""

import os
import statistics
import sys
import time

import click
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from stylegan2ada.augment import PRESETS, AugmentPipe  # noqa: E402
from stylegan2ada.ops import IMPL_CHOICES, default_impl  # noqa: E402


def parse_resolutions(ctx, param, value):
    """Parse '32,64,256' into a list of ints >= 2."""
    try:
        res = [int(v) for v in value.split(',') if v.strip()]
    except ValueError:
        raise click.BadParameter(f'expected comma-separated integers, got {value!r}')
    if not res or min(res) < 2:
        raise click.BadParameter(f'resolutions must be integers >= 2, got {value!r}')
    return res


def forward_only(pipe, images, probe):
    """One augmentation of the batch, no autograd graph."""
    with torch.no_grad():
        pipe(images)


def forward_double_backward(pipe, images, probe):
    """What R1 does through the pipe: a gradient w.r.t. the images with create_graph, then a backward of its norm.

    The stand-in for D is `sum(tanh(aug) * probe)`: non-linear, so the second backward really runs back
    through the pipe's backward graph (and its forward) to reach `probe`.
    """
    x = images.detach().requires_grad_()
    score = (pipe(x).tanh() * probe).sum()
    grad, = torch.autograd.grad(score, x, create_graph=True)
    grad.square().sum().backward()


def time_step(step, pipe, images, probe, repeats, sync):
    """Median wall time of one step, in milliseconds (after one warm-up)."""
    step(pipe, images, probe)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step(pipe, images, probe)
        sync()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


@click.command()
# Main options.
@click.option('--augpipe',  help='Augmentation preset', metavar='NAME', type=click.Choice(sorted(PRESETS)), default='bgc', show_default=True)
@click.option('--p',        help='Augmentation probability', metavar='FLOAT', type=click.FloatRange(min=0, max=1), default=0.2, show_default=True)
@click.option('--batch',    help='Images per batch', metavar='INT', type=click.IntRange(min=1), default=8, show_default=True)
@click.option('--res',      help='Resolutions, comma-separated', metavar='LIST', type=str, callback=parse_resolutions, default='32,64,256', show_default=True)
@click.option('--channels', help='Channels per image', metavar='INT', type=click.IntRange(min=1, max=3), default=3, show_default=True)
@click.option('--backward/--no-backward', help='Also time forward + double backward (what R1 runs)', default=True, show_default=True)
# Performance-related.
@click.option('--impl',     help="Ops path: 'auto' = each op's default, or one path for every op", type=click.Choice(['auto', *IMPL_CHOICES]), default='auto', show_default=True)
@click.option('--device',   help='Torch device', metavar='STR', type=str, default='cpu', show_default=True)
@click.option('--repeats',  help='Timed passes per resolution', metavar='INT', type=click.IntRange(min=1), default=10, show_default=True)
@click.option('--seed',     help='Random seed', metavar='INT', type=int, default=0, show_default=True)
def main(**kwargs):
    """Print the milliseconds per batch of an AugmentPipe preset: forward, and forward + double backward."""
    c = dict(kwargs)
    try:
        device = torch.device(c['device'])
        torch.empty([], device=device)
    except (RuntimeError, AssertionError) as err:
        raise click.ClickException(f'--device {c["device"]}: {err}')
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == 'cuda' else (lambda: None)
    torch.manual_seed(c['seed'])
    pipe = AugmentPipe(**PRESETS[c['augpipe']]).to(device)
    pipe.p.fill_(c['p'])
    print(f'augpipe={c["augpipe"]} p={c["p"]} batch={c["batch"]} channels={c["channels"]} impl={c["impl"]} '
          f'device={device} threads={torch.get_num_threads()} torch={torch.__version__}')
    with default_impl(None if c['impl'] == 'auto' else c['impl']):
        for res in c['res']:
            images = torch.rand([c['batch'], c['channels'], res, res], device=device) * 2 - 1
            probe = torch.randn_like(images).requires_grad_()
            ms = time_step(forward_only, pipe, images, probe, c['repeats'], sync)
            line = f'{res:5d} px: forward {ms:9.2f} ms/batch  ({ms / c["batch"]:.2f} ms/image)'
            if c['backward']:
                ms = time_step(forward_double_backward, pipe, images, probe, c['repeats'], sync)
                line += f';  forward + double backward {ms:9.2f} ms/batch'
            print(line, flush=True)


if __name__ == '__main__':
    main()
