"""Morph between two taxa: at fixed latents, render the path from taxon A's generator to taxon B's, their weights
blended (every parameter and buffer, linearly, in steps from 0 to 1) and/or a conditional network's class label
blended; optionally the taxon classifier's assignment along the path (share classified as A, as B).

In a descending plan every order is fine-tuned from the same parent network, so two orders' generators share one
architecture and, largely, one latent space: the blend shows what separates the taxa at the same latent.
"""

import copy
import math
import os

import click
import numpy as np
import torch
import tqdm

from stylegan2ada import cli
from stylegan2ada.image_utils import generate_images, make_grid, save_png_atomic, to_pil, write_video
from stylegan2ada.metrics.detectors import resolve_detector
from stylegan2ada.pickles import load_style_generator
from stylegan2ada.util import UserError, write_json_atomic
from taxogan_ext import hierarchy, report, taxonomy
from taxogan_ext.taxon_metrics import class_of_taxon
import taxogan_ext.dcgan  # noqa: F401  registers the DCGAN baseline's classes for pickles

MORPH_FORMAT = 'taxogan-morph/1'
GIF_FRAME_MS = 200              # a morph has few frames: slow enough to follow


class MorphError(UserError):
    """A morph that cannot be made (incompatible networks, unknown taxon, missing class); one line naming it."""


#----------------------------------------------------------------------------
# The two ends.

def one_hot(
    G,                  # generator
    class_idx,          # class index; None = not given
    what,               # how errors name the end ('--from net.pkl')
    option,             # the option that gives the class
):
    """One-hot label [c_dim] float32 of a conditional network, None for an unconditional one; MorphError when missing."""
    if not G.c_dim:
        if class_idx is not None:
            raise MorphError(f'{option} {class_idx}: {what} is unconditional (no classes)')
        return None
    if class_idx is None:
        raise MorphError(f'{what}: the network is conditional ({G.c_dim} classes); choose one with {option}')
    if not 0 <= class_idx < G.c_dim:
        raise MorphError(f'{option} {class_idx} out of range: {what} has {G.c_dim} classes (0-{G.c_dim - 1})')
    return np.eye(G.c_dim, dtype=np.float32)[class_idx]


def check_same_architecture(
    G_a,                # generator at blend 0
    G_b,                # generator at blend 1
    what_a,             # how the message names A
    what_b,             # how the message names B
):
    """MorphError (one line) unless both networks have the same class and tensors (names and shapes)."""
    if type(G_a) is not type(G_b):
        raise MorphError(f'{what_a} ({type(G_a).__name__}) and {what_b} ({type(G_b).__name__}): different architectures; '
                         f'only networks of one architecture can be blended')
    a, b = G_a.state_dict(), G_b.state_dict()
    only_a = [k for k in a if k not in b]
    only_b = [k for k in b if k not in a]
    if only_a or only_b:
        name, where = (only_a[0], what_a) if only_a else (only_b[0], what_b)
        raise MorphError(f'{what_a} and {what_b}: different architectures ({len(only_a) + len(only_b)} tensors differ, '
                         f'e.g. {name} only in {where}); only networks of one architecture can be blended')
    for key in a:
        if a[key].shape != b[key].shape:
            raise MorphError(f'{what_a} and {what_b}: different architectures ({key} is {list(a[key].shape)} in one, '
                             f'{list(b[key].shape)} in the other); only networks of one architecture can be blended')


def blend_state(
    state_a,            # state dict at blend 0
    state_b,            # state dict at blend 1, same names and shapes
    t,                  # blend: 0 = A, 1 = B
):
    """Every floating-point tensor (1 - t) A + t B; other tensors (integer counters) A's below 0.5, else B's."""
    if t == 0:
        return dict(state_a)        # the ends are the networks themselves, not a rounding of them
    if t == 1:
        return dict(state_b)
    out = {}
    for key, a in state_a.items():
        b = state_b[key]
        out[key] = torch.lerp(a, b, float(t)) if a.is_floating_point() else (a if t < 0.5 else b)
    return out


def blend_steps(num_steps):
    """num_steps blends evenly from 0 to 1, both ends exact."""
    return [0.0] + [k / (num_steps - 1) for k in range(1, num_steps - 1)] + [1.0]


