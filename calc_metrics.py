"""Compute FID / KID / precision-recall / density-coverage / data copying / taxon accuracy of a network pickle or of a
set of images against a dataset; train the offline taxon detector."""

import copy
import os
import tempfile

import click
import torch

from stylegan2ada import cli
from stylegan2ada.dataset import DatasetError, ImageFolderDataset
from stylegan2ada.metrics import detectors, metric_main
from stylegan2ada.metrics.metric_utils import ImageSet
from stylegan2ada.pickles import NetworkPickleError, evaluation_network, load_network_pkl
from stylegan2ada.util import UserError, parse_list, sha256_file
import taxogan_ext.dcgan  # noqa: F401  registers the DCGAN baseline's classes for pickles
from taxogan_ext import taxon_metrics  # registers the 'taxon' detector kind and the acc_taxon metric
from taxogan_ext import utility
from taxogan_ext.taxon_detector import train_taxon_classifier


def load_generator(network_pkl):
    """(G_ema or G, the pickle's training_set_kwargs or None); UserError on a missing or bad pickle."""
    if not os.path.isfile(network_pkl):
        raise UserError(f'{network_pkl}: no such network pickle')
    data = load_network_pkl(network_pkl)
    try:
        G = evaluation_network(data)
    except NetworkPickleError as exc:
        raise NetworkPickleError(f'{network_pkl}: {exc}') from None
    kwargs = data.get('training_set_kwargs')
    return G, (dict(kwargs) if kwargs else None)


def load_image_set(path):
    """The ImageSet of --images; click.ClickException (one line) for a missing, unreadable or empty folder or zip."""
    if not os.path.exists(path):
        raise click.ClickException(f'--images {path}: no such folder or zip')
    try:
        return ImageSet(path)
    except DatasetError as exc:
        raise click.ClickException(f'--images {exc}') from None


def dataset_kwargs_for(G, pkl_kwargs, data, mirror, network_pkl):
    """Real-image dataset kwargs: --data (or the pickle's training set), labels as G needs, resolution of G."""
    if data is None:
        if not pkl_kwargs or not pkl_kwargs.get('path'):
            raise UserError(f'{network_pkl}: the pickle does not name its training set; pass --data')
        kwargs = dict(pkl_kwargs)
        kwargs.pop('class_name', None)   # NVIDIA's pickles name their dataset class; ours is the only one
    else:
        kwargs = dict(path=data, max_size=None, xflip=bool((pkl_kwargs or {}).get('xflip', False)), random_seed=0)
    if mirror is not None:
        kwargs['xflip'] = mirror
    kwargs.update(resolution=G.img_resolution, use_labels=G.c_dim > 0)
    return kwargs


def _run_metrics(rank, c, temp_dir):
    """Compute every metric in one process (rank) and report on rank 0."""
    if c['num_gpus'] > 1:
        backend = 'nccl' if c['device'] == 'cuda' else 'gloo'
        if c['device'] != 'cuda':
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // c['num_gpus']))  # share the cores, do not oversubscribe
        torch.distributed.init_process_group(backend=backend, init_method=f'file://{os.path.join(temp_dir, ".torch_distributed_init")}',
                                             rank=rank, world_size=c['num_gpus'])
    device = cli.pick_device(c['device'], rank)
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    if c['images'] is not None:
        G = ImageSet(c['images'])
    else:
        G, _ = load_generator(c['network_pkl'])
        G = copy.deepcopy(G).eval().requires_grad_(False).to(device)
    results = []
    for metric in c['metrics']:
        result = metric_main.calc_metric(metric, G, c['dataset_kwargs'], detector=c['detectors'], num_gpus=c['num_gpus'], rank=rank,
                                         device=device, progress=c['progress'], cache_dir=c['cache_dir'], batch_size=c['batch_size'],
                                         seed=c['seed'], taxon=c['taxon'], heldout=c['heldout'])
        if rank == 0:
            path = metric_main.report_metric(result, c['run_dir'], c['network_pkl'])
            click.echo(f'{metric_main.format_metric_result(result)} -> {path}')
        results.append(result)
    if c['num_gpus'] > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return results


def _subprocess_fn(rank, c, temp_dir):
    try:
        _run_metrics(rank, c, temp_dir)
    except UserError as exc:
        # A spawned process has no click around it: end it with the one-line message, not a traceback.
        raise SystemExit(f'rank {rank}: {exc}') from None


