"""Feature detectors for the metrics: NVIDIA's Inception-v3 (downloaded once and cached), a local
TorchScript file, or our taxon classifier (trained here on the per-taxon datasets, works offline).

Every detector is a TorchScript module called as `detector(img_uint8_nchw, return_features=True)`
returning features [N, D]; the taxon classifier also exports `logits(img)` and `get_class_names()`.
"""

import contextlib
import hashlib
import json
import math
import os
import warnings
import zipfile
from typing import List

import numpy as np
import torch
import torch.nn.functional as F
import tqdm

from ..dataset import DatasetError, ImageFolderDataset
from . import taxa
from ..util import UserError, make_temp_file, sha256_file, write_text_atomic

INCEPTION_URL = 'https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt'
INCEPTION_FILENAME = 'inception-2015-12-05.pt'
INCEPTION_FEATURES = 2048
# NVIDIA publishes no checksum for this file, so the SHA-256 is recorded at the first download
# (in a side file `<name>.sha256`) and every later load is checked against it.
CHECKSUM_SUFFIX = '.sha256'
TAXON_META_FILE = 'taxon_detector.json'    # extra file inside a taxon classifier's TorchScript archive
CACHE_ENV = 'TAXOGAN_CACHE'
OFFLINE_ENV = 'TAXOGAN_OFFLINE'


class DetectorError(UserError):
    """A detector that cannot be found, downloaded, verified or loaded; one line naming the file."""


@contextlib.contextmanager
def _quiet_jit():
    """Silence torch's TorchScript deprecation notice: NVIDIA's detector exists only as TorchScript."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', category=DeprecationWarning, message=r'`torch\.jit\.')
        yield


def jit_load(path, **kwargs):
    """torch.jit.load without the deprecation notice."""
    with _quiet_jit():
        return torch.jit.load(path, **kwargs)


def default_cache_dir(
    cache_dir = None,   # explicit folder; None = $TAXOGAN_CACHE, else ~/.cache/taxogan
):
    """The folder for downloaded detectors and cached real-image features."""
    if cache_dir is not None:
        return str(cache_dir)
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser('~'), '.cache', 'taxogan')


def download_file(
    url,                    # what to fetch
    dest,                   # final path; written to a temporary file in the same folder, then renamed
    expected_sha256 = None, # hex digest the bytes must have; None = no check
    verify          = None, # verify(temp_path) raising on a bad file, run before the rename; None = no check
    progress        = True, # show a tqdm progress bar
    timeout         = 60,   # seconds without data before giving up
):
    """Download url to dest with requests (streamed, verified, atomic); returns the SHA-256 of the bytes."""
    import requests  # only needed when something is actually downloaded
    folder = os.path.dirname(os.path.abspath(dest))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = make_temp_file(folder, prefix='.tmp-download-')     # mode as open() gives: readable by others
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, 'wb') as f:
            with requests.get(url, stream=True, timeout=timeout) as response:
                response.raise_for_status()
                total = int(response.headers.get('Content-Length') or 0) or None
                with tqdm.tqdm(total=total, unit='B', unit_scale=True, desc=os.path.basename(dest), disable=not progress) as bar:
                    for chunk in response.iter_content(chunk_size=1 << 20):
                        f.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
        size = os.path.getsize(tmp)
        if total is not None and size != total:
            raise DetectorError(f'{url}: download truncated ({size} of {total} bytes)')
        if expected_sha256 is not None and digest.hexdigest() != expected_sha256:
            raise DetectorError(f'{url}: checksum mismatch (SHA-256 {digest.hexdigest()}, expected {expected_sha256})')
        if verify is not None:
            verify(tmp)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return digest.hexdigest()


def _check_inception_module(path, source):
    """Load a downloaded Inception file and check it returns [N, 2048] features; errors name `source`."""
    try:
        module = jit_load(path, map_location='cpu').eval()
        with torch.no_grad():
            out = module(torch.zeros([1, 3, 32, 32], dtype=torch.uint8), return_features=True)
    except Exception as exc:  # pylint: disable=broad-except
        raise DetectorError(f'{source}: not a usable Inception TorchScript file ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ""})') from None
    if tuple(out.shape) != (1, INCEPTION_FEATURES):
        raise DetectorError(f'{source}: not a usable Inception TorchScript file (features of shape {list(out.shape)}, '
                            f'expected [1, {INCEPTION_FEATURES}])')


def inception_path(
    cache_dir   = None, # folder; None = $TAXOGAN_CACHE or ~/.cache/taxogan
    progress    = True, # progress bar while downloading
):
    """Path of NVIDIA's Inception detector in the cache, downloading it on first use; DetectorError when impossible."""
    folder = default_cache_dir(cache_dir)
    path = os.path.join(folder, INCEPTION_FILENAME)
    sidecar = path + CHECKSUM_SUFFIX
    if os.path.isfile(path):
        actual = sha256_file(path)
        if os.path.isfile(sidecar):
            with open(sidecar, 'r', encoding='utf-8') as f:
                words = f.read().split()
            recorded = words[0] if words else ''
            if actual != recorded:
                raise DetectorError(f'{path}: SHA-256 {actual} differs from {recorded} recorded at download ({sidecar}); '
                                    f'delete both to download again')
        else:
            write_text_atomic(sidecar, f'{actual}  {INCEPTION_FILENAME}\n')  # a copy put there by hand
        return path

    where = f'download {INCEPTION_URL} to {path} (or set ${CACHE_ENV}, or pass --detector PATH)'
    if os.environ.get(OFFLINE_ENV, '') not in ('', '0'):
        raise DetectorError(f'Inception detector not found at {path} and ${OFFLINE_ENV} is set; {where}')
    try:
        import requests
        try:
            digest = download_file(INCEPTION_URL, path, verify=lambda tmp: _check_inception_module(tmp, INCEPTION_URL), progress=progress)
        except requests.RequestException as exc:
            reason = type(exc).__name__
            raise DetectorError(f'Inception detector not found at {path} and the download failed ({reason}); {where}') from None
    except OSError as exc:
        raise DetectorError(f'Inception detector not found at {path} and cannot be written there ({exc.strerror}); {where}') from None
    write_text_atomic(sidecar, f'{digest}  {INCEPTION_FILENAME}\n')
    return path


