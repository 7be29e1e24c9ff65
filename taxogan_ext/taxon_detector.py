"""The taxon classifier: a small CNN trained on the per-taxon datasets, saved as a TorchScript detector file.

Its penultimate features serve the engine's FID/KID as an offline feature detector (metric names get `_taxon`), and
its predictions give the taxon accuracy (taxogan_ext.taxon_metrics). Importing this module registers the detector kind
'taxon' with the engine, so that `--detector taxon:PATH` (or the PATH of such a file) resolves.

File format: TorchScript of TaxonClassifier (`forward(img_uint8, return_features)`, `logits(img)`,
`get_class_names()`) with the JSON metadata `taxon_detector.json` among its extra files (format
`taxogan-taxon-detector/1`: class names, resolution, the held-out split and its accuracy, the training options).

Training runs as load -> split -> fit -> evaluate -> save (train_taxon_classifier).
"""

import collections
import json
import math
import os
import zipfile
from typing import List

import numpy as np
import torch
import torch.nn.functional as F
import tqdm

from stylegan2ada.dataset import DatasetError, ImageFolderDataset
from stylegan2ada.metrics.detectors import DetectorError, jit_load, quiet_jit, register_detector_kind
from stylegan2ada.util import atomic_write
from taxogan_ext.taxonomy import MANIFEST_NAME, ManifestError, dataset_class_names, load_manifest, manifest_beside

KIND = 'taxon'                              # --detector taxon:PATH
META_FILE = 'taxon_detector.json'          # extra file inside the TorchScript archive
DETECTOR_FORMAT = 'taxogan-taxon-detector/1'
TRAIN_HINT = '(train one with: calc_metrics.py train-detector)'

# The decoded training images: `images` float [N, 3, r, r] as the classifier sees them, `labels` int64 [N], and per
# image [dataset file relative to `root`, image name in it, class index] (the held-out list of the metadata).
TrainingImages = collections.namedtuple('TrainingImages', ['root', 'class_names', 'entries', 'images', 'labels'])

#----------------------------------------------------------------------------
# The detector file.

