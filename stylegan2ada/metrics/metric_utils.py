"""Feature extraction for the metrics: real images from a dataset and generated images from G (or from an ImageSet
standing in for G), batched, split across processes, with real-image features cached on disk."""

import hashlib
import io
import json
import os

import numpy as np
import torch
import torch.distributed as dist
import tqdm

from ..dataset import ImageFolderDataset
from ..distributed import collective_device
from ..image_utils import to_uint8
from ..util import atomic_write
from .detectors import default_cache_dir
from .distances import feature_mean_cov

CACHE_FORMAT = 'taxogan-features/1'


class MetricOptions:
    """Everything a metric needs: generator, dataset kwargs, detector, device and process layout."""

    def __init__(self,
        G               = None,     # generator module, or None for metrics on real images only
        dataset_kwargs  = None,     # ImageFolderDataset kwargs of the real images
        detector        = None,     # a resolved Detector
        num_gpus        = 1,        # number of processes sharing the work (torch.distributed when > 1)
        rank            = 0,        # this process's rank
        device          = None,     # torch device; None = cuda when available, else cpu
        progress        = True,     # tqdm bars (rank 0 only)
        cache_dir       = None,     # folder of the real-feature cache; None = $TAXOGAN_CACHE or ~/.cache/taxogan
        batch_size      = 64,       # images per detector call
        seed            = 0,        # seed of latents, labels, noise and KID subsets
        family_kwargs   = None,     # options of extension metric families (see calc_metric), by name; None = none
    ):
        if num_gpus < 1 or not 0 <= rank < num_gpus:
            raise ValueError(f'rank {rank} is not in [0, {num_gpus})')
        self.G = G
        self.dataset_kwargs = dict(dataset_kwargs or {})
        self.detector = detector
        self.num_gpus = num_gpus
        self.rank = rank
        self.device = torch.device(device) if device is not None else torch.device('cuda' if torch.cuda.is_available() else 'cpu')
        self.progress = progress and rank == 0
        self.cache_dir = default_cache_dir(cache_dir)
        self.batch_size = batch_size
        self.seed = seed
        self.family_kwargs = dict(family_kwargs or {})
        self._datasets = {}

    def dataset(self, **overrides):
        """The real dataset with `overrides` applied to dataset_kwargs; built once per set of kwargs."""
        kwargs = dict(self.dataset_kwargs, **overrides)
        kwargs.pop('class_name', None)   # NVIDIA's pickles name their dataset class; ours is the only one
        kwargs['cache'] = False           # each image is read once here; keeping them all would only cost memory
        key = json.dumps(kwargs, sort_keys=True, default=str)
        if key not in self._datasets:
            self._datasets[key] = ImageFolderDataset(**kwargs)
        return self._datasets[key]


class ImageSet:
    """A folder or zip of images that stands in for a generator: the metrics take its first N images, in file order."""

    def __init__(self,
        path,                   # .zip or folder of PNG/JPEG files (searched recursively), e.g. an export
        resolution  = None,     # expected side in pixels; None = from the first image
    ):
        self.dataset = ImageFolderDataset(path, resolution=resolution, use_labels=False, cache=False)
        self.path = str(path)
        # What the metrics ask of a generator: images are unconditional (class 0) and of one size.
        self.c_dim = 0
        self.img_resolution = self.dataset.resolution
        self.img_channels = self.dataset.num_channels

    def __len__(self):
        return len(self.dataset)

    def images(self, start, stop):
        """uint8 images [B, C, H, W] (torch) of items start .. stop-1."""
        return torch.from_numpy(np.stack([self.dataset[i][0] for i in range(start, stop)]))


