"""Metric registry and runner: parse names like fid50k_full, kid2k or pr50k3_full, compute, report to metric-<name>.jsonl.

A metric name is a family's form plus, optionally, the suffix of the detector kind it was computed with: the engine's
families read `<family><N>[k][_full]`; an extension may register families with their own form (register_metric) and
detector kinds with their suffix (detectors.register_detector_kind).
"""

import collections
import json
import os
import re
import time

from . import metric_utils
from .detectors import Detector, detector_kind_suffixes, detector_request, resolve_detector
from .distances import density_coverage, frechet_distance_from_stats, kernel_inception_distance, memorisation, precision_recall
from ..util import UserError, format_duration

# Metric families by name; filled by @register_metric (the engine's below, an extension's at its import).
METRIC_FAMILIES = {}

DEFAULT_FORM = r'(?P<count>\d+)(?P<kilo>k?)(?P<full>_full)?'     # <N>[k][_full], after the family name
EXAMPLES = ('fid50k_full', 'kid50k_full', 'fid2k')
KID_NUM_SUBSETS = 100
KID_MAX_SUBSET_SIZE = 1000
PR_K = 3                # k-NN radius of precision / recall (Kynkaanniemi et al. 2019; NVIDIA's pr50k3): part of the name
DC_K = 5                # k-NN radius of density / coverage (Naeem et al. 2020 recommend 5)
MEM_QUANTILE = 0.05     # a generated image is a copy at or below this quantile of the reference distances
MEM_CT_COPYING = -3.0   # C_T below this: the generated images are closer to the training set than held-out reals are
SUFFIXES = '{suffixes}' # in a registered form: where the detector kinds' optional suffixes go

# A parsed metric name; detector_kind: the detector kind whose suffix the name ends in, None = none.
MetricSpec = collections.namedtuple('MetricSpec', ['name', 'family', 'count', 'full', 'detector_kind'])

# A registered family: fn(opts, spec) -> dict, and its name grammar (see register_metric).
MetricFamily = collections.namedtuple('MetricFamily', ['fn', 'pattern', 'default_count', 'detector_kind', 'form', 'example',
                                                     'plain_detector', 'higher_is_better'])


class MetricError(UserError):
    """A metric request that cannot be served; one line naming the problem."""


def register_metric(
    family,                     # name the metric names start with, e.g. 'fid'
    pattern         = None,     # regex of the rest of the name before any detector suffix, with the groups count,
                                # kilo and full (each optional); None = <N>[k][_full]
    default_count   = None,     # image count of a name without one; None = the count is required
    detector_kind   = None,     # the family needs detectors of this kind: its names end in that kind's suffix; None = any
    form            = None,     # the name forms for error messages, e.g. 'acc[<N>[k]]_taxon' ('{suffixes}' = the
                                # detector kinds' optional suffixes); None = derived
    example         = None,     # an example name for error messages; None = none
    plain_detector  = None,     # the protocol's own detector (e.g. 'vgg16'), used in place of Inception for names
                                # without a suffix; None = as given
    higher_is_better = False,   # True for scores (accuracy, precision); False for distances (FID, KID, copy share)
):
    """Decorator: register fn(opts, spec) -> dict(results={name: value}, ...) as the metric family `family`."""
    def decorator(fn):
        METRIC_FAMILIES[family] = MetricFamily(fn=fn, pattern=DEFAULT_FORM if pattern is None else pattern,
                                               default_count=default_count, detector_kind=detector_kind, form=form,
                                               example=example, plain_detector=plain_detector,
                                               higher_is_better=higher_is_better)
        return fn
    return decorator


def higher_is_better(name):
    """Whether a larger value of metric `name` is better (its family's registration says); MetricError for a bad name."""
    return METRIC_FAMILIES[parse_metric_name(name).family].higher_is_better


def valid_forms():
    """The metric-name forms for error messages, e.g. 'fid<N>[k][_full][_taxon], ... (e.g. fid50k_full, ...)'."""
    suffixes = detector_kind_suffixes()
    optional = ''.join(f'[{suffix}]' for suffix in suffixes.values())
    forms = [(entry.form or f'{family}<N>[k][_full]{SUFFIXES}').replace(SUFFIXES, optional) for family, entry in METRIC_FAMILIES.items()]
    examples = list(EXAMPLES) + [f'kid5k_full{suffix}' for suffix in suffixes.values()]
    examples += [entry.example for entry in METRIC_FAMILIES.values() if entry.example]
    return f'{", ".join(forms)} (e.g. {", ".join(examples)})'


