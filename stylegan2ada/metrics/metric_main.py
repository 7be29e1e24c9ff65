"""Metric registry and runner: parse names like fid50k_full or kid2k_taxon, compute, report to metric-<name>.jsonl."""

import collections
import json
import os
import re
import time

import numpy as np
import torch
import tqdm

from ..dataset import DatasetError, ImageFolderDataset
from . import metric_utils, taxa
from .detectors import resolve_detector
from .distances import frechet_distance_from_stats, kernel_inception_distance
from ..util import UserError, format_duration

# Metric families by name; filled by @register_metric below. A metric name is parsed into a family,
# an image count, the _full flag and the _taxon detector suffix by parse_metric_name().
METRIC_FAMILIES = {}

VALID_FORMS = ('fid<N>[k][_full][_taxon], kid<N>[k][_full][_taxon], acc[<N>[k]]_taxon '
               '(e.g. fid50k_full, kid50k_full, fid2k, kid5k_full_taxon, acc_taxon)')
DEFAULT_ACC_COUNT = 10000       # generated images of acc_taxon without a count
KID_NUM_SUBSETS = 100
KID_MAX_SUBSET_SIZE = 1000

MetricSpec = collections.namedtuple('MetricSpec', ['name', 'family', 'count', 'full', 'taxon'])


class MetricError(UserError):
    """A metric request that cannot be served; one line naming the problem."""


def register_metric(family):
    """Decorator: register fn(opts, spec) -> dict(results={name: value}, ...) as the metric family `family`."""
    def decorator(fn):
        METRIC_FAMILIES[family] = fn
        return fn
    return decorator


def parse_metric_name(name):
    """'fid2k_full_taxon' -> MetricSpec(name, 'fid', 2000, True, True); MetricError listing the valid forms."""
    match = re.fullmatch(r'(fid|kid)(\d+)(k?)(_full)?(_taxon)?', name) or re.fullmatch(r'(acc)(?:(\d+)(k?))?()(_taxon)', name)
    if match is None or match.group(1) not in METRIC_FAMILIES:
        raise MetricError(f'unknown metric {name!r}; valid forms: {VALID_FORMS}')
    family, digits, kilo, full, taxon = match.groups()
    count = DEFAULT_ACC_COUNT if digits is None else int(digits) * (1000 if kilo else 1)
    if count < 1:
        raise MetricError(f'metric {name!r}: the image count must be at least 1; valid forms: {VALID_FORMS}')
    return MetricSpec(name=name, family=family, count=count, full=bool(full), taxon=bool(taxon))


def is_valid_metric(name):
    """True if parse_metric_name accepts `name`."""
    try:
        parse_metric_name(name)
        return True
    except MetricError:
        return False


def select_detector(
    spec,               # MetricSpec
    detector,           # one detector (str or Detector) or a list of them
    cache_dir   = None, # cache folder for the Inception download; None = the default
    progress    = True, # progress bar when downloading
):
    """(Detector, result name): _taxon metrics take the taxon detector; others take a non-taxon one if given,
    else the taxon one with '_taxon' added to the name."""
    choices = list(detector) if isinstance(detector, (list, tuple)) else [detector]
    if not choices:
        raise MetricError('no detector given')
    resolved = [resolve_detector(d, cache_dir=cache_dir, progress=progress) for d in choices]
    taxon = [d for d in resolved if d.is_taxon]
    other = [d for d in resolved if not d.is_taxon]
    if spec.taxon:
        if not taxon:
            raise MetricError(f'metric {spec.name} needs the taxon detector; pass --detector taxon:PATH '
                              f'(train one with: calc_metrics.py train-detector)')
        return taxon[0], spec.name
    if other:
        return other[0], spec.name
    return taxon[0], spec.name + '_taxon'