class FeatureStats:
    """Features of a set of images: all rows and/or their mean and biased covariance (float64)."""

    def __init__(self,
        features,                   # float32 [N, D]
        capture_all     = True,     # keep every row (KID)
        capture_mean_cov= True,     # keep mean and covariance (FID)
    ):
        features = np.asarray(features, dtype=np.float32)
        self.num_items = int(features.shape[0])
        self.num_features = int(features.shape[1]) if features.ndim == 2 else 0
        self.features = features if capture_all else None
        self.mean, self.cov = feature_mean_cov(features) if capture_mean_cov and self.num_items else (None, None)

    def get_all(self):
        """All feature rows [N, D] (float32)."""
        if self.features is None:
            raise ValueError('these feature statistics were computed without capture_all')
        return self.features

    def get_mean_cov(self):
        """(mean [D], covariance [D, D]) in float64."""
        if self.mean is None:
            raise ValueError('these feature statistics were computed without capture_mean_cov')
        return self.mean, self.cov

    def save(self, path, key):
        """Write to an .npz atomically, with the cache key that produced it."""
        arrays = dict(format=np.array(CACHE_FORMAT), key=np.array(key), num_items=np.array(self.num_items),
                      num_features=np.array(self.num_features))
        if self.features is not None:
            arrays['features'] = self.features
        if self.mean is not None:
            arrays['mean'], arrays['cov'] = self.mean, self.cov
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        with atomic_write(path, 'wb') as f:
            f.write(buffer.getvalue())

    @classmethod
    def load(cls, path, key):
        """Read a cache file; None if it is unreadable or was written for another key."""
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data['format']) != CACHE_FORMAT or str(data['key']) != key:
                    return None
                stats = cls.__new__(cls)
                stats.num_items = int(data['num_items'])
                stats.num_features = int(data['num_features'])
                stats.features = data['features'] if 'features' in data.files else None
                stats.mean = data['mean'] if 'mean' in data.files else None
                stats.cov = data['cov'] if 'cov' in data.files else None
                return stats
        except (OSError, ValueError, KeyError):
            return None


#----------------------------------------------------------------------------
# Splitting work across processes.

def _batches(num_items, batch_size):
    return [(start, min(start + batch_size, num_items)) for start in range(0, num_items, batch_size)]


def _own_batches(batches, opts):
    """Indices of the batches this rank processes (round robin, so results do not depend on num_gpus)."""
    return [b for b in range(len(batches)) if b % opts.num_gpus == opts.rank]


def _broadcast_flag(flag, opts):
    """Rank 0's boolean, on every rank."""
    if opts.num_gpus == 1:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int64, device=collective_device())
    dist.broadcast(value, src=0)
    return bool(value.item())


def _gather_rows(parts, batches, opts, dtype):
    """Rows computed per batch on every rank -> one array [num_items, D] in batch order, on every rank."""
    own = _own_batches(batches, opts)
    local = [parts[b] for b in own]
    if opts.num_gpus == 1:
        return np.concatenate(local) if local else np.zeros([0, 0], dtype)
    device = collective_device()
    local = np.concatenate(local).astype(dtype) if local else None
    width = torch.tensor([0 if local is None else local.shape[1]], dtype=torch.int64, device=device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)     # a rank without batches does not know the width
    width = int(width.item())
    sizes = [sum(batches[b][1] - batches[b][0] for b in range(len(batches)) if b % opts.num_gpus == r) for r in range(opts.num_gpus)]
    padded = torch.zeros([max(sizes), width], dtype=getattr(torch, np.dtype(dtype).name), device=device)
    if local is not None:
        padded[:len(local)] = torch.from_numpy(local).to(device)
    gathered = [torch.empty_like(padded) for _ in range(opts.num_gpus)]
    dist.all_gather(gathered, padded)
    out = np.empty([batches[-1][1] if batches else 0, width], dtype=dtype)
    for r in range(opts.num_gpus):
        rows = gathered[r][:sizes[r]].cpu().numpy()
        offset = 0
        for b in range(r, len(batches), opts.num_gpus):
            start, stop = batches[b]
            out[start:stop] = rows[offset:offset + stop - start]
            offset += stop - start
    return out


#----------------------------------------------------------------------------
# Running a function over images.

