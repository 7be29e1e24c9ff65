"""Do the synthetic images help? Classifier accuracy on held-out real images when training with generated ones.

Two measures of a set of generators, one per target taxon (the rows of a plan method), on a fixed split of the real
images into training and held-out test images (`write_holdout_split`: seeded, stratified by taxon; the held-out images
are left out of every training zip, the parent's included, and never train anything):

- `cas[<N>[k]]_taxon`, classification accuracy score: a classifier trained only on generated images (N per taxon,
  balanced; default: as many as the largest taxon has real training images) labelled with the generator's taxon,
  tested on the held-out real images. Reported with the real-trained classifier's accuracy beside it.
- `gain[<N>[k]]_taxon`, augmentation gain: a classifier trained on the real training images and one trained on the
  real images plus generated ones (each taxon topped up to the size of the largest; with N: N more per taxon), both
  tested on the held-out real images; the difference, per taxon and for the balanced mean.

Every arm trains the same classifier (the taxon classifier's architecture, taxogan_ext.taxon_detector) for the same
number of steps with the same batch size, learning rate, class-balanced loss and augmentation; only the training
images differ. Accuracies are per taxon (the share of its held-out images classified as it) and their mean (balanced
accuracy, so that a 900-image order does not outweigh a 150-image one).

Uncertainty: every measure is repeated with `seeds` seeds (classifier initialisation, batch order, augmentation and the
generated images all change with the seed; the real arm and the augmented arm of one seed share the seed, so the gain
is a paired difference), and reported as the mean with a 95 % Student-t interval over the seeds. Repeated runs, not a
bootstrap over test images: with a few hundred images, the spread between training runs is the larger source of
variation, and a bootstrap of the fixed test set would not see it.
"""

import copy
import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import re
import time
import zipfile
from pathlib import Path

import click
import numpy as np
import scipy.stats
import torch
import tqdm

from stylegan2ada import cli
from stylegan2ada.dataset import IMAGE_EXTENSIONS, DatasetError, ImageFolderDataset
from stylegan2ada.image_utils import to_uint8
from stylegan2ada.metrics.detectors import default_cache_dir, resolve_detector
from stylegan2ada.pickles import evaluation_network, load_network_pkl
from stylegan2ada.util import UserError, atomic_write, sha256_file, write_json_atomic
from taxogan_ext import hierarchy
from taxogan_ext.collection import zip_info
from taxogan_ext.taxon_detector import TaxonClassifier, augment_batch, class_taxa, class_weights, preprocess_images, split_heldout
from taxogan_ext.taxon_metrics import TaxonError, TaxonFilter
from taxogan_ext.taxonomy import MANIFEST_NAME, Manifest, load_manifest, manifest_from_dict

HOLDOUT_FILE    = 'heldout.json'        # which images are held out, written beside the training-only zips
HELDOUT_ZIP     = 'heldout.zip'         # the held-out images, labelled with their lowest-rank taxon
HOLDOUT_FORMAT  = 'taxogan-holdout/1'
UTILITY_FILE    = 'utility.jsonl'       # an experiment's utility records (train_hier.py), read by the report
UTILITY_FORMAT  = 'taxogan-utility/1'
CACHE_VERSION   = 1                     # part of every cache key: bump when the computation changes
KINDS           = ('cas', 'gain')
NAME_PATTERN    = re.compile(r'(?P<kind>cas|gain)(?:(?P<count>\d+)(?P<kilo>k?))?(?P<filtered>_filtered)?_taxon')
FORMS           = ('cas[<N>[k]][_filtered]_taxon, gain[<N>[k]][_filtered]_taxon (e.g. cas_taxon, gain_taxon, cas500_taxon, '
                   'gain_filtered_taxon)')
FILTER_OPTIONS  = ('utility_filter', 'utility_filter_threshold')   # only the *_filtered measures depend on these
MAX_TRIES       = 20                    # a filtered measure draws at most this many candidates per image it keeps


class UtilityError(UserError):
    """A utility measure that cannot be computed (no held-out split, a taxon without test images); one line."""

#----------------------------------------------------------------------------
# Metric names and options.

@dataclasses.dataclass(frozen=True)
class UtilitySpec:
    """A parsed utility metric name."""
    name:       str             # e.g. 'cas_taxon', 'gain200_filtered_taxon'
    kind:       str             # 'cas' or 'gain'
    count:      int | None      # generated images per taxon; None = the default (see the module docstring)
    filtered:   bool = False    # only generated images the filter classifier assigns to their taxon (--utility-filter)


def parse_utility_metric(name: str) -> UtilitySpec | None:
    """'cas_taxon' -> UtilitySpec('cas_taxon', 'cas', None); None when `name` is not a utility metric."""
    match = NAME_PATTERN.fullmatch(name)
    if match is None:
        return None
    count = None if match['count'] is None else int(match['count']) * (1000 if match['kilo'] else 1)
    if count is not None and count < 1:
        raise UtilityError(f'metric {name!r}: the image count must be at least 1; valid forms: {FORMS}')
    return UtilitySpec(name=name, kind=match['kind'], count=count, filtered=match['filtered'] is not None)


