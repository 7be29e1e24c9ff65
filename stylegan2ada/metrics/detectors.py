"""Feature detectors for the metrics: NVIDIA's Inception-v3 or VGG16 (downloaded once and cached), a local TorchScript
file, or a file of a kind an extension registers (register_detector_kind; e.g. taxogan_ext.taxon_detector's 'taxon').

Every detector is a TorchScript module called as `detector(img_uint8_nchw, return_features=True)` returning features
[N, D]; a classifier detector also exports `logits(img)` and `get_class_names()`.
"""

import collections
import contextlib
import hashlib
import os
import types
import warnings
import zipfile

import numpy as np
import requests
import torch
import tqdm

from ..util import UserError, atomic_write, sha256_file, write_text_atomic

INCEPTION_URL = 'https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt'
INCEPTION_FILENAME = 'inception-2015-12-05.pt'
INCEPTION_FEATURES = 2048
VGG16_URL = 'https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan2/versions/1/files/metrics/vgg16.pt'
VGG16_FILENAME = 'vgg16.pt'
VGG16_FEATURES = 4096
# NVIDIA publishes no checksum for this file, so the SHA-256 is recorded at the first download
# (in a side file `<name>.sha256`) and every later load is checked against it.
CHECKSUM_SUFFIX = '.sha256'
CACHE_ENV = 'TAXOGAN_CACHE'
OFFLINE_ENV = 'TAXOGAN_OFFLINE'

# NVIDIA's detector files, asked for by name (--detector inception / vgg16): where they come from and the width of
# the features their file must return. Read-only: the table is the same in every process.
DownloadableDetector = collections.namedtuple('DownloadableDetector', ['title', 'url', 'filename', 'num_features'])
DOWNLOADABLE = types.MappingProxyType({
    'inception':    DownloadableDetector('Inception', INCEPTION_URL, INCEPTION_FILENAME, INCEPTION_FEATURES),
    'vgg16':        DownloadableDetector('VGG16', VGG16_URL, VGG16_FILENAME, VGG16_FEATURES),
})
BUILTIN_KINDS = tuple(DOWNLOADABLE) + ('file',)

# A detector kind an extension adds: --detector KIND:PATH asks for it (see register_detector_kind).
DetectorKind = collections.namedtuple('DetectorKind', ['check', 'recognize', 'suffix', 'hint'])

# Registered detector kinds by name; filled by register_detector_kind when the extension defining one is imported.
DETECTOR_KINDS = {}


class DetectorError(UserError):
    """A detector that cannot be found, downloaded, verified or loaded; one line naming the file."""


def register_detector_kind(
    kind,               # name of the kind: --detector KIND:PATH asks for it
    check,              # check(path) raising DetectorError (one line) when the file is not a detector of this kind
    recognize   = None, # recognize(path) -> True when a plain TorchScript PATH is of this kind; None = only KIND:PATH
    suffix      = None, # added to the names of metrics computed with it; None = '_' + kind
    hint        = '',   # how to get such a file, added to messages that ask for one, e.g. '(train one with: ...)'
):
    """Make `resolve_detector('KIND:PATH')` (and metric names ending in its suffix) known to the metrics."""
    if kind in BUILTIN_KINDS or not kind.isidentifier():
        raise ValueError(f'detector kind {kind!r} must be a new identifier')
    DETECTOR_KINDS[kind] = DetectorKind(check=check, recognize=recognize, suffix='_' + kind if suffix is None else suffix,
                                        hint=hint)


def detector_kind_suffixes():
    """{kind: metric-name suffix} of the registered detector kinds, in registration order."""
    return {kind: entry.suffix for kind, entry in DETECTOR_KINDS.items()}


def detector_request(kind):
    """How to ask for a detector of a registered kind on the command line, with the kind's hint."""
    hint = DETECTOR_KINDS[kind].hint if kind in DETECTOR_KINDS else ''
    return f'--detector {kind}:PATH' + (f' {hint}' if hint else '')


