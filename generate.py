"""Generate images from a network pickle (ours or NVIDIA's stylegan2-ada-pytorch)."""

import os

import click
import numpy as np
import torch

from stylegan2ada import cli
from stylegan2ada.image_utils import generate_images, grid_size_for, save_image_grid, save_png_atomic, to_pil, to_uint8
from stylegan2ada.pickles import NetworkPickleError, evaluation_network, load_network_pkl
from stylegan2ada.util import UserError
import taxogan_ext.dcgan  # noqa: F401  registers the DCGAN baseline's classes for pickles


def _parse_seeds(ctx, param, value):
    try:
        return cli.parse_range(value)
    except UserError as exc:
        raise click.BadParameter(str(exc)) from None


def render_projected_w(
    G,                  # StyleGAN2 generator
    path,               # .npz with key 'w' [N, num_ws, w_dim] (projector.py's projected_w.npz, or NVIDIA's)
    outdir,             # where projNN.png go
    noise_mode,         # 'const', 'random' or 'none'
    device,             # torch device of G
):
    """Write one image per w of a projection, projNN.png, rendered one at a time as projector.py renders proj.png."""
    try:
        loaded = np.load(path)
    except (OSError, ValueError, EOFError) as exc:
        raise UserError(f'--projected-w {path}: cannot read it ({type(exc).__name__}: {exc})') from None
    if not isinstance(loaded, np.lib.npyio.NpzFile) or 'w' not in loaded.files:
        raise UserError(f'--projected-w {path}: not a projection (an .npz file with the array \'w\')')
    with loaded:
        ws = loaded['w']
    if not hasattr(G, 'synthesis'):
        raise UserError(f'--projected-w {path}: the network ({type(G).__name__}) has no synthesis network to render ws')
    if ws.ndim != 3 or ws.shape[1:] != (G.num_ws, G.w_dim):
        raise UserError(f'--projected-w {path}: ws of shape {list(ws.shape)} do not fit the network '
                        f'([N, {G.num_ws}, {G.w_dim}] expected)')
    try:
        os.makedirs(outdir, exist_ok=True)
    except OSError as exc:
        raise UserError(f'{outdir}: cannot create the output folder: {exc.strerror}') from None
    ws = torch.from_numpy(ws).to(device, torch.float32)
    for idx, w in enumerate(ws):
        with torch.no_grad():
            image = to_uint8(G.synthesis(w[None], noise_mode=noise_mode))[0]
        save_png_atomic(to_pil(image), os.path.join(outdir, f'proj{idx:02d}.png'))
    click.echo(f'wrote {len(ws)} images of {path} to {outdir}')


@click.command(cls=cli.Command)
# Main options.
@click.option('--network', 'network_pkl', help='Network pickle (ours or NVIDIA stylegan2-ada-pytorch)', metavar='PKL', type=str, required=True)
@click.option('--seeds',          help='Random seeds, e.g. 0-7,12', metavar='LIST', type=str, callback=_parse_seeds, default='0-7', show_default=True)
@click.option('--outdir',         help='Where to save the images', metavar='DIR', type=str, required=True)
@click.option('--projected-w',    help='Render the ws of a projection (projector.py\'s projected_w.npz) instead of seeds', metavar='FILE', type=str, default=None)
# Sampling options.
@click.option('--trunc', 'truncation_psi', help='Truncation psi', metavar='FLOAT', type=click.FloatRange(min=-2, max=2), default=1, show_default=True)
@click.option('--class', 'class_idx', help='Class index (required for a conditional network)', metavar='INT', type=click.IntRange(min=0), default=None)
@click.option('--noise-mode',     help='Noise mode', type=click.Choice(['const', 'random', 'none']), default='const', show_default=True)
# I/O-related.
@click.option('--grid',           help='Also save all images as one grid (grid.png)', is_flag=True)
@click.option('--device',         help='Device to run on', type=click.Choice(['auto', 'cpu', 'cuda']), default='auto', show_default=True)
def main(**kwargs):
    """Generate images from a trained network pickle.

    \b
    Examples:
    python generate.py --network runs/exp/network-snapshot-000100.pkl --seeds 0-15 --outdir out --grid
    python generate.py --network cond.pkl --class 2 --trunc 0.7 --seeds 0-7 --outdir out
    python generate.py --network net.pkl --projected-w out/projected_w.npz --outdir out   # -> proj00.png
    """
    opts = dict(kwargs)
    device = cli.pick_device(opts['device'])
    data = load_network_pkl(opts['network_pkl'])
    try:
        G = evaluation_network(data).to(device)
    except NetworkPickleError:
        raise NetworkPickleError(f'{opts["network_pkl"]}: the pickle holds no generator') from None
    if opts['projected_w'] is not None:
        render_projected_w(G, opts['projected_w'], opts['outdir'], opts['noise_mode'], device)
        return
    if G.c_dim and opts['class_idx'] is None:
        raise UserError(f'{opts["network_pkl"]}: the network is conditional ({G.c_dim} classes); choose one with --class')
    if G.c_dim and opts['class_idx'] >= G.c_dim:
        raise UserError(f'--class {opts["class_idx"]} out of range: the network has {G.c_dim} classes (0-{G.c_dim - 1})')
    if not G.c_dim and opts['class_idx'] is not None:
        click.echo('warning: --class ignored: the network is unconditional')
    try:
        os.makedirs(opts['outdir'], exist_ok=True)
    except OSError as exc:
        raise UserError(f'{opts["outdir"]}: cannot create the output folder: {exc.strerror}') from None

    label = np.eye(G.c_dim, dtype=np.float32)[opts['class_idx']] if G.c_dim else None     # one-hot [c_dim]
    images = generate_images(G, opts['seeds'], label=label, truncation_psi=opts['truncation_psi'],
                             noise_mode=opts['noise_mode'], device=device)
    for seed, image in zip(opts['seeds'], images):
        save_png_atomic(to_pil(image), os.path.join(opts['outdir'], f'seed{seed:04d}.png'))
    if opts['grid']:
        save_image_grid(images, os.path.join(opts['outdir'], 'grid.png'), grid_size_for(len(images)))
    click.echo(f'wrote {len(images)} images to {opts["outdir"]}' + (' (+ grid.png)' if opts['grid'] else ''))


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