def _match_family(name):
    """(family, match of the family's pattern, detector kind of the suffix or None) for a metric name, or None."""
    endings = [(kind, suffix) for kind, suffix in detector_kind_suffixes().items() if suffix and name.endswith(suffix)]
    for kind, suffix in endings + [(None, '')]:
        stem = name[:len(name) - len(suffix)]
        for family, entry in METRIC_FAMILIES.items():
            if not stem.startswith(family) or entry.detector_kind not in (None, kind):
                continue
            match = re.fullmatch(entry.pattern, stem[len(family):])
            if match is not None:
                return family, match, kind
    return None


def parse_metric_name(name):
    """'fid2k_full' -> MetricSpec(name, 'fid', 2000, True, None) ('fid2k_full_taxon' -> ..., 'taxon' with taxogan_ext's
    detector kind); MetricError listing the valid forms."""
    found = _match_family(name)
    if found is None:
        raise MetricError(f'unknown metric {name!r}; valid forms: {valid_forms()}')
    family, match, kind = found
    groups = match.groupdict()
    digits = groups.get('count')
    if digits is None and METRIC_FAMILIES[family].default_count is None:
        raise MetricError(f'unknown metric {name!r}; valid forms: {valid_forms()}')
    count = METRIC_FAMILIES[family].default_count if digits is None else int(digits) * (1000 if groups.get('kilo') else 1)
    if count < 1:
        raise MetricError(f'metric {name!r}: the image count must be at least 1; valid forms: {valid_forms()}')
    return MetricSpec(name=name, family=family, count=count, full=bool(groups.get('full')), detector_kind=kind)


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
    """(Detector, result name): a name with a kind's suffix takes a detector of that kind; others take one without a
    suffix if given, else the first one with the detector's suffix added to the name. A family with a plain_detector
    (pr, dc: VGG16) takes it where the first plain choice is Inception, so that its figures follow its own protocol."""
    choices = list(detector) if isinstance(detector, (list, tuple)) else [detector]
    if not choices:
        raise MetricError('no detector given')
    resolved = [resolve_detector(d, cache_dir=cache_dir, progress=progress) for d in choices]
    if spec.detector_kind is not None:
        of_kind = [d for d in resolved if d.kind == spec.detector_kind]
        if not of_kind:
            raise MetricError(f'metric {spec.name} needs the {spec.detector_kind} detector; pass '
                              f'{detector_request(spec.detector_kind)}')
        return of_kind[0], spec.name
    plain = [d for d in resolved if not d.suffix]
    if plain:
        preferred = METRIC_FAMILIES[spec.family].plain_detector
        if preferred is not None and plain[0].kind == 'inception':
            given = [d for d in plain if d.kind == preferred]
            return (given[0] if given else Detector(preferred, cache_dir=cache_dir, progress=progress)), spec.name
        return plain[0], spec.name
    return resolved[0], spec.name + resolved[0].suffix


def calc_metric(
    metric,                 # metric name, e.g. 'fid50k_full', 'kid2k' (+ a registered detector kind's suffix)
    G,                      # generator (G_ema); G(z, c, truncation_psi, noise_mode) -> [N, C, H, W] in [-1, 1];
                            # or a metric_utils.ImageSet, whose images (at most N of them) stand in for generated ones
    dataset_kwargs,         # ImageFolderDataset kwargs of the real images (a pickle's training_set_kwargs)
    detector    = 'inception', # 'inception', KIND:PATH, a TorchScript PATH, a Detector, or a list of them
    num_gpus    = 1,        # processes sharing the work (torch.distributed must be initialised when > 1)
    rank        = 0,        # this process's rank
    device      = None,     # torch device; None = cuda when available, else cpu
    progress    = True,     # tqdm progress bars on rank 0
    cache_dir   = None,     # detector and real-feature cache; None = $TAXOGAN_CACHE or ~/.cache/taxogan
    batch_size  = 64,       # images per detector call
    seed        = 0,        # seed of latents, labels, noise and KID subsets: the same inputs give the same value
    **family_kwargs,        # options of extension families (MetricOptions.family_kwargs), e.g. taxogan_ext's taxon=NAME
):
    """Compute one metric; returns dict(results={name: value}, metric, total_time, num_gpus, detector, ...)."""
    spec = parse_metric_name(metric)
    chosen, name = select_detector(spec, detector, cache_dir=cache_dir, progress=progress and rank == 0)
    spec = spec._replace(name=name, detector_kind=chosen.kind if chosen.suffix else None)
    opts = metric_utils.MetricOptions(G=G, dataset_kwargs=dataset_kwargs, detector=chosen, num_gpus=num_gpus, rank=rank,
                                      device=device, progress=progress, cache_dir=cache_dir, batch_size=batch_size,
                                      seed=seed, family_kwargs=family_kwargs)
    start = time.time()
    try:
        out = METRIC_FAMILIES[spec.family].fn(opts, spec)
    except ValueError as exc:
        raise MetricError(f'{name}: {exc}') from None
    total_time = time.time() - start
    result = dict(out, metric=name, total_time=total_time, total_time_str=format_duration(total_time), num_gpus=num_gpus,
                  detector=chosen.spec, detector_id=chosen.id, dataset=opts.dataset_kwargs.get('path'), seed=seed)
    if isinstance(G, metric_utils.ImageSet):
        result['images'] = G.path
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


