"""Time one forward pass of G and D (NVIDIA's --cfg auto sizes: z/w 512, 2 mapping layers, channel_base 16384).

Last line: `images/s <G images/s at the last resolution>`.
"""

import time
import types

import click
import torch

from stylegan2ada.networks import Discriminator, Generator


def time_call(fn, iters):
    """Median seconds of fn() over iters calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@click.command(context_settings=dict(max_content_width=120))
@click.option('--res',      help='Resolutions (comma list)', metavar='LIST', type=str, default='64,256', show_default=True)
@click.option('--batch',    help='Images per forward pass', metavar='INT', type=click.IntRange(min=1), default=4, show_default=True)
@click.option('--iters',    help='Timed calls; the median is reported', metavar='INT', type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--cbase',    help='Capacity multiplier (channel_base)', metavar='INT', type=click.IntRange(min=1), default=16384, show_default=True)
@click.option('--cmax',     help='Max. feature maps', metavar='INT', type=click.IntRange(min=1), default=512, show_default=True)
@click.option('--device',   help='Torch device', metavar='STR', type=str, default='cpu', show_default=True)
def main(**kwargs):
    """Time one forward pass of G and D at NVIDIA's --cfg auto sizes; last line `images/s <G at the last resolution>`."""
    args = types.SimpleNamespace(**dict(kwargs, res=[int(r) for r in kwargs['res'].split(',') if r.strip()]))
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, batch {args.batch}')
    rate = 0.0
    for res in args.res:
        torch.manual_seed(0)
        G = Generator(z_dim=512, c_dim=0, w_dim=512, img_resolution=res, img_channels=3, mapping_kwargs=dict(num_layers=2),
                      synthesis_kwargs=dict(channel_base=args.cbase, channel_max=args.cmax)).eval().to(args.device)
        D = Discriminator(c_dim=0, img_resolution=res, img_channels=3, channel_base=args.cbase, channel_max=args.cmax).eval().to(args.device)
        z = torch.randn(args.batch, 512, device=args.device)
        img = torch.randn(args.batch, 3, res, res, device=args.device)
        with torch.no_grad():
            t_g = time_call(lambda: G(z, None, noise_mode='const'), args.iters)
            t_d = time_call(lambda: D(img, None), args.iters)
        rate = args.batch / t_g
        print(f'{res:4d} px: G forward {t_g * 1000:8.1f} ms, D forward {t_d * 1000:8.1f} ms  (batch {args.batch})')
    print(f'images/s {rate:.2f}')


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