def calc_metric(
    metric,                 # metric name, e.g. 'fid50k_full', 'kid2k', 'fid50k_full_taxon', 'acc_taxon'
    G,                      # generator (G_ema); G(z, c, truncation_psi, noise_mode) -> [N, C, H, W] in [-1, 1]
    dataset_kwargs,         # ImageFolderDataset kwargs of the real images (a pickle's training_set_kwargs)
    detector    = 'inception', # 'inception', 'taxon:PATH', a TorchScript PATH, a Detector, or a list of them
    num_gpus    = 1,        # processes sharing the work (torch.distributed must be initialised when > 1)
    rank        = 0,        # this process's rank
    device      = None,     # torch device; None = cuda when available, else cpu
    progress    = True,     # tqdm progress bars on rank 0
    cache_dir   = None,     # detector and real-feature cache; None = $TAXOGAN_CACHE or ~/.cache/taxogan
    batch_size  = 64,       # images per detector call
    seed        = 0,        # seed of latents, labels, noise and KID subsets: the same inputs give the same value
    taxon       = None,     # acc_taxon of an unconditional G: its taxon; None = from the dataset's manifest entry
):
    """Compute one metric; returns dict(results={name: value}, metric, total_time, num_gpus, detector, ...)."""
    spec = parse_metric_name(metric)
    chosen, name = select_detector(spec, detector, cache_dir=cache_dir, progress=progress and rank == 0)
    spec = spec._replace(name=name, taxon=chosen.is_taxon)
    opts = metric_utils.MetricOptions(G=G, dataset_kwargs=dataset_kwargs, detector=chosen, num_gpus=num_gpus, rank=rank,
                                      device=device, progress=progress, cache_dir=cache_dir, batch_size=batch_size,
                                      seed=seed, taxon=taxon)
    start = time.time()
    try:
        out = METRIC_FAMILIES[spec.family](opts, spec)
    except taxa.TaxonError as exc:
        raise MetricError(f'{name}: {exc}') from None
    except ValueError as exc:
        raise MetricError(f'{name}: {exc}') from None
    total_time = time.time() - start
    result = dict(out, metric=name, total_time=total_time, total_time_str=format_duration(total_time), num_gpus=num_gpus,
                  detector=chosen.spec, detector_id=chosen.id, dataset=opts.dataset_kwargs.get('path'), seed=seed)
    return result


def report_metric(
    result,         # what calc_metric returned
    run_dir,        # folder of metric-<name>.jsonl; None = do not write
    snapshot_pkl,   # the network pickle the metric was computed for (its file name is stored), or None
):
    """Append the result as one JSON line to run_dir/metric-<name>.jsonl; returns the file path (or None)."""
    if run_dir is None:
        return None
    line = dict(result, snapshot_pkl=os.path.basename(snapshot_pkl) if snapshot_pkl else None, timestamp=time.time())
    path = os.path.join(run_dir, f'metric-{result["metric"]}.jsonl')
    os.makedirs(run_dir, exist_ok=True)
    # One write of one complete line: concurrent readers never see half a record.
    with open(path, 'a', encoding='utf-8') as f:
        f.write(json.dumps(line) + '\n')
    return path


def format_metric_result(result):
    """One printable line: 'fid50k_full 12.3456 (1m 02s, inception-2015-12-05-...)'."""
    values = ' '.join(f'{k} {v:.6g}' for k, v in result['results'].items())
    return f'{values} ({result["total_time_str"]}, {result["detector_id"]})'


#----------------------------------------------------------------------------
# The metrics.

@register_metric('fid')
def _fid(opts, spec):
    real = metric_utils.compute_feature_stats_for_dataset(opts, max_items=None if spec.full else spec.count, full=spec.full,
                                                          capture_mean_cov=True)
    gen = metric_utils.compute_feature_stats_for_generator(opts, num_gen=spec.count, capture_mean_cov=True)
    value = frechet_distance_from_stats(*gen.get_mean_cov(), *real.get_mean_cov()) if opts.rank == 0 else float('nan')
    return dict(results={spec.name: value}, num_real=real.num_items, num_gen=gen.num_items)


@register_metric('kid')
def _kid(opts, spec):
    real = metric_utils.compute_feature_stats_for_dataset(opts, max_items=None if spec.full else spec.count, full=spec.full,
                                                          capture_all=True)
    gen = metric_utils.compute_feature_stats_for_generator(opts, num_gen=spec.count, capture_all=True)
    value = float('nan')
    if opts.rank == 0:
        value = kernel_inception_distance(real.get_all(), gen.get_all(), num_subsets=KID_NUM_SUBSETS,
                                          max_subset_size=KID_MAX_SUBSET_SIZE, seed=opts.seed)
    return dict(results={spec.name: value}, num_real=real.num_items, num_gen=gen.num_items)