def is_utility_metric(name: str) -> bool:
    """True for cas..._taxon and gain..._taxon names."""
    return NAME_PATTERN.fullmatch(name) is not None


@dataclasses.dataclass(frozen=True)
class UtilityOptions:
    """How the classifiers of the utility measures are trained (the same for every arm)."""
    utility_seeds:  int     = cli.option_field(3, 'Utility metrics: repeated runs (seeds) behind each mean and interval', click.IntRange(min=1), 'INT')
    utility_steps:  int     = cli.option_field(500, 'Utility metrics: optimizer steps of every classifier', click.IntRange(min=1), 'INT')
    utility_batch:  int     = cli.option_field(32, 'Utility metrics: images per step', click.IntRange(min=1), 'INT')
    utility_res:    int     = cli.option_field(64, 'Utility metrics: classifier side in pixels (at most the images\')', click.IntRange(min=8), 'INT')
    utility_lr:     float   = cli.option_field(2e-3, 'Utility metrics: Adam learning rate (cosine decay to 0)', click.FloatRange(min=0, min_open=True), 'FLOAT')
    utility_filter: str     = cli.option_field(None, 'Utility metrics: taxon classifier of the *_filtered_taxon measures (train it on the split\'s training images only)', str, 'taxon:PATH')
    utility_filter_threshold: float = cli.option_field(0.5, 'Utility metrics: *_filtered_taxon keep a generated image when the filter\'s top class is its taxon, with at least this probability', click.FloatRange(min=0, max=1), 'P')
    channels:       tuple   = (32, 64, 128, 256)    # the taxon classifier's stage widths (not an option: fixed architecture)

    def __post_init__(self):
        cli.typed_values(self)


def click_options():
    """Decorator adding UtilityOptions' fields to a click command (calc_metrics.py utility, train_hier.py)."""
    return cli.dataclass_options(UtilityOptions)


def check_filter(
    metrics,                            # utility metric names
    options:    UtilityOptions,
) -> None:
    """UtilityError (one line) when a *_filtered measure has no filter classifier, or its file is missing."""
    filtered = [name for name in metrics if (parse_utility_metric(name) or UtilitySpec(name, '', None)).filtered]
    if filtered and not options.utility_filter:
        raise UtilityError(f'{filtered[0]}: the filtered measures need --utility-filter taxon:PATH (a taxon classifier '
                           f'trained on the training images only, e.g. calc_metrics.py train-detector on the split folder)')
    if filtered:
        kind, _, path = options.utility_filter.partition(':')
        if kind != 'taxon' or not path:
            raise UtilityError(f'--utility-filter {options.utility_filter}: expected taxon:PATH')
        if not os.path.isfile(path):
            raise UtilityError(f'--utility-filter {options.utility_filter}: no such file')


def options_from(kwargs: dict) -> UtilityOptions:
    """UtilityOptions from a click command's kwargs (the fields it offers)."""
    names = [f.name for f in dataclasses.fields(UtilityOptions) if 'help' in f.metadata]
    return UtilityOptions(**{name: kwargs[name] for name in names if name in kwargs})

#----------------------------------------------------------------------------
# The held-out split.

@dataclasses.dataclass(frozen=True)
class Holdout:
    """A training-only datasets folder and its held-out real images."""
    manifest:   Manifest                # of the training-only zips
    classes:    list                    # the lowest-rank taxa, class order of heldout.zip
    images:     list                    # [{name, taxon, path, sha256}] of heldout.zip, `path` = taxa from the top down
    record:     dict                    # heldout.json as read

    @property
    def heldout_zip(self) -> Path:
        return self.manifest.root / HELDOUT_ZIP

    def test_names(self, taxon: str) -> list[str]:
        """Names in heldout.zip of the held-out images of `taxon` (or of taxa below it)."""
        return [image['name'] for image in self.images if taxon in image['path']]


def _image_names(zf: zipfile.ZipFile) -> list[str]:
    return sorted(n for n in zf.namelist() if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS)