def is_taxon_detector_file(path):
    """True if a TorchScript file carries the taxon classifier's metadata."""
    try:
        with zipfile.ZipFile(path) as zf:
            return any(name.endswith('/extra/' + META_FILE) for name in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def check_taxon_detector_file(path):
    """DetectorError (one line) unless `path` is a taxon detector file."""
    if not os.path.isfile(path):
        raise DetectorError(f'{path}: no such taxon detector file {TRAIN_HINT}')
    if not is_taxon_detector_file(path):
        raise DetectorError(f'{path}: not a taxon detector (no {META_FILE} inside); train one with calc_metrics.py train-detector')


def load_taxon_metadata(path):
    """The JSON metadata saved inside a taxon detector file."""
    extra = {META_FILE: ''}
    try:
        jit_load(path, map_location='cpu', _extra_files=extra)
        return json.loads(extra[META_FILE])
    except (RuntimeError, ValueError, OSError) as exc:
        raise DetectorError(f'{path}: not a taxon detector file ({type(exc).__name__}: {exc})') from None


def save_taxon_detector(
    model,          # trained TaxonClassifier (moved to the CPU here)
    metadata,       # JSON-ready dict stored as META_FILE inside the archive
    out,            # destination file, written atomically
):
    """Script the classifier and save it with its metadata as one TorchScript file."""
    model.cpu()
    with quiet_jit():
        scripted = torch.jit.script(model)
    with atomic_write(out, 'wb') as f, quiet_jit():
        torch.jit.save(scripted, f, _extra_files={META_FILE: json.dumps(metadata)})


register_detector_kind(KIND, check=check_taxon_detector_file, recognize=is_taxon_detector_file, hint=TRAIN_HINT)

#----------------------------------------------------------------------------
# The model.

def preprocess_images(img: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 [N, C, H, W] (C = 1 or 3) -> float [N, 3, resolution, resolution] in [-1, 1]."""
    x = img.to(torch.float32)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    if x.shape[2] != resolution or x.shape[3] != resolution:
        x = F.interpolate(x, size=[resolution, resolution], mode='bilinear', align_corners=False, antialias=True)
    return x / 127.5 - 1


class TaxonClassifier(torch.nn.Module):
    """Small CNN: uint8 images of any size -> `resolution` px -> features [N, channels[-1]] -> class logits."""

    class_names: List[str]
    resolution: int
    heldout_accuracy: float

    def __init__(self,
        class_names,                            # one name per class
        resolution  = 64,                       # side the images are resized to, in pixels
        channels    = (32, 64, 128, 256),       # width of each stride-2 stage; the last is the feature size
    ):
        super().__init__()
        if not channels or any(c % 8 for c in channels):
            raise ValueError(f'channels must be multiples of 8 (GroupNorm with 8 groups), got {list(channels)}')
        self.class_names = list(class_names)
        self.resolution = int(resolution)
        self.heldout_accuracy = -1.0            # set after training; -1 = not measured
        layers = []
        cin = 3
        for cout in channels:
            # GroupNorm, not BatchNorm: a sample's features must not depend on the rest of its batch.
            layers += [torch.nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), torch.nn.GroupNorm(8, cout), torch.nn.ReLU(),
                       torch.nn.Conv2d(cout, cout, 3, padding=1, bias=False), torch.nn.GroupNorm(8, cout), torch.nn.ReLU()]
            cin = cout
        self.body = torch.nn.Sequential(*layers)
        self.dropout = torch.nn.Dropout(0.2)
        self.head = torch.nn.Linear(cin, len(self.class_names))
        self.init_kwargs = dict(class_names=list(class_names), resolution=resolution, channels=list(channels))

    def preprocess(self, img: torch.Tensor) -> torch.Tensor:
        """uint8 [N, C, H, W] (C = 1 or 3) -> float [N, 3, r, r] in [-1, 1]."""
        return preprocess_images(img, self.resolution)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed images -> penultimate features [N, D] (global average of the last stage)."""
        return self.body(x).mean(dim=[2, 3])

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed images -> class logits [N, K]."""
        return self.head(self.dropout(self.embed(x)))

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        features = self.embed(self.preprocess(img))
        if return_features:
            return features
        return torch.softmax(self.head(features), dim=1)

    @torch.jit.export
    def logits(self, img: torch.Tensor) -> torch.Tensor:
        """uint8 images -> class logits [N, K]."""
        return self.head(self.embed(self.preprocess(img)))

    @torch.jit.export
    def get_class_names(self) -> List[str]:
        return self.class_names

#----------------------------------------------------------------------------
# Training step 1: load.

def class_taxa(
    manifest,       # taxonomy.Manifest
    rank    = None, # rank whose taxa become the classes; None = the lowest rank of the manifest
):
    """Names of the taxa at `rank` that have a dataset with images, in manifest order."""
    where = manifest.root / MANIFEST_NAME
    if rank is None:
        if not manifest.ranks:
            raise ManifestError(f'{where}: no "ranks" list; pass the rank to train on')
        rank = manifest.ranks[-1]
    names = [name for name, taxon in manifest.taxa.items() if taxon.rank == rank and taxon.dataset and taxon.num_images > 0]
    if len(names) < 2:
        raise ManifestError(f'{where}: {len(names)} taxa with images at rank {rank!r}; a classifier needs at least 2')
    return names


def _dataset_names(data, label_names):
    """The class names of one labelled dataset (dataset.json, else its entry in a manifest beside it), or None."""
    try:
        return dataset_class_names(data, label_names, manifest_beside(data))
    except ManifestError:
        return None     # a broken manifest beside the zip only costs the names, as for a zip without one


def _training_sources(data, rank):
    """(root folder, class names, [(dataset file relative to root, class index or None = its own labels)])."""
    manifest_file = data if os.path.basename(data) == MANIFEST_NAME else os.path.join(data, MANIFEST_NAME)
    if os.path.isfile(manifest_file):
        manifest = load_manifest(manifest_file)
        names = class_taxa(manifest, rank)
        return os.path.abspath(manifest.root), names, [(manifest.taxa[n].dataset, i) for i, n in enumerate(names)]
    if not os.path.exists(data):
        raise DetectorError(f'{data}: no such file or folder')
    dataset = ImageFolderDataset(data, use_labels=True, cache=False)
    if not dataset.has_onehot_labels:
        raise DetectorError(f'{data}: neither a datasets folder with {MANIFEST_NAME} nor a dataset with class labels in dataset.json')
    names = _dataset_names(data, dataset.label_names) or [f'class{k}' for k in range(dataset.label_dim)]
    root = os.path.dirname(os.path.abspath(os.path.normpath(data)))
    return root, names, [(os.path.basename(os.path.normpath(data)), None)]


def _open_sources(root, sources):
    """[(file, class or None, ImageFolderDataset)] of the training sources; DetectorError naming a bad one."""
    datasets = []
    for file, cls in sources:
        try:
            dataset = ImageFolderDataset(os.path.join(root, file), use_labels=cls is None, cache=False)
        except DatasetError as exc:
            raise DetectorError(str(exc)) from None
        if cls is None and not dataset.has_onehot_labels:
            raise DetectorError(f'{os.path.join(root, file)}: no class labels in dataset.json')
        datasets.append((file, cls, dataset))
    return datasets


def load_training_images(
    data,                   # datasets folder with manifest.json (or that file), or one dataset with class labels
    rank        = None,     # manifest rank whose taxa are the classes; None = the lowest rank
    resolution  = 64,       # the classifier's side in pixels: every image is kept only at this size
    batch_size  = 64,       # images decoded at a time
    progress    = True,     # tqdm progress bar
):
    """Decode every training image once, at the classifier's resolution; returns TrainingImages."""
    try:
        root, class_names, sources = _training_sources(data, rank)
    except (DatasetError, ManifestError) as exc:
        raise DetectorError(str(exc)) from None
    datasets = _open_sources(root, sources)
    entries, chunks = [], []
    total = sum(len(d) for _, _, d in datasets)
    with tqdm.tqdm(total=total, desc='loading images', unit='img', disable=not progress) as bar:
        for file, cls, dataset in datasets:
            names = dataset.image_fnames
            for start in range(0, len(dataset), batch_size):
                idx = range(start, min(start + batch_size, len(dataset)))
                images = torch.from_numpy(np.stack([dataset[i][0] for i in idx]))      # [B, C, H, W] uint8
                for i in idx:
                    details = dataset.get_details(i)
                    entries.append([file, names[details['raw_idx']], cls if cls is not None else details['raw_label']])
                chunks.append(preprocess_images(images, resolution))
                bar.update(len(idx))
            dataset.close()
    labels = torch.tensor([e[2] for e in entries], dtype=torch.int64)
    return TrainingImages(root=root, class_names=class_names, entries=entries, images=torch.cat(chunks), labels=labels)

#----------------------------------------------------------------------------
# Training step 2: split.

def split_heldout(
    labels,             # int64 tensor [N] of class indices
    num_classes,        # number of classes
    fraction,           # share of each class held out
    seed,               # seed of the split (numpy RandomState)
):
    """Stratified held-out split: (train indices, held-out indices), int64 tensors in increasing order.

    A fixed share of every class is held out, at least one image when the class has two, never all of them.
    """
    rnd = np.random.RandomState(seed)
    heldout_mask = np.zeros(len(labels), dtype=bool)
    for k in range(num_classes):
        members = np.flatnonzero(labels.numpy() == k)
        if len(members) < 2:
            continue
        n_held = min(max(int(round(fraction * len(members))), 1), len(members) - 1)
        heldout_mask[rnd.permutation(members)[:n_held]] = True
    return torch.from_numpy(np.flatnonzero(~heldout_mask)), torch.from_numpy(np.flatnonzero(heldout_mask))


def class_weights(
    train_labels,       # int64 tensor [N] of the training split's classes
    class_names,        # one name per class
    data,               # how error messages name the training data
):
    """Inverse-frequency weights [K] (a 150-image order counts as much as a 900-image one); DetectorError for an empty class."""
    counts = torch.bincount(train_labels, minlength=len(class_names)).to(torch.float32)
    if (counts == 0).any():
        empty = [class_names[k] for k in torch.nonzero(counts == 0).flatten().tolist()]
        raise DetectorError(f'{data}: no training images for {", ".join(empty)}')
    return counts.sum() / (len(class_names) * counts)

#----------------------------------------------------------------------------
# Training step 3: fit.

def augment_batch(x, generator):
    """Random flips, quarter turns, shifts and brightness/contrast changes of a float batch [N, 3, r, r]."""
    n, _, r, _ = x.shape
    flip_h = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip_h[:, None, None, None], x.flip(3), x)
    flip_v = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip_v[:, None, None, None], x.flip(2), x)
    turn = torch.rand(n, generator=generator) < 0.5
    x = torch.where(turn[:, None, None, None], x.transpose(2, 3), x)
    pad = max(r // 8, 1)
    padded = F.pad(x, [pad] * 4, mode='reflect')
    offsets = torch.randint(0, 2 * pad + 1, [n, 2], generator=generator)
    x = torch.stack([padded[i, :, int(dy):int(dy) + r, int(dx):int(dx) + r] for i, (dy, dx) in enumerate(offsets)])
    scale = 1 + (torch.rand([n, 1, 1, 1], generator=generator) - 0.5) * 0.2
    shift = (torch.rand([n, 1, 1, 1], generator=generator) - 0.5) * 0.2
    return x * scale + shift


def _fit_epoch(model, optimizer, loss_fn, training, train_idx, generator, batch_size, lr, step, total_steps, device):
    """One pass over the training split in a random order; returns (mean loss, steps taken so far)."""
    order = train_idx[torch.randperm(len(train_idx), generator=generator)]
    running = 0.0
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        x = augment_batch(training.images[batch], generator).to(device)
        for group in optimizer.param_groups:
            group['lr'] = lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))
        loss = loss_fn(model.classify(x), training.labels[batch].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running += float(loss.detach()) * len(batch)
        step += 1
    return running / max(len(order), 1), step


def fit_classifier(
    training,                   # TrainingImages
    train_idx,                  # int64 tensor: the images to train on
    weights,                    # float tensor [K]: class weights of the loss
    resolution          = 64,   # the classifier's side in pixels
    channels            = (32, 64, 128, 256),  # stage widths; the last is the feature size
    epochs              = 30,   # passes over the training split
    batch_size          = 64,   # images per step
    lr                  = 2e-3, # Adam learning rate (cosine decay to 0)
    seed                = 0,    # seed of the initialisation, the order and the augmentation
    device              = 'cpu',# where to train
    progress            = True, # tqdm progress bar
):
    """Train a new TaxonClassifier (Adam, cosine decay, weighted cross-entropy, augmentation); returns it on `device`."""
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    # Initialisation and dropout draw from torch's global RNG: seeded inside a fork, so training repeats exactly and
    # the caller's RNG state is left as it was.
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        torch.manual_seed(seed)
        model = TaxonClassifier(training.class_names, resolution=resolution, channels=channels)
        model.to(device).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
        total_steps = max(epochs * math.ceil(len(train_idx) / batch_size), 1)
        step = 0
        loss_fn = torch.nn.CrossEntropyLoss(weight=weights.to(device))
        with tqdm.tqdm(total=epochs, desc='training taxon detector', unit='epoch', disable=not progress) as bar:
            for _epoch in range(epochs):
                loss, step = _fit_epoch(model, optimizer, loss_fn, training, train_idx, generator, batch_size, lr, step,
                                        total_steps, device)
                bar.set_postfix(loss=f'{loss:.3f}')
                bar.update(1)
    return model

#----------------------------------------------------------------------------
# Training step 4: evaluate.

def evaluate_classifier(
    model,                  # TaxonClassifier
    training,               # TrainingImages
    held_idx,               # int64 tensor: the held-out images
    batch_size  = 64,       # images per call
):
    """Held-out accuracy from the stored (preprocessed) images: (overall or NaN, {class name: accuracy})."""
    # acc_taxon of the held-out reals (taxon_metrics) recomputes it from the files, through the metric path.
    device = next(model.parameters()).device
    model.eval()
    predictions = []
    with torch.no_grad():
        for start in range(0, len(held_idx), batch_size):
            batch = held_idx[start:start + batch_size]
            predictions.append(model.classify(training.images[batch].to(device)).argmax(dim=1).cpu())
    predicted = torch.cat(predictions) if predictions else torch.zeros([0], dtype=torch.int64)
    truth = training.labels[held_idx]
    accuracy = float((predicted == truth).to(torch.float64).mean()) if len(held_idx) else float('nan')
    per_class = {}
    for k, name in enumerate(training.class_names):
        mask = truth == k
        if mask.any():
            per_class[name] = float((predicted[mask] == k).to(torch.float64).mean())
    return accuracy, per_class

#----------------------------------------------------------------------------
# Training: load -> split -> fit -> evaluate -> save.

def train_taxon_classifier(
    data,                       # datasets folder with manifest.json (or that file), or one dataset with class labels
    out,                        # destination TorchScript file (.pt), written atomically
    rank                = None, # manifest rank whose taxa are the classes; None = the lowest rank
    resolution          = 64,   # training and inference side in pixels
    epochs              = 30,   # passes over the training split
    batch_size          = 64,   # images per step
    lr                  = 2e-3, # Adam learning rate (cosine decay to 0)
    heldout_fraction    = 0.2,  # share of each class kept out of training for the held-out accuracy
    seed                = 0,    # seed of the split, the initialisation and the augmentation
    channels            = (32, 64, 128, 256),  # stage widths; the last is the feature size
    device              = 'cpu',# where to train
    progress            = True, # tqdm progress bars
):
    """Train the taxon classifier and save it as TorchScript; returns its metadata (held-out accuracy included)."""
    data = str(data)
    training = load_training_images(data, rank=rank, resolution=resolution, batch_size=batch_size, progress=progress)
    class_names = training.class_names
    train_idx, held_idx = split_heldout(training.labels, len(class_names), heldout_fraction, seed)
    weights = class_weights(training.labels[train_idx], class_names, data)
    model = fit_classifier(training, train_idx, weights, resolution=resolution, channels=channels, epochs=epochs,
                           batch_size=batch_size, lr=lr, seed=seed, device=device, progress=progress)
    accuracy, per_class = evaluate_classifier(model, training, held_idx, batch_size=batch_size)
    model.heldout_accuracy = accuracy
    metadata = dict(
        format=DETECTOR_FORMAT,
        class_names=list(class_names),
        resolution=int(resolution),
        feature_dim=int(channels[-1]),
        heldout_accuracy=accuracy,
        heldout_accuracy_per_class=per_class,
        num_train=int(len(train_idx)),
        num_heldout=int(len(held_idx)),
        num_images_per_class={name: int((training.labels == k).sum()) for k, name in enumerate(class_names)},
        data=os.path.abspath(data),
        data_root=training.root,
        heldout=[training.entries[i] for i in held_idx.tolist()],
        options=dict(rank=rank, resolution=resolution, epochs=epochs, batch_size=batch_size, lr=lr,
                     heldout_fraction=heldout_fraction, seed=seed, channels=list(channels)),
    )
    out = str(out)
    save_taxon_detector(model, metadata, out)
    return dict(metadata, out=out)
