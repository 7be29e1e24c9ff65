"""Style mixing grids (NVIDIA's figure): row seeds x column seeds, each cell the row's ws with the column's ws in a
chosen range of layers; the row images down the left, the column images along the top."""

import os

import click
import numpy as np
import torch
import tqdm

from stylegan2ada import cli
from stylegan2ada.image_utils import make_grid, save_png_atomic, to_pil, to_uint8
from stylegan2ada.pickles import load_style_generator
from stylegan2ada.util import UserError


def class_label(
    G,                  # generator
    class_idx,          # --class value; None = not given
    what,               # how errors name the network
):
    """One-hot label [c_dim] float32 of a conditional network, None for an unconditional one; UserError when missing."""
    if not G.c_dim:
        if class_idx is not None:
            click.echo('warning: --class ignored: the network is unconditional')
        return None
    if class_idx is None:
        raise UserError(f'{what}: the network is conditional ({G.c_dim} classes); choose one with --class')
    if class_idx >= G.c_dim:
        raise UserError(f'--class {class_idx} out of range: the network has {G.c_dim} classes (0-{G.c_dim - 1})')
    return np.eye(G.c_dim, dtype=np.float32)[class_idx]


def seed_ws(
    G,                          # StyleGAN2 generator
    seeds,                      # one latent per seed: z from np.random.RandomState(seed), as generate.py draws it
    label           = None,     # one-hot [c_dim]; None = unconditional
    truncation_psi  = 1,        # truncation towards w_avg: 1 = none
    device          = 'cpu',    # torch device of G
):
    """ws [len(seeds), num_ws, w_dim] of the seeds."""
    z = torch.from_numpy(np.stack([np.random.RandomState(s).randn(G.z_dim) for s in seeds])).to(device, torch.float32)
    c = torch.zeros([len(seeds), G.c_dim], device=device)
    if label is not None:
        c[:] = torch.as_tensor(label, device=device)
    with torch.no_grad():
        return G.mapping(z, c, truncation_psi=truncation_psi)


def mix_styles(
    row_ws,             # [R, num_ws, w_dim]
    col_ws,             # [K, num_ws, w_dim]
    styles,             # layer indices that take the column's w; [] = none (every cell is its row)
):
    """ws of every cell [R, K, num_ws, w_dim]: the row's ws with the column's in the `styles` layers."""
    R, K = row_ws.shape[0], col_ws.shape[0]
    mixed = row_ws[:, None].repeat(1, K, 1, 1)                          # [R, K, num_ws, w_dim]
    if styles:
        index = torch.as_tensor(list(styles), dtype=torch.long, device=row_ws.device)
        mixed[:, :, index] = col_ws[None][:, :, index].expand(R, -1, -1, -1)
    return mixed


def render_ws(
    G,                          # StyleGAN2 generator
    ws,                         # [N, num_ws, w_dim]
    noise_mode  = 'const',      # 'const', 'random' or 'none'
    progress    = False,        # tqdm progress bar
):
    """uint8 images [N, C, H, W] on the CPU, synthesized one at a time."""
    # One image per call: a sample's pixels then never depend on what else is in its batch, so that a cell whose w
    # equals its row's gives the row image bit for bit, on any device.
    out = []
    with torch.no_grad():
        for w in tqdm.tqdm(ws, desc='rendering', unit='img', disable=not progress, leave=False):
            out.append(to_uint8(G.synthesis(w[None], noise_mode=noise_mode)).cpu())
    return torch.cat(out)


def style_mixing_images(
    G,                          # StyleGAN2 generator
    row_seeds,                  # seeds of the rows (their ws are the base of each cell)
    col_seeds,                  # seeds of the columns (their ws replace the rows' in the `styles` layers)
    styles,                     # layer indices taken from the column
    label           = None,     # one-hot [c_dim]; None = unconditional
    truncation_psi  = 1,        # truncation: 1 = none
    noise_mode      = 'const',  # 'const', 'random' or 'none'
    device          = 'cpu',    # torch device of G
    progress        = False,    # tqdm progress bar
):
    """(row images [R, C, H, W], column images [K, C, H, W], cells [R, K, C, H, W]), uint8 on the CPU."""
    bad = [s for s in styles if not 0 <= s < G.num_ws]
    if bad:
        raise UserError(f'--styles: layer {bad[0]} out of range: the network has {G.num_ws} ws (layers 0-{G.num_ws - 1})')
    row_ws = seed_ws(G, row_seeds, label, truncation_psi, device)
    col_ws = seed_ws(G, col_seeds, label, truncation_psi, device)
    cell_ws = mix_styles(row_ws, col_ws, styles)                        # [R, K, num_ws, w_dim]
    everything = render_ws(G, torch.cat([row_ws, col_ws, cell_ws.flatten(0, 1)]), noise_mode, progress)
    R, K = len(row_seeds), len(col_seeds)
    return everything[:R], everything[R:R + K], everything[R + K:].reshape(R, K, *everything.shape[1:])