def _read_zip(path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise UtilityError(f'{path}: cannot read the dataset zip ({exc})') from None


def _choose_heldout(manifest: Manifest, fraction: float, seed: int) -> tuple[list, list]:
    """(classes, held-out images [{name, taxon, path, sha256, data}]): a stratified share of each lowest-rank taxon."""
    classes = class_taxa(manifest)
    items = []                                  # (class index, name in its zip)
    for k, taxon in enumerate(classes):
        with _read_zip(manifest.dataset_path(taxon)) as zf:
            items += [(k, name) for name in _image_names(zf)]
    labels = torch.tensor([k for k, _ in items], dtype=torch.int64)
    _, held_idx = split_heldout(labels, len(classes), fraction, seed)
    held = []
    for k, taxon in enumerate(classes):
        names = [items[i][1] for i in held_idx.tolist() if items[i][0] == k]
        path = list(reversed(manifest.ancestors(taxon))) + [taxon]
        with _read_zip(manifest.dataset_path(taxon)) as zf:
            for name in names:
                data = zf.read(name)
                held.append(dict(name=f'{taxon}/{name}', taxon=taxon, path=path,
                                 sha256=hashlib.sha256(data).hexdigest(), data=data))
    return classes, held


def _copy_without(src, dst, drop_sha256: set) -> tuple[int, int]:
    """Copy a dataset zip leaving out images whose bytes hash into `drop_sha256`; (images kept, images dropped)."""
    with _read_zip(src) as zf, atomic_write(dst, 'wb') as f, zipfile.ZipFile(f, 'w') as out:
        kept, dropped = [], 0
        for name in _image_names(zf):
            data = zf.read(name)
            if hashlib.sha256(data).hexdigest() in drop_sha256:
                dropped += 1
                continue
            out.writestr(zip_info(name), data)
            kept.append(name)
        meta = json.loads(zf.read('dataset.json')) if 'dataset.json' in zf.namelist() else {'labels': None}
        if meta.get('labels') is not None:
            keep = set(kept)
            meta['labels'] = [entry for entry in meta['labels'] if entry[0] in keep]
        out.writestr(zip_info('dataset.json', zipfile.ZIP_DEFLATED), json.dumps(meta, separators=(',', ':')))
    return len(kept), dropped


def _write_heldout_zip(path, classes: list, held: list) -> None:
    with atomic_write(path, 'wb') as f, zipfile.ZipFile(f, 'w') as out:
        for image in held:
            out.writestr(zip_info(image['name']), image['data'])
        meta = dict(labels=[[image['name'], classes.index(image['taxon'])] for image in held], label_names=list(classes))
        out.writestr(zip_info('dataset.json', zipfile.ZIP_DEFLATED), json.dumps(meta, separators=(',', ':')))


def _split_is_current(dest: Path, source_sha: str, fraction: float, seed: int) -> bool:
    """True when dest holds a complete split of this source manifest with these settings, every zip intact."""
    try:
        record = json.loads((dest / HOLDOUT_FILE).read_text(encoding='utf-8'))
        manifest = load_manifest(dest)
    except (OSError, ValueError, UserError):
        return False
    if (record.get('source_manifest_sha256'), record.get('fraction'), record.get('seed')) != (source_sha, fraction, seed):
        return False
    return all(manifest.verify(name) == 'ok' for name in manifest.taxa) and \
        (dest / HELDOUT_ZIP).is_file() and sha256_file(dest / HELDOUT_ZIP) == record.get('heldout_sha256')


def write_holdout_split(
    datasets,                   # source datasets folder (manifest.json)
    dest,                       # folder for the training-only zips, manifest.json, heldout.zip and heldout.json
    fraction,                   # share of each lowest-rank taxon's images held out (at least one, never all)
    seed        = 0,            # seed of the split
    log         = None,         # f(line) for a summary line; None = quiet
) -> Manifest:
    """Split a datasets folder into training-only zips and held-out images (kept as they are when already written)."""
    source = load_manifest(datasets)
    if source.extra.get('holdout'):
        raise UtilityError(f'{source.root / MANIFEST_NAME}: already a held-out split (of {source.extra["holdout"].get("source")}); '
                           f'split the original datasets folder')
    if not 0 < fraction < 1:
        raise UtilityError(f'held-out fraction {fraction}: must be between 0 and 1')
    dest = Path(dest)
    if dest.resolve() == source.root.resolve():
        raise UtilityError(f'{dest}: the split must go to another folder than the datasets it splits')
    source_sha = sha256_file(source.root / MANIFEST_NAME)
    if _split_is_current(dest, source_sha, fraction, seed):
        return load_manifest(dest)
    for name in source.taxa:
        check = source.verify(name)
        if check != 'ok':
            raise UtilityError(f'{source.dataset_path(name)}: {check}; rebuild the datasets')
    dest.mkdir(parents=True, exist_ok=True)
    classes, held = _choose_heldout(source, fraction, seed)
    drop = {image['sha256'] for image in held}
    data = source.to_dict()
    for name, taxon in source.taxa.items():
        kept, dropped = _copy_without(source.dataset_path(name), dest / taxon.dataset, drop)
        entry = data['taxa'][name]
        entry.update(num_images=kept, sha256=sha256_file(dest / taxon.dataset),
                     num_images_direct=taxon.num_images_direct - (dropped if not taxon.children else 0))
    _write_heldout_zip(dest / HELDOUT_ZIP, classes, held)
    record = dict(format=HOLDOUT_FORMAT, source=str(source.root.resolve()), source_manifest_sha256=source_sha,
                  fraction=fraction, seed=seed, classes=classes, heldout_sha256=sha256_file(dest / HELDOUT_ZIP),
                  num_heldout={t: sum(1 for i in held if i['taxon'] == t) for t in classes},
                  images=[{k: v for k, v in image.items() if k != 'data'} for image in held])
    write_json_atomic(dest / HOLDOUT_FILE, record)
    data['holdout'] = dict(file=HOLDOUT_FILE, source=record['source'], fraction=fraction, seed=seed, num_heldout=len(held))
    # The manifest goes last: a folder with it is a complete split.
    write_json_atomic(dest / MANIFEST_NAME, data)
    if log is not None:
        log(f'held out {len(held)} real images ({fraction:g} of each of {", ".join(classes)}; seed {seed}) -> {dest}')
    return manifest_from_dict(data, dest)


def load_holdout(datasets) -> Holdout:
    """The held-out split a datasets folder was made with; UtilityError when it is not a split."""
    manifest = load_manifest(datasets)
    path = manifest.root / HOLDOUT_FILE
    if not manifest.extra.get('holdout') or not path.is_file():
        raise UtilityError(f'{manifest.root}: no held-out real images ({HOLDOUT_FILE}); the utility metrics need a split: '
                           f'train_hier.py --holdout FRACTION (or calc_metrics.py utility --datasets on its split folder)')
    try:
        record = json.loads(path.read_text(encoding='utf-8'))
    except (OSError, ValueError) as exc:
        raise UtilityError(f'{path}: cannot read ({exc})') from None
    if record.get('format') != HOLDOUT_FORMAT:
        raise UtilityError(f'{path}: format is {record.get("format")!r}, expected {HOLDOUT_FORMAT!r}')
    return Holdout(manifest=manifest, classes=list(record['classes']), images=list(record['images']), record=record)

#----------------------------------------------------------------------------
# The classifier of every arm.

def _decode(path, names=None, resolution=64) -> torch.Tensor:
    """Images of a dataset (all, or those called `names`, in that order) as float [N, 3, r, r] in [-1, 1]."""
    try:
        dataset = ImageFolderDataset(str(path), use_labels=False, cache=False)
    except DatasetError as exc:
        raise UtilityError(str(exc)) from None
    index = {name: i for i, name in enumerate(dataset.image_fnames)}
    wanted = list(dataset.image_fnames) if names is None else list(names)
    missing = [name for name in wanted if name not in index]
    if missing:
        raise UtilityError(f'{path}: no image {missing[0]} (the held-out split is out of date; write it again)')
    chunks = []
    for start in range(0, len(wanted), 64):
        batch = np.stack([dataset[index[name]][0] for name in wanted[start:start + 64]])     # [B, C, H, W] uint8
        chunks.append(preprocess_images(torch.from_numpy(batch), resolution))
    dataset.close()
    return torch.cat(chunks) if chunks else torch.zeros([0, 3, resolution, resolution])


def _batches(num, batch_size, steps, generator):
    """`steps` batches of indices below `num`: consecutive random permutations, cut into batches."""
    pool = torch.zeros([0], dtype=torch.int64)
    for _ in range(steps):
        while len(pool) < batch_size:
            pool = torch.cat([pool, torch.randperm(num, generator=generator)])
        yield pool[:batch_size]
        pool = pool[batch_size:]


def fit_classifier_steps(
    images,                     # float [N, 3, r, r] in [-1, 1]
    labels,                     # int64 [N] class indices
    class_names,                # one name per class
    options: UtilityOptions,
    seed,                       # initialisation, batch order and augmentation
    device      = 'cpu',
) -> TaxonClassifier:
    """Train a taxon classifier for options.utility_steps steps (class-balanced loss, augmentation, cosine decay)."""
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    weights = class_weights(labels, class_names, 'the training images')
    # Initialisation and dropout draw from torch's global RNG: seeded inside a fork, so that a fit repeats exactly.
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        torch.manual_seed(seed)
        model = TaxonClassifier(class_names, resolution=images.shape[-1], channels=options.channels).to(device).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=options.utility_lr, weight_decay=1e-4)
        loss_fn = torch.nn.CrossEntropyLoss(weight=weights.to(device))
        for step, batch in enumerate(_batches(len(labels), options.utility_batch, options.utility_steps, generator)):
            for group in optimizer.param_groups:
                group['lr'] = options.utility_lr * 0.5 * (1 + math.cos(math.pi * step / options.utility_steps))
            x = augment_batch(images[batch], generator).to(device)
            loss = loss_fn(model.classify(x), labels[batch].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


def per_class_accuracy(
    model,                      # TaxonClassifier
    images,                     # float [N, 3, r, r] test images
    labels,                     # int64 [N] their classes
    num_classes,                # K
) -> np.ndarray:
    """[K] float64: the share of each class's test images classified as that class (NaN for a class without any)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        predicted = torch.cat([model.classify(images[i:i + 256].to(device)).argmax(dim=1).cpu()
                               for i in range(0, len(images), 256)]) if len(images) else torch.zeros([0], dtype=torch.int64)
    out = np.full([num_classes], np.nan)
    for k in range(num_classes):
        mask = labels == k
        if mask.any():
            out[k] = float((predicted[mask] == k).to(torch.float64).mean())
    return out


def mean_interval(values, confidence=0.95) -> tuple[float, float, float]:
    """(mean, low, high) of a Student-t interval over repeated runs; low = high = NaN for a single run."""
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, float('nan'), float('nan')
    half = float(scipy.stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))
    return mean, mean - half, mean + half

#----------------------------------------------------------------------------
# Generators.

@dataclasses.dataclass
class GeneratorSource:
    """The generator of one taxon: a network G(z, c, truncation_psi=, noise_mode=) -> images in [-1, 1], or its pickle."""
    G:          torch.nn.Module | None = None   # the network; None = load it from `pkl` when first needed
    pkl:        str | None = None               # network pickle (its G_ema) when G is None
    label:      int | None = None               # class of a conditional G; None = unconditional
    identity:   str | None = None               # what identifies it for the cache (the pickle's SHA-256); None = no cache

    def network(self, device) -> torch.nn.Module:
        """The generator on `device` (loaded from the pickle the first time)."""
        if self.G is None:
            self.G = copy.deepcopy(evaluation_network(load_network_pkl(self.pkl))).eval().requires_grad_(False)
        self.G = self.G.to(device)
        return self.G


def _taxon_seed(seed: int, taxon: str) -> int:
    """A seed per (run, taxon), independent of the order of the targets."""
    return int.from_bytes(hashlib.sha256(f'{seed}/{taxon}'.encode()).digest()[:4], 'little')


def generate(
    source: GeneratorSource,
    num,                        # images to generate (to keep, with `accept`)
    seed,                       # latents and noise
    resolution,                 # the classifier's side
    device      = 'cpu',
    batch_size  = 32,
    accept      = None,         # f(uint8 [n, C, H, W]) -> bool [n]: keep only these candidates; None = keep all
    max_tries   = MAX_TRIES,    # with `accept`: at most this many candidates per image wanted, then UtilityError
    what        = None,         # how an error names the generator, e.g. its taxon; None = its pickle
) -> torch.Tensor:
    """`num` images of a generator as the classifier sees them: float [num, 3, r, r] (through uint8, as real images)."""
    G = source.network(device)
    generator = torch.Generator().manual_seed(seed)
    out, kept, tried = [], 0, 0
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == 'cuda' else []), torch.no_grad():
        torch.manual_seed(seed)                 # noise_mode='random' draws from the global RNG
        while kept < num:
            if accept is not None and tried >= max_tries * num:
                raise UtilityError(f'{what or source.pkl or "generator"}: only {kept} of {tried} generated images '
                                   f'({kept / tried:.1%}) pass the filter, {num} wanted; lower --utility-filter-threshold '
                                   f'or check the filter classifier')
            n = min(batch_size, num - kept) if accept is None else batch_size
            z = torch.randn([n, G.z_dim], generator=generator).to(device)
            c = torch.zeros([n, G.c_dim], device=device)
            if source.label is not None:
                c[:, source.label] = 1
            images = to_uint8(G(z, c, truncation_psi=1, noise_mode='random')).cpu()           # [n, C, H, W]
            tried += n
            if accept is not None:
                images = images[torch.as_tensor(accept(images), dtype=torch.bool)][:num - kept]
            kept += len(images)
            out.append(preprocess_images(images, resolution))
    return torch.cat(out) if out else torch.zeros([0, 3, resolution, resolution])


#----------------------------------------------------------------------------
# The measures.

class UtilityEvaluator:
    """The real training and held-out images of some target taxa, decoded once, and the real-trained classifier of each
    seed, trained once: several generator sets (plan methods) are then measured against the same baseline."""

    def __init__(self,
        holdout:    Holdout,
        targets,                            # the taxa (classes of every classifier), e.g. the four orders
        options:    UtilityOptions,
        device      = 'cpu',
        progress    = True,                 # tqdm progress bars
    ):
        self.holdout, self.targets, self.options = holdout, list(targets), options
        self.device, self.progress = torch.device(device), progress
        self.resolution = min(options.utility_res, holdout.manifest.resolution)
        manifest = holdout.manifest
        for target in self.targets:
            manifest.taxon(target)                              # ManifestError for an unknown name
            above = [other for other in self.targets if other in manifest.ancestors(target)]
            if above:
                raise UtilityError(f'targets {above[0]} and {target} overlap ({target} is below {above[0]}); '
                                   f'the classes of a classifier must be disjoint')
        train, test = [], []
        for k, target in enumerate(self.targets):
            names = holdout.test_names(target)
            if not names:
                raise UtilityError(f'{holdout.manifest.root / HOLDOUT_FILE}: no held-out images of {target}')
            train.append(_decode(manifest.dataset_path(target), resolution=self.resolution))
            test.append(_decode(holdout.heldout_zip, names, resolution=self.resolution))
        self.num_train = {t: len(x) for t, x in zip(self.targets, train)}
        self.num_test = {t: len(x) for t, x in zip(self.targets, test)}
        self.real_x = torch.cat(train)
        self.real_y = torch.cat([torch.full([len(x)], k, dtype=torch.int64) for k, x in enumerate(train)])
        self.test_x = torch.cat(test)
        self.test_y = torch.cat([torch.full([len(x)], k, dtype=torch.int64) for k, x in enumerate(test)])
        self._real_accuracy = {}            # seed -> [K]
        self.filter = None                  # TaxonFilter of the *_filtered measures, loaded when first needed

    def taxon_filter(self) -> TaxonFilter:
        """The filter classifier of options.utility_filter; UtilityError when none is set."""
        if self.filter is None:
            if not self.options.utility_filter:
                raise UtilityError('the *_filtered_taxon measures need a filter classifier: --utility-filter taxon:PATH')
            try:
                self.filter = TaxonFilter(self.options.utility_filter, self.options.utility_filter_threshold,
                                          self.holdout.manifest, self.targets, option='--utility-filter')
            except TaxonError as exc:
                raise UtilityError(str(exc)) from None
        return self.filter

    def accept(self, taxon):
        """f(uint8 images [n, C, H, W]) -> bool numpy [n]: the filter's verdict on generated images of `taxon`."""
        taxon_filter = self.taxon_filter()
        return lambda images: taxon_filter.judge(images, taxon, self.device)[1]

    def identity(self) -> dict:
        """What the results depend on besides the generators: the split, the targets' data, the options."""
        manifest = self.holdout.manifest
        return dict(version=CACHE_VERSION, heldout=self.holdout.record['heldout_sha256'],
                    train={t: manifest.sha256(t) for t in self.targets}, targets=self.targets,
                    options={k: v for k, v in dataclasses.asdict(self.options).items() if k not in FILTER_OPTIONS},
                    resolution=self.resolution, device=self.device.type)

    def filter_identity(self) -> dict:
        """What the *_filtered measures depend on besides identity(): the filter classifier's bytes and threshold."""
        return dict(sha256=self.taxon_filter().sha256, threshold=self.options.utility_filter_threshold)

    def _fit_and_test(self, images, labels, seed) -> np.ndarray:
        model = fit_classifier_steps(images, labels, self.targets, self.options, seed, self.device)
        return per_class_accuracy(model, self.test_x, self.test_y, len(self.targets))

    def real_accuracy(self, seed) -> np.ndarray:
        """[K] held-out accuracy per taxon of the classifier trained on the real training images with this seed."""
        if seed not in self._real_accuracy:
            self._real_accuracy[seed] = self._fit_and_test(self.real_x, self.real_y, seed)
        return self._real_accuracy[seed]

    def generated_counts(self, spec: UtilitySpec) -> dict:
        """Generated images per taxon of one measure: CAS's training set, or the gain's top-up."""
        largest = max(self.num_train.values())
        if spec.kind == 'cas':
            return {t: spec.count or largest for t in self.targets}
        return {t: spec.count if spec.count is not None else largest - self.num_train[t] for t in self.targets}

    def measure(self,
        specs,                              # [UtilitySpec]
        sources,                            # {target: GeneratorSource}
        bar         = None,                 # tqdm bar counting classifier fits; None = none
    ) -> dict:
        """{metric name: result dict} of the measures (see cas_result and gain_result)."""
        missing = [t for t in self.targets if t not in sources]
        if missing:
            raise UtilityError(f'no generator for {", ".join(missing)}')
        counts = {spec.name: self.generated_counts(spec) for spec in specs}
        # The filtered and unfiltered sets come from the same latents: the filtered one keeps the accepted candidates.
        flags = sorted({spec.filtered for spec in specs})
        need = {flag: {t: max(counts[spec.name][t] for spec in specs if spec.filtered == flag) for t in self.targets}
                for flag in flags}
        accept = {t: self.accept(t) for t in self.targets} if True in flags else {}
        runs = {spec.name: [] for spec in specs}
        seconds = dict(generate=0.0, real=0.0, **{spec.name: 0.0 for spec in specs})
        for seed in range(self.options.utility_seeds):
            t0 = time.time()
            real = self.real_accuracy(seed)
            seconds['real'] += time.time() - t0
            t0 = time.time()
            fake = {flag: {t: generate(sources[t], need[flag][t], _taxon_seed(seed, t), self.resolution, self.device,
                                       accept=accept[t] if flag else None, what=t) for t in self.targets} for flag in flags}
            seconds['generate'] += time.time() - t0
            for spec in specs:
                t0 = time.time()
                parts = [(fake[spec.filtered][t][:counts[spec.name][t]], k) for k, t in enumerate(self.targets)]
                x = torch.cat([images for images, _ in parts])
                y = torch.cat([torch.full([len(images)], k, dtype=torch.int64) for images, k in parts])
                if spec.kind == 'gain':
                    x, y = torch.cat([self.real_x, x]), torch.cat([self.real_y, y])
                runs[spec.name].append(dict(real=real, arm=self._fit_and_test(x, y, seed)))
                seconds[spec.name] += time.time() - t0
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.update(1)
        out = {}
        for spec in specs:
            summary = cas_result if spec.kind == 'cas' else gain_result
            out[spec.name] = summary(spec, self.targets, runs[spec.name], counts[spec.name],
                                     seconds[spec.name] + seconds['generate'] / len(specs))
            out[spec.name].update(num_train=self.num_train, num_test=self.num_test, seeds=self.options.utility_seeds)
            if spec.filtered:
                out[spec.name]['filter'] = dict(self.filter_identity(), classifier=self.options.utility_filter,
                                                rule=self.taxon_filter().rule())
        out['_seconds'] = seconds
        return out


def _per_taxon(targets, runs, fn) -> dict:
    """{taxon: [mean, low, high]} of fn(run)[k] over the runs."""
    return {t: list(mean_interval([fn(run)[k] for run in runs])) for k, t in enumerate(targets)}


def cas_result(spec, targets, runs, counts, seconds) -> dict:
    """Classification accuracy score: accuracy of the generated-only classifier (and of the real one, for reference)."""
    value, low, high = mean_interval([np.nanmean(run['arm']) for run in runs])
    real, real_low, real_high = mean_interval([np.nanmean(run['real']) for run in runs])
    return dict(metric=spec.name, value=value, interval=[low, high], per_taxon=_per_taxon(targets, runs, lambda r: r['arm']),
                real_accuracy=real, real_interval=[real_low, real_high],
                real_per_taxon=_per_taxon(targets, runs, lambda r: r['real']), num_generated=counts,
                per_seed=[float(np.nanmean(run['arm'])) for run in runs], seconds=seconds)


def gain_result(spec, targets, runs, counts, seconds) -> dict:
    """Augmentation gain: accuracy with real + generated images minus accuracy with the real images alone (paired)."""
    value, low, high = mean_interval([np.nanmean(run['arm']) - np.nanmean(run['real']) for run in runs])
    return dict(metric=spec.name, value=value, interval=[low, high],
                per_taxon=_per_taxon(targets, runs, lambda r: r['arm'] - r['real']),
                accuracy_real=mean_interval([np.nanmean(run['real']) for run in runs])[0],
                real_per_taxon=_per_taxon(targets, runs, lambda r: r['real']),
                accuracy_augmented=mean_interval([np.nanmean(run['arm']) for run in runs])[0],
                num_added=counts, per_seed=[float(np.nanmean(run['arm']) - np.nanmean(run['real'])) for run in runs],
                seconds=seconds)

#----------------------------------------------------------------------------
# Cached evaluation of generator sets.

def cache_key(evaluator: UtilityEvaluator, spec: UtilitySpec, sources: dict) -> str | None:
    """SHA-256 of everything a result depends on; None when a generator has no identity (not cacheable)."""
    identities = {t: [sources[t].identity, sources[t].label] for t in evaluator.targets}
    if any(ident is None for ident, _ in identities.values()):
        return None
    key = dict(evaluator.identity(), metric=spec.name, generators=identities)
    if spec.filtered:
        key['filter'] = evaluator.filter_identity()
    text = json.dumps(key, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def calc_utility(
    evaluator:  UtilityEvaluator,
    metrics,                            # utility metric names
    sources,                            # {target: GeneratorSource}
    cache_dir   = None,                 # result cache; None = $TAXOGAN_CACHE or ~/.cache/taxogan
    label       = '',                   # progress bar text, e.g. the plan method
) -> dict:
    """{metric name: result} of a generator set, from the cache where the same inputs were measured before."""
    specs = [parse_utility_metric(name) for name in metrics]
    unknown = [name for name, spec in zip(metrics, specs) if spec is None]
    if unknown:
        raise UtilityError(f'unknown utility metric {unknown[0]!r}; valid forms: {FORMS}')
    folder = Path(default_cache_dir(cache_dir)) / 'utility'
    keys = {spec.name: cache_key(evaluator, spec, sources) for spec in specs}
    results, todo = {}, []
    for spec in specs:
        path = folder / f'{keys[spec.name]}.json' if keys[spec.name] else None
        if path is not None and path.is_file():
            results[spec.name] = dict(json.loads(path.read_text(encoding='utf-8')), cached=True)
        else:
            todo.append(spec)
    if todo:
        fits = evaluator.options.utility_seeds * (len(todo) + 1)
        with tqdm.tqdm(total=fits, desc=f'utility classifiers {label}'.rstrip(), unit='fit',
                       disable=not evaluator.progress) as bar:
            measured = evaluator.measure(todo, sources, bar=bar)
        for spec in todo:
            result = dict(measured[spec.name], cache_key=keys[spec.name])
            if keys[spec.name]:
                write_json_atomic(folder / f'{keys[spec.name]}.json', result)
            results[spec.name] = dict(result, cached=False)
    return {name: results[name] for name in metrics}


def format_result(result: dict) -> str:
    """'cas_taxon 0.612 [0.55, 0.67] (real 0.70)' or 'gain_taxon +0.021 [-0.01, 0.05] (0.70 -> 0.72)'."""
    low, high = result['interval']
    interval = '' if math.isnan(low) else f' [{low:+.3f}, {high:+.3f}]' if result['metric'].startswith('gain') else \
        f' [{low:.3f}, {high:.3f}]'
    if result['metric'].startswith('gain'):
        return (f'{result["metric"]} {result["value"]:+.3f}{interval} '
                f'(balanced accuracy {result["accuracy_real"]:.3f} -> {result["accuracy_augmented"]:.3f})')
    return f'{result["metric"]} {result["value"]:.3f}{interval} (real-trained {result["real_accuracy"]:.3f})'


def read_utility_records(path) -> list[dict]:
    """The records of an experiment's utility.jsonl ([] when there is none); UtilityError for a damaged line."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding='utf-8').splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise UtilityError(f'{path}:{number}: not a JSON line') from None
    return records


def append_utility_record(path, record: dict) -> None:
    """Append one record to a utility.jsonl with a single write."""
    with open(path, 'a', encoding='utf-8') as f:
        f.write(json.dumps(record) + '\n')


def evaluate_plan(
    plan,                               # hierarchy.Plan, trained
    holdout:    Holdout,                # the split its datasets were made with
    metrics,                            # utility metric names
    options:    UtilityOptions,
    device      = 'cpu',
    cache_dir   = None,                 # result cache; None = the default
    progress    = True,
    log         = print,
) -> list[dict]:
    """Measure each plan method's generators (one per target) and append the records to OUTDIR/utility.jsonl."""
    outdir = Path(plan.outdir)
    generators = hierarchy.row_generators(plan, outdir)
    evaluator = UtilityEvaluator(holdout, plan.targets, options, device=device, progress=progress)
    path = outdir / UTILITY_FILE
    recorded = {(r.get('method'), r.get('metric'), r.get('cache_key')) for r in read_utility_records(path)}
    appended = []
    for method, rows in generators.items():
        missing = [t for t in plan.targets if t not in rows]
        if missing:
            log(f'{method}: no utility metrics (no network for {", ".join(missing)})')
            continue
        sources = {t: GeneratorSource(pkl=g.pkl, label=g.label, identity=g.sha256) for t, g in rows.items()}
        specs = [parse_utility_metric(name) for name in metrics]
        plain = [spec.name for spec in specs if not spec.filtered]
        results = calc_utility(evaluator, plain, sources, cache_dir=cache_dir, label=method) if plain else {}
        filtered = [spec for spec in specs if spec.filtered]
        if filtered:
            # A generator whose images the filter (almost) never accepts has no filtered measure; the plain ones and the
            # other methods stand, and the table says which filtered cells are missing and why.
            try:
                results.update(calc_utility(evaluator, [spec.name for spec in filtered], sources, cache_dir=cache_dir,
                                            label=f'{method} (filtered)'))
            except UtilityError as exc:
                log(f'{method}: {", ".join(spec.name for spec in filtered)} not measured: {exc}')
                results.update({spec.name: dict(metric=spec.name, error=str(exc), cache_key=cache_key(evaluator, spec, sources))
                                for spec in filtered})
        for name, result in results.items():
            if 'error' not in result:
                log(f'{method}: {format_result(result)}')
            if (method, name, result['cache_key']) in recorded:
                continue
            record = dict(result, format=UTILITY_FORMAT, method=method, targets=list(plan.targets),
                          stages={t: g.stage for t, g in rows.items()}, pkls={t: os.path.relpath(g.pkl, outdir) for t, g in rows.items()},
                          labels={t: g.label for t, g in rows.items()}, generator_sha256={t: g.sha256 for t, g in rows.items()},
                          datasets=str(holdout.manifest.root), heldout_fraction=holdout.record['fraction'],
                          heldout_seed=holdout.record['seed'],
                          date=datetime.datetime.now().astimezone().isoformat(timespec='seconds'), host=platform.node())
            append_utility_record(path, record)
            appended.append(record)
    return appended