def _map_batches(opts, num_items, rows, dtype, desc):
    """rows(batch index, start, stop) -> numpy rows, over this rank's batches of num_items; all rows, in order, on every rank."""
    batches = _batches(num_items, opts.batch_size)
    parts = {}
    own = _own_batches(batches, opts)
    with tqdm.tqdm(total=sum(batches[b][1] - batches[b][0] for b in own), desc=desc, unit='img', disable=not opts.progress) as bar:
        for b in own:
            start, stop = batches[b]
            parts[b] = np.asarray(rows(b, start, stop), dtype=dtype)
            bar.update(stop - start)
    return _gather_rows(parts, batches, opts, dtype)


def map_dataset(
    opts,           # MetricOptions
    dataset,        # ImageFolderDataset
    num_items,      # items 0 .. num_items-1 of the dataset
    fn,             # fn(uint8 images [B, C, H, W] on opts.device) -> numpy rows [B, D]
    dtype           = np.float32,   # dtype of the rows
    desc            = 'real images',# progress bar label
):
    """fn over the first num_items dataset images, split across ranks; rows [num_items, D] on every rank."""
    def rows(_batch_index, start, stop):
        images = torch.from_numpy(np.stack([dataset[i][0] for i in range(start, stop)]))   # [B, C, H, W]
        return fn(images.to(opts.device))
    return _map_batches(opts, num_items, rows, dtype, desc)


def batch_seed(seed, batch_index):
    """Seed of one generator batch, so image i is the same whatever the number of processes."""
    return int(np.random.SeedSequence([int(seed), int(batch_index)]).generate_state(1)[0])


def generate_batch(
    G,              # generator: G(z, c, truncation_psi=1, noise_mode='random') -> [B, C, H, W] in [-1, 1]
    dataset,        # real dataset the labels are drawn from (conditional G)
    num,            # batch size
    seed,           # batch seed (see batch_seed)
    device,         # torch device of G
):
    """(uint8 images [B, C, H, W], class index per image [B] int64; 0 for an unconditional G)."""
    rnd = np.random.RandomState(seed)
    z = torch.from_numpy(rnd.standard_normal([num, G.z_dim]).astype(np.float32)).to(device)
    if G.c_dim:
        picks = rnd.randint(len(dataset), size=num)
        labels = np.stack([dataset.get_label(int(i)) for i in picks])
        classes = labels.argmax(axis=1).astype(np.int64)
    else:
        labels = np.zeros([num, 0], dtype=np.float32)
        classes = np.zeros([num], dtype=np.int64)
    c = torch.from_numpy(labels).to(device)
    # The noise inputs come from torch's global generator: seed it for this batch without disturbing the caller.
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == 'cuda' else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        images = G(z, c, truncation_psi=1, noise_mode='random')
    return to_uint8(images), classes


def check_generator(G, dataset):
    """Raise ValueError when G cannot be compared with the dataset (labels or resolution differ)."""
    if G.c_dim and dataset.label_dim != G.c_dim:
        raise ValueError(f'{dataset.path}: the generator is conditional with {G.c_dim} classes but the dataset '
                         f'has {dataset.label_dim} label dimensions (use_labels={dataset.init_kwargs["use_labels"]})')
    if G.img_resolution != dataset.resolution:
        raise ValueError(f'{dataset.path}: images are {dataset.resolution} px but the generator makes {G.img_resolution} px')