def calc_metrics(c):
    """Run the metrics of config dict c in one process or in c['num_gpus'] processes; returns rank 0's results."""
    if c['num_gpus'] == 1:
        return _run_metrics(0, c, None)
    with tempfile.TemporaryDirectory() as temp_dir:
        torch.multiprocessing.spawn(fn=_subprocess_fn, args=(c, temp_dir), nprocs=c['num_gpus'])
    return None


#----------------------------------------------------------------------------

@click.group(cls=cli.Group, invoke_without_command=True)
@click.pass_context
# Main options.
@click.option('--network', 'network_pkl', help='Network pickle to evaluate', metavar='PKL', type=str, default=None)
@click.option('--images',                 help='Or: a folder or zip of images to evaluate in place of a network (its first N per metric)', metavar='PATH', type=str, default=None)
@click.option('--data',                   help='Real images: dataset zip or folder  [default: the pickle\'s training set]', metavar='ZIP', type=str, default=None)
@click.option('--metrics',                help='Comma-separated metrics, e.g. fid50k_full,kid50k_full,pr50k3_full,dc10k_full,mem1k,acc_taxon', metavar='LIST', type=str, default='fid50k_full', show_default=True)
@click.option('--detector', 'detectors',  help='inception, vgg16, taxon:PATH or a TorchScript PATH; repeat to give both kinds (pr, dc: vgg16 in place of inception)', metavar='SPEC', type=str, multiple=True, default=('inception',), show_default=True)
@click.option('--taxon',                  help='Taxon of an unconditional generator (or of --images) for acc_taxon  [default: from the manifest]', metavar='NAME', type=str, default=None)
@click.option('--heldout',                help='Held-out real images of the training set\'s kind, the reference of mem<N>[k]  [default: leave-one-out over the real images]', metavar='ZIP', type=str, default=None)
# Hyperparameters.
@click.option('--mirror',                 help='Mirror the reals of the non-_full metrics  [default: as in the pickle]', metavar='BOOL', type=bool, default=None)
@click.option('--seed',                   help='Seed of latents, labels, noise and KID subsets', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
# Performance-related.
@click.option('--gpus', 'num_gpus',       help='Number of processes (GPUs, or CPU processes with gloo)', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--batch', 'batch_size',    help='Images per detector call', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--device',                 help='Device to run on', type=click.Choice(['auto', 'cpu', 'cuda']), default='auto', show_default=True)
# I/O-related.
@click.option('--cache', 'cache_dir',     help='Detector and real-feature cache  [default: $TAXOGAN_CACHE or ~/.cache/taxogan]', metavar='DIR', type=str, default=None)
@click.option('--run-dir',                help='Where metric-<name>.jsonl is appended  [default: beside the pickle or --images]', metavar='DIR', type=str, default=None)
@click.option('--quiet',                  help='No progress bars', is_flag=True)
def main(ctx, **kwargs):
    """Compute metrics of a network pickle or of a set of images; or train / check the offline taxon detector (see the
    subcommands).

    \b
    Examples:
    python calc_metrics.py --network runs/exp/network-snapshot-000400.pkl --data datasets/Calanoida.zip \\
        --metrics fid50k_full,kid50k_full
    python calc_metrics.py --images exported/Calanoida.zip --data datasets/Calanoida.zip \\
        --metrics fid2k_full,pr2k3_full_taxon,mem2k_taxon --detector taxon:taxon.pt
    python calc_metrics.py train-detector --data datasets/ --out taxon.pt
    python calc_metrics.py --network net.pkl --data datasets/Calanoida.zip --metrics fid2k_full,acc_taxon \\
        --detector taxon:taxon.pt
    """
    if ctx.invoked_subcommand is not None:
        return
    opts = dict(kwargs)
    if opts['network_pkl'] is None and opts['images'] is None:
        raise click.ClickException('--network or --images is required (or use a subcommand: train-detector, eval-detector)')
    if opts['network_pkl'] is not None and opts['images'] is not None:
        raise click.ClickException('--network and --images exclude each other: evaluate one at a time')
    if opts['images'] is not None and opts['data'] is None:
        raise click.ClickException('--images needs --data, the real images to compare them with')
    if opts['heldout'] is not None and not os.path.exists(opts['heldout']):
        raise click.ClickException(f'--heldout {opts["heldout"]}: no such file or folder')
    metrics = parse_list(opts['metrics'])
    if not metrics:
        raise click.ClickException('--metrics is empty')
    used = {}
    for metric in metrics:
        spec = metric_main.parse_metric_name(metric)
        detector, _name = metric_main.select_detector(spec, list(opts['detectors']), cache_dir=opts['cache_dir'])
        used[detector.spec] = detector

    if opts['images'] is not None:
        G, pkl_kwargs = load_image_set(opts['images']), None
        source = os.path.normpath(opts['images'])     # metric-*.jsonl go beside the folder or zip, not into it
    else:
        G, pkl_kwargs = load_generator(opts['network_pkl'])
        source = opts['network_pkl']
    dataset_kwargs = dataset_kwargs_for(G, pkl_kwargs, opts['data'], opts['mirror'], opts['network_pkl'])
    c = dict(network_pkl=opts['network_pkl'], images=opts['images'], metrics=metrics, detectors=list(opts['detectors']),
             dataset_kwargs=dataset_kwargs, taxon=opts['taxon'], heldout=opts['heldout'], seed=opts['seed'],
             num_gpus=opts['num_gpus'], batch_size=opts['batch_size'], device=cli.pick_device(opts['device']).type,
             cache_dir=opts['cache_dir'], run_dir=opts['run_dir'] or os.path.dirname(os.path.abspath(source)),
             progress=not opts['quiet'])
    if c['device'] == 'cuda' and c['num_gpus'] > torch.cuda.device_count():
        raise click.ClickException(f'--gpus {c["num_gpus"]}: only {torch.cuda.device_count()} CUDA devices')

    # Fail early, before any process starts: the dataset must read, the detectors must be there.
    dataset = ImageFolderDataset(**dataset_kwargs)
    if opts['heldout'] is not None:
        ImageFolderDataset(**dict(dataset_kwargs, path=opts['heldout'], use_labels=False))
    if G.c_dim and dataset.label_dim != G.c_dim:
        raise click.ClickException(f'{dataset.path}: the generator has {G.c_dim} classes but the dataset labels have '
                                   f'{dataset.label_dim} (dataset.json)')
    for detector in used.values():
        _ = detector.id   # finds (or downloads) and hashes the file now
    calc_metrics(c)


@main.command('train-detector')
# Main options.
@click.option('--data',                   help='Datasets folder with manifest.json, or one dataset zip with class labels', metavar='DIR', type=str, required=True)
@click.option('--out',                    help='Where to save the detector (TorchScript)', metavar='PT', type=str, required=True)
@click.option('--rank',                   help='Manifest rank whose taxa are the classes  [default: the lowest]', metavar='NAME', type=str, default=None)
# Hyperparameters.
@click.option('--res', 'resolution',      help='Classifier resolution (pixels)', metavar='INT', type=click.IntRange(min=8), default=64, show_default=True)
@click.option('--epochs',                 help='Training epochs', metavar='INT', type=click.IntRange(min=1), default=30, show_default=True)
@click.option('--lr',                     help='Learning rate (Adam, cosine decay)', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=2e-3, show_default=True)
@click.option('--heldout',                help='Share of each class held out', metavar='FLOAT', type=click.FloatRange(min=0.01, max=0.9), default=0.2, show_default=True)
@click.option('--seed',                   help='Seed of the split, initialisation and augmentation', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
# Performance-related.
@click.option('--batch', 'batch_size',    help='Images per step', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--device',                 help='Device to train on', type=click.Choice(['auto', 'cpu', 'cuda']), default='auto', show_default=True)
def train_detector(**kwargs):
    """Train the taxon classifier used by the *_taxon metrics and acc_taxon.

    \b
    Example:
    python calc_metrics.py train-detector --data datasets/ --out taxon.pt
    """
    opts = dict(kwargs)
    c = dict(data=opts['data'], out=opts['out'], rank=opts['rank'], resolution=opts['resolution'], epochs=opts['epochs'],
             lr=opts['lr'], heldout_fraction=opts['heldout'], seed=opts['seed'], batch_size=opts['batch_size'],
             device=cli.pick_device(opts['device']))
    if not os.path.exists(c['data']):
        raise click.ClickException(f'{c["data"]}: no such file or folder')
    meta = train_taxon_classifier(**c)
    check = taxon_metrics.calc_taxon_accuracy_on_reals(f'taxon:{c["out"]}', data=c['data'], device=c['device'])
    click.echo(f'classes: ' + ', '.join(f'{n} ({meta["num_images_per_class"][n]})' for n in meta['class_names']))
    click.echo(f'trained on {meta["num_train"]} images, held out {meta["num_heldout"]}')
    click.echo(f'held-out accuracy: {meta["heldout_accuracy"]:.4f} (' +
               ', '.join(f'{n} {a:.3f}' for n, a in meta['heldout_accuracy_per_class'].items()) + ')')
    click.echo(f'acc_taxon of the held-out real images: {check["acc_taxon"]:.4f}')
    click.echo(f'saved {c["out"]}')


@main.command('eval-detector')
@click.option('--detector', 'detector',   help='Taxon detector file', metavar='PT', type=str, required=True)
@click.option('--data',                   help='The data it was trained on  [default: as recorded in the file]', metavar='DIR', type=str, default=None)
@click.option('--device',                 help='Device to run on', type=click.Choice(['auto', 'cpu', 'cuda']), default='auto', show_default=True)
def eval_detector(**kwargs):
    """Print acc_taxon of the taxon detector's held-out real images, per taxon and overall."""
    opts = dict(kwargs)
    spec = opts['detector'] if opts['detector'].startswith('taxon:') else f'taxon:{opts["detector"]}'
    result = taxon_metrics.calc_taxon_accuracy_on_reals(spec, data=opts['data'], device=cli.pick_device(opts['device']))
    for name, acc in result['per_taxon'].items():
        click.echo(f'acc_taxon {name}: {acc:.4f}')
    click.echo(f'acc_taxon (all {result["num_images"]} held-out images): {result["acc_taxon"]:.4f}; '
               f'recorded held-out accuracy: {result["heldout_accuracy"]:.4f}')


def parse_generator(text):
    """'TAXON=PKL' or 'TAXON=PKL@CLASS' -> (taxon, pkl, class or None); UserError naming the problem."""
    taxon, sep, rest = text.partition('=')
    pkl, at, label = rest.rpartition('@') if '@' in rest else (rest, '', '')
    if not sep or not taxon.strip() or not pkl:
        raise UserError(f'--generator {text}: expected TAXON=PKL or TAXON=PKL@CLASS')
    if at and not label.isdigit():
        raise UserError(f'--generator {text}: the class after @ must be a class index')
    if not os.path.isfile(pkl):
        raise UserError(f'--generator {text}: {pkl}: no such network pickle')
    return taxon.strip(), pkl, int(label) if at else None


def generator_source(taxon, pkl, label):
    """The GeneratorSource of one --generator; a conditional network needs its class (PKL@CLASS)."""
    G, _ = load_generator(pkl)
    if G.c_dim and label is None:
        raise UserError(f'--generator {taxon}={pkl}: a conditional network; name the class of {taxon}: {taxon}={pkl}@CLASS')
    if label is not None and not (G.c_dim and 0 <= label < G.c_dim):
        raise UserError(f'--generator {taxon}={pkl}@{label}: the network has {G.c_dim} classes')
    return utility.GeneratorSource(G=copy.deepcopy(G).eval().requires_grad_(False), label=label, identity=sha256_file(pkl))


@main.command('utility')
# Main options.
@click.option('--datasets',               help='A held-out split (train_hier.py --holdout writes OUTDIR/_holdout)', metavar='DIR', type=str, required=True)
@click.option('--generator', 'generators', help='One network per taxon (repeat); @CLASS picks the class of a conditional one', metavar='TAXON=PKL[@CLASS]', type=str, multiple=True, required=True)
@click.option('--metrics',                help='Comma list of cas[<N>[k]]_taxon, gain[<N>[k]]_taxon', metavar='LIST', type=str, default='cas_taxon,gain_taxon', show_default=True)
# Hyperparameters.
@utility.click_options()
# Performance-related.
@click.option('--device',                 help='Device to run on', type=click.Choice(['auto', 'cpu', 'cuda']), default='auto', show_default=True)
# I/O-related.
@click.option('--cache', 'cache_dir',     help='Result cache  [default: $TAXOGAN_CACHE or ~/.cache/taxogan]', metavar='DIR', type=str, default=None)
@click.option('--run-dir',                help='Also append the results to DIR/utility.jsonl', metavar='DIR', type=str, default=None)
@click.option('--quiet',                  help='No progress bars', is_flag=True)
def utility_command(**kwargs):
    """Do the generated images help a classifier? CAS and augmentation gain on held-out real images.

    \b
    Example:
    python calc_metrics.py utility --datasets runs/table3/_holdout --metrics cas_taxon,gain_taxon \\
        --generator Calanoida=runs/table3/Copepoda__Calanoida/network-snapshot-000005.pkl \\
        --generator Cyclopoida=runs/table3/Copepoda__Cyclopoida/network-snapshot-000005.pkl
    """
    opts = dict(kwargs)
    metrics = parse_list(opts['metrics'])
    if not metrics:
        raise click.ClickException('--metrics is empty')
    for name in metrics:
        if utility.parse_utility_metric(name) is None:
            raise click.ClickException(f'--metrics: unknown utility metric {name!r}; valid forms: {utility.FORMS}')
    utility.check_filter(metrics, utility.options_from(opts))
    parsed = [parse_generator(text) for text in opts['generators']]
    taxa = [taxon for taxon, _, _ in parsed]
    if len(set(taxa)) != len(taxa):
        raise click.ClickException(f'--generator names a taxon twice: {", ".join(taxa)}')
    holdout = utility.load_holdout(opts['datasets'])
    device = cli.pick_device(opts['device'])
    evaluator = utility.UtilityEvaluator(holdout, taxa, utility.options_from(opts), device=device, progress=not opts['quiet'])
    sources = {taxon: generator_source(taxon, pkl, label) for taxon, pkl, label in parsed}
    results = utility.calc_utility(evaluator, metrics, sources, cache_dir=opts['cache_dir'])
    for name, result in results.items():
        click.echo(utility.format_result(result) + (' (cached)' if result['cached'] else ''))
        click.echo('  per taxon: ' + ', '.join(f'{t} {v[0]:.3f}' for t, v in result['per_taxon'].items()))
        if opts['run_dir']:
            os.makedirs(opts['run_dir'], exist_ok=True)
            utility.append_utility_record(os.path.join(opts['run_dir'], utility.UTILITY_FILE), dict(
                result, format=utility.UTILITY_FORMAT, method='calc_metrics', targets=taxa,
                pkls={t: pkl for t, pkl, _ in parsed}, labels={t: label for t, _, label in parsed},
                generator_sha256={t: sources[t].identity for t in taxa}, datasets=str(holdout.manifest.root),
                heldout_fraction=holdout.record['fraction'], heldout_seed=holdout.record['seed']))



@main.command('fetch-detectors')
# Main options.
@click.option('--cache', 'cache_dir',     help='Cache to fill  [default: $TAXOGAN_CACHE or ~/.cache/taxogan]', metavar='DIR', type=str, default=None)
@click.option('--detectors', 'names',     help='Which downloadable detectors (comma list)', metavar='LIST', type=str, default=','.join(detectors.DOWNLOADABLE), show_default=True)
@click.option('--quiet',                  help='No progress bars', is_flag=True)
def fetch_detectors(cache_dir, names, quiet):
    """Download every detector file a run may fetch (Inception, VGG16) into the cache and verify it.

    \b
    Run it where there is internet, then train with TAXOGAN_OFFLINE=1 (nothing tries the network) and the same cache:
    python calc_metrics.py fetch-detectors --cache /shared/taxogan-cache
    TAXOGAN_CACHE=/shared/taxogan-cache TAXOGAN_OFFLINE=1 python train_hier.py ...
    """
    chosen = parse_list(names)
    unknown = [name for name in chosen if name not in detectors.DOWNLOADABLE]
    if unknown or not chosen:
        raise click.ClickException(f'--detectors {names}: choose among {", ".join(detectors.DOWNLOADABLE)}')
    for name in chosen:
        entry = detectors.DOWNLOADABLE[name]
        # Downloads it unless present (checked against the SHA-256 recorded at download), then loads and runs it.
        path = detectors.downloaded_detector_path(name, cache_dir=cache_dir, progress=not quiet)
        features = detectors.resolve_detector(path).features(torch.zeros([1, 3, 32, 32], dtype=torch.uint8), 'cpu')
        if features.shape != (1, entry.num_features):
            raise click.ClickException(f'{path}: not a usable {entry.title} file (features of shape {list(features.shape)}, '
                                       f'expected [1, {entry.num_features}]); delete it and fetch again')
        click.echo(f'{entry.title}: {path} (SHA-256 {sha256_file(path)}, verified)')


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
