"""Taxon metrics: `acc[<N>[k]]_taxon`, the share of generated images the taxon classifier assigns to the generator's
taxon, and the same accuracy for the classifier's held-out real images.

Importing this module registers the metric family 'acc' with the engine's metric runner (and, through
taxogan_ext.taxon_detector, the detector kind 'taxon' whose features give the `_taxon` FID/KID).
The generator's taxon comes from --taxon, else from the datasets manifest beside its dataset; a conditional
generator's taxa are its dataset's class names (`label_names` in dataset.json, or the manifest's `labels` for
datasets written before dataset.json carried them). A taxon below the classifier's classes counts as its ancestor.
"""

import collections
import os

import numpy as np
import torch
import tqdm

from stylegan2ada.dataset import DatasetError, ImageFolderDataset
from stylegan2ada.metrics import metric_utils
from stylegan2ada.metrics.detectors import resolve_detector
from stylegan2ada.metrics.metric_main import MetricError, register_metric
from stylegan2ada.util import UserError, sha256_file
from taxogan_ext.taxon_detector import KIND, load_taxon_metadata
from taxogan_ext.taxonomy import MANIFEST_NAME, ManifestError, dataset_class_names, manifest_beside

DEFAULT_ACC_COUNT = 10000       # generated images of acc_taxon without a count


class TaxonError(UserError):
    """A taxon question that cannot be answered (unknown taxon, no class names); one line naming the problem."""

#----------------------------------------------------------------------------
# Taxa of datasets and generators.

def class_of_taxon(
    name,           # taxon name
    class_names,    # the classifier's class names
    manifest,       # taxonomy.Manifest or None (then only exact names match)
):
    """Index of `name` or of its nearest ancestor among class_names; None when neither is a class."""
    seen = set()
    while name is not None and name not in seen:
        if name in class_names:
            return class_names.index(name)
        seen.add(name)
        taxon = manifest.taxa.get(name) if manifest is not None else None
        name = taxon.parent if taxon is not None else None
    return None


class TaxonFilter:
    """Judges generated images of a taxon with the taxon classifier: an image is kept when the classifier assigns it to
    the taxon (its top class) with probability at least `threshold` (0: the top class alone decides)."""

    def __init__(self,
        spec,                   # 'taxon:PATH' of a classifier (calc_metrics.py train-detector)
        threshold,              # minimum probability of the image's taxon, in [0, 1]
        manifest,               # taxonomy.Manifest: a taxon below one of the classes is judged as that class; None = exact names
        targets,                # the taxa it will judge
        option  = '--filter',   # how errors name the option that gave the classifier
    ):
        try:
            self.detector = resolve_detector(spec, progress=False)
            names = self.detector.class_names
        except UserError as exc:
            raise TaxonError(f'{option}: {exc}') from None
        if not names:
            raise TaxonError(f'{option} {spec}: not a classifier with class names (train one with calc_metrics.py train-detector)')
        self.spec, self.threshold, self.names = spec, float(threshold), list(names)
        self.classes = {}                                   # taxon -> class index of the classifier
        for taxon in targets:
            index = class_of_taxon(taxon, self.names, manifest)
            if index is None:
                raise TaxonError(f'{option} {spec}: taxon {taxon!r} is neither a class of the classifier '
                                 f'({", ".join(self.names)}) nor below one')
            self.classes[taxon] = index
        self.sha256 = sha256_file(self.detector.path)

    def judge(self,
        images,                 # uint8 [N, C, H, W] generated images of `taxon`
        taxon,                  # the taxon they should show
        device,                 # torch device of the classifier
    ):
        """(p, keep): float64 numpy [N] probability of the taxon, bool numpy [N] the filter's verdict."""
        module = self.detector.load(device)
        with torch.no_grad():
            logits = module.logits(self.detector._as_rgb(images.to(device)))                  # [N, K]
        probs = torch.softmax(logits.to(torch.float64), dim=1).cpu()                         # [N, K]
        k = self.classes[taxon]
        keep = (probs.argmax(dim=1) == k) & (probs[:, k] >= self.threshold)
        return probs[:, k].numpy(), keep.numpy()

    def rule(self) -> str:
        """The rule in words, for logs and reports."""
        return f'top class with p >= {self.threshold:g}' if self.threshold > 0 else 'top class'


def _unconditional_target(dataset_path, class_names, taxon, manifest):
    """(class index, taxon name) expected of an unconditional generator trained on the dataset."""
    name = taxon
    if name is None:
        name = manifest.taxon_of_dataset(dataset_path) if manifest is not None else None
    if name is None:
        stem = os.path.splitext(os.path.basename(os.path.normpath(dataset_path)))[0]
        if stem not in class_names:
            raise TaxonError(f'{dataset_path}: cannot tell which taxon this dataset is (no manifest.json entry); pass --taxon NAME')
        name = stem
    index = class_of_taxon(name, class_names, manifest)
    if index is None:
        raise TaxonError(f'taxon {name!r} is neither a class of the taxon detector ({", ".join(class_names)}) '
                         f'nor below one in the manifest')
    return index, name


