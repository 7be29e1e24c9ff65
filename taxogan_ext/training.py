"""Training runs as train.py and train_hier.py make them: the options (declared once), the config they become, fine-tuning
and continuing from pickles, the run folder, and the training processes.

- `TrainingOptions`: every train.py option with its default, --help text, click type and metavar; `click_options()` adds
  them to a click command (train.py: all of them; train_hier.py: those it passes to every stage).
- `build_config`: options + dataset -> the plain dict written to training_options.json and given to the training loop.
- `resume_networks`, `continued_options`: fine-tuning takes a pickle's sizes; a continued run keeps its settings.
- `run_training`: what train.py does; `launch_training`: write training_options.json and train (one or several processes).
"""

import contextlib
import copy
import dataclasses
import inspect
import json
import os
import re
import shlex
import threading

import click
import torch

from stylegan2ada import cli, distributed
from stylegan2ada.dataset import DatasetError, ImageFolderDataset
from stylegan2ada.metrics.detectors import OFFLINE_ENV, DetectorError, resolve_detector
from stylegan2ada.metrics.metric_main import parse_metric_name
from stylegan2ada.networks import Discriminator, MappingNetwork, SynthesisNetwork
from stylegan2ada.pickles import MODULE_CLASSES, evaluation_network, load_network_pkl, tensor_mismatches
from stylegan2ada.training_loop import TrainingDivergedError, TrainingInterrupted, latest_snapshot, training_loop
from stylegan2ada.util import DiskFullError, UserError, disk_full_error, is_disk_full, write_json_atomic
from taxogan_ext import disk
from taxogan_ext import dcgan  # the DCGAN baseline (--model dcgan); importing it registers its classes for pickles
from taxogan_ext.augment_allow import describe as describe_augment
from taxogan_ext.augment_allow import parse_names as parse_aug_names
from taxogan_ext.augment_allow import resolve_augment_kwargs
from taxogan_ext.lecam import LECAM_HELP, LeCamRegularizer
# Registers the acc_taxon metric and the 'taxon' detector kind (--metrics, --detector taxon:PATH) in every training
# process, spawned ones included (they import this module for subprocess_fn).
from taxogan_ext import taxon_metrics  # noqa: F401

# NVIDIA's configuration presets (stylegan2-ada-pytorch); 'auto' is filled in from the resolution and --gpus.
CFG_SPECS = {
    'auto':      dict(ref_gpus=-1, kimg=25000,  mb=-1, mbstd=-1, fmaps=-1,  lrate=-1,     gamma=-1,   ema=-1,  ramp=0.05, map=2),
    'stylegan2': dict(ref_gpus=8,  kimg=25000,  mb=32, mbstd=4,  fmaps=1,   lrate=0.002,  gamma=10,   ema=10,  ramp=None, map=8),
    'paper256':  dict(ref_gpus=8,  kimg=25000,  mb=64, mbstd=8,  fmaps=0.5, lrate=0.0025, gamma=1,    ema=20,  ramp=None, map=8),
    'paper512':  dict(ref_gpus=8,  kimg=25000,  mb=64, mbstd=8,  fmaps=1,   lrate=0.0025, gamma=0.5,  ema=20,  ramp=None, map=8),
    'paper1024': dict(ref_gpus=8,  kimg=25000,  mb=32, mbstd=4,  fmaps=1,   lrate=0.002,  gamma=2,    ema=10,  ramp=None, map=8),
    'cifar':     dict(ref_gpus=2,  kimg=100000, mb=64, mbstd=32, fmaps=1,   lrate=0.0025, gamma=0.01, ema=500, ramp=0.05, map=2),
}
AUGPIPE_PRESETS = ('blit', 'geom', 'color', 'filter', 'noise', 'cutout', 'bg', 'bgc', 'bgcf', 'bgcfn', 'bgcfnc')

# Options that set the networks' sizes. Given explicitly they win; otherwise a fine-tuning run takes the sizes of the
# pickle it starts from (networks of other sizes would take only some of its tensors and train the rest from noise).
SIZE_OPTIONS = ('zdim', 'map', 'cbase', 'cmax', 'fp32', 'cond')

# When a run is continued, these describe the new invocation (where, from what, which data file, and --cuda-graphs,
# which needs the machine it runs on: a run continued elsewhere must not inherit it) ...
CONTINUE_INVOCATION = ('outdir', 'run_dir', 'data', 'resume', 'resume_mode', 'resume_partial', 'dry_run', 'cuda_graphs',
                       'no_space_check')
# ... these may be given anew (its length, what is reported, how fast it runs), else they stay as the run had them ...
CONTINUE_MAY_CHANGE = ('kimg', 'snap', 'tick', 'metrics', 'detector', 'device', 'workers', 'nobench', 'allow_tf32',
                       'keep_snaps')
# ... and every other one comes from the snapshot: giving it with another value is an error.


class TrainingSetupError(UserError):
    """train.py options, data or a pickle that cannot make a run (or not this run); one line naming the option."""


class RunStopped(UserError):
    """Training stopped by SIGINT or SIGTERM; the message says what was kept and how to continue."""

#----------------------------------------------------------------------------
# The options, declared once.

_option = cli.option_field