def is_taxon_detector_file(path):
    """True if a TorchScript file carries our taxon classifier's metadata."""
    try:
        with zipfile.ZipFile(path) as zf:
            return any(name.endswith('/extra/' + TAXON_META_FILE) for name in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_taxon_metadata(path):
    """The JSON metadata saved inside a taxon classifier file."""
    extra = {TAXON_META_FILE: ''}
    try:
        jit_load(path, map_location='cpu', _extra_files=extra)
        return json.loads(extra[TAXON_META_FILE])
    except (RuntimeError, ValueError, OSError) as exc:
        raise DetectorError(f'{path}: not a taxon detector file ({type(exc).__name__}: {exc})') from None


#----------------------------------------------------------------------------

class Detector:
    """A resolved --detector choice: 'inception', 'taxon:PATH' or a TorchScript PATH; loads lazily per device."""

    def __init__(self,
        kind,               # 'inception' (NVIDIA's file from the cache), 'file' (a local TorchScript), 'taxon'
        path        = None, # the TorchScript file; None only for 'inception' (then found or downloaded on use)
        cache_dir   = None, # cache folder for 'inception'; None = the default
        progress    = True, # progress bar when downloading
    ):
        if kind not in ('inception', 'file', 'taxon'):
            raise ValueError(f'unknown detector kind {kind!r}')
        self.kind = kind
        self._path = None if path is None else str(path)
        self._cache_dir = cache_dir
        self._progress = progress
        self._sha256 = None
        self._modules = {}      # str(device) -> loaded module
        self._metadata = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state['_modules'] = {}  # loaded modules stay in the process that loaded them
        return state

    @property
    def is_taxon(self):
        return self.kind == 'taxon'

    @property
    def suffix(self):
        """Added to metric names computed with this detector, so taxon figures never pass for Inception ones."""
        return '_taxon' if self.is_taxon else ''

    @property
    def path(self):
        """The TorchScript file (downloads Inception on first use)."""
        if self._path is None:
            self._path = inception_path(self._cache_dir, progress=self._progress)
        return self._path

    @property
    def spec(self):
        """How to ask for this detector again on the command line."""
        if self.kind == 'inception' and self._path is None:
            return 'inception'
        return f'taxon:{self._path}' if self.is_taxon else self._path

    @property
    def id(self):
        """Identity for cache keys: file stem + content hash."""
        if self._sha256 is None:
            self._sha256 = sha256_file(self.path)
        stem = os.path.splitext(os.path.basename(self.path))[0]
        return f'{stem}-{self._sha256[:16]}'

    def load(self, device):
        """The TorchScript module on `device`, in eval mode."""
        key = str(device)
        if key not in self._modules:
            try:
                module = jit_load(self.path, map_location=device)
            except (RuntimeError, ValueError, OSError) as exc:
                raise DetectorError(f'{self.path}: cannot load the detector ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ""})') from None
            self._modules[key] = module.eval()
        return self._modules[key]

    @staticmethod
    def _as_rgb(images):
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)    # grayscale -> 3 equal channels, as the protocol says
        return images

    def features(self, images, device):
        """Features of uint8 images [N, C, H, W] as float32 numpy [N, D]."""
        module = self.load(device)
        with torch.no_grad():
            out = module(self._as_rgb(images.to(device)), return_features=True)
        return out.to(torch.float32).cpu().numpy()

    def predict(self, images, device):
        """Taxon classifier only: predicted class of uint8 images [N, C, H, W] as int64 numpy [N]."""
        if not self.is_taxon:
            raise DetectorError(f'{self.spec}: predictions need the taxon detector (--detector taxon:PATH)')
        module = self.load(device)
        with torch.no_grad():
            logits = module.logits(self._as_rgb(images.to(device)))
        return logits.argmax(dim=1).cpu().numpy().astype(np.int64)

    @property
    def metadata(self):
        """Taxon classifier only: its saved metadata (class names, held-out split and accuracy, options)."""
        if self._metadata is None:
            self._metadata = load_taxon_metadata(self.path)
        return self._metadata

    @property
    def class_names(self):
        return list(self.metadata['class_names'])


