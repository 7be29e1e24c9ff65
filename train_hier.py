"""Hierarchical transfer along the taxonomy: train and evaluate a plan of stages chained by resuming from pickles."""

import copy
import functools
import os
import shlex
import sys

import click

import train
from stylegan2ada import distributed
from stylegan2ada.dataset import DatasetError, ImageFolderDataset
from stylegan2ada.metrics import metric_main
from stylegan2ada.metrics.detectors import DetectorError, resolve_detector
from stylegan2ada.pickles import NetworkPickleError, load_network_pkl
from stylegan2ada.training_loop import TrainingDivergedError, TrainingInterrupted
from taxogan_ext import hierarchy, report, taxonomy

# train.py options the plan sets per stage, or replaces with its own: every other one is passed to all stages.
PLAN_OWNED = ('outdir', 'run_dir', 'data', 'kimg', 'resume', 'resume_mode', 'cond', 'dry_run', 'metrics')
USER_ERRORS = (hierarchy.PlanError, taxonomy.ManifestError, report.ReportError, DatasetError, NetworkPickleError,
               DetectorError, metric_main.MetricError)


def passthrough_params():
    """Copies of train.py's click options that train_hier.py passes to every stage."""
    return [copy.copy(param) for param in train.main.params if param.name not in PLAN_OWNED]


def train_options_decorator(fn):
    """Add train.py's options (after this command's own) under '# Training options of every stage.'"""
    # click lists params in reverse order of appending, and this decorator runs before the ones above it.
    for param in reversed(passthrough_params()):
        fn.__click_params__ = getattr(fn, '__click_params__', [])
        fn.__click_params__.append(param)
    return fn


def stage_train_opts(
    stage,              # hierarchy.Stage
    run_dir,            # the stage folder
    start_pkl,          # pickle the stage starts from; None = scratch
):
    """train.py options of one stage (as train.main receives them)."""
    opts = train.default_options()
    opts.update(stage.train_options)
    opts.update(data=stage.data, run_dir=run_dir, kimg=stage.kimg, cond=stage.cond, resume=start_pkl,
                resume_mode='weights' if start_pkl else 'auto')
    return opts


def stage_config(stage, run_dir, start_pkl):
    """train.py's config dict of one stage; ClickException for data or options train.py refuses.

    A stage that starts from a pickle takes its networks' sizes (unless the stage's options give them) and must be able
    to copy every tensor of it (unless --resume-partial); config['networks_from'] then says which sizes were used.
    """
    opts = stage_train_opts(stage, run_dir, start_pkl)
    try:
        training_set = ImageFolderDataset(path=opts['data'], use_labels=opts['cond'], max_size=opts['subset'], xflip=opts['mirror'])
    except DatasetError as exc:
        raise click.ClickException(str(exc)) from None
    if opts['cond'] and not training_set.has_labels:
        raise click.ClickException(f'{opts["data"]}: the conditional method needs class labels in dataset.json')
    config = train.build_config(opts, training_set)
    if start_pkl is not None and os.path.isfile(start_pkl):     # before the start stage is trained, a folder: checked then
        # The plan decides whether a stage is conditional: a pickle of other labels is refused (or partial), not followed.
        config['networks_from'] = train.resume_networks(config, load_network_pkl(start_pkl), start_pkl, set(stage.train_options),
                                                        training_set, opts['data'])
    for key, value in stage.overrides.items():
        if key == 'ema_kimg' and opts['model'] == 'dcgan':
            continue                    # the baseline has no G_ema of its own (half-life 0 by design)
        config[key] = value
    config['run_dir'] = run_dir
    config['run_dir_fixed'] = True
    return config


def train_stage(stage, run_dir, resume_snapshot, start_pkl, progress_callback):
    """Train one stage with train.py's engine; an interrupted stage continues from its newest snapshot."""
    config = stage_config(stage, run_dir, start_pkl)
    if config.get('networks_from'):
        click.echo(f'stage {stage.key}: {config["networks_from"]}')
    if resume_snapshot is not None:
        # The config is the stage's original one (fine-tuning settings included); only the pickle and mode change.
        config['resume_pkl'], config['resume_mode'] = resume_snapshot, 'full'
    try:
        return train.launch_training(config, run_dir, progress_callback)
    except TrainingInterrupted as exc:
        raise click.ClickException(f'stage {stage.key}: {exc}; {continue_hint()}') from None
    except TrainingDivergedError as exc:
        raise click.ClickException(f'stage {stage.key}: training diverged: {exc}') from None
    except (DatasetError, NetworkPickleError, DetectorError, metric_main.MetricError, ValueError) as exc:
        raise click.ClickException(f'stage {stage.key}: {exc}') from None