@dataclasses.dataclass
class TrainingOptions:
    """train.py's options, one field per --option ('_' for '-'); values as click gives them (typed, ranges checked)."""

    # Main options.
    outdir:         str | None   = _option(None, 'Where to make the run folder (outdir/NNNNN-desc)', click.STRING, 'DIR')
    run_dir:        str | None   = _option(None, 'Exact run folder instead of --outdir; if it holds snapshots, training resumes from the newest', click.STRING, 'DIR')
    data:           str | None   = _option(None, 'Training data (.zip or folder of square PNG/JPEG images)', click.STRING, '[ZIP|DIR]', required=True)
    gpus:           int          = _option(1, 'Number of processes (GPUs, or CPU processes with gloo)', click.IntRange(min=1), 'INT')
    model:          str          = _option('stylegan2', 'Network family: StyleGAN2 or the DCGAN baseline', click.Choice(['stylegan2', 'dcgan']))
    cfg:            str          = _option('auto', 'Base configuration (NVIDIA presets)', click.Choice(sorted(CFG_SPECS)))
    cond:           bool         = _option(help='Train a class-conditional network (labels from dataset.json)')
    subset:         int | None   = _option(None, 'Train on a random subset of this many images', click.IntRange(min=1), 'INT')
    mirror:         bool         = _option(help='Enable dataset x-flips')
    seed:           int          = _option(0, 'Random seed', click.IntRange(min=0), 'INT')
    dry_run:        bool         = _option(help='Print the training options and exit')
    # Hyperparameters.
    kimg:           float | None = _option(None, 'Training length in thousands of images [default: from --cfg]', click.FloatRange(min=0, min_open=True), 'KIMG')
    batch:          int | None   = _option(None, 'Total batch size [default: from --cfg]', click.IntRange(min=1), 'INT')
    batch_gpu:      int | None   = _option(None, 'Batch size per process and round (gradient accumulation) [default: batch / gpus]', click.IntRange(min=1), 'INT')
    gamma:          float | None = _option(None, 'R1 regularization weight [default: from --cfg]', click.FloatRange(min=0), 'FLOAT')
    zdim:           int          = _option(512, 'Latent (z and w) dimensionality', click.IntRange(min=1), 'INT')
    cbase:          int | None   = _option(None, 'Capacity multiplier (channel_base) [default: from --cfg]', click.IntRange(min=1), 'INT')
    cmax:           int | None   = _option(None, 'Max. feature maps per layer [default: 512]', click.IntRange(min=1), 'INT')
    map:            int | None   = _option(None, 'Mapping network depth [default: from --cfg]', click.IntRange(min=1), 'INT')
    glr:            float | None = _option(None, 'G learning rate [default: from --cfg]', click.FloatRange(min=0, min_open=True), 'FLOAT')
    dlr:            float | None = _option(None, 'D learning rate [default: from --cfg]', click.FloatRange(min=0, min_open=True), 'FLOAT')
    mbstd_group:    int | None   = _option(None, 'Minibatch std group size [default: from --cfg]', click.IntRange(min=1), 'INT')
    freezed:        int          = _option(0, 'Freeze-D: freeze the first N layers of D (from the highest resolution)', click.IntRange(min=0), 'INT')
    lecam_weight:   float        = _option(0, 'LeCam regularization weight (0 = off). ' + LECAM_HELP, click.FloatRange(min=0), 'FLOAT')
    lecam_decay:    float        = _option(0.99, 'Decay of the LeCam EMAs of the real and fake logits', click.FloatRange(min=0, max=1, max_open=True), 'FLOAT')
    lecam_start_kimg: float      = _option(0, 'Apply LeCam from this kimg on', click.FloatRange(min=0), 'KIMG')
    # Augmentation.
    aug:            str          = _option('ada', 'Augmentation mode', click.Choice(['ada', 'noaug', 'fixed']))
    p:              float | None = _option(None, 'Augmentation probability for --aug fixed (initial p for ada)', click.FloatRange(min=0, max=1), 'FLOAT')
    target:         float        = _option(0.6, 'ADA target value for r_t', click.FloatRange(min=0, max=1), 'FLOAT')
    augpipe:        str | None   = _option(None, 'Augmentation pipeline preset [default: bgc]', click.Choice(list(AUGPIPE_PRESETS)))
    aug_allow:      str | None   = _option(None, 'Keep only these transforms (comma list; sets leakfree-color, leakfree-geom)', click.STRING, 'LIST')
    aug_deny:       str | None   = _option(None, 'Remove these transforms (comma list)', click.STRING, 'LIST')
    # Transfer learning.
    resume:         str | None   = _option(None, 'Resume from a network pickle (ours or NVIDIA\'s) or a run folder (its newest snapshot)', click.STRING, '[PKL|DIR]')
    resume_mode:    str          = _option('auto', 'full = continue the run (progress, optimizers, p); weights = fine-tune from 0; auto = full for our snapshots', click.Choice(['auto', 'full', 'weights']))
    resume_partial: bool         = _option(help='Fine-tuning: copy the tensors whose names and shapes match, start the others from random values (NVIDIA\'s behaviour); without it, that is an error')
    # Evaluation and I/O.
    metrics:        str          = _option('none', 'Metrics at each snapshot (comma list, or none)', click.STRING, 'LIST')
    detector:       str          = _option('inception', 'Feature detector for the metrics: inception, taxon:PATH or a TorchScript path', click.STRING, 'NAME')
    snap:           int          = _option(50, 'Snapshot interval in ticks', click.IntRange(min=1), 'TICKS')
    keep_snaps:     int | None   = _option(None, 'Keep the newest N network snapshots, plus the best by the first --metrics and the final one; older ones are deleted once a newer one is complete  [default: all; train_hier.py: 1]', click.IntRange(min=1), 'N')
    no_space_check: bool         = _option(help='Start even when the free disk space is below the estimate of what the run will write (see --dry-run)')
    tick:           float        = _option(4, 'Progress report interval in kimg', click.FloatRange(min=0, min_open=True), 'KIMG')
    # Performance-related.
    device:         str          = _option('auto', 'Device', click.Choice(['auto', 'cpu', 'cuda']))
    fp32:           bool         = _option(help='Disable mixed precision (always on CPU)')
    nhwc:           bool         = _option(help='channels_last for fp16 layers')
    allow_tf32:     bool         = _option(help='Allow TF32 for convolutions and matmul')
    nobench:        bool         = _option(help='Disable cuDNN benchmarking')
    cuda_graphs:    bool         = _option(help='Replay each training phase as one CUDA graph (one GPU; cuts the host\'s kernel-launch time, docs/benchmarks.md)')
    workers:        int | None   = _option(None, 'DataLoader worker processes [default: 3 on CUDA, 0 on CPU]', click.IntRange(min=0), 'INT')

    def __post_init__(self):
        # Values as click gives them (--tick's default 4 becomes 4.0), so that options built here and parsed ones are
        # equal, and training_options.json reads the same either way.
        cli.typed_values(self)

    def as_dict(self):
        """{option name: value}, sorted by name (as training_options.json stores them)."""
        return {name: value for name, value in sorted(dataclasses.asdict(self).items())}


def option_names():
    """Field names of TrainingOptions, in declaration (--help) order."""
    return [field.name for field in dataclasses.fields(TrainingOptions)]