def resolve_detector(
    spec,               # 'inception', 'taxon:PATH', a TorchScript PATH, or a Detector (returned as is)
    cache_dir   = None, # cache folder for the Inception download; None = the default
    progress    = True, # progress bar when downloading
):
    """Turn a --detector value into a Detector; DetectorError (one line) for a missing or wrong file."""
    if isinstance(spec, Detector):
        return spec
    spec = str(spec)
    if spec == 'inception':
        return Detector('inception', cache_dir=cache_dir, progress=progress)
    if spec.startswith('taxon:'):
        path = spec[len('taxon:'):]
        if not os.path.isfile(path):
            raise DetectorError(f'{path}: no such taxon detector file (train one with: calc_metrics.py train-detector)')
        if not is_taxon_detector_file(path):
            raise DetectorError(f'{path}: not a taxon detector (no {TAXON_META_FILE} inside); train one with calc_metrics.py train-detector')
        return Detector('taxon', path)
    if not os.path.isfile(spec):
        raise DetectorError(f'{spec}: no such detector file (expected inception, taxon:PATH or a TorchScript file)')
    if not zipfile.is_zipfile(spec):
        raise DetectorError(f'{spec}: not a TorchScript file')
    # A taxon classifier passed as a plain path is still a taxon detector: its figures keep the suffix.
    return Detector('taxon' if is_taxon_detector_file(spec) else 'file', spec)


#----------------------------------------------------------------------------
# The taxon classifier.

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


def _training_sources(data, rank):
    """(root folder, class names, [(dataset file relative to root, class index or None = its own labels)])."""
    manifest_file = data if os.path.basename(data) == taxa.MANIFEST_FILE else os.path.join(data, taxa.MANIFEST_FILE)
    if os.path.isfile(manifest_file):
        manifest = taxa.read_manifest(manifest_file)
        names = taxa.class_taxa(manifest, rank)
        return manifest['_root'], names, [(manifest['taxa'][n]['dataset'], i) for i, n in enumerate(names)]
    if not os.path.exists(data):
        raise DetectorError(f'{data}: no such file or folder')
    dataset = ImageFolderDataset(data, use_labels=True, cache=False)
    if not dataset.has_onehot_labels:
        raise DetectorError(f'{data}: neither a datasets folder with {taxa.MANIFEST_FILE} nor a dataset with class labels in dataset.json')
    names = dataset.label_names or [f'class{k}' for k in range(dataset.label_dim)]
    root = os.path.dirname(os.path.abspath(os.path.normpath(data)))
    return root, names, [(os.path.basename(os.path.normpath(data)), None)]


