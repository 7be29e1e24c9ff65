"""Training images from a .zip or a folder of PNG/JPEG files, with optional class labels from dataset.json."""

import hashlib
import io
import json
import os
import zipfile

import numpy as np
import PIL.Image
import torch

from .util import UserError

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
LABELS_FILE = 'dataset.json'

# PIL modes whose pixels are single-channel intensities; everything else is read as RGB.
GRAY_MODES = ('1', 'L', 'LA', 'I', 'I;16', 'I;16B', 'I;16L', 'F')


class DatasetError(UserError):
    """A dataset that cannot be read; the message names the file and the problem on one line."""


def _is_power_of_two(n):
    return n >= 1 and (n & (n - 1)) == 0


#----------------------------------------------------------------------------

class ImageFolderDataset(torch.utils.data.Dataset):
    """Square images of one power-of-two size from a .zip or a folder; items are (uint8 [C, H, W], float32 label)."""

    def __init__(self,
        path,                   # .zip file or folder of PNG/JPEG files (searched recursively)
        resolution  = None,     # expected side in pixels; None = take it from the first image
        use_labels  = False,    # one-hot labels from dataset.json; False = label_dim 0
        max_size    = None,     # keep a random subset of this many images (fixed seed); None = all
        xflip       = False,    # double the dataset with horizontally mirrored copies
        random_seed = 0,        # seed of the max_size subset
        cache       = True,     # keep decoded images in memory after the first read
    ):
        self._path = str(path)
        self._use_labels = bool(use_labels)
        self._cache_enabled = bool(cache)
        self._cache = {}            # raw index -> uint8 [C, H, W]; filled lazily, per process
        self._zipfile = None        # opened lazily in each process (see _open_zip)
        self._zipfile_pid = None
        self._content_hash = None

        if not os.path.exists(self._path):
            raise DatasetError(f'{self._path}: no such file or folder')
        if os.path.isdir(self._path):
            self._type = 'dir'
            self._all_fnames = sorted(self._list_folder())
        elif os.path.isfile(self._path) and zipfile.is_zipfile(self._path):
            self._type = 'zip'
            try:
                self._all_fnames = sorted(self._open_zip().namelist())
            except (zipfile.BadZipFile, OSError) as exc:
                raise DatasetError(f'{self._path}: cannot read the zip file: {exc}') from None
        else:
            raise DatasetError(f'{self._path}: not a .zip file or a folder')

        self._image_fnames = [f for f in self._all_fnames if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
        if not self._image_fnames:
            raise DatasetError(f'{self._path}: no images found (looked for {", ".join(IMAGE_EXTENSIONS)})')

        self._num_channels, self._resolution = self._check_images(resolution)
        self._raw_labels, self._label_names = self._load_labels()

        # The subset and the mirrored copies are index arrays over the raw images.
        num_raw = len(self._image_fnames)
        self._raw_idx = np.arange(num_raw, dtype=np.int64)
        if max_size is not None and max_size < num_raw:
            chosen = np.random.RandomState(random_seed).choice(num_raw, size=max_size, replace=False)
            self._raw_idx = np.sort(chosen).astype(np.int64)
        self._xflip = np.zeros(len(self._raw_idx), dtype=bool)
        if xflip:
            self._raw_idx = np.concatenate([self._raw_idx, self._raw_idx])
            self._xflip = np.concatenate([self._xflip, np.ones_like(self._xflip)])

        self._name = os.path.splitext(os.path.basename(os.path.normpath(self._path)))[0]
        self.init_kwargs = dict(path=self._path, resolution=self._resolution, use_labels=self._use_labels,
                                max_size=max_size, xflip=bool(xflip), random_seed=random_seed, cache=self._cache_enabled)

    # ------------------------------------------------------------------
    # Files.

    def _list_folder(self):
        names = []
        for root, _dirs, files in os.walk(self._path):
            for fname in files:
                rel = os.path.relpath(os.path.join(root, fname), self._path)
                names.append(rel.replace(os.sep, '/'))
        return names

    def _open_zip(self):
        # A ZipFile shares one file offset, so each process (DataLoader worker) opens its own.
        if self._zipfile is None or self._zipfile_pid != os.getpid():
            self._zipfile = zipfile.ZipFile(self._path)
            self._zipfile_pid = os.getpid()
        return self._zipfile

    def _describe(self, fname):
        """How error messages name one file of the dataset."""
        if self._type == 'zip':
            return f'{self._path}:{fname}'
        return os.path.join(self._path, fname)

    def _read_bytes(self, fname):
        if self._type == 'zip':
            return self._open_zip().read(fname)
        with open(os.path.join(self._path, fname), 'rb') as f:
            return f.read()

    def __getstate__(self):
        state = dict(self.__dict__)
        state['_zipfile'] = None   # an open file cannot travel to another process
        state['_zipfile_pid'] = None
        return state

    def close(self):
        """Close the zip file if this process opened it."""
        if self._zipfile is not None:
            self._zipfile.close()
        self._zipfile = None
        self._zipfile_pid = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # pylint: disable=broad-except
            pass

    # ------------------------------------------------------------------
    # Validation.

    def _check_images(self, resolution):
        """Read every image header; return (channels, side). Raises DatasetError at the first bad file."""
        first = None
        all_gray = True
        for fname in self._image_fnames:
            try:
                with PIL.Image.open(io.BytesIO(self._read_bytes(fname))) as img:
                    width, height = img.size
                    mode = img.mode
            except (OSError, SyntaxError, ValueError, zipfile.BadZipFile) as exc:
                raise DatasetError(f'{self._describe(fname)}: unreadable image ({type(exc).__name__}: {exc})') from None
            if width != height:
                raise DatasetError(f'{self._describe(fname)}: image is {width}x{height}; all images must be square')
            if not _is_power_of_two(width):
                raise DatasetError(f'{self._describe(fname)}: side {width} is not a power of two')
            if resolution is not None and width != resolution:
                raise DatasetError(f'{self._describe(fname)}: image is {width}x{height}, expected {resolution}x{resolution}')
            if first is None:
                first = (fname, width)
            elif width != first[1]:
                raise DatasetError(f'{self._describe(fname)}: image is {width}x{height} but {first[0]} is '
                                   f'{first[1]}x{first[1]}; all images must have the same size')
            all_gray = all_gray and mode in GRAY_MODES
        # A dataset is grayscale only if every image is; a mixed one is read as RGB throughout.
        return (1 if all_gray else 3), first[1]

    def _dataset_json_desc(self):
        return self._describe(LABELS_FILE)

    def _load_labels(self):
        """Raw labels ([N] int64 classes, [N, D] float32 vectors, or None) and the class names (or None)."""
        if LABELS_FILE not in self._all_fnames:
            return None, None
        desc = self._dataset_json_desc()
        try:
            meta = json.loads(self._read_bytes(LABELS_FILE).decode('utf-8'))
        except (ValueError, UnicodeDecodeError) as exc:
            raise DatasetError(f'{desc}: not valid JSON ({exc})') from None
        if not isinstance(meta, dict) or 'labels' not in meta:
            raise DatasetError(f'{desc}: expected an object with a "labels" key')
        entries = meta['labels']
        if entries is None:
            return None, None
        if not isinstance(entries, list):
            raise DatasetError(f'{desc}: "labels" must be a list of [file name, class] pairs or null')

        by_name = {}
        for entry in entries:
            if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str)):
                raise DatasetError(f'{desc}: malformed entry {json.dumps(entry)[:80]}; expected [file name, class]')
            name, label = entry[0].replace('\\', '/'), entry[1]
            is_class = isinstance(label, int) and not isinstance(label, bool) and label >= 0
            is_vector = isinstance(label, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in label)
            if not (is_class or is_vector):
                raise DatasetError(f'{desc}: label of {name} must be a class index >= 0 or a list of numbers, got {json.dumps(label)[:40]}')
            by_name[name] = label

        image_set = set(self._image_fnames)
        for name in by_name:
            if name not in image_set:
                raise DatasetError(f'{desc}: names {name}, which is not an image of the dataset')
        for fname in self._image_fnames:
            if fname not in by_name:
                raise DatasetError(f'{desc}: has no label for {fname}')

        labels = [by_name[f] for f in self._image_fnames]
        kinds = {isinstance(label, int) for label in labels}
        if len(kinds) != 1:
            raise DatasetError(f'{desc}: mixes class indices and label vectors')
        if kinds == {True}:
            raw = np.array(labels, dtype=np.int64)
        else:
            lengths = {len(label) for label in labels}
            if len(lengths) != 1:
                raise DatasetError(f'{desc}: label vectors have different lengths {sorted(lengths)}')
            raw = np.array(labels, dtype=np.float32).reshape(len(labels), -1)

        names = self._find_label_names(meta, desc)
        if names is not None and raw.ndim == 1 and raw.max() >= len(names):
            raise DatasetError(f'{desc}: class {int(raw.max())} is out of range of the {len(names)} class names')
        return raw, names

    def _find_label_names(self, meta, desc):
        """Class names from dataset.json's "label_names" (position = class index), or None."""
        names = meta.get('label_names')
        if names is None:
            return None
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise DatasetError(f'{desc}: "label_names" must be a list of strings')
        return list(names)

    # ------------------------------------------------------------------
    # Items.

    def _load_raw_image(self, raw_idx):
        """Decoded image raw_idx as uint8 [C, H, W]."""
        cached = self._cache.get(raw_idx)
        if cached is not None:
            return cached
        fname = self._image_fnames[raw_idx]
        try:
            with PIL.Image.open(io.BytesIO(self._read_bytes(fname))) as img:
                img = img.convert('L' if self._num_channels == 1 else 'RGB')
                array = np.asarray(img, dtype=np.uint8)
        except (OSError, SyntaxError, ValueError, zipfile.BadZipFile) as exc:
            raise DatasetError(f'{self._describe(fname)}: unreadable image ({type(exc).__name__}: {exc})') from None
        if array.ndim == 2:
            array = array[:, :, np.newaxis]                       # [H, W, 1]
        array = np.ascontiguousarray(array.transpose(2, 0, 1))   # [C, H, W]
        if array.shape[1:] != (self._resolution, self._resolution):
            raise DatasetError(f'{self._describe(fname)}: decoded size {array.shape[2]}x{array.shape[1]} '
                               f'differs from {self._resolution}x{self._resolution}')
        if self._cache_enabled:
            self._cache[raw_idx] = array
        return array

    def __len__(self):
        return len(self._raw_idx)

    def __getitem__(self, idx):
        raw_idx = int(self._raw_idx[idx])
        image = self._load_raw_image(raw_idx)
        if self._xflip[idx]:
            image = image[:, :, ::-1]
        return image.copy(), self.get_label(idx)

    def get_label(self, idx):
        """Label of item idx: float32 one-hot (or the raw vector); an empty array when labels are off."""
        if not self.has_labels:
            return np.zeros([0], dtype=np.float32)
        raw = self._raw_labels[int(self._raw_idx[idx])]
        if self._raw_labels.ndim == 1:
            onehot = np.zeros([self.label_dim], dtype=np.float32)
            onehot[raw] = 1
            return onehot
        return raw.copy()

    def get_details(self, idx):
        """dict(raw_idx, xflip, raw_label): raw_label is the class index, the label vector, or None."""
        raw_idx = int(self._raw_idx[idx])
        raw_label = None
        if self.has_labels:
            raw = self._raw_labels[raw_idx]
            raw_label = int(raw) if self._raw_labels.ndim == 1 else raw.copy()
        return dict(raw_idx=raw_idx, xflip=bool(self._xflip[idx]), raw_label=raw_label)

    def content_hash(self):
        """SHA-256 over the names and bytes of the images and dataset.json; computed once per object."""
        if self._content_hash is None:
            digest = hashlib.sha256()
            names = list(self._image_fnames) + ([LABELS_FILE] if LABELS_FILE in self._all_fnames else [])
            for fname in sorted(names):
                data = self._read_bytes(fname)
                digest.update(fname.encode('utf-8') + b'\0' + str(len(data)).encode('ascii') + b'\0')
                digest.update(data)
            self._content_hash = digest.hexdigest()
        return self._content_hash

    # ------------------------------------------------------------------
    # Properties.

    @property
    def name(self):
        return self._name

    @property
    def path(self):
        return self._path

    @property
    def image_fnames(self):
        """File names of the raw images inside the zip or folder, in raw index order."""
        return list(self._image_fnames)

    @property
    def image_shape(self):
        return [self._num_channels, self._resolution, self._resolution]

    @property
    def num_channels(self):
        return self._num_channels

    @property
    def resolution(self):
        return self._resolution

    @property
    def label_shape(self):
        return [self.label_dim]

    @property
    def label_dim(self):
        if not self._use_labels or self._raw_labels is None:
            return 0
        if self._raw_labels.ndim == 1:
            num = int(self._raw_labels.max()) + 1
            return max(num, len(self._label_names)) if self._label_names is not None else num
        return int(self._raw_labels.shape[1])

    @property
    def has_labels(self):
        return self.label_dim != 0

    @property
    def has_onehot_labels(self):
        return self.has_labels and self._raw_labels.ndim == 1

    @property
    def label_names(self):
        return list(self._label_names) if self._label_names is not None else None

    @property
    def raw_labels(self):
        """Raw labels of the raw images ([N] class indices or [N, D] vectors), or None."""
        return None if self._raw_labels is None else self._raw_labels.copy()


