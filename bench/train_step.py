"""Time full StyleGAN2-ADA training iterations (Gmain, Greg every 4, Dmain, Dreg every 16, bgc ADA at p=0.2).

The iteration is built from the engine's own pieces (Generator, Discriminator, StyleGAN2Loss,
AugmentPipe, Adam with lazy-regularization lr/betas) and follows training_loop.py phase by phase,
including the G_ema update. One warm-up iteration (batch_idx 0, all phases) runs untimed; the timed
iterations are batch_idx 1..iters, so with iters a multiple of 16 every phase runs at exactly its
long-run rate. The last line printed is `images/s <number>` (median over --repeats).

Example: python bench/train_step.py --res 64 --iters 16 --repeats 3 --impl auto
"""

import copy
import os
import statistics
import sys
import time

import click
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from stylegan2ada.augment import PRESETS, AugmentPipe  # noqa: E402
from stylegan2ada.loss import StyleGAN2Loss  # noqa: E402
from stylegan2ada.networks import Discriminator, Generator  # noqa: E402
from stylegan2ada.ops import default_impl  # noqa: E402

def build_training_state(c, device):
    """Networks, loss, augment pipe and per-phase optimizers as training_loop.py builds them."""
    torch.manual_seed(c['seed'])
    common = dict(c_dim=0, img_resolution=c['res'], img_channels=3)
    G = Generator(z_dim=c['zdim'], w_dim=c['zdim'], mapping_kwargs=dict(num_layers=2),
                  synthesis_kwargs=dict(channel_base=c['cbase'], channel_max=c['cmax'], num_fp16_res=0, conv_clamp=None),
                  **common).train().requires_grad_(False).to(device)
    D = Discriminator(architecture='resnet', channel_base=c['cbase'], channel_max=c['cmax'], num_fp16_res=0, conv_clamp=None,
                      epilogue_kwargs=dict(mbstd_group_size=min(4, c['batch'])),
                      **common).train().requires_grad_(False).to(device)
    G_ema = copy.deepcopy(G).eval()
    augment_pipe = AugmentPipe(**PRESETS['bgc']).train().requires_grad_(False).to(device)
    augment_pipe.p.copy_(torch.as_tensor(c['p']))
    loss = StyleGAN2Loss(G=G, D=D, augment_pipe=augment_pipe, r1_gamma=c['gamma'], pl_weight=c['pl_weight'])

    # Lazy regularization: lr and betas scaled by mb_ratio so the effective schedule is unchanged.
    phases = []
    for name, module, reg_interval in [('G', G, 4), ('D', D, 16)]:
        mb_ratio = reg_interval / (reg_interval + 1)
        opt = torch.optim.Adam(module.parameters(), lr=c['lr'] * mb_ratio, betas=[b ** mb_ratio for b in (0, 0.99)], eps=1e-8)
        phases.append(dict(name=name + 'main', module=module, opt=opt, interval=1))
        phases.append(dict(name=name + 'reg', module=module, opt=opt, interval=reg_interval))
    return dict(G=G, D=D, G_ema=G_ema, loss=loss, phases=phases)


def train_iteration(state, batch_idx, batch, device):
    """One training iteration: every due phase (forward, backward, Adam step), then the G_ema update."""
    G, G_ema, loss, phases = state['G'], state['G_ema'], state['loss'], state['phases']
    real_img = torch.rand([batch, 3, G.img_resolution, G.img_resolution], device=device) * 2 - 1
    real_c = torch.zeros([batch, 0], device=device)
    all_gen_z = torch.randn([len(phases), batch, G.z_dim], device=device)
    for phase, gen_z in zip(phases, all_gen_z):
        if batch_idx % phase['interval'] != 0:
            continue
        phase['module'].requires_grad_(True)
        phase['opt'].zero_grad(set_to_none=True)
        loss.accumulate_gradients(phase=phase['name'], real_img=real_img, real_c=real_c, gen_z=gen_z, gen_c=real_c,
                                  gain=phase['interval'], cur_nimg=batch_idx * batch)
        phase['module'].requires_grad_(False)
        for p in phase['module'].parameters():
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
        phase['opt'].step()
    with torch.no_grad():
        for p_ema, p in zip(G_ema.parameters(), G.parameters()):
            p_ema.copy_(p.lerp(p_ema, 0.999))
        for b_ema, b in zip(G_ema.buffers(), G.buffers()):
            b_ema.copy_(b)


