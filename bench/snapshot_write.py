"""Time writing (and reading back) a final training snapshot at NVIDIA's --cfg auto sizes: is it done before Slurm's SIGKILL?

A stopped run writes G, D, G_ema, the augmentation pipe and both Adam states (two moments per parameter) through
save_network_pkl (a temporary file, fsync, rename), as the training loop does. Slurm sends SIGKILL 30 s after SIGTERM
by default (KillWait). Last line: `write_s <seconds to write the snapshot>`.
"""

import copy
import os
import tempfile
import time

import click
import torch

from stylegan2ada.augment import AugmentPipe
from stylegan2ada.networks import Discriminator, Generator
from stylegan2ada.pickles import load_network_pkl, save_network_pkl

BGC = dict(xflip=1, rotate90=1, xint=1, scale=1, rotate=1, aniso=1, xfrac=1, brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1)


def snapshot_like_training(res, cbase, cmax):
    """The dict the training loop saves, with networks of these sizes and Adam states after one step."""
    torch.manual_seed(0)
    common = dict(c_dim=0, img_resolution=res, img_channels=3, channel_base=cbase, channel_max=cmax, num_fp16_res=4, conv_clamp=256)
    G = Generator(z_dim=512, w_dim=512, mapping_kwargs=dict(num_layers=2),
                  synthesis_kwargs={k: common[k] for k in ('channel_base', 'channel_max', 'num_fp16_res', 'conv_clamp')},
                  **{k: common[k] for k in ('c_dim', 'img_resolution', 'img_channels')})
    D = Discriminator(**common)
    optimizers = {}
    for name, module in (('G', G), ('D', D)):
        opt = torch.optim.Adam(module.parameters(), lr=0.0025, betas=(0.0, 0.99), eps=1e-8)
        for p in module.parameters():
            p.grad = torch.ones_like(p)
        opt.step()                                      # fills exp_avg and exp_avg_sq, as after any training step
        optimizers[name] = opt.state_dict()
    G_ema = copy.deepcopy(G).eval()
    pipe = AugmentPipe(**BGC)
    return dict(G=G.requires_grad_(False), D=D.requires_grad_(False), G_ema=G_ema.requires_grad_(False), augment_pipe=pipe,
                training_set_kwargs=dict(path='dataset.zip', resolution=res),
                progress=dict(cur_nimg=0, cur_tick=0, batch_idx=0, augment_p=0.0, optimizers=optimizers))


@click.command(context_settings=dict(max_content_width=120))
@click.option('--res',      help='Resolution', metavar='INT', type=click.IntRange(min=8), default=256, show_default=True)
@click.option('--cbase',    help='Capacity multiplier (channel_base; --cfg auto: 16384 below 512 px)', metavar='INT', type=click.IntRange(min=1), default=16384, show_default=True)
@click.option('--cmax',     help='Max. feature maps', metavar='INT', type=click.IntRange(min=1), default=512, show_default=True)
@click.option('--dir',      'folder', help='Where to write (the run folder\'s disk)  [default: a temporary folder]', metavar='DIR', type=str)
@click.option('--repeats',  help='Writes timed; each is reported', metavar='INT', type=click.IntRange(min=1), default=3, show_default=True)
def main(res, cbase, cmax, folder, repeats):
    """Time save_network_pkl of a final snapshot at --cfg auto sizes; last line `write_s <median seconds>`."""
    data = snapshot_like_training(res, cbase, cmax)
    params = sum(p.numel() for key in ('G', 'D') for p in data[key].parameters())
    print(f'torch {torch.__version__}, {res} px, channel_base {cbase}, channel_max {cmax}: G + D {params / 1e6:.1f} M parameters')
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        path = os.path.join(tmp, 'network-snapshot-000000.pkl')
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            save_network_pkl(path, data)
            times.append(time.perf_counter() - start)
            print(f'write {times[-1]:.2f} s')
        size = os.path.getsize(path)
        start = time.perf_counter()
        load_network_pkl(path)
        print(f'pickle {size / 2 ** 20:.0f} MiB; read back {time.perf_counter() - start:.2f} s')
    print(f'write_s {sorted(times)[len(times) // 2]:.2f}')


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