@contextlib.contextmanager
def quiet_jit():
    """Silence torch's TorchScript deprecation notice: NVIDIA's detector exists only as TorchScript."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', category=DeprecationWarning, message=r'`torch\.jit\.')
        yield


def jit_load(path, **kwargs):
    """torch.jit.load without the deprecation notice."""
    with quiet_jit():
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
    verify          = None, # verify(file) raising on bad bytes (a binary file at offset 0), run before the rename; None = no check
    progress        = True, # show a tqdm progress bar
    timeout         = 60,   # seconds without data before giving up
):
    """Download url to dest with requests (streamed, verified, atomic); returns the SHA-256 of the bytes."""
    digest = hashlib.sha256()
    # 'w+b': the verification reads the temporary file back before atomic_write renames it.
    with atomic_write(dest, 'w+b') as f:
        with requests.get(url, stream=True, timeout=timeout) as response:
            response.raise_for_status()
            total = int(response.headers.get('Content-Length') or 0) or None
            with tqdm.tqdm(total=total, unit='B', unit_scale=True, desc=os.path.basename(dest), disable=not progress) as bar:
                for chunk in response.iter_content(chunk_size=1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        size = f.tell()
        if total is not None and size != total:
            raise DetectorError(f'{url}: download truncated ({size} of {total} bytes)')
        if expected_sha256 is not None and digest.hexdigest() != expected_sha256:
            raise DetectorError(f'{url}: checksum mismatch (SHA-256 {digest.hexdigest()}, expected {expected_sha256})')
        if verify is not None:
            f.flush()
            f.seek(0)
            verify(f)
    return digest.hexdigest()


def _check_downloaded_module(file, source, entry):
    """Load a downloaded detector file (path or binary file) and check its feature width; errors name `source`."""
    try:
        module = jit_load(file, map_location='cpu').eval()
        with torch.no_grad():
            out = module(torch.zeros([1, 3, 32, 32], dtype=torch.uint8), return_features=True)
    except Exception as exc:  # pylint: disable=broad-except
        raise DetectorError(f'{source}: not a usable {entry.title} TorchScript file ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ""})') from None
    if tuple(out.shape) != (1, entry.num_features):
        raise DetectorError(f'{source}: not a usable {entry.title} TorchScript file (features of shape {list(out.shape)}, '
                            f'expected [1, {entry.num_features}])')


def inception_path(
    cache_dir   = None, # folder; None = $TAXOGAN_CACHE or ~/.cache/taxogan
    progress    = True, # progress bar while downloading
):
    """Path of NVIDIA's Inception detector in the cache, downloading it on first use; DetectorError when impossible."""
    return downloaded_detector_path('inception', cache_dir=cache_dir, progress=progress)


def downloaded_detector_path(
    name,               # a key of DOWNLOADABLE: 'inception' or 'vgg16'
    cache_dir   = None, # folder; None = $TAXOGAN_CACHE or ~/.cache/taxogan
    progress    = True, # progress bar while downloading
):
    """Path of one of NVIDIA's detector files in the cache, downloading it on first use; DetectorError when impossible."""
    entry = DOWNLOADABLE[name]
    folder = default_cache_dir(cache_dir)
    path = os.path.join(folder, entry.filename)
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
            write_text_atomic(sidecar, f'{actual}  {entry.filename}\n')  # a copy put there by hand
        return path

    where = f'download {entry.url} to {path} (or set ${CACHE_ENV}, or pass --detector PATH)'
    if os.environ.get(OFFLINE_ENV, '') not in ('', '0'):
        raise DetectorError(f'{entry.title} detector not found at {path} and ${OFFLINE_ENV} is set; {where}')
    try:
        digest = download_file(entry.url, path, verify=lambda file: _check_downloaded_module(file, entry.url, entry), progress=progress)
    except requests.RequestException as exc:
        reason = type(exc).__name__
        raise DetectorError(f'{entry.title} detector not found at {path} and the download failed ({reason}); {where}') from None
    except OSError as exc:
        raise DetectorError(f'{entry.title} detector not found at {path} and cannot be written there ({exc.strerror}); {where}') from None
    write_text_atomic(sidecar, f'{digest}  {entry.filename}\n')
    return path


