"""Hierarchical transfer along the taxonomy: train and evaluate a plan of stages chained by resuming from pickles."""

import functools
import os
import shlex
import sys

import click
import torch

from stylegan2ada import cli, distributed
from stylegan2ada.dataset import DatasetError, ImageFolderDataset
from stylegan2ada.metrics import metric_main
from stylegan2ada.pickles import load_network_pkl
from stylegan2ada.training_loop import TrainingDivergedError, TrainingInterrupted
from stylegan2ada.util import DiskFullError, UserError, is_disk_full
from taxogan_ext import disk, hierarchy, parallel, report, taxonomy, training, utility

# train.py options the plan sets per stage, or replaces with its own: every other one is passed to all stages.
HOLDOUT_DIR = '_holdout'     # OUTDIR/_holdout: the training-only datasets of --holdout, heldout.zip, heldout.json
PLAN_OWNED = ('outdir', 'run_dir', 'data', 'kimg', 'resume', 'resume_mode', 'cond', 'dry_run', 'metrics')
# Options of the driver itself, not passed on to the driver of one stage (a stage process or a Slurm job).
DRIVER_ONLY = ('parallel', 'stage', 'slurm', 'slurm_partition', 'slurm_time', 'slurm_mem', 'slurm_cpus', 'slurm_option',
               'dry_run', 'quiet')
# Snapshots each stage keeps without --keep-snaps: the newest (the final one once trained: what the report, the stages
# starting from it and a rerun read; while training, what a rerun continues from), plus the best by --snap-metrics.
DEFAULT_KEEP_SNAPS = 1


def passthrough_names():
    """Names of the train.py options that train_hier.py passes to every stage, in --help order."""
    return [name for name in training.option_names() if name not in PLAN_OWNED]


def stage_train_opts(
    stage,              # hierarchy.Stage
    run_dir,            # the stage folder
    start_pkl,          # pickle the stage starts from; None = scratch
):
    """train.py options of one stage (training.TrainingOptions)."""
    return training.TrainingOptions(**{**stage.train_options,
                                       **dict(data=stage.data, run_dir=run_dir, kimg=stage.kimg, cond=stage.cond,
                                              resume=start_pkl, resume_mode='weights' if start_pkl else 'auto')})


def stage_config(stage, run_dir, start_pkl):
    """train.py's config dict of one stage; a UserError for data or options train.py refuses.

    A stage that starts from a pickle takes its networks' sizes (unless the stage's options give them) and must be able
    to copy every tensor of it (unless --resume-partial); config['networks_from'] then says which sizes were used.
    """
    opts = stage_train_opts(stage, run_dir, start_pkl)
    training_set = ImageFolderDataset(path=opts.data, use_labels=opts.cond, max_size=opts.subset, xflip=opts.mirror)
    if opts.cond and not training_set.has_labels:
        raise DatasetError(f'{opts.data}: the conditional method needs class labels in dataset.json')
    config = training.build_config(opts, training_set)
    if start_pkl is not None and os.path.isfile(start_pkl):     # before the start stage is trained, a folder: checked then
        # The plan decides whether a stage is conditional: a pickle of other labels is refused (or partial), not followed.
        config['networks_from'] = training.resume_networks(config, load_network_pkl(start_pkl), start_pkl,
                                                           set(stage.train_options), training_set, opts.data)
    for key, value in stage.overrides.items():
        if key == 'ema_kimg' and opts.model == 'dcgan':
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
        return training.launch_training(config, run_dir, progress_callback)
    except TrainingInterrupted as exc:
        raise training.RunStopped(f'stage {stage.key}: {exc}; {continue_hint()}') from None
    except TrainingDivergedError as exc:
        raise TrainingDivergedError(f'stage {stage.key}: training diverged: {exc}') from None
    except (DiskFullError, OSError) as exc:
        if not isinstance(exc, DiskFullError) and not is_disk_full(exc):
            raise
        # The plan stops here; every finished stage is kept, and the same command continues this one.
        raise DiskFullError(f'stage {stage.key}: {training.disk_full_text(exc)}; once space is freed, '
                            f'{continue_hint()}') from None
    except UserError as exc:
        raise UserError(f'stage {stage.key}: {exc}') from None