#----------------------------------------------------------------------------

class InfiniteSampler(torch.utils.data.Sampler):
    """Endless stream of dataset indices for one rank; shuffling swaps items within a sliding window."""

    def __init__(self,
        dataset,                # anything with __len__
        rank            = 0,    # this process's rank
        num_replicas    = 1,    # number of processes sharing the stream
        shuffle         = True, # False = visit items in order
        seed            = 0,    # seed of the shuffling
        window_size     = 0.5,  # swap window as a fraction of the dataset; 0 = one shuffle, then a fixed order
    ):
        if len(dataset) == 0:
            raise ValueError('InfiniteSampler needs a non-empty dataset')
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f'rank {rank} is not in [0, {num_replicas})')
        if not 0 <= window_size <= 1:
            raise ValueError(f'window_size {window_size} is not in [0, 1]')
        super().__init__()
        self.dataset = dataset
        self.rank = rank
        self.num_replicas = num_replicas
        self.shuffle = shuffle
        self.seed = seed
        self.window_size = window_size

    def __iter__(self):
        n = len(self.dataset)
        order = np.arange(n)
        rnd = None
        window = 0
        if self.shuffle:
            rnd = np.random.RandomState(self.seed)
            rnd.shuffle(order)
            window = int(np.rint(n * self.window_size))
        step = 0
        while True:
            pos = step % n
            # All replicas walk the same stream; each one keeps every num_replicas-th element.
            if step % self.num_replicas == self.rank:
                yield int(order[pos])
            if window >= 2:
                # Swap with an item up to `window` places behind, so the order keeps changing epoch after epoch.
                other = (pos - rnd.randint(window)) % n
                order[pos], order[other] = order[other], order[pos]
            step += 1