@register_metric('acc')
def _acc(opts, spec):
    detector = opts.detector
    dataset = opts.dataset()
    class_names = detector.class_names
    targets, gen_taxa = taxa.generator_targets(dataset.path, dataset.label_names, opts.G.c_dim, class_names, opts.taxon)
    rows = metric_utils.map_generator(opts, dataset, spec.count,
                                      lambda images, classes: np.stack([detector.predict(images, opts.device), classes], axis=1),
                                      dtype=np.int64)
    predicted, gen_class = rows[:, 0], rows[:, 1]
    target = targets[gen_class if opts.G.c_dim else np.zeros_like(gen_class)]
    valid = target >= 0
    if not valid.any():
        raise ValueError('no generated image belongs to a class of the taxon detector')
    per_taxon = {}
    for k, name in enumerate(gen_taxa):
        mask = valid & ((gen_class == k) if opts.G.c_dim else True)
        if name is not None and mask.any():
            per_taxon[name] = float((predicted[mask] == target[mask]).mean())
    value = float((predicted[valid] == target[valid]).mean())
    return dict(results={spec.name: value}, num_gen=int(valid.sum()), per_taxon=per_taxon,
                classifier_heldout_accuracy=detector.metadata.get('heldout_accuracy'))


#----------------------------------------------------------------------------
# acc_taxon of real images: the taxon detector on its own held-out split.

def calc_taxon_accuracy_on_reals(
    detector,               # taxon detector: 'taxon:PATH', a path, or a Detector
    data        = None,     # the datasets folder (or manifest / labelled dataset) it was trained on; None = as recorded
    device      = None,     # torch device; None = cuda when available, else cpu
    batch_size  = 64,       # images per detector call
    progress    = True,     # tqdm progress bar
):
    """acc_taxon of the held-out real images through the metric path (files -> uint8 -> detector); equals the
    classifier's held-out accuracy. Returns dict(acc_taxon, per_taxon, num_images, heldout_accuracy)."""
    det = resolve_detector(detector)
    if not det.is_taxon:
        raise MetricError(f'{det.spec}: not a taxon detector')
    meta = det.metadata
    device = torch.device(device) if device is not None else torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if data is None:
        root = meta['data_root']
    elif os.path.isdir(data) and os.path.isfile(os.path.join(data, taxa.MANIFEST_FILE)):
        root = os.path.abspath(data)
    else:
        root = os.path.dirname(os.path.abspath(os.path.normpath(data)))
    by_file = collections.OrderedDict()
    for file, fname, cls in meta['heldout']:
        by_file.setdefault(file, []).append((fname, int(cls)))
    predicted, truth = [], []
    with tqdm.tqdm(total=len(meta['heldout']), desc='held-out reals', unit='img', disable=not progress) as bar:
        for file, items in by_file.items():
            path = os.path.join(root, file)
            try:
                dataset = ImageFolderDataset(path, cache=False)
            except DatasetError as exc:
                raise MetricError(str(exc)) from None
            index = {f: i for i, f in enumerate(dataset.image_fnames)}
            missing = [f for f, _ in items if f not in index]
            if missing:
                raise MetricError(f'{path}: held-out image {missing[0]} of the taxon detector is not in the dataset')
            for start in range(0, len(items), batch_size):
                chunk = items[start:start + batch_size]
                images = torch.from_numpy(np.stack([dataset[index[f]][0] for f, _ in chunk]))
                predicted.append(det.predict(images, device))
                truth.append(np.array([c for _, c in chunk], dtype=np.int64))
                bar.update(len(chunk))
            dataset.close()
    if not predicted:
        raise MetricError(f'{det.path}: the taxon detector has no held-out images')
    predicted, truth = np.concatenate(predicted), np.concatenate(truth)
    names = meta['class_names']
    per_taxon = {names[k]: float((predicted[truth == k] == k).mean()) for k in range(len(names)) if (truth == k).any()}
    return dict(acc_taxon=float((predicted == truth).mean()), per_taxon=per_taxon, num_images=int(len(truth)),
                heldout_accuracy=meta['heldout_accuracy'])