def map_generator(
    opts,           # MetricOptions (opts.G is used)
    dataset,        # real dataset the labels are drawn from
    num_gen,        # number of images to generate
    fn,             # fn(uint8 images on opts.device, class indices [B]) -> numpy rows [B, D]
    dtype           = np.float32,       # dtype of the rows
    desc            = 'generated images', # progress bar label
):
    """fn over num_gen generated images (seeded per batch), split across ranks; rows [num_gen, D] on every rank.
    An ImageSet in opts.G gives its first min(num_gen, len) images instead, all of class 0."""
    if isinstance(opts.G, ImageSet):
        if opts.G.img_resolution != dataset.resolution:
            raise ValueError(f'{opts.G.path}: images are {opts.G.img_resolution} px but {dataset.path} has {dataset.resolution} px')
        def image_rows(_batch_index, start, stop):
            return fn(opts.G.images(start, stop).to(opts.device), np.zeros([stop - start], dtype=np.int64))
        return _map_batches(opts, min(num_gen, len(opts.G)), image_rows, dtype, 'image set')
    check_generator(opts.G, dataset)
    def rows(batch_index, start, stop):
        return fn(*generate_batch(opts.G, dataset, stop - start, batch_seed(opts.seed, batch_index), opts.device))
    return _map_batches(opts, num_gen, rows, dtype, desc)


#----------------------------------------------------------------------------
# Feature statistics.

def feature_cache_key(dataset, detector, num_items, capture_all, capture_mean_cov):
    """JSON text identifying real-image features: dataset content and options, detector, what was kept."""
    kwargs = dataset.init_kwargs
    return json.dumps(dict(
        dataset_sha256=dataset.content_hash(), dataset_len=len(dataset), max_size=kwargs['max_size'],
        random_seed=kwargs['random_seed'], xflip=kwargs['xflip'], resolution=dataset.resolution,
        detector=detector.id, num_items=num_items, capture_all=bool(capture_all), capture_mean_cov=bool(capture_mean_cov),
    ), sort_keys=True)


def compute_feature_stats_for_dataset(
    opts,                       # MetricOptions
    max_items       = None,     # use at most this many images; None = all
    full            = False,    # True = every real image, x-flip off (the *_full metrics)
    capture_all     = False,    # keep every row (KID)
    capture_mean_cov= False,    # keep mean and covariance (FID)
    use_cache       = True,     # read and write the on-disk cache
    dataset_overrides= None,    # dataset kwargs replacing opts.dataset_kwargs', e.g. dict(path=...) of another real set
):
    """Detector features of the real images, from the on-disk cache when the same request was computed before."""
    overrides = dict(dataset_overrides or {})
    # As NVIDIA's metrics: never the training subset (max_size); x-flip as trained except for the *_full metrics.
    dataset = opts.dataset(**dict(overrides, max_size=None, xflip=False)) if full else opts.dataset(**dict(overrides, max_size=None))
    num_items = len(dataset) if max_items is None else min(max_items, len(dataset))
    detector = opts.detector
    cache_file = None
    if use_cache:
        key = feature_cache_key(dataset, detector, num_items, capture_all, capture_mean_cov)
        digest = hashlib.sha256(key.encode('utf-8')).hexdigest()[:24]
        cache_file = os.path.join(opts.cache_dir, 'gan-metrics', f'{dataset.name}-{detector.id}-{digest}.npz')
        stats = FeatureStats.load(cache_file, key) if opts.rank == 0 and os.path.isfile(cache_file) else None
        if _broadcast_flag(stats is not None, opts):
            return stats if stats is not None else FeatureStats.load(cache_file, key)
    feats = map_dataset(opts, dataset, num_items, lambda images: detector.features(images, opts.device), desc='real images')
    stats = FeatureStats(feats, capture_all=capture_all, capture_mean_cov=capture_mean_cov)
    if cache_file is not None and opts.rank == 0:
        stats.save(cache_file, key)
    return stats


def compute_feature_stats_for_generator(
    opts,                       # MetricOptions (opts.G is used)
    num_gen,                    # number of generated images
    capture_all     = False,    # keep every row (KID)
    capture_mean_cov= False,    # keep mean and covariance (FID)
):
    """Detector features of num_gen images from G (psi 1, random noise, labels drawn from the dataset)."""
    detector = opts.detector
    feats = map_generator(opts, opts.dataset(max_size=None), num_gen, lambda images, _classes: detector.features(images, opts.device))
    return FeatureStats(feats, capture_all=capture_all, capture_mean_cov=capture_mean_cov)
