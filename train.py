"""Train a StyleGAN2-ADA (or DCGAN baseline) network: NVIDIA's options, plus LeCam, augmentation whitelist, Freeze-D."""

import contextlib
import copy
import inspect
import json
import os
import re
import shlex
import signal
import threading

import click
from click.core import ParameterSource
import torch

from stylegan2ada import cli, distributed
from stylegan2ada.dataset import DatasetError, ImageFolderDataset
from stylegan2ada.metrics.detectors import DetectorError, resolve_detector
from stylegan2ada.metrics.metric_main import MetricError, parse_metric_name
from stylegan2ada.pickles import MODULE_CLASSES, NetworkPickleError, load_network_pkl, tensor_mismatches
from stylegan2ada.util import write_json_atomic
from stylegan2ada.training_loop import TrainingDivergedError, TrainingInterrupted, latest_snapshot, training_loop
from taxogan_ext import dcgan  # registers the DCGAN classes for pickles
from taxogan_ext.augment_allow import describe as describe_augment
from taxogan_ext.augment_allow import parse_names as parse_aug_names
from taxogan_ext.augment_allow import resolve_augment_kwargs
from taxogan_ext.lecam import LECAM_HELP, LeCamRegularizer

# NVIDIA's configuration presets (stylegan2-ada-pytorch); 'auto' is filled in from the resolution and --gpus.
CFG_SPECS = {
    'auto':      dict(ref_gpus=-1, kimg=25000,  mb=-1, mbstd=-1, fmaps=-1,  lrate=-1,     gamma=-1,   ema=-1,  ramp=0.05, map=2),
    'stylegan2': dict(ref_gpus=8,  kimg=25000,  mb=32, mbstd=4,  fmaps=1,   lrate=0.002,  gamma=10,   ema=10,  ramp=None, map=8),
    'paper256':  dict(ref_gpus=8,  kimg=25000,  mb=64, mbstd=8,  fmaps=0.5, lrate=0.0025, gamma=1,    ema=20,  ramp=None, map=8),
    'paper512':  dict(ref_gpus=8,  kimg=25000,  mb=64, mbstd=8,  fmaps=1,   lrate=0.0025, gamma=0.5,  ema=20,  ramp=None, map=8),
    'paper1024': dict(ref_gpus=8,  kimg=25000,  mb=32, mbstd=4,  fmaps=1,   lrate=0.002,  gamma=2,    ema=10,  ramp=None, map=8),
    'cifar':     dict(ref_gpus=2,  kimg=100000, mb=64, mbstd=32, fmaps=1,   lrate=0.0025, gamma=0.01, ema=500, ramp=0.05, map=2),
}


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


def _fail(message):
    raise click.ClickException(message)