def pick_device(device):
    """'auto' -> cuda when available, else cpu."""
    import torch
    if device == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    if device == 'cuda' and not torch.cuda.is_available():
        raise click.ClickException('--device cuda asked for, but no CUDA device is available')
    return device


def continue_hint():
    """'continue with: python train_hier.py ...' (this command line), or a plain hint when not run as a script."""
    if os.path.basename(sys.argv[0]) == 'train_hier.py':
        return f'continue with: python {shlex.join(sys.argv)}'
    return 'run the same command again to continue'


@click.command(context_settings=dict(max_content_width=120))
# Main options.
@click.option('--datasets',     help='Datasets folder with manifest.json (dataset_tool_ext.py build)', metavar='DIR', type=str, required=True)
@click.option('--outdir',       help='Experiment folder: a folder per stage, results.jsonl, table.md, grids', metavar='DIR', type=str, required=True)
@click.option('--method',       help='direct, lateral, descending, conditional or all (comma list)  [default: descending; direct with --resume]', metavar='LIST', type=str, default=None)
@click.option('--targets',      help='Taxa to produce (comma list)  [default: the children of --parent]', metavar='LIST', type=str, default=None)
@click.option('--parent',       help='Top of the descending chains  [default: --depth levels above each target]', metavar='NAME', type=str, default=None)
@click.option('--depth',        help='Descending: levels above each target where the chain starts  [default: 1]', metavar='INT', type=click.IntRange(min=1), default=None)
@click.option('--donor',        help='Lateral donor  [default: the sibling with the most images]', metavar='NAME', type=str, default=None)
@click.option('--cond-finetune', help='Conditional: also fine-tune the conditional network on each target', is_flag=True)
@click.option('--dry-run',      help='Print the plan as a tree (image counts, what is done) and exit', is_flag=True)
# Hyperparameters.
@click.option('--kimg-parent',  help='kimg of every stage trained from scratch (parents, donors, direct runs)', metavar='KIMG', type=click.FloatRange(min=0, min_open=True), default=1000, show_default=True)
@click.option('--kimg-child',   help='kimg of every stage that starts from a network (fine-tuning)', metavar='KIMG', type=click.FloatRange(min=0, min_open=True), default=500, show_default=True)
@click.option('--resume',       help='Start the plan from this pickle (ours or NVIDIA\'s) instead of from scratch', metavar='PKL', type=str, default=None)
@click.option('--ema-kimg',     help='Half-life of G_ema in every stage  [default: from --cfg]; short runs need one shorter than their kimg', metavar='KIMG', type=click.FloatRange(min=0), default=None)
# Evaluation and I/O.
@click.option('--metrics',      help='Metrics of each stage\'s final network (comma list, or none: train without evaluating)', metavar='LIST', type=str, default='fid50k_full,kid50k_full', show_default=True)
@click.option('--snap-metrics', help='Metrics at every snapshot during training (train.py --metrics)', metavar='LIST', type=str, default='none', show_default=True)
@click.option('--cache',        help='Detector and real-feature cache  [default: $TAXOGAN_CACHE or ~/.cache/taxogan]', metavar='DIR', type=str, default=None)
@click.option('--report/--no-report', help='Write table.md, table.csv, grids and curves at the end', default=True, show_default=True)
@click.option('--quiet',        help='No progress bars', is_flag=True)
# Training options of every stage (train.py's; see python train.py --help).
@train_options_decorator
def main(**kwargs):
    """Train and evaluate a hierarchical transfer plan (the paper's direct, lateral and descending methods).

    \b
    Examples:
    # The paper's descending method for the four orders, 256 px on one GPU:
    python train_hier.py --datasets datasets --method descending --parent Copepoda \\
        --targets Calanoida,Cyclopoida,Harpacticoida,Siphonostomatoida --outdir runs/copepoda --gpus 1
    # All three methods (Table 2), showing the plan first:
    python train_hier.py --datasets datasets --method all --parent Copepoda --outdir runs/copepoda --dry-run
    # Fine-tune a pickle on one order:
    python train_hier.py --datasets datasets --resume calanoida.pkl --targets Cyclopoida --outdir runs/ft
    An interrupted run continues where it stopped when the same command is run again.
    """
    opts = dict(kwargs)
    names = [p.name for p in passthrough_params()]
    defaults = train.default_options()
    train_opts = {name: opts[name] for name in names if opts[name] != defaults[name]}
    if opts['snap_metrics'] not in (None, '', 'none'):
        train_opts['metrics'] = opts['snap_metrics']
    try:
        metrics = hierarchy.parse_metrics(opts['metrics'])
    except hierarchy.PlanError as exc:
        raise click.ClickException(str(exc)) from None
    c = dict(datasets=opts['datasets'], outdir=opts['outdir'], method=opts['method'] or ('direct' if opts['resume'] else 'descending'),
             targets=opts['targets'], parent=opts['parent'], depth=opts['depth'], donor=opts['donor'], resume=opts['resume'],
             kimg_parent=opts['kimg_parent'], kimg_child=opts['kimg_child'], cond_finetune=opts['cond_finetune'],
             overrides={} if opts['ema_kimg'] is None else dict(ema_kimg=opts['ema_kimg']),
             metrics=metrics, detector=opts['detector'], cache=opts['cache'], device=opts['device'], train_options=train_opts,
             report=opts['report'], progress=not opts['quiet'], dry_run=opts['dry_run'])
    try:
        run(c)
    except USER_ERRORS as exc:
        raise click.ClickException(str(exc)) from None