def generator_targets(
    dataset_path,   # the dataset the generator was evaluated against
    label_names,    # the dataset's class names from dataset.json (conditional generators), or None
    c_dim,          # the generator's label dimension; 0 = unconditional
    class_names,    # the classifier's class names
    taxon   = None, # taxon of an unconditional generator; None = the dataset's taxon in the manifest
):
    """Classifier class expected for each generator class ([max(c_dim, 1)] int64, -1 = no class) and their names."""
    manifest = manifest_beside(dataset_path)
    if c_dim == 0:
        index, name = _unconditional_target(dataset_path, class_names, taxon, manifest)
        return np.array([index], dtype=np.int64), [name]
    if taxon is not None:
        raise TaxonError('--taxon is for unconditional generators; a conditional one takes its taxa from the dataset labels')
    label_names = dataset_class_names(dataset_path, label_names, manifest)
    if not label_names:
        raise TaxonError(f'{dataset_path}: the generator is conditional but the dataset has no class names '
                         f'("label_names" in dataset.json or "labels" in manifest.json)')
    names = list(label_names) + [None] * max(0, c_dim - len(label_names))
    targets = [class_of_taxon(n, class_names, manifest) if n is not None else None for n in names[:c_dim]]
    if all(t is None for t in targets):
        raise TaxonError(f'{dataset_path}: none of the classes {names[:c_dim]} is (or is below) a class of the taxon detector '
                         f'({", ".join(class_names)})')
    return np.array([-1 if t is None else t for t in targets], dtype=np.int64), names[:c_dim]

#----------------------------------------------------------------------------
# acc_taxon of a generator.

@register_metric('acc', pattern=r'(?:(?P<count>\d+)(?P<kilo>k?))?', default_count=DEFAULT_ACC_COUNT, detector_kind=KIND,
                 form='acc[<N>[k]]_taxon', example='acc_taxon', higher_is_better=True)
def _acc(opts, spec):
    """acc_taxon: share of spec.count generated images the classifier assigns to their taxon (options: taxon=NAME)."""
    detector = opts.detector
    dataset = opts.dataset()
    try:
        targets, gen_taxa = generator_targets(dataset.path, dataset.label_names, opts.G.c_dim, detector.class_names,
                                              opts.family_kwargs.get('taxon'))
    except (TaxonError, ManifestError) as exc:
        raise MetricError(f'{spec.name}: {exc}') from None
    rows = metric_utils.map_generator(opts, dataset, spec.count,
                                      lambda images, classes: np.stack([detector.predict(images, opts.device), classes], axis=1),
                                      dtype=np.int64)
    predicted, gen_class = rows[:, 0], rows[:, 1]
    target = targets[gen_class if opts.G.c_dim else np.zeros_like(gen_class)]
    valid = target >= 0
    if not valid.any():
        raise MetricError(f'{spec.name}: no generated image belongs to a class of the taxon detector')
    per_taxon = {}
    for k, name in enumerate(gen_taxa):
        mask = valid & ((gen_class == k) if opts.G.c_dim else True)
        if name is not None and mask.any():
            per_taxon[name] = float((predicted[mask] == target[mask]).mean())
    value = float((predicted[valid] == target[valid]).mean())
    return dict(results={spec.name: value}, num_gen=int(valid.sum()), per_taxon=per_taxon,
                classifier_heldout_accuracy=load_taxon_metadata(detector.path).get('heldout_accuracy'))

#----------------------------------------------------------------------------
# acc_taxon of real images: the taxon detector on its own held-out split.

def _heldout_root(metadata, data):
    """The folder the held-out entries' dataset files are relative to."""
    if data is None:
        return metadata['data_root']
    if os.path.isdir(data) and os.path.isfile(os.path.join(data, MANIFEST_NAME)):
        return os.path.abspath(data)
    return os.path.dirname(os.path.abspath(os.path.normpath(data)))


def _predict_heldout(detector, root, heldout, device, batch_size, progress):
    """(predicted, true) classes [N] int64 of the held-out images, read from their dataset files."""
    by_file = collections.OrderedDict()
    for file, fname, cls in heldout:
        by_file.setdefault(file, []).append((fname, int(cls)))
    predicted, truth = [], []
    with tqdm.tqdm(total=len(heldout), desc='held-out reals', unit='img', disable=not progress) as bar:
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
                images = torch.from_numpy(np.stack([dataset[index[f]][0] for f, _ in chunk]))     # [B, C, H, W] uint8
                predicted.append(detector.predict(images, device))
                truth.append(np.array([c for _, c in chunk], dtype=np.int64))
                bar.update(len(chunk))
            dataset.close()
    if not predicted:
        raise MetricError(f'{detector.path}: the taxon detector has no held-out images')
    return np.concatenate(predicted), np.concatenate(truth)


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
    if det.kind != KIND:
        raise MetricError(f'{det.spec}: not a taxon detector')
    meta = load_taxon_metadata(det.path)
    device = torch.device(device) if device is not None else torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    predicted, truth = _predict_heldout(det, _heldout_root(meta, data), meta['heldout'], device, batch_size, progress)
    names = meta['class_names']
    per_taxon = {names[k]: float((predicted[truth == k] == k).mean()) for k in range(len(names)) if (truth == k).any()}
    return dict(acc_taxon=float((predicted == truth).mean()), per_taxon=per_taxon, num_images=int(len(truth)),
                heldout_accuracy=meta['heldout_accuracy'])