def build_config(
    opts,                   # train.py options
    training_set,           # the ImageFolderDataset they name
    fine_tuning     = None, # NVIDIA's fine-tuning settings (faster ADA, no EMA ramp-up); None = when starting from a pickle's weights
):
    """All training settings as one plain, JSON-serialisable dict (written to training_options.json)."""
    res = training_set.resolution
    gpus = opts['gpus']
    spec = cfg_spec(opts['cfg'], res, gpus)
    batch = opts['batch'] if opts['batch'] is not None else spec['mb']
    if batch % gpus != 0:
        _fail(f'--batch {batch} must be a multiple of --gpus {gpus}')
    # As NVIDIA: a preset's batch is split over its reference GPU count (gradient accumulation on fewer), --batch over --gpus.
    batch_gpu = opts['batch_gpu'] if opts['batch_gpu'] is not None else (batch // gpus if opts['batch'] is not None else
                                                                          min(batch // gpus, max(spec['mb'] // spec['ref_gpus'], 1)))
    if batch % (batch_gpu * gpus) != 0:
        _fail(f'--batch {batch} must be a multiple of --batch-gpu x --gpus = {batch_gpu * gpus}')
    # Default group: the largest divisor of the per-process batch not above the preset's.
    mbstd = opts['mbstd_group'] if opts['mbstd_group'] is not None else max(g for g in range(1, min(spec['mbstd'], batch_gpu) + 1) if batch_gpu % g == 0)
    if batch_gpu % mbstd != 0:
        _fail(f'--mbstd-group {mbstd} must divide the per-process batch {batch_gpu}')
    channel_base = opts['cbase'] if opts['cbase'] is not None else int(spec['fmaps'] * 32768)
    channel_max = opts['cmax'] if opts['cmax'] is not None else 512
    device = _pick_device(opts['device'])
    fp32 = opts['fp32'] or device == 'cpu'

    c = dict(model=opts['model'], device=device, num_gpus=gpus, random_seed=opts['seed'])
    c['options'] = {name: opts[name] for name in sorted(opts)}    # as given: a continued run starts from these
    c['training_set_kwargs'] = dict(path=opts['data'], use_labels=opts['cond'], max_size=opts['subset'], xflip=opts['mirror'],
                                    resolution=res, random_seed=opts['seed'])
    workers = opts['workers'] if opts['workers'] is not None else (3 if device == 'cuda' else 0)
    c['data_loader_kwargs'] = dict(num_workers=workers, pin_memory=(device == 'cuda'), **({'prefetch_factor': 2} if workers > 0 else {}))
    c['batch_size'] = batch
    c['batch_gpu'] = batch_gpu
    c['total_kimg'] = opts['kimg'] if opts['kimg'] is not None else spec['kimg']
    c['kimg_per_tick'] = opts['tick']
    c['image_snapshot_ticks'] = c['network_snapshot_ticks'] = opts['snap']
    c['metrics'] = [m for m in opts['metrics'].split(',') if m and m != 'none']
    for metric in c['metrics']:
        try:
            parse_metric_name(metric)
        except MetricError as exc:
            _fail(str(exc))
    c['detector'] = opts['detector']
    c['cudnn_benchmark'] = not opts['nobench']
    c['allow_tf32'] = opts['allow_tf32']

    if opts['model'] == 'dcgan':
        for name in ('lecam_weight', 'aug_allow', 'aug_deny', 'augpipe', 'freezed'):
            if opts[name]:
                _fail(f'--{name.replace("_", "-")} applies to StyleGAN2 only: the DCGAN baseline has no augmentation, LeCam or Freeze-D')
        defaults = dcgan.DCGAN_DEFAULTS
        c['G_class'] = f'{dcgan.DCGANGenerator.__module__}.{dcgan.DCGANGenerator.__qualname__}'
        c['D_class'] = f'{dcgan.DCGANDiscriminator.__module__}.{dcgan.DCGANDiscriminator.__qualname__}'
        c['G_kwargs'] = dict(z_dim=100, ngf=opts['cbase'] // 64 if opts['cbase'] else 64)
        c['D_kwargs'] = dict(ndf=opts['cbase'] // 64 if opts['cbase'] else 64)
        c['G_opt_kwargs'] = dict(defaults['G_opt'])
        c['D_opt_kwargs'] = dict(defaults['D_opt'])
        c['loss_kwargs'] = dict(r1_gamma=defaults['r1_gamma'], pl_weight=defaults['pl_weight'], style_mixing_prob=defaults['style_mixing_prob'])
        c['ema_kimg'], c['ema_rampup'] = defaults['ema_kimg'], None
        c['G_reg_interval'] = c['D_reg_interval'] = None
        c['augment_kwargs'] = None
        c['augment_p'], c['ada_target'] = 0, None
        c['augment_names'] = []
    else:
        c['G_class'] = 'stylegan2ada.networks.Generator'
        c['D_class'] = 'stylegan2ada.networks.Discriminator'
        c['G_kwargs'] = dict(z_dim=opts['zdim'], w_dim=opts['zdim'],
                             mapping_kwargs=dict(num_layers=opts['map'] if opts['map'] is not None else spec['map']),
                             synthesis_kwargs=dict(channel_base=channel_base, channel_max=channel_max,
                                                   num_fp16_res=0 if fp32 else 4, conv_clamp=None if fp32 else 256))
        c['D_kwargs'] = dict(architecture='orig' if opts['cfg'] == 'cifar' else 'resnet', channel_base=channel_base, channel_max=channel_max,
                             num_fp16_res=0 if fp32 else 4, conv_clamp=None if fp32 else 256,
                             block_kwargs=dict(freeze_layers=opts['freezed']), mapping_kwargs={},
                             epilogue_kwargs=dict(mbstd_group_size=mbstd))
        if opts['nhwc']:
            c['G_kwargs']['synthesis_kwargs']['fp16_channels_last'] = True
            c['D_kwargs']['block_kwargs']['fp16_channels_last'] = True
        glr = opts['glr'] if opts['glr'] is not None else spec['lrate']
        dlr = opts['dlr'] if opts['dlr'] is not None else spec['lrate']
        c['G_opt_kwargs'] = dict(lr=glr, betas=[0, 0.99], eps=1e-8)
        c['D_opt_kwargs'] = dict(lr=dlr, betas=[0, 0.99], eps=1e-8)
        c['loss_kwargs'] = dict(r1_gamma=opts['gamma'] if opts['gamma'] is not None else spec['gamma'])
        if opts['cfg'] == 'cifar':
            c['loss_kwargs'].update(pl_weight=0, style_mixing_prob=0)
        c['ema_kimg'] = spec['ema']
        c['ema_rampup'] = spec['ramp']
        c['G_reg_interval'], c['D_reg_interval'] = 4, 16

        # Augmentation: --aug chooses how p evolves, --augpipe / --aug-allow / --aug-deny which transforms.
        if opts['aug'] == 'noaug':
            if opts['aug_allow'] or opts['aug_deny']:
                _fail('--aug-allow/--aug-deny need augmentation: use --aug ada or --aug fixed')
            c['augment_kwargs'], c['augment_names'] = None, []
            c['augment_p'], c['ada_target'] = 0, None
        else:
            # --aug-allow alone picks from all transforms; otherwise the preset (default bgc) is filtered.
            augpipe = opts['augpipe'] or (None if opts['aug_allow'] else 'bgc')
            try:
                augment_kwargs = resolve_augment_kwargs(augpipe, opts['aug_allow'], opts['aug_deny'])
            except ValueError as exc:
                _fail(str(exc))
            if opts['aug_deny']:
                # A deny list names transforms to remove; one naming only absent ones would silently do nothing.
                chosen = resolve_augment_kwargs(augpipe, opts['aug_allow'], None)
                if not parse_aug_names(opts['aug_deny'], 'aug-deny') & set(chosen):
                    _fail(f'--aug-deny {opts["aug_deny"]}: none of these is among the chosen transforms '
                          f'({describe_augment(chosen)}); nothing to remove')
            c['augment_kwargs'] = augment_kwargs
            c['augment_names'] = [name for name, v in augment_kwargs.items() if v]
            if opts['aug'] == 'ada':
                c['augment_p'] = opts['p'] if opts['p'] is not None else 0
                c['ada_target'] = opts['target']
            else:
                if opts['p'] is None:
                    _fail('--aug fixed needs --p (the fixed augmentation probability)')
                c['augment_p'] = opts['p']
                c['ada_target'] = None
        c['lecam_kwargs'] = dict(weight=opts['lecam_weight'], decay=opts['lecam_decay'], start_kimg=opts['lecam_start_kimg'])

    c['ada_kimg'] = 500
    c['resume_pkl'] = opts['resume']
    c['resume_mode'] = opts['resume_mode']
    c['resume_partial'] = bool(opts['resume_partial'])
    c['fine_tuning'] = fine_tuning if fine_tuning is not None else (opts['resume'] is not None and c['resume_mode'] != 'full')
    if c['fine_tuning']:
        c['ada_kimg'] = 100          # fine-tuning: let ADA react faster, as NVIDIA does
        c['ema_rampup'] = None       # and no EMA ramp-up: the network is already trained
    return c


@contextlib.contextmanager
def stop_signals_end_training():
    """Within the block the first SIGINT or SIGTERM stops training (KeyboardInterrupt: the loop writes a final snapshot);
    later ones are ignored until the block ends, so that they cannot cut that snapshot short."""
    # timeout, scancel, docker stop and Ctrl-C signal the whole process group: the DataLoader workers ignore these
    # signals (stylegan2ada.util.worker_init_ignoring_stop_signals), the main process handles them here.
    if threading.current_thread() is not threading.main_thread():
        yield                   # only the main thread may set handlers (and receives the signals)
        return
    stop_signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.getsignal(sig) for sig in stop_signals}

    def already_stopping(signum, frame):
        # os.write, not print: a handler may run while the main code is inside a print to the same stream.
        os.write(2, f'{signal.Signals(signum).name} ignored: stopping already, writing the final snapshot '
                    f'(SIGKILL or Ctrl-\\ quits without it)\n'.encode())

    def stop(signum, frame):
        for sig in stop_signals:
            signal.signal(sig, already_stopping)
        raise KeyboardInterrupt

    for sig in stop_signals:
        signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _pick_device(device):
    if device == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    if device == 'cuda' and not torch.cuda.is_available():
        _fail('--device cuda asked for, but no CUDA device is available')
    return device


# train.py options that set the networks' sizes. Given explicitly they win; otherwise a fine-tuning run takes the sizes
# of the pickle it starts from (networks of other sizes would take only some of its tensors and train the rest from noise).
SIZE_OPTIONS = ('zdim', 'map', 'cbase', 'cmax', 'fp32', 'cond')


def _pickle_generator(resume_data):
    """The pickle's G_ema, else its G."""
    return resume_data['G_ema'] if resume_data.get('G_ema') is not None else resume_data['G']


def _without_data_kwargs(init_kwargs):
    """A network's init kwargs without those the dataset decides (labels, resolution, channels), copied."""
    return {k: copy.deepcopy(v) for k, v in init_kwargs.items() if k not in ('c_dim', 'img_resolution', 'img_channels')}


def _default(cls, name):
    return inspect.signature(cls).parameters[name].default


def resume_networks(
    config,         # build_config's dict; its G_kwargs and D_kwargs are replaced by the pickle's sizes
    resume_data,    # load_network_pkl() of the pickle being fine-tuned
    resume_pkl,     # its path (for messages)
    given,          # names of the train.py options given explicitly: those in SIZE_OPTIONS win over the pickle's sizes
    training_set,   # the dataset (resolution, channels, label dim)
    data,           # the dataset's path (for messages)
):
    """Take the networks' sizes from a pickle being fine-tuned and check that every tensor transfers; returns the line
    'networks from X.pkl: ...' that says which sizes were used."""
    from stylegan2ada.networks import Discriminator, MappingNetwork, SynthesisNetwork
    for key in ('G', 'D', 'G_ema'):
        if resume_data.get(key) is None:
            _fail(f'{resume_pkl}: the pickle has no {key}; fine-tuning needs G, D and G_ema')
    G_src, D_src = _pickle_generator(resume_data), resume_data['D']
    G_cls, D_cls = MODULE_CLASSES[config['G_class']], MODULE_CLASSES[config['D_class']]
    if type(G_src) is not G_cls or type(D_src) is not D_cls:
        _fail(f'{resume_pkl}: holds a {type(G_src).__name__} and a {type(D_src).__name__}, but --model {config["model"]} '
              f'trains a {G_cls.__name__} and a {D_cls.__name__}')
    if (G_src.img_resolution, G_src.img_channels) != (training_set.resolution, training_set.num_channels):
        _fail(f'{resume_pkl}: its networks make {G_src.img_resolution} px images with {G_src.img_channels} channel(s), '
              f'but {data} holds {training_set.resolution} px images with {training_set.num_channels} channel(s)')

    ours_G, ours_D = config['G_kwargs'], config['D_kwargs']
    G_kwargs, D_kwargs = _without_data_kwargs(G_src.init_kwargs), _without_data_kwargs(D_src.init_kwargs)
    differs = []                # given sizes that differ from the pickle's, for the error message
    if config['model'] == 'dcgan':
        if 'cbase' in given:
            if ours_G['ngf'] != G_kwargs['ngf']:
                differs.append(f'--cbase {ours_G["ngf"] * 64} (pickle: {G_kwargs["ngf"] * 64})')
            G_kwargs['ngf'], D_kwargs['ndf'] = ours_G['ngf'], ours_D['ndf']
        sizes = f'DCGAN, z_dim {G_kwargs["z_dim"]}, ngf {G_kwargs["ngf"]}, ndf {D_kwargs["ndf"]}'
    else:
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
        sizes = (f'z_dim {G_kwargs["z_dim"]}, w_dim {G_kwargs["w_dim"]}, '
                 f'mapping {mapping.get("num_layers", _default(MappingNetwork, "num_layers"))} layers, '
                 f'channel_base {synthesis.get("channel_base", _default(SynthesisNetwork, "channel_base"))}, '
                 f'channel_max {synthesis.get("channel_max", _default(SynthesisNetwork, "channel_max"))}, '
                 f'fp16 resolutions {synthesis.get("num_fp16_res", 0)}, conv_clamp {synthesis.get("conv_clamp")}, '
                 f'c_dim {training_set.label_dim}, '
                 f'D architecture {D_kwargs.get("architecture", _default(Discriminator, "architecture"))}')
    config['G_kwargs'], config['D_kwargs'] = G_kwargs, D_kwargs

    # Every tensor must transfer: built on the meta device, the networks cost no memory to compare.
    common = dict(c_dim=training_set.label_dim, img_resolution=training_set.resolution, img_channels=training_set.num_channels)
    with torch.device('meta'):
        G_new, D_new = G_cls(**G_kwargs, **common), D_cls(**D_kwargs, **common)
    untransferred = {}
    for key, new in (('G', G_new), ('D', D_new), ('G_ema', G_new)):
        unfilled, unused = tensor_mismatches(resume_data[key], new)
        if unfilled or unused:
            untransferred[key] = (unfilled, unused)
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
            _fail(f'{resume_pkl}: not every tensor would transfer ({counts}: {"; ".join(first[:4])}'
                  f'{"; ..." if len(first) > 4 else ""}){"; " + ", ".join(differs) if differs else ""}; give the pickle\'s '
                  f'sizes, or --resume-partial to copy only the matching tensors (NVIDIA\'s behaviour)')
        line += f'; partial transfer: {counts}'
    return line


def run_description(opts, config, dataset_name):
    """NVIDIA-style run folder suffix, e.g. Calanoida-auto-gamma0.5-kimg2-batch8-ada-bgc."""
    desc = f'{dataset_name}-{"cond-" if opts["cond"] else ""}{opts["model"] if opts["model"] != "stylegan2" else opts["cfg"]}'
    desc += f'-kimg{config["total_kimg"]:g}-batch{config["batch_size"]}'
    if opts['model'] == 'stylegan2':
        desc += f'-gamma{config["loss_kwargs"]["r1_gamma"]:g}-{opts["aug"]}'
        if config['augment_names']:
            desc += '-' + (opts['augpipe'] or ('allow' if opts['aug_allow'] else 'bgc'))
        if opts['lecam_weight']:
            desc += f'-lecam{opts["lecam_weight"]:g}'
        if opts['freezed']:
            desc += f'-freezed{opts["freezed"]}'
    if opts['resume']:
        desc += '-resume'
    return re.sub(r'[^A-Za-z0-9_.+-]', '_', desc)


def next_run_dir(outdir, desc):
    """outdir/NNNNN-desc with the next free run id."""
    ids = [int(m.group(1)) for name in (os.listdir(outdir) if os.path.isdir(outdir) else []) if (m := re.match(r'^(\d+)-', name))]
    return os.path.join(outdir, f'{max(ids, default=-1) + 1:05d}-{desc}')


def subprocess_fn(rank, init_file, config, run_dir, progress_callback=None):
    """Entry point of each training process (rank 0 alone when --gpus 1)."""
    distributed.init_process_group(rank, config['num_gpus'], config['device'], init_file)
    device = config['device']
    if device == 'cuda':
        torchrun = distributed.torchrun_env()
        local_rank = torchrun[2] if torchrun is not None else rank   # one GPU per process on each machine
        device = f'cuda:{local_rank % torch.cuda.device_count()}'
        torch.cuda.set_device(device)
    extra_d_terms = []
    lecam = config.get('lecam_kwargs')
    if lecam and lecam['weight'] > 0:
        extra_d_terms.append(LeCamRegularizer(**lecam))
    keys = ['training_set_kwargs', 'data_loader_kwargs', 'G_class', 'D_class', 'G_kwargs', 'D_kwargs', 'G_opt_kwargs', 'D_opt_kwargs',
            'augment_kwargs', 'loss_kwargs', 'metrics', 'detector', 'random_seed', 'num_gpus', 'batch_size', 'batch_gpu', 'ema_kimg',
            'ema_rampup', 'G_reg_interval', 'D_reg_interval', 'augment_p', 'ada_target', 'ada_kimg', 'total_kimg', 'kimg_per_tick',
            'image_snapshot_ticks', 'network_snapshot_ticks', 'resume_pkl', 'resume_mode', 'resume_partial', 'cudnn_benchmark',
            'allow_tf32']
    # One process: a stop signal raises KeyboardInterrupt at once (stop_signals_end_training). Several: each only sets
    # its flag, and the loop stops every process at the same iteration (one raising alone would leave the others
    # waiting in a collective); a spawned process then ends quietly and the launching process reports the stop.
    stop = threading.Event()
    several = config['num_gpus'] > 1
    try:
        with cli.stop_signals(stop) if several else contextlib.nullcontext():
            return training_loop(run_dir=run_dir, rank=rank, device=device, extra_d_terms=extra_d_terms,
                                 progress_callback=progress_callback, training_options=config,
                                 stop_requested=stop.is_set if several else None, **{k: config[k] for k in keys})
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
            _fail('under torchrun, name the run folder with --run-dir (every process must use the same one)')
        if torchrun[1] != config['num_gpus']:
            _fail(f'torchrun started {torchrun[1]} processes but --gpus is {config["num_gpus"]}')
    rank = torchrun[0] if torchrun is not None else 0
    if rank == 0:
        write_json_atomic(os.path.join(run_dir, 'training_options.json'), config)
    if torchrun is not None:
        return subprocess_fn(rank, None, config, run_dir)
    if config['num_gpus'] == 1:
        return subprocess_fn(0, None, config, run_dir, progress_callback)
    torch.multiprocessing.set_start_method('spawn', force=True)
    received = distributed.spawn(subprocess_fn, config['num_gpus'], args=(config, run_dir),
                                 forward_signals=(signal.SIGINT, signal.SIGTERM))
    if received:
        raise TrainingInterrupted(latest_snapshot(run_dir))
    return latest_snapshot(run_dir)


@click.command(context_settings=dict(max_content_width=120))
# Main options.
@click.option('--outdir',       help='Where to make the run folder (outdir/NNNNN-desc)', metavar='DIR', type=str)
@click.option('--run-dir',      help='Exact run folder instead of --outdir; if it holds snapshots, training resumes from the newest', metavar='DIR', type=str)
@click.option('--data',         help='Training data (.zip or folder of square PNG/JPEG images)', metavar='[ZIP|DIR]', type=str, required=True)
@click.option('--gpus',         help='Number of processes (GPUs, or CPU processes with gloo)', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--model',        help='Network family: StyleGAN2 or the DCGAN baseline', type=click.Choice(['stylegan2', 'dcgan']), default='stylegan2', show_default=True)
@click.option('--cfg',          help='Base configuration (NVIDIA presets)', type=click.Choice(sorted(CFG_SPECS)), default='auto', show_default=True)
@click.option('--cond',         help='Train a class-conditional network (labels from dataset.json)', is_flag=True)
@click.option('--subset',       help='Train on a random subset of this many images', metavar='INT', type=click.IntRange(min=1))
@click.option('--mirror',       help='Enable dataset x-flips', is_flag=True)
@click.option('--seed',         help='Random seed', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--dry-run',      help='Print the training options and exit', is_flag=True)
# Hyperparameters.
@click.option('--kimg',         help='Training length in thousands of images [default: from --cfg]', metavar='KIMG', type=click.FloatRange(min=0, min_open=True))
@click.option('--batch',        help='Total batch size [default: from --cfg]', metavar='INT', type=click.IntRange(min=1))
@click.option('--batch-gpu',    help='Batch size per process and round (gradient accumulation) [default: batch / gpus]', metavar='INT', type=click.IntRange(min=1))
@click.option('--gamma',        help='R1 regularization weight [default: from --cfg]', metavar='FLOAT', type=click.FloatRange(min=0))
@click.option('--zdim',         help='Latent (z and w) dimensionality', metavar='INT', type=click.IntRange(min=1), default=512, show_default=True)
@click.option('--cbase',        help='Capacity multiplier (channel_base) [default: from --cfg]', metavar='INT', type=click.IntRange(min=1))
@click.option('--cmax',         help='Max. feature maps per layer [default: 512]', metavar='INT', type=click.IntRange(min=1))
@click.option('--map',          help='Mapping network depth [default: from --cfg]', metavar='INT', type=click.IntRange(min=1))
@click.option('--glr',          help='G learning rate [default: from --cfg]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--dlr',          help='D learning rate [default: from --cfg]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--mbstd-group',  help='Minibatch std group size [default: from --cfg]', metavar='INT', type=click.IntRange(min=1))
@click.option('--freezed',      help='Freeze-D: freeze the first N layers of D (from the highest resolution)', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--lecam-weight', help='LeCam regularization weight (0 = off). ' + LECAM_HELP, metavar='FLOAT', type=click.FloatRange(min=0), default=0, show_default=True)
@click.option('--lecam-decay',  help='Decay of the LeCam EMAs of the real and fake logits', metavar='FLOAT', type=click.FloatRange(min=0, max=1, max_open=True), default=0.99, show_default=True)
@click.option('--lecam-start-kimg', help='Apply LeCam from this kimg on', metavar='KIMG', type=click.FloatRange(min=0), default=0, show_default=True)
# Augmentation.
@click.option('--aug',          help='Augmentation mode', type=click.Choice(['ada', 'noaug', 'fixed']), default='ada', show_default=True)
@click.option('--p',            help='Augmentation probability for --aug fixed (initial p for ada)', metavar='FLOAT', type=click.FloatRange(min=0, max=1))
@click.option('--target',       help='ADA target value for r_t', metavar='FLOAT', type=click.FloatRange(min=0, max=1), default=0.6, show_default=True)
@click.option('--augpipe',      help='Augmentation pipeline preset [default: bgc]', type=click.Choice(['blit', 'geom', 'color', 'filter', 'noise', 'cutout', 'bg', 'bgc', 'bgcf', 'bgcfn', 'bgcfnc']))
@click.option('--aug-allow',    help='Keep only these transforms (comma list; sets leakfree-color, leakfree-geom)', metavar='LIST', type=str)
@click.option('--aug-deny',     help='Remove these transforms (comma list)', metavar='LIST', type=str)
# Transfer learning.
@click.option('--resume',       help='Resume from a network pickle (ours or NVIDIA\'s) or a run folder (its newest snapshot)', metavar='[PKL|DIR]', type=str)
@click.option('--resume-mode',  help='full = continue the run (progress, optimizers, p); weights = fine-tune from 0; auto = full for our snapshots', type=click.Choice(['auto', 'full', 'weights']), default='auto', show_default=True)
@click.option('--resume-partial', help='Fine-tuning: copy the tensors whose names and shapes match, start the others from random values (NVIDIA\'s behaviour); without it, that is an error', is_flag=True)
# Evaluation and I/O.
@click.option('--metrics',      help='Metrics at each snapshot (comma list, or none)', metavar='LIST', type=str, default='none', show_default=True)
@click.option('--detector',     help='Feature detector for the metrics: inception, taxon:PATH or a TorchScript path', metavar='NAME', type=str, default='inception', show_default=True)
@click.option('--snap',         help='Snapshot interval in ticks', metavar='TICKS', type=click.IntRange(min=1), default=50, show_default=True)
@click.option('--tick',         help='Progress report interval in kimg', metavar='KIMG', type=click.FloatRange(min=0, min_open=True), default=4, show_default=True)
# Performance-related.
@click.option('--device',       help='Device', type=click.Choice(['auto', 'cpu', 'cuda']), default='auto', show_default=True)
@click.option('--fp32',         help='Disable mixed precision (always on CPU)', is_flag=True)
@click.option('--nhwc',         help='channels_last for fp16 layers', is_flag=True)
@click.option('--allow-tf32',   help='Allow TF32 for convolutions and matmul', is_flag=True)
@click.option('--nobench',      help='Disable cuDNN benchmarking', is_flag=True)
@click.option('--workers',      help='DataLoader worker processes [default: 3 on CUDA, 0 on CPU]', metavar='INT', type=click.IntRange(min=0))
def main(**kwargs):
    """Train a StyleGAN2-ADA network (or the DCGAN baseline) on one dataset.

    \b
    Examples:
    # 256 px on one GPU with ADA and LeCam:
    python train.py --outdir runs --data datasets/Calanoida.zip --gpus 1 --lecam-weight 0.0001
    # Fine-tune from a pickle with a leak-free augmentation whitelist and Freeze-D:
    python train.py --outdir runs --data datasets/Harpacticoida.zip --resume copepoda.pkl --aug-allow leakfree-geom --freezed 10
    # Continue a killed run (its settings come from the snapshot; --kimg, --snap, --tick, --metrics may be changed):
    python train.py --run-dir runs/00003-Calanoida-auto-... --data datasets/Calanoida.zip
    """
    ctx = click.get_current_context()
    given = {name for name in kwargs if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)}
    final = run_training(dict(kwargs), given=given)
    if final is not None:
        click.echo(f'Final snapshot: {final}')


def continue_command(run_dir, data):
    """The command line that continues the run in run_dir (its settings come from the snapshot)."""
    return f'python train.py --run-dir {shlex.quote(run_dir)} --data {shlex.quote(data)}'


def default_options(**overrides):
    """train.py's options as main() receives them when none is given (flags False, unset values None), updated with overrides."""
    opts = dict(main.make_context('train.py', ['--data', ''], resilient_parsing=True).params)
    opts['data'] = None
    unknown = sorted(set(overrides) - set(opts))
    if unknown:
        raise click.ClickException(f'unknown train.py option(s): {", ".join(unknown)}')
    opts.update(overrides)
    return opts


# When a run is continued, these describe the new invocation (where, from what, which data file) ...
CONTINUE_INVOCATION = ('outdir', 'run_dir', 'data', 'resume', 'resume_mode', 'resume_partial', 'dry_run')
# ... these may be given anew (its length, what is reported, how fast it runs), else they stay as the run had them ...
CONTINUE_MAY_CHANGE = ('kimg', 'snap', 'tick', 'metrics', 'detector', 'device', 'workers', 'nobench', 'allow_tf32')
# ... and every other one comes from the snapshot: giving it with another value is an error.


def continued_options(
    opts,           # train.py options of this command
    saved,          # train.py options the snapshot's run was started with
    given,          # names of the options given on this command line
    source,         # the snapshot (for messages)
):
    """The options of a continued run: the saved ones, except this invocation's and those of CONTINUE_MAY_CHANGE given anew."""
    merged = dict(opts)
    for name, value in saved.items():
        if name not in merged or name in CONTINUE_INVOCATION or (name in CONTINUE_MAY_CHANGE and name in given):
            continue
        if name in given and merged[name] != value:
            flag = '--' + name.replace('_', '-')
            _fail(f'{source}: this run was trained with {flag} {value}, not {merged[name]}; continuing it keeps its '
                  f'settings (start a new run with --resume-mode weights to fine-tune with other ones)')
        merged[name] = value
    return merged


def run_training(
    opts,                       # dict of train.py options (see default_options)
    progress_callback = None,   # f(cur_nimg, total_nimg) each tick (single process only); None = nothing
    given           = None,     # names of the options given explicitly; None = those that differ from the defaults
):
    """Validate the options, write the run folder and train; returns the final snapshot (None for --dry-run)."""
    opts = dict(opts)
    if (opts['outdir'] is None) == (opts['run_dir'] is None):
        _fail('give exactly one of --outdir (new numbered run folder) or --run-dir (exact folder)')
    if given is None:
        defaults = default_options()
        given = {name for name, value in opts.items() if value != defaults.get(name)}

    fine_tuning = None
    fine_tune_data = None       # the pickle's contents when fine-tuning (its networks' sizes are taken)
    continued_networks = {}     # G_kwargs and D_kwargs of the run being continued (its networks as they are)
    # Resume source: a run folder means its newest snapshot.
    if opts['resume'] is not None:
        if os.path.isdir(opts['resume']):
            snap = latest_snapshot(opts['resume'])
            if snap is None:
                _fail(f'{opts["resume"]}: no network-snapshot-*.pkl in this folder')
            opts['resume'] = snap
        elif not os.path.isfile(opts['resume']):
            _fail(f'{opts["resume"]}: no such file or folder')
    if opts['run_dir'] is not None and opts['resume'] is None:
        snap = latest_snapshot(opts['run_dir'])
        if snap is not None:
            opts['resume'], opts['resume_mode'] = snap, 'full'
    if opts['resume'] is not None:
        try:
            resume_data = load_network_pkl(opts['resume'])
        except NetworkPickleError as exc:
            _fail(str(exc))
        progress = resume_data.get('progress')
        if opts['resume_mode'] == 'full' and progress is None:
            _fail(f'{opts["resume"]}: --resume-mode full needs one of our snapshots (this pickle has no training progress)')
        if opts['resume_mode'] == 'auto':
            # Decided here, not in the loop, so that a continued run keeps its settings (no fine-tuning overrides).
            opts['resume_mode'] = 'full' if progress is not None else 'weights'
        saved = (progress or {}).get('training_options') or {}
        if opts['resume_mode'] == 'full' and 'options' in saved:
            opts = continued_options(opts, saved['options'], given, opts['resume'])
            fine_tuning = saved.get('fine_tuning')
            # Not rebuilt from the options: a run that fine-tuned a pickle has that pickle's sizes, not the options'.
            continued_networks = {key: copy.deepcopy(saved[key]) for key in ('G_kwargs', 'D_kwargs') if key in saved}
        if opts['resume_mode'] == 'weights':
            fine_tune_data = resume_data
        del resume_data, progress

    # Dataset: checked once here so bad data fails in one line before anything starts.
    try:
        training_set = ImageFolderDataset(path=opts['data'], use_labels=opts['cond'], max_size=opts['subset'], xflip=opts['mirror'])
    except DatasetError as exc:
        _fail(str(exc))
    if opts['cond'] and not training_set.has_labels:
        _fail(f'{opts["data"]}: --cond needs labels in dataset.json')
    if fine_tune_data is not None and 'cond' not in given and not opts['cond']:
        # A conditional pickle stays conditional when the dataset has labels for its classes (c_dim is one of its sizes).
        pickle_c_dim = _pickle_generator(fine_tune_data).c_dim
        if pickle_c_dim > 0:
            labelled = ImageFolderDataset(path=opts['data'], use_labels=True, max_size=opts['subset'], xflip=opts['mirror'])
            if labelled.label_dim == pickle_c_dim:
                opts['cond'], training_set = True, labelled

    config = build_config(opts, training_set, fine_tuning)
    config.update(continued_networks)
    if fine_tune_data is not None:
        config['networks_from'] = resume_networks(config, fine_tune_data, opts['resume'], given, training_set, opts['data'])
    del fine_tune_data
    dataset_name = training_set.name
    run_dir = opts['run_dir'] or next_run_dir(opts['outdir'], run_description(opts, config, dataset_name))
    config['run_dir'] = run_dir
    config['run_dir_fixed'] = opts['run_dir'] is not None

    click.echo(f'Training options:\n{json.dumps(config, indent=2)}\n')
    click.echo(f'Output directory:    {run_dir}')
    click.echo(f'Dataset:             {opts["data"]} ({len(training_set)} images, {training_set.resolution} px, {training_set.num_channels} ch)')
    click.echo(f'Model:               {config["model"]} on {config["device"]}, {config["num_gpus"]} process(es), batch {config["batch_size"]}')
    click.echo(f'Augmentations:       {describe_augment(config["augment_kwargs"]) if config["augment_kwargs"] else "none"}')
    if config.get('networks_from'):
        click.echo(config['networks_from'])
    if opts['dry_run']:
        click.echo('Dry run; exiting.')
        return None
    if config['metrics']:
        try:
            resolve_detector(opts['detector']).path  # fails now (offline Inception, missing file), not at the first snapshot
        except DetectorError as exc:
            _fail(str(exc))
    del training_set

    # SIGTERM behaves like Ctrl-C: the loop writes a snapshot before exiting.
    try:
        with stop_signals_end_training():
            return launch_training(config, run_dir, progress_callback)
    except TrainingInterrupted as exc:
        raise click.ClickException(f'{exc}; continue with: {continue_command(run_dir, opts["data"])}') from None
    except KeyboardInterrupt:
        # Stopped outside the loop's steps (while the networks were being built): nothing new to save.
        snapshot = latest_snapshot(run_dir)
        if snapshot is None:
            raise click.ClickException('interrupted before the first snapshot: nothing to continue from') from None
        raise click.ClickException(f'interrupted; newest snapshot {snapshot}; continue with: '
                                   f'{continue_command(run_dir, opts["data"])}') from None
    except TrainingDivergedError as exc:
        raise click.ClickException(f'training diverged: {exc}') from None
    except (DatasetError, NetworkPickleError, DetectorError, MetricError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
