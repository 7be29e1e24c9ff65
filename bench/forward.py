"""Time one forward pass of G and D (NVIDIA's --cfg auto sizes: z/w 512, 2 mapping layers, channel_base 16384).

Last line: `images/s <G images/s at the last resolution>`.
"""

import argparse
import time

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


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--res', type=int, nargs='+', default=[64, 256], help='resolutions')
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--iters', type=int, default=3)
    parser.add_argument('--cbase', type=int, default=16384)
    parser.add_argument('--cmax', type=int, default=512)
    parser.add_argument('--device', default='cpu')
    args = parser.parse_args()
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
    main()