def run(c):
    """Build the plan from config dict c; print it (dry run) or train, evaluate and report it."""
    if distributed.torchrun_env() is not None:
        # Stages run one after another in one driver; its bookkeeping is not shared between torchrun processes.
        raise click.ClickException('train_hier.py does not run under torchrun: use --gpus N on one machine, or train.py '
                                   'under torchrun for one stage at a time (see python train_hier.py --dry-run for the stages)')
    for name in c['metrics'] + hierarchy.parse_list(c['train_options'].get('metrics')):
        metric_main.parse_metric_name(name)                 # MetricError lists the valid forms
    if c['resume'] is not None and not os.path.isfile(c['resume']):
        raise click.ClickException(f'--resume {c["resume"]}: no such file')
    manifest = taxonomy.load_manifest(c['datasets'])
    plan = hierarchy.build_plan(manifest, c['outdir'], c['method'], targets=c['targets'], parent=c['parent'], donor=c['donor'],
                                depth=c['depth'], resume_pkl=c['resume'], kimg_parent=c['kimg_parent'], kimg_child=c['kimg_child'],
                                train_options=c['train_options'], overrides=c['overrides'], cond_finetune=c['cond_finetune'])
    if c['dry_run']:
        records = hierarchy.read_results(os.path.join(c['outdir'], hierarchy.RESULTS_FILE))
        states = hierarchy.plan_states(plan, records, c['metrics'], c['detector'])
        click.echo(hierarchy.format_plan(plan, states))
        return

    # Fail now rather than after hours of training: every stage's data and options, and the detector.
    for stage in plan.stages:
        if stage.derived is not None:
            hierarchy.write_derived_zip(stage.derived)
        stage_config(stage, os.path.join(c['outdir'], stage.key), stage.start if stage.start_kind == 'pickle' else
                     (os.path.join(c['outdir'], stage.start) if stage.start_kind == 'stage' else None))
    if c['metrics'] or hierarchy.parse_list(c['train_options'].get('metrics')):
        _ = resolve_detector(c['detector'], cache_dir=c['cache']).id   # finds (or downloads) and hashes it now

    device = pick_device(c['device'])
    evaluate = functools.partial(hierarchy.evaluate_pickle, device=device, cache_dir=c['cache'], progress=c['progress'])
    # SIGINT and SIGTERM (to the whole process group: timeout, scancel, docker stop) stop the running stage, which writes
    # a snapshot; finished stages are kept, and the same command continues.
    try:
        with train.stop_signals_end_training():
            hierarchy.run_plan(plan, manifest, train_stage, c['metrics'], c['detector'], evaluate_fn=evaluate, log=click.echo,
                               progress=c['progress'])
    except KeyboardInterrupt:
        raise click.ClickException(f'interrupted outside training (finished stages and evaluations are kept); '
                                   f'{continue_hint()}') from None
    if c['report']:
        for path in report.write_report(c['outdir'], device=device):
            click.echo(f'wrote {path}')


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