def compose_mixing_grid(
    row_images,         # uint8 [R, C, H, W]: down the left
    col_images,         # uint8 [K, C, H, W]: along the top
    cells,              # uint8 [R, K, C, H, W]
):
    """One uint8 image [C, (R + 1) H, (K + 1) W]: the top-left corner blank (black), as in NVIDIA's figure."""
    R, K = cells.shape[:2]
    blank = torch.zeros_like(col_images[:1])
    rows = [torch.cat([blank, col_images])] + [torch.cat([row_images[r:r + 1], cells[r]]) for r in range(R)]
    return make_grid(torch.cat(rows), (K + 1, R + 1))


@click.command(cls=cli.Command)
# Main options.
@click.option('--network', 'network_pkl', help='Network pickle (ours or NVIDIA stylegan2-ada-pytorch)', metavar='PKL', type=str, required=True)
@click.option('--rows', 'row_seeds',  help='Random seeds of the rows, e.g. 85,100,75', metavar='LIST', type=str, required=True)
@click.option('--cols', 'col_seeds',  help='Random seeds of the columns, e.g. 55,821,1789', metavar='LIST', type=str, required=True)
@click.option('--styles',         help='Layers (ws) that take the column\'s w: 0-6 coarse and middle, higher = fine', metavar='LIST', type=str, default='0-6', show_default=True)
@click.option('--outdir',         help='Where to save the grid and the cells', metavar='DIR', type=str, required=True)
# Sampling options.
@click.option('--trunc', 'truncation_psi', help='Truncation psi', metavar='FLOAT', type=click.FloatRange(min=-2, max=2), default=1, show_default=True)
@click.option('--class', 'class_idx', help='Class index (required for a conditional network)', metavar='INT', type=click.IntRange(min=0), default=None)
@click.option('--noise-mode',     help='Noise mode', type=click.Choice(['const', 'random', 'none']), default='const', show_default=True)
# I/O-related.
@click.option('--device',         help='Device to run on', type=click.Choice(['auto', 'cpu', 'cuda']), default='auto', show_default=True)
def main(**kwargs):
    """Style mixing: each cell is its row's image with the column's styles in the chosen layers.

    Writes grid.png (row images down the left, column images along the top) and each cell as ROW-COL.png.

    \b
    Examples:
    python style_mixing.py --network net.pkl --rows 85,100,75 --cols 55,821,1789 --styles 0-6 --outdir out
    python style_mixing.py --network cond.pkl --class 2 --rows 0-3 --cols 10-13 --styles 4-7 --outdir out
    """
    opts = dict(kwargs)
    row_seeds = cli.parse_range(opts['row_seeds'], '--rows')
    col_seeds = cli.parse_range(opts['col_seeds'], '--cols')
    styles = cli.parse_range(opts['styles'], '--styles')
    device = cli.pick_device(opts['device'])
    G = load_style_generator(opts['network_pkl'], device)
    label = class_label(G, opts['class_idx'], opts['network_pkl'])
    try:
        os.makedirs(opts['outdir'], exist_ok=True)
    except OSError as exc:
        raise UserError(f'{opts["outdir"]}: cannot create the output folder: {exc.strerror}') from None

    rows, cols, cells = style_mixing_images(G, row_seeds, col_seeds, styles, label=label,
                                            truncation_psi=opts['truncation_psi'], noise_mode=opts['noise_mode'],
                                            device=device, progress=True)
    for r, row_seed in enumerate(row_seeds):
        for k, col_seed in enumerate(col_seeds):
            save_png_atomic(to_pil(cells[r, k]), os.path.join(opts['outdir'], f'{row_seed}-{col_seed}.png'))
    save_png_atomic(to_pil(compose_mixing_grid(rows, cols, cells)), os.path.join(opts['outdir'], 'grid.png'))
    click.echo(f'wrote grid.png and {cells.shape[0] * cells.shape[1]} cells to {opts["outdir"]}')


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