def run_benchmark(c):
    """Warm up once, then time c['iters'] iterations c['repeats'] times; returns [(images/s, CPU s per iteration)]."""
    device = torch.device(c['device'])
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == 'cuda' else (lambda: None)
    state = build_training_state(c, device)
    train_iteration(state, 0, c['batch'], device)
    sync()
    results = []
    batch_idx = 1
    for _ in range(c['repeats']):
        t0, cpu0 = time.perf_counter(), time.process_time()
        for _ in range(c['iters']):
            train_iteration(state, batch_idx, c['batch'], device)
            batch_idx += 1
        sync()
        # Process CPU time sums all threads; on a shared machine it is steadier than the wall clock.
        results.append((c['batch'] * c['iters'] / (time.perf_counter() - t0), (time.process_time() - cpu0) / c['iters']))
    return results


@click.command()
# Main options.
@click.option('--res',       help='Image resolution', metavar='INT', type=click.IntRange(min=8), default=32, show_default=True)
@click.option('--batch',     help='Images per iteration', metavar='INT', type=click.IntRange(min=1), default=8, show_default=True)
@click.option('--iters',     help='Timed iterations per repeat (16 = every phase at its exact rate)', metavar='INT', type=click.IntRange(min=1), default=16, show_default=True)
@click.option('--repeats',   help='Timed blocks; the median is reported', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True)
# Hyperparameters.
@click.option('--cbase',     help='Capacity multiplier (channel_base)', metavar='INT', type=click.IntRange(min=1), default=4096, show_default=True)
@click.option('--cmax',      help='Max. feature maps', metavar='INT', type=click.IntRange(min=1), default=128, show_default=True)
@click.option('--zdim',      help='z and w dimensionality', metavar='INT', type=click.IntRange(min=1), default=128, show_default=True)
@click.option('--gamma',     help='R1 regularization weight', metavar='FLOAT', type=click.FloatRange(min=0), default=0.01, show_default=True)
@click.option('--pl-weight', help='Path-length regularization weight', metavar='FLOAT', type=click.FloatRange(min=0), default=2, show_default=True)
@click.option('--lr',        help='Adam learning rate (before the lazy-reg adjustment)', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=0.0025, show_default=True)
@click.option('--p',         help='bgc augmentation probability', metavar='FLOAT', type=click.FloatRange(min=0, max=1), default=0.2, show_default=True)
# Performance-related.
@click.option('--impl',      help="Ops: 'auto' = fast path where supported, 'ref' = reference path only", type=click.Choice(['auto', 'ref']), default='auto', show_default=True)
@click.option('--device',    help='Torch device', metavar='STR', type=str, default='cpu', show_default=True)
@click.option('--threads',   help='torch.set_num_threads [default: torch default]', metavar='INT', type=click.IntRange(min=1))
@click.option('--seed',      help='Random seed', metavar='INT', type=int, default=0, show_default=True)
def main(**kwargs):
    """Print the training throughput (images/s) of the engine for one configuration."""
    c = dict(kwargs)
    if c['res'] & (c['res'] - 1) != 0:
        raise click.ClickException(f'--res {c["res"]}: must be a power of two >= 8')
    if c['batch'] % min(4, c['batch']) != 0:
        raise click.ClickException(f'--batch {c["batch"]}: must be a multiple of the minibatch-std group size 4 (or below 4)')
    try:
        device = torch.device(c['device'])
        torch.empty([], device=device)
    except (RuntimeError, AssertionError) as err:
        raise click.ClickException(f'--device {c["device"]}: {err}')
    if c['threads'] is not None:
        torch.set_num_threads(c['threads'])
    np.random.seed(c['seed'])
    print(f'res={c["res"]} batch={c["batch"]} iters={c["iters"]} repeats={c["repeats"]} cbase={c["cbase"]} cmax={c["cmax"]} '
          f'impl={c["impl"]} device={device} threads={torch.get_num_threads()} torch={torch.__version__}', flush=True)
    with default_impl('ref' if c['impl'] == 'ref' else None):
        results = run_benchmark(c)
    for i, (rate, cpu) in enumerate(results):
        print(f'repeat {i}: {rate:.3f} images/s, {cpu:.3f} CPU s/iteration')
    print(f'images/s {statistics.median(r for r, _ in results):.3f}')


if __name__ == '__main__':
    main()