def _augment(x, generator):
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
    device = torch.device(device)
    try:
        root, class_names, sources = _training_sources(data, rank)
    except (DatasetError, taxa.TaxonError) as exc:
        raise DetectorError(str(exc)) from None

    # Decode every image once, keep it only at the classifier's resolution.
    entries, chunks = [], []                       # entries: [dataset file, image name, class]
    datasets = []
    for file, cls in sources:
        try:
            dataset = ImageFolderDataset(os.path.join(root, file), use_labels=cls is None, cache=False)
        except DatasetError as exc:
            raise DetectorError(str(exc)) from None
        if cls is None and not dataset.has_onehot_labels:
            raise DetectorError(f'{os.path.join(root, file)}: no class labels in dataset.json')
        datasets.append((file, cls, dataset))
    total = sum(len(d) for _, _, d in datasets)
    with tqdm.tqdm(total=total, desc='loading images', unit='img', disable=not progress) as bar:
        for file, cls, dataset in datasets:
            names = dataset.image_fnames
            for start in range(0, len(dataset), batch_size):
                idx = range(start, min(start + batch_size, len(dataset)))
                images = torch.from_numpy(np.stack([dataset[i][0] for i in idx]))
                for i in idx:
                    details = dataset.get_details(i)
                    entries.append([file, names[details['raw_idx']], cls if cls is not None else details['raw_label']])
                chunks.append(preprocess_images(images, resolution))
                bar.update(len(idx))
            dataset.close()
    x_all = torch.cat(chunks)                                       # [N, 3, r, r]
    y_all = torch.tensor([e[2] for e in entries], dtype=torch.int64)

    # Stratified held-out split: a fixed share of every class (at least one image when the class has two).
    rnd = np.random.RandomState(seed)
    heldout_mask = np.zeros(len(entries), dtype=bool)
    for k in range(len(class_names)):
        members = np.flatnonzero(y_all.numpy() == k)
        if len(members) < 2:
            continue
        n_held = min(max(int(round(heldout_fraction * len(members))), 1), len(members) - 1)
        heldout_mask[rnd.permutation(members)[:n_held]] = True
    train_idx = torch.from_numpy(np.flatnonzero(~heldout_mask))
    held_idx = torch.from_numpy(np.flatnonzero(heldout_mask))
    counts = torch.bincount(y_all[train_idx], minlength=len(class_names)).to(torch.float32)
    if (counts == 0).any():
        empty = [class_names[k] for k in torch.flatnonzero(counts == 0).tolist()]
        raise DetectorError(f'{data}: no training images for {", ".join(empty)}')
    # Inverse-frequency weights: a 150-image order counts as much as a 900-image one.
    class_weights = counts.sum() / (len(class_names) * counts)

    generator = torch.Generator().manual_seed(seed)
    # Initialisation and dropout draw from torch's global RNG: seeded inside a fork, so training repeats exactly and
    # the caller's RNG state is left as it was.
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        torch.manual_seed(seed)
        model = TaxonClassifier(class_names, resolution=resolution, channels=channels)
        model.to(device).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
        steps_per_epoch = math.ceil(len(train_idx) / batch_size)
        total_steps = max(epochs * steps_per_epoch, 1)
        step = 0
        loss_fn = torch.nn.CrossEntropyLoss(weight=class_weights.to(device))
        with tqdm.tqdm(total=epochs, desc='training taxon detector', unit='epoch', disable=not progress) as bar:
            for _epoch in range(epochs):
                order = train_idx[torch.randperm(len(train_idx), generator=generator)]
                running = 0.0
                for start in range(0, len(order), batch_size):
                    batch = order[start:start + batch_size]
                    x = _augment(x_all[batch], generator).to(device)
                    for group in optimizer.param_groups:
                        group['lr'] = lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))
                    loss = loss_fn(model.classify(x), y_all[batch].to(device))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    running += float(loss.detach()) * len(batch)
                    step += 1
                bar.set_postfix(loss=f'{running / max(len(order), 1):.3f}')
                bar.update(1)

    # Held-out accuracy from the stored (preprocessed) images; acc_taxon recomputes it from the files.
    model.eval()
    predictions = []
    with torch.no_grad():
        for start in range(0, len(held_idx), batch_size):
            batch = held_idx[start:start + batch_size]
            predictions.append(model.classify(x_all[batch].to(device)).argmax(dim=1).cpu())
    predicted = torch.cat(predictions) if predictions else torch.zeros([0], dtype=torch.int64)
    truth = y_all[held_idx]
    accuracy = float((predicted == truth).to(torch.float64).mean()) if len(held_idx) else float('nan')
    per_class = {}
    for k, name in enumerate(class_names):
        mask = truth == k
        if mask.any():
            per_class[name] = float((predicted[mask] == k).to(torch.float64).mean())

    model.heldout_accuracy = accuracy
    metadata = dict(
        format='taxogan-taxon-detector/1',
        class_names=list(class_names),
        resolution=int(resolution),
        feature_dim=int(channels[-1]),
        heldout_accuracy=accuracy,
        heldout_accuracy_per_class=per_class,
        num_train=int(len(train_idx)),
        num_heldout=int(len(held_idx)),
        num_images_per_class={name: int((y_all == k).sum()) for k, name in enumerate(class_names)},
        data=os.path.abspath(data),
        data_root=root,
        heldout=[entries[i] for i in held_idx.tolist()],
        options=dict(rank=rank, resolution=resolution, epochs=epochs, batch_size=batch_size, lr=lr,
                     heldout_fraction=heldout_fraction, seed=seed, channels=list(channels)),
    )
    model.cpu()
    with _quiet_jit():
        scripted = torch.jit.script(model)
    out = str(out)
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = make_temp_file(folder, prefix='.tmp-', suffix='.pt')
    os.close(fd)
    try:
        with _quiet_jit():
            torch.jit.save(scripted, tmp, _extra_files={TAXON_META_FILE: json.dumps(metadata)})
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return dict(metadata, out=out)