def _knn_pair(opts, spec, measure, k, endings):
    """Results <name>_<ending> of measure(real rows, generated rows, k=k) -> two floats (computed on rank 0)."""
    real, gen = _real_and_generated_rows(opts, spec)
    values = (float('nan'),) * 2
    if opts.rank == 0:
        values = measure(real.get_all(), gen.get_all(), k=k, device=opts.device)
    return dict(results={f'{spec.name}_{ending}': value for ending, value in zip(endings, values)}, k=k,
                num_real=real.num_items, num_gen=gen.num_items)


def _real_and_generated_rows(opts, spec):
    """All feature rows of the real images (as fid/kid choose them) and of spec.count generated images."""
    real = metric_utils.compute_feature_stats_for_dataset(opts, max_items=None if spec.full else spec.count, full=spec.full,
                                                          capture_all=True)
    gen = metric_utils.compute_feature_stats_for_generator(opts, num_gen=spec.count, capture_all=True)
    return real, gen


@register_metric('pr', pattern=r'(?P<count>\d+)(?P<kilo>k?)3(?P<full>_full)?', form=f'pr<N>[k]3[_full]{SUFFIXES}',
                 example='pr50k3_full', plain_detector='vgg16', higher_is_better=True)
def _pr(opts, spec):
    """Precision and recall with k = 3: results <name>_precision, <name>_recall (the '3' in the name is k)."""
    return _knn_pair(opts, spec, precision_recall, PR_K, ('precision', 'recall'))


@register_metric('dc', example='dc10k_full', plain_detector='vgg16', higher_is_better=True)
def _dc(opts, spec):
    """Density and coverage with k = 5: results <name>_density, <name>_coverage."""
    return _knn_pair(opts, spec, density_coverage, DC_K, ('density', 'coverage'))


@register_metric('mem', pattern=r'(?P<count>\d+)(?P<kilo>k?)', form=f'mem<N>[k]{SUFFIXES}', example='mem1k')
def _mem(opts, spec):
    """Data copying of spec.count generated images against every training image (x-flip off): results <name>_share,
    <name>_ct. Reference: held-out real images (option heldout=PATH) or leave-one-out over the training images."""
    train = metric_utils.compute_feature_stats_for_dataset(opts, full=True, capture_all=True)
    heldout = opts.family_kwargs.get('heldout')
    ref = None
    if heldout is not None:
        ref = metric_utils.compute_feature_stats_for_dataset(opts, full=True, capture_all=True,
                                                             dataset_overrides=dict(path=heldout, use_labels=False))
    gen = metric_utils.compute_feature_stats_for_generator(opts, num_gen=spec.count, capture_all=True)
    out = dict(share=float('nan'), ct=float('nan'), threshold=float('nan'), baseline_share=float('nan'))
    if opts.rank == 0:
        out = memorisation(train.get_all(), gen.get_all(), None if ref is None else ref.get_all(), quantile=MEM_QUANTILE,
                           device=opts.device)
    return dict(results={f'{spec.name}_share': out['share'], f'{spec.name}_ct': out['ct']}, quantile=MEM_QUANTILE,
                threshold=out['threshold'], baseline_share=out['baseline_share'], copying=bool(out['ct'] < MEM_CT_COPYING),
                reference=heldout if heldout is not None else 'leave-one-out',
                num_reference=ref.num_items if ref is not None else train.num_items, num_real=train.num_items,
                num_gen=gen.num_items)