def click_options(
    exclude = (),       # field names the command does not offer (it sets them itself)
):
    """Decorator adding TrainingOptions' fields to a click command as --options, in declaration order."""
    unknown = set(exclude) - set(option_names())
    assert not unknown, f'not training options: {sorted(unknown)}'
    return cli.dataclass_options(TrainingOptions, exclude)

#----------------------------------------------------------------------------
# Options -> config.

def cfg_spec(cfg, resolution, gpus):
    """The preset's values; 'auto' derives batch, gamma and EMA from the resolution as NVIDIA does."""
    spec = dict(CFG_SPECS[cfg])
    if cfg == 'auto':
        spec['ref_gpus'] = gpus
        spec['mb'] = max(min(gpus * min(4096 // resolution, 32), 64), gpus)
        spec['mbstd'] = min(spec['mb'] // gpus, 4)
        spec['fmaps'] = 1 if resolution >= 512 else 0.5
        spec['lrate'] = 0.002 if resolution >= 1024 else 0.0025
        spec['gamma'] = 0.0002 * (resolution ** 2) / spec['mb']
        spec['ema'] = spec['mb'] * 10 / 32
    return spec


def batch_sizes(
    opts,               # TrainingOptions
    spec,               # cfg_spec() of the run
):
    """(total batch, batch per process and round, minibatch-std group) from the options and the preset."""
    gpus = opts.gpus
    batch = opts.batch if opts.batch is not None else spec['mb']
    if batch % gpus != 0:
        raise TrainingSetupError(f'--batch {batch} must be a multiple of --gpus {gpus}')
    # As NVIDIA: a preset's batch is split over its reference GPU count (gradient accumulation on fewer), --batch over --gpus.
    batch_gpu = opts.batch_gpu if opts.batch_gpu is not None else (batch // gpus if opts.batch is not None else
                                                                  min(batch // gpus, max(spec['mb'] // spec['ref_gpus'], 1)))
    if batch % (batch_gpu * gpus) != 0:
        raise TrainingSetupError(f'--batch {batch} must be a multiple of --batch-gpu x --gpus = {batch_gpu * gpus}')
    # Default group: the largest divisor of the per-process batch not above the preset's.
    mbstd = opts.mbstd_group if opts.mbstd_group is not None else max(g for g in range(1, min(spec['mbstd'], batch_gpu) + 1) if batch_gpu % g == 0)
    if batch_gpu % mbstd != 0:
        raise TrainingSetupError(f'--mbstd-group {mbstd} must divide the per-process batch {batch_gpu}')
    return batch, batch_gpu, mbstd


def _class_name(cls):
    return f'{cls.__module__}.{cls.__qualname__}'


def dcgan_config(
    opts,               # TrainingOptions with --model dcgan
):
    """The DCGAN baseline's networks, optimizers and loss (no augmentation, LeCam or Freeze-D), config entries in order."""
    for name in ('lecam_weight', 'aug_allow', 'aug_deny', 'augpipe', 'freezed'):
        if getattr(opts, name):
            raise TrainingSetupError(f'--{name.replace("_", "-")} applies to StyleGAN2 only: the DCGAN baseline has no '
                                     f'augmentation, LeCam or Freeze-D')
    defaults = dcgan.DCGAN_DEFAULTS
    width = opts.cbase // 64 if opts.cbase else 64
    return dict(
        G_class=_class_name(dcgan.DCGANGenerator), D_class=_class_name(dcgan.DCGANDiscriminator),
        G_kwargs=dict(z_dim=100, ngf=width), D_kwargs=dict(ndf=width),
        G_opt_kwargs=dict(defaults['G_opt']), D_opt_kwargs=dict(defaults['D_opt']),
        loss_kwargs=dict(r1_gamma=defaults['r1_gamma'], pl_weight=defaults['pl_weight'], style_mixing_prob=defaults['style_mixing_prob']),
        ema_kimg=defaults['ema_kimg'], ema_rampup=None, G_reg_interval=None, D_reg_interval=None,
        augment_kwargs=None, augment_p=0, ada_target=None, augment_names=[],
    )


def stylegan2_config(
    opts,               # TrainingOptions with --model stylegan2
    spec,               # cfg_spec() of the run
    mbstd,              # minibatch-std group size
    fp32,               # no mixed precision (given, or on the CPU)
):
    """StyleGAN2's networks, optimizers, loss and augmentation, config entries in order."""
    channel_base = opts.cbase if opts.cbase is not None else int(spec['fmaps'] * 32768)
    channel_max = opts.cmax if opts.cmax is not None else 512
    precision = dict(num_fp16_res=0 if fp32 else 4, conv_clamp=None if fp32 else 256)
    c = dict(G_class='stylegan2ada.networks.Generator', D_class='stylegan2ada.networks.Discriminator')
    c['G_kwargs'] = dict(z_dim=opts.zdim, w_dim=opts.zdim,
                         mapping_kwargs=dict(num_layers=opts.map if opts.map is not None else spec['map']),
                         synthesis_kwargs=dict(channel_base=channel_base, channel_max=channel_max, **precision))
    c['D_kwargs'] = dict(architecture='orig' if opts.cfg == 'cifar' else 'resnet', channel_base=channel_base,
                         channel_max=channel_max, **precision, block_kwargs=dict(freeze_layers=opts.freezed), mapping_kwargs={},
                         epilogue_kwargs=dict(mbstd_group_size=mbstd))
    if opts.nhwc:
        c['G_kwargs']['synthesis_kwargs']['fp16_channels_last'] = True
        c['D_kwargs']['block_kwargs']['fp16_channels_last'] = True
    glr = opts.glr if opts.glr is not None else spec['lrate']
    dlr = opts.dlr if opts.dlr is not None else spec['lrate']
    c['G_opt_kwargs'] = dict(lr=glr, betas=[0, 0.99], eps=1e-8)
    c['D_opt_kwargs'] = dict(lr=dlr, betas=[0, 0.99], eps=1e-8)
    c['loss_kwargs'] = dict(r1_gamma=opts.gamma if opts.gamma is not None else spec['gamma'])
    if opts.cfg == 'cifar':
        c['loss_kwargs'].update(pl_weight=0, style_mixing_prob=0)
    c['ema_kimg'] = spec['ema']
    c['ema_rampup'] = spec['ramp']
    c['G_reg_interval'], c['D_reg_interval'] = 4, 16
    c.update(augment_config(opts))
    c['lecam_kwargs'] = dict(weight=opts.lecam_weight, decay=opts.lecam_decay, start_kimg=opts.lecam_start_kimg)
    return c


def augment_config(
    opts,               # TrainingOptions with --model stylegan2
):
    """augment_kwargs, augment_names, augment_p and ada_target: --aug says how p evolves, --augpipe / --aug-allow /
    --aug-deny which transforms."""
    if opts.aug == 'noaug':
        if opts.aug_allow or opts.aug_deny:
            raise TrainingSetupError('--aug-allow/--aug-deny need augmentation: use --aug ada or --aug fixed')
        return dict(augment_kwargs=None, augment_names=[], augment_p=0, ada_target=None)
    # --aug-allow alone picks from all transforms; otherwise the preset (default bgc) is filtered.
    augpipe = opts.augpipe or (None if opts.aug_allow else 'bgc')
    augment_kwargs = resolve_augment_kwargs(augpipe, opts.aug_allow, opts.aug_deny)
    if opts.aug_deny:
        # A deny list names transforms to remove; one naming only absent ones would silently do nothing.
        chosen = resolve_augment_kwargs(augpipe, opts.aug_allow, None)
        if not parse_aug_names(opts.aug_deny, 'aug-deny') & set(chosen):
            raise TrainingSetupError(f'--aug-deny {opts.aug_deny}: none of these is among the chosen transforms '
                                     f'({describe_augment(chosen)}); nothing to remove')
    c = dict(augment_kwargs=augment_kwargs, augment_names=[name for name, v in augment_kwargs.items() if v])
    if opts.aug == 'ada':
        c['augment_p'] = opts.p if opts.p is not None else 0
        c['ada_target'] = opts.target
    else:
        if opts.p is None:
            raise TrainingSetupError('--aug fixed needs --p (the fixed augmentation probability)')
        c['augment_p'] = opts.p
        c['ada_target'] = None
    return c


def build_config(
    opts,                   # TrainingOptions
    training_set,           # the ImageFolderDataset they name
    fine_tuning     = None, # NVIDIA's fine-tuning settings (faster ADA, no EMA ramp-up); None = when starting from a pickle's weights
):
    """All training settings as one plain, JSON-serialisable dict (written to training_options.json)."""
    spec = cfg_spec(opts.cfg, training_set.resolution, opts.gpus)
    batch, batch_gpu, mbstd = batch_sizes(opts, spec)
    device = cli.pick_device(opts.device).type
    fp32 = opts.fp32 or device == 'cpu'

    c = dict(model=opts.model, device=device, num_gpus=opts.gpus, random_seed=opts.seed)
    c['options'] = opts.as_dict()       # as given: a continued run starts from these
    c['training_set_kwargs'] = dict(path=opts.data, use_labels=opts.cond, max_size=opts.subset, xflip=opts.mirror,
                                    resolution=training_set.resolution, random_seed=opts.seed)
    workers = opts.workers if opts.workers is not None else (3 if device == 'cuda' else 0)
    c['data_loader_kwargs'] = dict(num_workers=workers, pin_memory=(device == 'cuda'), **({'prefetch_factor': 2} if workers > 0 else {}))
    c['batch_size'] = batch
    c['batch_gpu'] = batch_gpu
    c['total_kimg'] = opts.kimg if opts.kimg is not None else spec['kimg']
    c['kimg_per_tick'] = opts.tick
    c['image_snapshot_ticks'] = c['network_snapshot_ticks'] = opts.snap
    c['keep_snapshots'] = opts.keep_snaps
    c['metrics'] = [m for m in opts.metrics.split(',') if m and m != 'none']
    for metric in c['metrics']:
        parse_metric_name(metric)           # MetricError lists the valid forms
    c['detector'] = opts.detector
    c['cudnn_benchmark'] = not opts.nobench
    c['allow_tf32'] = opts.allow_tf32
    if opts.cuda_graphs and (device != 'cuda' or opts.gpus != 1):
        raise TrainingSetupError(f'--cuda-graphs needs one CUDA GPU (here --gpus {opts.gpus} on {device})')
    c['phase_graphs'] = 'cuda' if opts.cuda_graphs else None
    c.update(dcgan_config(opts) if opts.model == 'dcgan' else stylegan2_config(opts, spec, mbstd, fp32))
    if opts.model == 'stylegan2' and training_set.resolution < 8:
        # Checked here, not by the discriminator when the run starts: a one-line error before the run folder is made.
        raise TrainingSetupError(f'{opts.data}: {training_set.resolution} px images; StyleGAN2\'s discriminator needs at least 8 px')

    c['ada_kimg'] = 500
    c['resume_pkl'] = opts.resume
    c['resume_mode'] = opts.resume_mode
    c['resume_partial'] = bool(opts.resume_partial)
    c['fine_tuning'] = fine_tuning if fine_tuning is not None else (opts.resume is not None and c['resume_mode'] != 'full')
    if c['fine_tuning']:
        c['ada_kimg'] = 100          # fine-tuning: let ADA react faster, as NVIDIA does
        c['ema_rampup'] = None       # and no EMA ramp-up: the network is already trained
    return c

#----------------------------------------------------------------------------
# Fine-tuning: the networks take the sizes of the pickle they start from.

def _without_data_kwargs(init_kwargs):
    """A network's init kwargs without those the dataset decides (labels, resolution, channels), copied."""
    return {k: copy.deepcopy(v) for k, v in init_kwargs.items() if k not in ('c_dim', 'img_resolution', 'img_channels')}


def _default(cls, name):
    return inspect.signature(cls).parameters[name].default


def _check_fine_tuning_pickle(
    config,         # build_config's dict (model, G_class, D_class)
    resume_data,    # load_network_pkl() of the pickle
    resume_pkl,     # its path (for messages)
    training_set,   # the dataset (resolution, channels)
    data,           # the dataset's path (for messages)
):
    """The pickle's (G_ema else G, D) and the classes this run trains; TrainingSetupError when it cannot be fine-tuned."""
    for key in ('G', 'D', 'G_ema'):
        if resume_data.get(key) is None:
            raise TrainingSetupError(f'{resume_pkl}: the pickle has no {key}; fine-tuning needs G, D and G_ema')
    G_src, D_src = evaluation_network(resume_data), resume_data['D']
    G_cls, D_cls = MODULE_CLASSES[config['G_class']], MODULE_CLASSES[config['D_class']]
    if type(G_src) is not G_cls or type(D_src) is not D_cls:
        raise TrainingSetupError(f'{resume_pkl}: holds a {type(G_src).__name__} and a {type(D_src).__name__}, but --model '
                                 f'{config["model"]} trains a {G_cls.__name__} and a {D_cls.__name__}')
    if (G_src.img_resolution, G_src.img_channels) != (training_set.resolution, training_set.num_channels):
        raise TrainingSetupError(f'{resume_pkl}: its networks make {G_src.img_resolution} px images with {G_src.img_channels} '
                                 f'channel(s), but {data} holds {training_set.resolution} px images with '
                                 f'{training_set.num_channels} channel(s)')
    return G_src, D_src, G_cls, D_cls


def _dcgan_sizes(
    config,         # build_config's dict: the sizes the options ask for
    G_kwargs,       # the pickle's G kwargs, updated in place
    D_kwargs,       # the pickle's D kwargs, updated in place
    given,          # names of the options given explicitly
    differs,        # list to which given sizes that differ from the pickle's are appended (for messages)
):
    """Apply a given --cbase to the pickle's DCGAN kwargs (in place); returns the sizes part of the networks line."""
    ours_G, ours_D = config['G_kwargs'], config['D_kwargs']
    if 'cbase' in given:
        if ours_G['ngf'] != G_kwargs['ngf']:
            differs.append(f'--cbase {ours_G["ngf"] * 64} (pickle: {G_kwargs["ngf"] * 64})')
        G_kwargs['ngf'], D_kwargs['ndf'] = ours_G['ngf'], ours_D['ndf']
    return f'DCGAN, z_dim {G_kwargs["z_dim"]}, ngf {G_kwargs["ngf"]}, ndf {D_kwargs["ndf"]}'


def _stylegan2_sizes(
    config,         # build_config's dict: the sizes the options ask for
    G_kwargs,       # the pickle's G kwargs, updated in place
    D_kwargs,       # the pickle's D kwargs, updated in place
    G_cls,          # generator class (its defaults apply where the pickle omits a kwarg)
    given,          # names of the options given explicitly
    differs,        # list to which given sizes that differ from the pickle's are appended (for messages)
    label_dim,      # the dataset's number of classes (for the line)
):
    """Apply the given size options and this run's training settings to the pickle's StyleGAN2 kwargs (in place);
    returns the sizes part of the networks line."""
    ours_G, ours_D = config['G_kwargs'], config['D_kwargs']
    mapping = G_kwargs['mapping_kwargs'] = dict(G_kwargs.get('mapping_kwargs') or {})
    synthesis = G_kwargs['synthesis_kwargs'] = dict(G_kwargs.get('synthesis_kwargs') or {})
    ours_synthesis = ours_G['synthesis_kwargs']
    # (option, kwarg, the pickle's kwargs, ours, the class whose default applies when the pickle omits the kwarg)
    sized = [('zdim', 'z_dim', G_kwargs, ours_G, G_cls),
             ('map', 'num_layers', mapping, ours_G['mapping_kwargs'], MappingNetwork),
             ('cbase', 'channel_base', synthesis, ours_synthesis, SynthesisNetwork),
             ('cmax', 'channel_max', synthesis, ours_synthesis, SynthesisNetwork)]
    for option, key, theirs, ours, cls in sized:
        if option in given:
            pickle_value = theirs.get(key, _default(cls, key))
            if ours[key] != pickle_value:
                differs.append(f'--{option} {ours[key]} (pickle: {pickle_value})')
            theirs[key] = ours[key]
    if 'zdim' in given:
        G_kwargs['w_dim'] = ours_G['w_dim']
    for option, key in (('cbase', 'channel_base'), ('cmax', 'channel_max')):
        if option in given:
            D_kwargs[key] = ours_D[key]
    if 'fp32' in given:
        for theirs, ours in ((synthesis, ours_synthesis), (D_kwargs, ours_D)):
            theirs['num_fp16_res'], theirs['conv_clamp'] = ours['num_fp16_res'], ours['conv_clamp']
    # How this run trains, not what the networks are: channels_last, Freeze-D, and the minibatch-std group
    # (it must divide this run's per-process batch).
    synthesis.pop('fp16_channels_last', None)
    synthesis.update({k: v for k, v in ours_synthesis.items() if k == 'fp16_channels_last'})
    D_kwargs['block_kwargs'] = {k: v for k, v in (D_kwargs.get('block_kwargs') or {}).items() if k != 'fp16_channels_last'}
    D_kwargs['block_kwargs'].update(ours_D['block_kwargs'])
    D_kwargs['epilogue_kwargs'] = dict(D_kwargs.get('epilogue_kwargs') or {},
                                       mbstd_group_size=ours_D['epilogue_kwargs']['mbstd_group_size'])
    return (f'z_dim {G_kwargs["z_dim"]}, w_dim {G_kwargs["w_dim"]}, '
            f'mapping {mapping.get("num_layers", _default(MappingNetwork, "num_layers"))} layers, '
            f'channel_base {synthesis.get("channel_base", _default(SynthesisNetwork, "channel_base"))}, '
            f'channel_max {synthesis.get("channel_max", _default(SynthesisNetwork, "channel_max"))}, '
            f'fp16 resolutions {synthesis.get("num_fp16_res", 0)}, conv_clamp {synthesis.get("conv_clamp")}, '
            f'c_dim {label_dim}, '
            f'D architecture {D_kwargs.get("architecture", _default(Discriminator, "architecture"))}')


def _untransferred_tensors(
    resume_data,    # load_network_pkl() of the pickle
    G_cls,          # generator class of this run
    D_cls,          # discriminator class of this run
    G_kwargs,       # the generator's kwargs (without the dataset's)
    D_kwargs,       # the discriminator's kwargs (without the dataset's)
    training_set,   # the dataset (labels, resolution, channels)
):
    """{'G' | 'D' | 'G_ema': (unfilled, unused)} for the networks whose tensors do not all transfer from the pickle."""
    # Built on the meta device, the networks cost no memory to compare.
    common = dict(c_dim=training_set.label_dim, img_resolution=training_set.resolution, img_channels=training_set.num_channels)
    with torch.device('meta'):
        G_new, D_new = G_cls(**G_kwargs, **common), D_cls(**D_kwargs, **common)
    untransferred = {}
    for key, new in (('G', G_new), ('D', D_new), ('G_ema', G_new)):
        unfilled, unused = tensor_mismatches(resume_data[key], new)
        if unfilled or unused:
            untransferred[key] = (unfilled, unused)
    return untransferred


def resume_networks(
    config,         # build_config's dict; its G_kwargs and D_kwargs are replaced by the pickle's sizes
    resume_data,    # load_network_pkl() of the pickle being fine-tuned
    resume_pkl,     # its path (for messages)
    given,          # names of the options given explicitly: those in SIZE_OPTIONS win over the pickle's sizes
    training_set,   # the dataset (resolution, channels, label dim)
    data,           # the dataset's path (for messages)
):
    """Take the networks' sizes from a pickle being fine-tuned and check that every tensor transfers; returns the line
    'networks from X.pkl: ...' that says which sizes were used."""
    G_src, D_src, G_cls, D_cls = _check_fine_tuning_pickle(config, resume_data, resume_pkl, training_set, data)
    G_kwargs, D_kwargs = _without_data_kwargs(G_src.init_kwargs), _without_data_kwargs(D_src.init_kwargs)
    differs = []                # given sizes that differ from the pickle's, for the error message
    if config['model'] == 'dcgan':
        sizes = _dcgan_sizes(config, G_kwargs, D_kwargs, given, differs)
    else:
        sizes = _stylegan2_sizes(config, G_kwargs, D_kwargs, G_cls, given, differs, training_set.label_dim)
    config['G_kwargs'], config['D_kwargs'] = G_kwargs, D_kwargs

    untransferred = _untransferred_tensors(resume_data, G_cls, D_cls, G_kwargs, D_kwargs, training_set)
    if G_src.c_dim != training_set.label_dim:
        differs.append(f'the pickle is conditional with {G_src.c_dim} classes, this run has {training_set.label_dim} (it needs '
                       f'--cond and {G_src.c_dim} classes in dataset.json)' if G_src.c_dim else
                       f'the pickle is unconditional, this run has {training_set.label_dim} classes')
    given_sizes = [f'--{option}' for option in (('cbase',) if config['model'] == 'dcgan' else SIZE_OPTIONS) if option in given]
    line = f'networks from {os.path.basename(resume_pkl)}: {sizes}'
    if given_sizes:
        line += f' (given: {", ".join(given_sizes)})'
    if untransferred:
        counts = ', '.join(f"{key} {len(unfilled)} left at random initialisation and {len(unused)} of the pickle's unused"
                           for key, (unfilled, unused) in untransferred.items())
        if not config['resume_partial']:
            first = [f'{key}.{what}' for key, (unfilled, unused) in untransferred.items() for what in unfilled + unused]
            raise TrainingSetupError(f'{resume_pkl}: not every tensor would transfer ({counts}: {"; ".join(first[:4])}'
                                     f'{"; ..." if len(first) > 4 else ""}){"; " + ", ".join(differs) if differs else ""}; '
                                     f'give the pickle\'s sizes, or --resume-partial to copy only the matching tensors '
                                     f'(NVIDIA\'s behaviour)')
        line += f'; partial transfer: {counts}'
    return line

#----------------------------------------------------------------------------
# Continuing a run.

def continue_command(run_dir, data):
    """The command line that continues the run in run_dir (its settings come from the snapshot)."""
    return f'python train.py --run-dir {shlex.quote(run_dir)} --data {shlex.quote(data)}'


def continued_options(
    opts,           # TrainingOptions of this command
    saved,          # {option name: value} the snapshot's run was started with
    given,          # names of the options given on this command line
    source,         # the snapshot (for messages)
):
    """The options of a continued run: the saved ones, except this invocation's and those of CONTINUE_MAY_CHANGE given anew."""
    merged = dataclasses.asdict(opts)
    for name, value in saved.items():
        if name not in merged or name in CONTINUE_INVOCATION or (name in CONTINUE_MAY_CHANGE and name in given):
            continue
        if name in given and merged[name] != value:
            flag = '--' + name.replace('_', '-')
            raise TrainingSetupError(f'{source}: this run was trained with {flag} {value}, not {merged[name]}; continuing it '
                                     f'keeps its settings (start a new run with --resume-mode weights to fine-tune with other ones)')
        merged[name] = value
    return TrainingOptions(**merged)


def resolve_resume(
    opts,           # TrainingOptions; resume and resume_mode are set in place
):
    """--resume FOLDER means its newest snapshot; --run-dir with snapshots and no --resume continues the newest."""
    if opts.resume is not None:
        if os.path.isdir(opts.resume):
            snap = latest_snapshot(opts.resume)
            if snap is None:
                raise TrainingSetupError(f'{opts.resume}: no network-snapshot-*.pkl in this folder')
            opts.resume = snap
        elif not os.path.isfile(opts.resume):
            raise TrainingSetupError(f'{opts.resume}: no such file or folder')
    if opts.run_dir is not None and opts.resume is None:
        snap = latest_snapshot(opts.run_dir)
        if snap is not None:
            opts.resume, opts.resume_mode = snap, 'full'


def resume_state(
    opts,           # TrainingOptions with resolve_resume() applied
    given,          # names of the options given explicitly
):
    """(options, fine_tuning, fine-tuned pickle's contents or None, G_kwargs/D_kwargs of the continued run) of a run that
    starts from --resume; a continued run takes its saved options."""
    fine_tuning = None
    fine_tune_data = None       # the pickle's contents when fine-tuning (its networks' sizes are taken)
    continued_networks = {}     # G_kwargs and D_kwargs of the run being continued (its networks as they are)
    if opts.resume is None:
        return opts, fine_tuning, fine_tune_data, continued_networks
    resume_data = load_network_pkl(opts.resume)
    progress = resume_data.get('progress')
    if opts.resume_mode == 'full' and progress is None:
        raise TrainingSetupError(f'{opts.resume}: --resume-mode full needs one of our snapshots (this pickle has no training progress)')
    if opts.resume_mode == 'auto':
        # Decided here, not in the loop, so that a continued run keeps its settings (no fine-tuning overrides).
        opts.resume_mode = 'full' if progress is not None else 'weights'
    saved = (progress or {}).get('training_options') or {}
    if opts.resume_mode == 'full' and 'options' in saved:
        opts = continued_options(opts, saved['options'], given, opts.resume)
        fine_tuning = saved.get('fine_tuning')
        # Not rebuilt from the options: a run that fine-tuned a pickle has that pickle's sizes, not the options'.
        continued_networks = {key: copy.deepcopy(saved[key]) for key in ('G_kwargs', 'D_kwargs') if key in saved}
    if opts.resume_mode == 'weights':
        fine_tune_data = resume_data
    return opts, fine_tuning, fine_tune_data, continued_networks


def open_training_set(
    opts,           # TrainingOptions; cond is set in place when a conditional pickle is fine-tuned
    fine_tune_data, # the fine-tuned pickle's contents; None = not fine-tuning
    given,          # names of the options given explicitly
):
    """The dataset, checked once here so that bad data fails in one line before anything starts."""
    training_set = ImageFolderDataset(path=opts.data, use_labels=opts.cond, max_size=opts.subset, xflip=opts.mirror)
    if opts.cond and not training_set.has_labels:
        raise DatasetError(f'{opts.data}: --cond needs labels in dataset.json')
    if fine_tune_data is not None and 'cond' not in given and not opts.cond:
        # A conditional pickle stays conditional when the dataset has labels for its classes (c_dim is one of its sizes).
        pickle_c_dim = evaluation_network(fine_tune_data).c_dim
        if pickle_c_dim > 0:
            labelled = ImageFolderDataset(path=opts.data, use_labels=True, max_size=opts.subset, xflip=opts.mirror)
            if labelled.label_dim == pickle_c_dim:
                opts.cond, training_set = True, labelled
    return training_set

#----------------------------------------------------------------------------
# The run folder and the run.

def run_description(opts, config, dataset_name):
    """NVIDIA-style run folder suffix, e.g. Calanoida-auto-gamma0.5-kimg2-batch8-ada-bgc."""
    desc = f'{dataset_name}-{"cond-" if opts.cond else ""}{opts.model if opts.model != "stylegan2" else opts.cfg}'
    desc += f'-kimg{config["total_kimg"]:g}-batch{config["batch_size"]}'
    if opts.model == 'stylegan2':
        desc += f'-gamma{config["loss_kwargs"]["r1_gamma"]:g}-{opts.aug}'
        if config['augment_names']:
            desc += '-' + (opts.augpipe or ('allow' if opts.aug_allow else 'bgc'))
        if opts.lecam_weight:
            desc += f'-lecam{opts.lecam_weight:g}'
        if opts.freezed:
            desc += f'-freezed{opts.freezed}'
    if opts.resume:
        desc += '-resume'
    return re.sub(r'[^A-Za-z0-9_.+-]', '_', desc)


def next_run_dir(outdir, desc):
    """outdir/NNNNN-desc with the next free run id."""
    ids = [int(m.group(1)) for name in (os.listdir(outdir) if os.path.isdir(outdir) else []) if (m := re.match(r'^(\d+)-', name))]
    return os.path.join(outdir, f'{max(ids, default=-1) + 1:05d}-{desc}')


def _print_summary(config, opts, run_dir, training_set):
    click.echo(f'Training options:\n{json.dumps(config, indent=2)}\n')
    click.echo(f'Output directory:    {run_dir}')
    click.echo(f'Dataset:             {opts.data} ({len(training_set)} images, {training_set.resolution} px, {training_set.num_channels} ch)')
    click.echo(f'Model:               {config["model"]} on {config["device"]}, {config["num_gpus"]} process(es), batch {config["batch_size"]}')
    click.echo(f'Augmentations:       {describe_augment(config["augment_kwargs"]) if config["augment_kwargs"] else "none"}')
    if config.get('networks_from'):
        click.echo(config['networks_from'])


def train_until_stopped(
    config,                     # build_config's dict, run_dir set
    run_dir,                    # the run folder
    data,                       # the dataset's path (for the continue command)
    progress_callback = None,   # f(cur_nimg, total_nimg) each tick (single process only); None = nothing
):
    """launch_training, with SIGINT and SIGTERM stopping it (the loop writes a snapshot); returns the final snapshot."""
    try:
        with cli.stop_signals():
            return launch_training(config, run_dir, progress_callback)
    except TrainingInterrupted as exc:
        raise RunStopped(f'{exc}; continue with: {continue_command(run_dir, data)}') from None
    except KeyboardInterrupt:
        # Stopped outside the loop's steps (while the networks were being built): nothing new to save.
        snapshot = latest_snapshot(run_dir)
        if snapshot is None:
            raise RunStopped('interrupted before the first snapshot: nothing to continue from') from None
        raise RunStopped(f'interrupted; newest snapshot {snapshot}; continue with: {continue_command(run_dir, data)}') from None
    except TrainingDivergedError as exc:
        raise TrainingDivergedError(f'training diverged: {exc}') from None
    except (DiskFullError, OSError) as exc:
        if not isinstance(exc, DiskFullError) and not is_disk_full(exc):
            raise
        raise DiskFullError(f'{disk_full_text(exc)}; {disk_full_hint(run_dir, data)}') from None


def disk_full_text(exc):
    """The one-line text of a DiskFullError, or of an OSError saying the disk is full (naming its file)."""
    return str(exc) if isinstance(exc, DiskFullError) else str(disk_full_error(exc.filename or '.'))


def disk_full_hint(run_dir, data):
    """What to run once space is freed: the command continuing the run from its newest snapshot (or starting it again)."""
    snapshot = latest_snapshot(run_dir)
    if snapshot is None:
        return 'no snapshot was written yet: once space is freed, run the same command again'
    return f'once space is freed, continue from {os.path.basename(snapshot)} with: {continue_command(run_dir, data)}'


def run_estimate(
    config,             # build_config's dict of the run (run_dir set)
    training_set,       # its dataset
    opts,               # TrainingOptions (keep_snaps)
):
    """disk.DiskEstimate of what the run will still write (from its newest snapshot when it continues one)."""
    start_nimg, start_tick = 0, 0
    if config.get('resume_mode') == 'full' and config.get('resume_pkl'):
        progress = load_network_pkl(config['resume_pkl']).get('progress') or {}
        start_nimg, start_tick = progress.get('cur_nimg', 0), progress.get('cur_tick', 0)
    return disk.run_estimate(config, training_set, keep_snaps=opts.keep_snaps, start_nimg=start_nimg, start_tick=start_tick)


def resolve_offline(
    spec,               # --detector
    cache_dir   = None, # detector cache; None = the default
):
    """resolve_detector() with its file found (or downloaded) now; on a node without internet, the error says how to fetch
    the files beforehand."""
    try:
        detector = resolve_detector(spec, cache_dir=cache_dir)
        _ = detector.path                   # where a downloadable detector is looked up, or fetched
        return detector
    except DetectorError as exc:
        if os.environ.get(OFFLINE_ENV, '') in ('', '0'):
            raise
        raise DetectorError(f'{exc}; on a machine with internet run: python calc_metrics.py fetch-detectors'
                            f'{" --cache " + shlex.quote(cache_dir) if cache_dir else ""}, then use that cache here') from None


def run_training(
    opts,                       # TrainingOptions
    progress_callback = None,   # f(cur_nimg, total_nimg) each tick (single process only); None = nothing
    given           = None,     # names of the options given explicitly; None = those that differ from the defaults
):
    """Validate the options, write the run folder and train; returns the final snapshot (None for --dry-run)."""
    opts = dataclasses.replace(opts)
    if (opts.outdir is None) == (opts.run_dir is None):
        raise TrainingSetupError('give exactly one of --outdir (new numbered run folder) or --run-dir (exact folder)')
    if given is None:
        defaults = TrainingOptions()
        given = {name for name in option_names() if getattr(opts, name) != getattr(defaults, name)}
    resolve_resume(opts)
    opts, fine_tuning, fine_tune_data, continued_networks = resume_state(opts, given)
    training_set = open_training_set(opts, fine_tune_data, given)

    config = build_config(opts, training_set, fine_tuning)
    config.update(continued_networks)
    if fine_tune_data is not None:
        config['networks_from'] = resume_networks(config, fine_tune_data, opts.resume, given, training_set, opts.data)
    del fine_tune_data
    run_dir = opts.run_dir or next_run_dir(opts.outdir, run_description(opts, config, training_set.name))
    config['run_dir'] = run_dir
    config['run_dir_fixed'] = opts.run_dir is not None

    _print_summary(config, opts, run_dir, training_set)
    estimate = run_estimate(config, training_set, opts)
    if opts.dry_run:
        click.echo(disk.describe_check(estimate, run_dir))
        click.echo('Dry run; exiting.')
        return None
    if not opts.no_space_check:
        disk.check_free_space(estimate, run_dir)
    if config['metrics']:
        resolve_offline(opts.detector).path     # fails now (offline Inception, missing file), not at the first snapshot
    del training_set
    return train_until_stopped(config, run_dir, opts.data, progress_callback)

#----------------------------------------------------------------------------
# Training processes.

LOOP_KEYS = ('training_set_kwargs', 'data_loader_kwargs', 'G_class', 'D_class', 'G_kwargs', 'D_kwargs', 'G_opt_kwargs',
             'D_opt_kwargs', 'augment_kwargs', 'loss_kwargs', 'metrics', 'detector', 'random_seed', 'num_gpus', 'batch_size',
             'batch_gpu', 'ema_kimg', 'ema_rampup', 'G_reg_interval', 'D_reg_interval', 'augment_p', 'ada_target', 'ada_kimg',
             'total_kimg', 'kimg_per_tick', 'image_snapshot_ticks', 'network_snapshot_ticks', 'keep_snapshots', 'resume_pkl', 'resume_mode',
             'resume_partial', 'cudnn_benchmark', 'allow_tf32', 'phase_graphs')  # config entries that are training_loop() arguments


def subprocess_fn(rank, init_file, config, run_dir, progress_callback=None):
    """Entry point of each training process (rank 0 alone when --gpus 1)."""
    distributed.init_process_group(rank, config['num_gpus'], config['device'], init_file)
    device = config['device']
    if device == 'cuda':
        torchrun = distributed.torchrun_env()
        local_rank = torchrun[2] if torchrun is not None else rank   # one GPU per process on each machine
        device = cli.pick_device(device, rank=local_rank)
        torch.cuda.set_device(device)
    extra_d_terms = []
    lecam = config.get('lecam_kwargs')
    if lecam and lecam['weight'] > 0:
        extra_d_terms.append(LeCamRegularizer(**lecam))
    # One process: a stop signal raises KeyboardInterrupt at once (cli.stop_signals() around the launch). Several: each
    # only sets its flag, and the loop stops every process at the same iteration (one raising alone would leave the
    # others waiting in a collective); a spawned process then ends quietly and the launching process reports the stop.
    stop = threading.Event()
    several = config['num_gpus'] > 1
    try:
        with cli.stop_signals(stop) if several else contextlib.nullcontext():
            return training_loop(run_dir=run_dir, rank=rank, device=device, extra_d_terms=extra_d_terms,
                                 progress_callback=progress_callback, training_options=config,
                                 stop_requested=stop.is_set if several else None, **{k: config[k] for k in LOOP_KEYS})
    except TrainingInterrupted:
        if several and distributed.torchrun_env() is None:
            return None
        raise
    finally:
        distributed.destroy_process_group()


def launch_training(config, run_dir, progress_callback=None):
    """Write training_options.json into run_dir and train (spawning processes for --gpus > 1, or as one torchrun rank)."""
    torchrun = distributed.torchrun_env()
    if torchrun is not None:
        if not config.get('run_dir_fixed'):
            raise TrainingSetupError('under torchrun, name the run folder with --run-dir (every process must use the same one)')
        if torchrun[1] != config['num_gpus']:
            raise TrainingSetupError(f'torchrun started {torchrun[1]} processes but --gpus is {config["num_gpus"]}')
    rank = torchrun[0] if torchrun is not None else 0
    if rank == 0:
        write_json_atomic(os.path.join(run_dir, 'training_options.json'), config)
    if torchrun is not None:
        return subprocess_fn(rank, None, config, run_dir)
    if config['num_gpus'] == 1:
        return subprocess_fn(0, None, config, run_dir, progress_callback)
    torch.multiprocessing.set_start_method('spawn', force=True)
    received = distributed.spawn(subprocess_fn, config['num_gpus'], args=(config, run_dir), forward_signals=cli.STOP_SIGNALS)
    if received:
        raise TrainingInterrupted(latest_snapshot(run_dir))
    return latest_snapshot(run_dir)