def morph_images(
    G_a,                            # generator at blend 0
    G_b,                            # generator at blend 1 (same architecture; may be G_a itself)
    label_a,                        # one-hot [c_dim] at blend 0; None = unconditional
    label_b,                        # one-hot [c_dim] at blend 1; None = unconditional
    seeds,                          # the fixed latents: z from np.random.RandomState(seed), as generate.py draws them
    steps,                          # blends, e.g. blend_steps(9)
    truncation_psi  = 1,            # truncation towards the blended network's w_avg: 1 = none
    noise_mode      = 'const',      # 'const', 'random' or 'none'
    device          = 'cpu',        # torch device of both networks
    progress        = False,        # tqdm progress bar
):
    """uint8 images [len(steps), len(seeds), C, H, W] on the CPU: the same latents through each blended network."""
    same = G_a is G_b
    state_a = G_a.state_dict()
    state_b = state_a if same else G_b.state_dict()
    G = copy.deepcopy(G_a).eval().requires_grad_(False)
    out = []
    for t in tqdm.tqdm(steps, desc='morphing', unit='step', disable=not progress):
        if not same:
            G.load_state_dict(blend_state(state_a, state_b, t))
        label = None
        if label_a is not None:
            label = torch.lerp(torch.as_tensor(label_a), torch.as_tensor(label_b), float(t)) if 0 < t < 1 else \
                torch.as_tensor(label_a if t == 0 else label_b)
        # generate_images, as generate.py and acc_taxon's generator use it: blend 0 gives exactly A's images.
        out.append(generate_images(G, seeds, label=label, truncation_psi=truncation_psi, noise_mode=noise_mode,
                                   device=device))
    return torch.stack(out)

#----------------------------------------------------------------------------
# The taxon classifier along the path.

def classifier_shares(
    detector,           # resolved classifier Detector (taxon:PATH)
    images,             # uint8 [T, N, C, H, W]
    class_a,            # classifier class of taxon A
    class_b,            # classifier class of taxon B
    device,             # torch device for the classifier
):
    """(share classified as A [T], share classified as B [T]), as acc_taxon counts: argmax of the classifier."""
    share_a, share_b = [], []
    for step_images in images:
        predicted = detector.predict(step_images, device)                # [N] int64
        share_a.append(float((predicted == class_a).mean()))
        share_b.append(float((predicted == class_b).mean()))
    return share_a, share_b


def classifier_classes(
    detector,           # resolved Detector
    name_a,             # taxon A
    name_b,             # taxon B
    manifest,           # taxonomy.Manifest (a taxon below a class counts as it), or None
):
    """Classifier class indices of A and B; MorphError when one is not (below) a class of the classifier."""
    names = detector.class_names
    if names is None:
        raise MorphError(f'--classifier {detector.spec}: not a classifier (it exports no class names)')
    out = []
    for name in (name_a, name_b):
        index = class_of_taxon(name, names, manifest)
        if index is None:
            raise MorphError(f'--classifier {detector.spec}: taxon {name!r} is neither a class of the classifier '
                             f'({", ".join(names)}) nor below one in the manifest')
        out.append(index)
    if out[0] == out[1]:
        raise MorphError(f'--classifier {detector.spec}: {name_a} and {name_b} fall in the same class '
                         f'{names[out[0]]!r}; the chart could not tell them apart')
    return out


def write_chart(
    path,                                       # chart.png; chart.pdf and chart.svg go beside it
    steps,                                      # blends [T]
    share_a,                                    # [T] shares classified as A
    share_b,                                    # [T] shares classified as B
    name_a,                                     # taxon A
    name_b,                                     # taxon B
    num_images,                                 # latents per step
    formats         = report.FIGURE_FORMATS,    # file formats written
):
    """Line chart of the classifier's shares along the path (matplotlib); returns the report.Chart drawn."""
    series = [dict(panel='shares', label=f'classified as {name}', x=list(steps), y=list(shares))
              for name, shares in ((name_a, share_a), (name_b, share_b))]
    figure = report.new_figure(5.6, 3.6)
    ax = figure.add_subplot()
    for i, item in enumerate(series):
        ax.plot(item['x'], item['y'], color=f'C{i}', marker='o', markersize=4, linewidth=1.5, label=item['label'])
    ax.set_xlim(-0.03, 1.03)            # a little room: the markers at blend 0 and 1 and at share 0 and 1 show whole
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel(f'blend: 0 = {name_a}, 1 = {name_b}')
    ax.set_ylabel('share')
    ax.set_title(f'Taxon classifier along the morph ({num_images} latents)', loc='left', fontsize='medium')
    ax.grid(True, color='0.9')
    ax.legend(frameon=False)
    return report.Chart(report.save_figure(figure, path, formats), series)

#----------------------------------------------------------------------------
# Output.