def continue_hint():
    """'continue with: python train_hier.py ...' (this command line), or a plain hint when not run as a script."""
    if os.path.basename(sys.argv[0]) == 'train_hier.py':
        return f'continue with: python {shlex.join(sys.argv)}'
    return 'run the same command again to continue'


@click.command(cls=cli.Command, context_settings=dict(max_content_width=120))
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
@click.option('--metrics',      help='Metrics of each stage\'s final network, and cas_taxon / gain_taxon of each method\'s networks together (comma list, or none: train without evaluating)', metavar='LIST', type=str, default='fid50k_full,kid50k_full', show_default=True)
@click.option('--snap-metrics', help='Metrics at every snapshot during training (train.py --metrics)', metavar='LIST', type=str, default='none', show_default=True)
@click.option('--cache',        help='Detector and real-feature cache  [default: $TAXOGAN_CACHE or ~/.cache/taxogan]', metavar='DIR', type=str, default=None)
@click.option('--holdout',      help='Hold this share of each taxon\'s real images out of every training zip (for cas_taxon, gain_taxon)', metavar='FRACTION', type=click.FloatRange(min=0, max=1, min_open=True, max_open=True), default=None)
@click.option('--holdout-seed', help='Seed of the held-out split', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--report/--no-report', help='Write table.md, table.csv, grids and curves at the end', default=True, show_default=True)
@click.option('--quiet',        help='No progress bars', is_flag=True)
# Stages side by side: local processes, or Slurm jobs.
@click.option('--parallel',     help='Train up to K stages at once whose start is trained, each in its own process on its own --gpus devices', metavar='K', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--stage',        help='Train and evaluate this stage alone (its start stage must be trained; keys: --dry-run or plan.json)', metavar='KEY', type=str, default=None)
@click.option('--slurm',        help='Write one sbatch script per stage and DIR/submit.sh (jobs chained by afterok) instead of training', metavar='DIR', type=str, default=None)
@click.option('--slurm-partition', help='--slurm: partition of every job', metavar='NAME', type=str, default=None)
@click.option('--slurm-time',   help='--slurm: time limit of every job (a stage continues in its requeued job)', metavar='TIME', type=str, default=None)
@click.option('--slurm-mem',    help='--slurm: memory of every job (sbatch --mem)', metavar='SIZE', type=str, default=None)
@click.option('--slurm-cpus',   help='--slurm: CPUs of every job (sbatch --cpus-per-task)', metavar='INT', type=click.IntRange(min=1), default=None)
@click.option('--slurm-option', help='--slurm: any sbatch option of every job, e.g. account=proj or qos=long (repeatable)', metavar='KEY=VALUE', type=str, multiple=True)
# The classifiers of the utility metrics (cas_taxon, gain_taxon).
@utility.click_options()
# Training options of every stage (train.py's; see python train.py --help).
@training.click_options(exclude=PLAN_OWNED)
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
    # Do the generated images help a classifier? (Table 3: 20 % of the real images held out of all training)
    python train_hier.py --datasets datasets --method direct,lateral,descending --parent Copepoda --outdir runs/table3 \\
        --holdout 0.2 --metrics cas_taxon,gain_taxon
    An interrupted run continues where it stopped when the same command is run again.
    """
    opts = dict(kwargs)
    defaults = training.TrainingOptions()
    train_opts = {name: opts[name] for name in passthrough_names() if opts[name] != getattr(defaults, name)}
    if opts['snap_metrics'] not in (None, '', 'none'):
        train_opts['metrics'] = opts['snap_metrics']
    train_opts['keep_snaps'] = opts['keep_snaps'] or DEFAULT_KEEP_SNAPS
    train_opts.pop('no_space_check', None)      # checked for the whole plan, below
    c = dict(datasets=opts['datasets'], outdir=opts['outdir'], method=opts['method'] or ('direct' if opts['resume'] else 'descending'),
             targets=opts['targets'], parent=opts['parent'], depth=opts['depth'], donor=opts['donor'], resume=opts['resume'],
             kimg_parent=opts['kimg_parent'], kimg_child=opts['kimg_child'], cond_finetune=opts['cond_finetune'],
             overrides={} if opts['ema_kimg'] is None else dict(ema_kimg=opts['ema_kimg']),
             metrics=hierarchy.parse_metrics(opts['metrics']), detector=opts['detector'], cache=opts['cache'],
             device=opts['device'], train_options=train_opts, report=opts['report'], progress=not opts['quiet'],
             dry_run=opts['dry_run'], holdout=opts['holdout'], holdout_seed=opts['holdout_seed'],
             utility=utility.options_from(opts), space_check=not opts['no_space_check'],
             parallel=opts['parallel'], stage=opts['stage'], slurm=opts['slurm'], gpus=opts['gpus'],
             slurm_options=slurm_option_list(opts),
             command=[sys.executable, os.path.abspath(__file__)]
                     + parallel.given_arguments(click.get_current_context(), exclude=DRIVER_ONLY) + ['--quiet'])
    run(c)


def slurm_option_list(opts):
    """The --slurm-* options as KEY=VALUE sbatch settings, --slurm-option last (it may replace the others)."""
    named = dict(partition=opts['slurm_partition'], time=opts['slurm_time'], mem=opts['slurm_mem'],
                 cpus_per_task=opts['slurm_cpus'])
    return [f'{key.replace("_", "-")}={value}' for key, value in named.items() if value is not None] + list(opts['slurm_option'])


def split_metrics(names):
    """(metrics of each stage, utility metrics of each method's networks); MetricError / UtilityError for a bad name."""
    stage_metrics = [name for name in names if not utility.is_utility_metric(name)]
    method_metrics = [name for name in names if utility.is_utility_metric(name)]
    for name in stage_metrics:
        metric_main.parse_metric_name(name)                 # MetricError lists the valid forms
    for name in method_metrics:
        utility.parse_utility_metric(name)
    return stage_metrics, method_metrics


def plan_disk_estimate(
    c,                  # the plan's config dict (outdir, holdout, report)
    plan,               # hierarchy.Plan
    states,             # hierarchy.plan_states() of it
    only    = None,     # key of the one stage this driver trains (--stage; no report); None = the whole plan
):
    """disk.DiskEstimate of what running the plan still writes: stages to train, derived datasets, split, report."""
    estimate = disk.DiskEstimate()
    resolution = 0
    for stage in plan.stages:
        state = states[stage.key]
        if only is not None and stage.key != only:
            continue
        if state.status in ('done', 'evaluate'):
            continue
        run_dir = os.path.join(c['outdir'], stage.key)
        config = stage_config(stage, run_dir, hierarchy.stage_start_pkl(stage, c['outdir'], final=False))
        training_set = disk.open_run_dataset(config)
        resolution = max(resolution, training_set.resolution)
        start_nimg = int(state.done_kimg * 1000) if state.status == 'resume' else 0
        start_tick = 1 if start_nimg else 0     # a continued stage is past its first tick
        estimate.add(disk.run_estimate(config, training_set, keep_snaps=stage.train_options.get('keep_snaps'),
                                       start_nimg=start_nimg, start_tick=start_tick))
        if stage.derived is not None and not os.path.isfile(stage.derived.path):
            estimate.add_part('datasets', disk.zip_bytes([stage.derived.source]))
    if c.get('holdout') is not None and not os.path.isfile(os.path.join(c['outdir'], HOLDOUT_DIR, utility.HOLDOUT_FILE)):
        manifest = taxonomy.load_manifest(c['datasets'])
        estimate.add_part('datasets', disk.zip_bytes([manifest.dataset_path(name) for name in manifest.taxa]))
    if c.get('report', True) and resolution and only is None:
        rows = {}                   # taxon -> grid rows: its real images, then each network evaluated on it
        for stage in plan.stages:
            for ev in stage.evaluations:
                rows[ev.taxon] = rows.get(ev.taxon, 1) + 1
        estimate.add_part('report', disk.report_bytes(list(rows.values()), resolution))
    return estimate


def plan_datasets(c):
    """The datasets folder the plan trains on: --datasets, or its held-out split under OUTDIR (written unless a dry run)."""
    if c.get('holdout') is None:
        return c['datasets']
    dest = os.path.join(c['outdir'], HOLDOUT_DIR)
    if c['dry_run']:
        return dest if os.path.isfile(os.path.join(dest, utility.HOLDOUT_FILE)) else c['datasets']
    if c.get('space_check', True) and not os.path.isfile(os.path.join(dest, utility.HOLDOUT_FILE)):
        # The split copies every dataset zip (less the held-out images); the plan's own check comes after it.
        source = taxonomy.load_manifest(c['datasets'])
        estimate = disk.DiskEstimate()
        estimate.add_part('held-out split', disk.zip_bytes([source.dataset_path(name) for name in source.taxa]))
        disk.check_free_space(estimate, dest)
    utility.write_holdout_split(c['datasets'], dest, c['holdout'], c.get('holdout_seed', 0), log=click.echo)
    return dest


def run(c):
    """Build the plan from config dict c; print it (dry run), write its Slurm jobs, or train, evaluate and report it."""
    if distributed.torchrun_env() is not None:
        # Stages run one after another in one driver; its bookkeeping is not shared between torchrun processes.
        raise hierarchy.PlanError('train_hier.py does not run under torchrun: use --gpus N on one machine, or train.py '
                                  'under torchrun for one stage at a time (see python train_hier.py --dry-run for the stages)')
    only, workers = c.get('stage'), c.get('parallel', 1)
    if only is not None and (workers > 1 or c.get('slurm')):
        raise hierarchy.PlanError('--stage trains one stage: it takes neither --parallel nor --slurm')
    if c.get('slurm') and (workers > 1 or c['dry_run']):
        raise hierarchy.PlanError('--slurm writes the jobs of the plan: it takes neither --parallel nor --dry-run')
    stage_metrics, method_metrics = split_metrics(c['metrics'])
    utility.check_filter(method_metrics, c['utility'])
    for name in hierarchy.parse_list(c['train_options'].get('metrics')):
        metric_main.parse_metric_name(name)
    if c['resume'] is not None and not os.path.isfile(c['resume']):
        raise hierarchy.PlanError(f'--resume {c["resume"]}: no such file')
    manifest = taxonomy.load_manifest(plan_datasets(c))
    plan = hierarchy.build_plan(manifest, c['outdir'], c['method'], targets=c['targets'], parent=c['parent'], donor=c['donor'],
                                depth=c['depth'], resume_pkl=c['resume'], kimg_parent=c['kimg_parent'], kimg_child=c['kimg_child'],
                                train_options=c['train_options'], overrides=c['overrides'], cond_finetune=c['cond_finetune'])
    keys = [stage.key for stage in plan.stages]
    if only is not None and only not in keys:
        raise hierarchy.PlanError(f'--stage {only}: no such stage in this plan (its stages: {", ".join(keys)})')
    if c['dry_run']:
        records = hierarchy.read_results(os.path.join(c['outdir'], hierarchy.RESULTS_FILE))
        states = hierarchy.plan_states(plan, records, stage_metrics, c['detector'])
        click.echo(hierarchy.format_plan(plan, states))
        try:
            click.echo(disk.describe_check(plan_disk_estimate(c, plan, states, only=only), c['outdir']))
        except UserError as exc:
            click.echo(f'Disk: no estimate ({exc})')
        return
    holdout = utility.load_holdout(manifest.root) if method_metrics and only is None else None

    # Fail now rather than after hours of training: every stage's data and options, the disk space, and the detector.
    for stage in plan.stages:
        if only is not None and stage.key != only:
            continue
        if stage.derived is not None:
            hierarchy.write_derived_zip(stage.derived)
        stage_config(stage, os.path.join(c['outdir'], stage.key), hierarchy.stage_start_pkl(stage, c['outdir'], final=False))
    if c.get('space_check', True):
        records = hierarchy.read_results(os.path.join(c['outdir'], hierarchy.RESULTS_FILE))
        states = hierarchy.plan_states(plan, records, stage_metrics, c['detector'])
        disk.check_free_space(plan_disk_estimate(c, plan, states, only=only), c['outdir'])
    if stage_metrics or hierarchy.parse_list(c['train_options'].get('metrics')):
        _ = training.resolve_offline(c['detector'], cache_dir=c['cache']).id   # finds (or downloads) and hashes it now
    if c.get('slurm'):
        write_slurm_jobs(c, plan)
        return

    device = cli.pick_device(c['device'])
    evaluate = functools.partial(hierarchy.evaluate_pickle, device=device, cache_dir=c['cache'], progress=c['progress'])
    # SIGINT and SIGTERM (to the whole process group: timeout, scancel, docker stop) stop the running stage, which writes
    # a snapshot; finished stages are kept, and the same command continues.
    try:
        with cli.stop_signals(), hierarchy.experiment_lock(c['outdir'], stage=only) as lock_file:
            if workers > 1:
                run_stage_processes(c, plan, stage_metrics, device, lock_file)
            hierarchy.run_plan(plan, manifest, train_stage, stage_metrics, c['detector'], evaluate_fn=evaluate, log=click.echo,
                               progress=c['progress'], only=only, lock=False)
            if method_metrics and only is None:
                utility.evaluate_plan(plan, holdout, method_metrics, c.get('utility') or utility.UtilityOptions(),
                                      device=device, cache_dir=c['cache'], progress=c['progress'], log=click.echo)
    except KeyboardInterrupt:
        raise training.RunStopped(f'interrupted outside training (finished stages and evaluations are kept); '
                                  f'{continue_hint()}') from None
    if c['report'] and only is None:
        for path in report.write_report(c['outdir'], device=device):
            click.echo(f'wrote {path}')


def run_stage_processes(c, plan, stage_metrics, device, lock_file):
    """--parallel K: every stage not done, in a process of its own (the driver restricted to it), K at once."""
    records = hierarchy.read_results(os.path.join(c['outdir'], hierarchy.RESULTS_FILE))
    states = hierarchy.plan_states(plan, records, stage_metrics, c['detector'])
    gpus = c.get('gpus', 1)
    slots = parallel.device_slots(c['parallel'], gpus, device.type == 'cuda',
                                  torch.cuda.device_count() if device.type == 'cuda' else 0)
    parallel.run_stages(plan, states, c['command'], slots, lock_file, continue_hint(), progress=c['progress'], log=click.echo)


def write_slurm_jobs(c, plan):
    """--slurm DIR: an sbatch script per stage (and one for the report), and DIR/submit.sh that chains them."""
    gres = None if c['device'] == 'cpu' else f'gpu:{c.get("gpus", 1)}'
    settings = parallel.slurm_settings(gres, c.get('slurm_options', ()))
    paths = parallel.write_slurm(plan, c['slurm'], c['command'], os.getcwd(), settings)
    click.echo(f'wrote {len(paths) - 1} sbatch scripts to {c["slurm"]}; submit them with: bash {paths[-1]}')


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