#----------------------------------------------------------------------------

class Detector:
    """A resolved --detector choice: 'inception', 'vgg16', a TorchScript PATH or KIND:PATH; loads lazily per device."""

    def __init__(self,
        kind,               # 'inception' / 'vgg16' (NVIDIA's files from the cache), 'file' (a local TorchScript) or a registered kind
        path        = None, # the TorchScript file; None only for 'inception' / 'vgg16' (then found or downloaded on use)
        cache_dir   = None, # cache folder for 'inception' / 'vgg16'; None = the default
        progress    = True, # progress bar when downloading
    ):
        if kind not in BUILTIN_KINDS and kind not in DETECTOR_KINDS:
            raise ValueError(f'unknown detector kind {kind!r}')
        self.kind = kind
        # Added to metric names computed with this detector, so that its figures never pass for Inception ones.
        self.suffix = DETECTOR_KINDS[kind].suffix if kind in DETECTOR_KINDS else ''
        self._path = None if path is None else str(path)
        self._by_name = path is None    # asked for by name ('inception'): spec stays the name once the file is found
        self._cache_dir = cache_dir
        self._progress = progress
        self._sha256 = None
        self._modules = {}      # str(device) -> loaded module

    def __getstate__(self):
        state = dict(self.__dict__)
        state['_modules'] = {}  # loaded modules stay in the process that loaded them
        return state

    @property
    def path(self):
        """The TorchScript file (downloads NVIDIA's Inception or VGG16 file on first use)."""
        if self._path is None:
            self._path = downloaded_detector_path(self.kind, self._cache_dir, progress=self._progress)
        return self._path

    @property
    def spec(self):
        """How to ask for this detector again on the command line."""
        if self.kind in DOWNLOADABLE and self._by_name:
            return self.kind
        return self._path if self.kind in BUILTIN_KINDS else f'{self.kind}:{self._path}'

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
        """Classifier detectors only: predicted class of uint8 images [N, C, H, W] as int64 numpy [N]."""
        module = self.load(device)
        if not hasattr(module, 'logits'):
            raise DetectorError(f'{self.spec}: not a classifier (its TorchScript module exports no logits(img))')
        with torch.no_grad():
            logits = module.logits(self._as_rgb(images.to(device)))
        return logits.argmax(dim=1).cpu().numpy().astype(np.int64)

    @property
    def class_names(self):
        """Classifier detectors: the class names (the module's get_class_names()); None for a feature extractor."""
        # Any loaded copy answers; else one on the CPU (the names do not depend on the device).
        module = next(iter(self._modules.values()), None) or self.load('cpu')
        return list(module.get_class_names()) if hasattr(module, 'get_class_names') else None


def resolve_detector(
    spec,               # 'inception', 'vgg16', KIND:PATH (a registered kind), a TorchScript PATH, or a Detector (returned as is)
    cache_dir   = None, # cache folder for the Inception / VGG16 download; None = the default
    progress    = True, # progress bar when downloading
):
    """Turn a --detector value into a Detector; DetectorError (one line) for a missing or wrong file."""
    if isinstance(spec, Detector):
        return spec
    spec = str(spec)
    if spec in DOWNLOADABLE:
        return Detector(spec, cache_dir=cache_dir, progress=progress)
    kind, colon, path = spec.partition(':')
    if colon and kind in DETECTOR_KINDS:
        DETECTOR_KINDS[kind].check(path)
        return Detector(kind, path)
    if not os.path.isfile(spec):
        expected = ', '.join(list(DOWNLOADABLE) + [f'{kind}:PATH' for kind in DETECTOR_KINDS])
        raise DetectorError(f'{spec}: no such detector file (expected {expected} or a TorchScript file)')
    if not zipfile.is_zipfile(spec):
        raise DetectorError(f'{spec}: not a TorchScript file')
    # A file of a registered kind given as a plain path is still of that kind: its figures keep the kind's suffix.
    for kind, entry in DETECTOR_KINDS.items():
        if entry.recognize is not None and entry.recognize(spec):
            return Detector(kind, spec)
    return Detector('file', spec)