def resolve_ends(opts):
    """[(taxon name or None, pickle, class index or None)] of A and B from --plan or --from/--to; and the manifest."""
    if opts['plan'] is not None:
        if opts['from_pkl'] is not None or opts['to_pkl'] is not None:
            raise MorphError('--plan and --from/--to are alternatives: give one')
        if opts['from_taxon'] is None or opts['to_taxon'] is None:
            raise MorphError('--plan needs --from-taxon and --to-taxon')
        plan = hierarchy.load_plan(opts['plan'])
        rows = hierarchy.row_generators(plan, opts['plan'])
        methods = sorted({row.method for row in plan.rows})
        if opts['method'] not in methods:
            raise MorphError(f'--method {opts["method"]}: not a method of the plan {opts["plan"]} (methods: {", ".join(methods)})')
        ends = []
        for option, taxon in (('--from-taxon', opts['from_taxon']), ('--to-taxon', opts['to_taxon'])):
            if taxon not in plan.targets:
                raise MorphError(f'{option} {taxon}: not a target of the plan {opts["plan"]} (targets: {", ".join(plan.targets)})')
            row = rows.get(opts['method'], {}).get(taxon)
            if row is None:
                raise MorphError(f'plan {opts["plan"]}: no trained network answers {opts["method"]} {taxon} '
                                 f'(train it with train_hier.py)')
            ends.append((taxon, row.pkl, row.label))
        try:
            manifest = taxonomy.load_manifest(plan.datasets)
        except taxonomy.ManifestError:
            manifest = None     # the datasets moved: only exact class names match
        return ends, manifest
    if opts['from_pkl'] is None:
        raise MorphError('give the two networks: --from PKL [--to PKL], or --plan DIR --from-taxon A --to-taxon B')
    to_pkl = opts['to_pkl'] if opts['to_pkl'] is not None else opts['from_pkl']
    return [(opts['from_taxon'], opts['from_pkl'], opts['from_class']),
            (opts['to_taxon'], to_pkl, opts['to_class'])], None


@click.command(cls=cli.Command)
# The two ends: two pickles (or one conditional network and two classes), or two taxa of a trained plan.
@click.option('--from', 'from_pkl',   help='Network pickle at blend 0', metavar='PKL', type=str, default=None)
@click.option('--to', 'to_pkl',       help='Network pickle at blend 1 [default: --from, for a class morph]', metavar='PKL', type=str, default=None)
@click.option('--from-class',     help='Class at blend 0 of a conditional network', metavar='INT', type=click.IntRange(min=0), default=None)
@click.option('--to-class',       help='Class at blend 1 of a conditional network', metavar='INT', type=click.IntRange(min=0), default=None)
@click.option('--plan',           help='Experiment folder of train_hier.py (instead of --from/--to)', metavar='DIR', type=str, default=None)
@click.option('--method',         help='Plan method whose networks are blended', metavar='NAME', type=str, default='descending', show_default=True)
@click.option('--from-taxon',     help='Taxon at blend 0 (with --plan: which network; else its name for the classifier)', metavar='NAME', type=str, default=None)
@click.option('--to-taxon',       help='Taxon at blend 1 (with --plan: which network; else its name for the classifier)', metavar='NAME', type=str, default=None)
# The path.
@click.option('--seeds',          help='Fixed latents, e.g. 0-7,12: one strip each', metavar='LIST', type=str, default='0-7', show_default=True)
@click.option('--steps', 'num_steps', help='Blends from 0 to 1, both ends included', metavar='INT', type=click.IntRange(min=2), default=9, show_default=True)
@click.option('--trunc', 'truncation_psi', help='Truncation psi', metavar='FLOAT', type=click.FloatRange(min=-2, max=2), default=1, show_default=True)
@click.option('--noise-mode',     help='Noise mode', type=click.Choice(['const', 'random', 'none']), default='const', show_default=True)
# Classifier and output.
@click.option('--classifier',     help='Taxon classifier: chart of the share classified as A and as B', metavar='taxon:PATH', type=str, default=None)
@click.option('--outdir',         help='Where to save strips, grid, morph.json (and chart, video)', metavar='DIR', type=str, required=True)
@click.option('--save-video',     help='Also write the morph as a video (mp4 with imageio-ffmpeg, else GIF)', is_flag=True)
@click.option('--fps',            help='Video frames per second', metavar='INT', type=click.IntRange(min=1), default=5, show_default=True)
@click.option('--device',         help='Device to run on', type=click.Choice(['auto', 'cpu', 'cuda']), default='auto', show_default=True)
def main(**kwargs):
    """Morph between two taxa's generators at fixed latents.

    Writes strip-seedNNNN.png (one strip per latent, blend 0 to 1 from left to right), grid.png (all strips),
    morph.json, and with --classifier chart.png (and chart.pdf, chart.svg); with --save-video morph.mp4 or morph.gif.

    \b
    Examples:
    python morph.py --plan runs/copepoda --method descending --from-taxon Calanoida --to-taxon Cyclopoida --outdir out
    python morph.py --from calanoida.pkl --to cyclopoida.pkl --from-taxon Calanoida --to-taxon Cyclopoida \\
        --classifier taxon:taxon.pt --seeds 0-63 --outdir out
    python morph.py --from cond.pkl --from-class 0 --to-class 2 --outdir out
    """
    opts = dict(kwargs)
    seeds = cli.parse_range(opts['seeds'], '--seeds')
    device = cli.pick_device(opts['device'])
    ends, manifest = resolve_ends(opts)
    (name_a, pkl_a, class_a), (name_b, pkl_b, class_b) = ends
    from_plan = opts['plan'] is not None
    what_a = f'--from-taxon {name_a} ({pkl_a})' if from_plan else f'--from {pkl_a}'
    what_b = f'--to-taxon {name_b} ({pkl_b})' if from_plan else f'--to {pkl_b}'
    G_a = load_style_generator(pkl_a, device)
    G_b = G_a if os.path.abspath(pkl_b) == os.path.abspath(pkl_a) else load_style_generator(pkl_b, device)
    check_same_architecture(G_a, G_b, what_a, what_b)
    label_a = one_hot(G_a, class_a, what_a, '--from-class')
    label_b = one_hot(G_b, class_b, what_b, '--to-class')
    if G_a is G_b and (class_a == class_b):
        raise MorphError(f'{what_a}: both ends are the same network' + (' and class' if G_a.c_dim else '') +
                         ('; give --to PKL' if not G_a.c_dim else '; give another --to-class'))
    if G_a is not G_b and getattr(G_a, 'init_kwargs', None) != getattr(G_b, 'init_kwargs', None):
        click.echo(f'warning: {what_a} and {what_b} have the same tensors but different constructor options; '
                   f'the blend runs with those of {what_a}')
    detector = class_indices = None
    if opts['classifier'] is not None:
        if name_a is None or name_b is None:
            raise MorphError('--classifier needs the taxa of both ends: --from-taxon NAME and --to-taxon NAME')
        detector = resolve_detector(opts['classifier'])
        class_indices = classifier_classes(detector, name_a, name_b, manifest)
    try:
        os.makedirs(opts['outdir'], exist_ok=True)
    except OSError as exc:
        raise UserError(f'{opts["outdir"]}: cannot create the output folder: {exc.strerror}') from None

    steps = blend_steps(opts['num_steps'])
    images = morph_images(G_a, G_b, label_a, label_b, seeds, steps, truncation_psi=opts['truncation_psi'],
                          noise_mode=opts['noise_mode'], device=device, progress=True)      # [T, N, C, H, W]
    T, N = images.shape[:2]
    for n, seed in enumerate(seeds):
        save_png_atomic(to_pil(make_grid(images[:, n], (T, 1))), os.path.join(opts['outdir'], f'strip-seed{seed:04d}.png'))
    save_png_atomic(to_pil(make_grid(images.transpose(0, 1).flatten(0, 1), (T, N))), os.path.join(opts['outdir'], 'grid.png'))
    record = dict(format=MORPH_FORMAT, steps=steps, seeds=seeds, truncation_psi=opts['truncation_psi'],
                  noise_mode=opts['noise_mode'],
                  ends=[dict(taxon=name, pkl=os.path.abspath(pkl), **{'class': cls}) for name, pkl, cls in ends],
                  method=opts['method'] if from_plan else None)
    written = ['strips', 'grid.png', 'morph.json']
    if detector is not None:
        share_a, share_b = classifier_shares(detector, images, class_indices[0], class_indices[1], device)
        record['classifier'] = dict(spec=detector.spec, class_names=detector.class_names, classes=class_indices,
                                    share_a=share_a, share_b=share_b, num_images=N)
        chart = write_chart(os.path.join(opts['outdir'], 'chart.png'), steps, share_a, share_b, name_a, name_b, N)
        written += [os.path.basename(p) for p in chart.paths]
    write_json_atomic(os.path.join(opts['outdir'], 'morph.json'), record)
    if opts['save_video']:
        gw = math.ceil(math.sqrt(N))
        frames = (make_grid(step_images, (gw, math.ceil(N / gw))).transpose(1, 2, 0) for step_images in images)
        written.append(os.path.basename(write_video(frames, os.path.join(opts['outdir'], 'morph'), opts['fps'])))
    click.echo(f'wrote {", ".join(written)} to {opts["outdir"]}')


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
