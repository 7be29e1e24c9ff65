"""Network pickles: ours, and NVIDIA's stylegan2-ada-pytorch pickles, loaded without running their code.

Our format is a pickled dict whose modules are stored as plain records (registered class name,
constructor kwargs, state dict), so loading never imports anything but tensors, numpy scalars and
containers. NVIDIA's pickles store each network as
`torch_utils.persistence._reconstruct_persistent_obj(meta)` with the class's source code in
`meta['module_src']`; we never execute that source: a restricted unpickler turns each such object into
a stub, and the stub tree is mapped onto our own classes by class name and constructor kwargs, copying
tensors by name.
"""

import collections
import io
import os
import pickle
import re
import struct

import numpy as np
import torch

from . import augment, networks
from .util import UserError, atomic_write

RECORD_KEY = '__taxogan_module__'
PICKLE_FORMAT = 'taxogan-network/1'

# Classes that may be rebuilt from a pickle, by registered name. Extensions register theirs with
# @register_module_class at import time (the engine never imports them).
MODULE_CLASSES = {}


class NetworkPickleError(UserError):
    """A network pickle cannot be read; the message names the file and the problem."""


def register_module_class(cls):
    """Allow instances of `cls` to be saved in and rebuilt from network pickles."""
    MODULE_CLASSES[f'{cls.__module__}.{cls.__qualname__}'] = cls
    return cls


for _cls in (networks.Generator, networks.Discriminator, augment.AugmentPipe):
    register_module_class(_cls)


NVIDIA_CLASS_NAMES = ('Generator', 'Discriminator', 'AugmentPipe')


def _nvidia_class(class_name):
    """Our class for an NVIDIA class name (as stored in persistence meta); None if unsupported."""
    return {'Generator': networks.Generator, 'Discriminator': networks.Discriminator, 'AugmentPipe': augment.AugmentPipe}.get(class_name)


# ----------------------------------------------------------------------------
# Restricted unpickling.

class _PersistentStub:
    """What an NVIDIA persistent object unpickles to: its class name and state, no code."""

    def __init__(self, meta):
        if not isinstance(meta, dict) or meta.get('type') != 'class' or 'class_name' not in meta:
            raise pickle.UnpicklingError('malformed persistent-object metadata')
        self.class_name = meta['class_name']
        self.state = meta.get('state') or {}


class _EasyDictStub(dict):
    """Stands in for dnnlib.util.EasyDict: a plain dict."""


def _load_storage_from_bytes(data):
    """Storage bytes inside a plain pickle, loaded with torch's weights-only unpickler."""
    return torch.load(io.BytesIO(data), weights_only=True)


def _allowed_globals():
    """(module, name) -> object: everything a network pickle may reference."""
    allowed = {
        ('collections', 'OrderedDict'): collections.OrderedDict,
        # Protocols below 4 (NVIDIA's training loop pickles with Python 3.7's default, 3) have no set opcode:
        # each module's _non_persistent_buffers_set arrives as a call of builtins.set.
        ('builtins', 'set'): set,
        ('builtins', 'frozenset'): frozenset,
        ('torch._utils', '_rebuild_tensor_v2'): torch._utils._rebuild_tensor_v2,
        ('torch._utils', '_rebuild_parameter'): torch._utils._rebuild_parameter,
        ('torch._utils', '_rebuild_parameter_with_state'): torch._utils._rebuild_parameter_with_state,
        ('torch.storage', '_load_from_bytes'): _load_storage_from_bytes,
        ('torch_utils.persistence', '_reconstruct_persistent_obj'): _PersistentStub,
        ('dnnlib.util', 'EasyDict'): _EasyDictStub,
        ('numpy', 'ndarray'): np.ndarray,
        ('numpy', 'dtype'): np.dtype,
    }
    try:
        from numpy._core import multiarray         # numpy >= 2
    except ImportError:
        from numpy.core import multiarray          # numpy 1.x
    for numpy_core in ('numpy.core.multiarray', 'numpy._core.multiarray'):  # pickles name either
        allowed[(numpy_core, 'scalar')] = multiarray.scalar
        allowed[(numpy_core, '_reconstruct')] = multiarray._reconstruct
    for dtype_name in ('Float64DType', 'Float32DType', 'Int64DType', 'Int32DType', 'BoolDType'):
        if hasattr(np, 'dtypes') and hasattr(np.dtypes, dtype_name):
            allowed[('numpy.dtypes', dtype_name)] = getattr(np.dtypes, dtype_name)
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a network pickle needs."""

    def __init__(self, file):
        super().__init__(file)
        self._allowed = _allowed_globals()

    def find_class(self, module, name):
        obj = self._allowed.get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(f'refused global {module}.{name} (not allowed in a network pickle)')
        return obj

    def persistent_load(self, pid):
        raise pickle.UnpicklingError('persistent ids are not allowed in a network pickle')


# ----------------------------------------------------------------------------
# Conversion between modules and plain records.

def _to_plain(value):
    """EasyDict stubs -> dicts, recursively (NVIDIA's kwargs)."""
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_plain(v) for v in value)
    return value


def _module_to_record(module):
    """A registered module -> a plain record (class name, init kwargs, state dict on CPU)."""
    name = f'{type(module).__module__}.{type(module).__qualname__}'
    if MODULE_CLASSES.get(name) is not type(module):
        raise TypeError(f'{name} is not registered for network pickles (use @register_module_class)')
    if not hasattr(module, 'init_kwargs'):
        raise TypeError(f'{name} has no init_kwargs attribute; cannot be rebuilt from a pickle')
    state = collections.OrderedDict((k, v.detach().cpu().clone()) for k, v in module.state_dict().items())
    return {RECORD_KEY: name, 'init_kwargs': _to_plain(module.init_kwargs), 'state_dict': state}


def _record_to_module(record, path):
    """A plain record -> a module in eval mode without gradients."""
    name = record[RECORD_KEY]
    cls = MODULE_CLASSES.get(name)
    if cls is None:
        raise NetworkPickleError(f'{path}: unknown network class {name!r} (import the package that defines it)')
    module = cls(**record['init_kwargs'])
    _load_state_strict(module, record['state_dict'], path, name)
    return module.eval().requires_grad_(False)


def _load_state_strict(module, state, path, what):
    """Copy tensors by name, failing loudly on any missing, extra or mis-shaped tensor."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise NetworkPickleError(f'{path}: {what} tensors do not match: missing {missing[:5]}{"..." if len(missing) > 5 else ""}, '
                                 f'unexpected {extra[:5]}{"..." if len(extra) > 5 else ""}')
    for key, value in state.items():
        if tuple(own[key].shape) != tuple(value.shape):
            raise NetworkPickleError(f'{path}: {what} tensor {key} has shape {list(value.shape)}, expected {list(own[key].shape)}')
    module.load_state_dict(state, strict=True)


def _flatten_stub(stub, prefix, out):
    """Collect the parameters and persistent buffers of an NVIDIA stub tree by dotted name."""
    state = stub.state
    non_persistent = set(state.get('_non_persistent_buffers_set') or ())
    for name, tensor in (state.get('_parameters') or {}).items():
        if tensor is not None:
            out[prefix + name] = tensor
    for name, tensor in (state.get('_buffers') or {}).items():
        if tensor is not None and name not in non_persistent:
            out[prefix + name] = tensor
    for name, child in (state.get('_modules') or {}).items():
        if child is None:
            continue
        if not isinstance(child, _PersistentStub):
            raise NetworkPickleError(f'submodule {prefix + name} is not a persistent object')
        _flatten_stub(child, f'{prefix}{name}.', out)
    return out


def _stub_to_module(stub, path):
    """Build our module from an NVIDIA stub: same class, same init kwargs, tensors copied by name."""
    cls = _nvidia_class(stub.class_name)
    if cls is None:
        raise NetworkPickleError(f'{path}: unsupported network class {stub.class_name!r} (supported: {", ".join(NVIDIA_CLASS_NAMES)})')
    args = _to_plain(tuple(stub.state.get('_init_args') or ()))
    kwargs = _to_plain(dict(stub.state.get('_init_kwargs') or {}))
    try:
        module = cls(*args, **kwargs)
    except TypeError as exc:
        raise NetworkPickleError(f'{path}: cannot build {stub.class_name} from its stored kwargs: {exc}') from None
    tensors = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in _flatten_stub(stub, '', {}).items()}
    _load_state_strict(module, tensors, path, stub.class_name)     # AugmentPipe too: p, Hz_geom, Hz_fbank
    return module.eval().requires_grad_(False)


def _convert(value, path):
    """Turn records and stubs inside the loaded object into modules; other values into plain data."""
    if isinstance(value, _PersistentStub):
        return _stub_to_module(value, path)
    if isinstance(value, dict) and RECORD_KEY in value:
        return _record_to_module(value, path)
    if isinstance(value, dict):
        return {k: _convert(v, path) for k, v in value.items()}
    if isinstance(value, list):
        return [_convert(v, path) for v in value]
    return value


# ----------------------------------------------------------------------------
# Public API.

def module_tensors(module):
    """name -> tensor of a module's parameters and buffers (what a transfer by name copies)."""
    return dict(module.named_parameters()) | dict(module.named_buffers())


def tensor_mismatches(
    src,    # module whose tensors would be copied (e.g. a pickle's network)
    dst,    # module they would be copied into
):
    """What a copy by name and shape leaves undone: (dst tensors src cannot fill, src tensors dst has no place for).

    Both are lists of one-line descriptions ('mapping.fc0.weight [64, 128], pickle [64, 64]'), in dst's and src's order.
    """
    src_tensors, dst_tensors = module_tensors(src), module_tensors(dst)
    unfilled, unused = [], []
    for name, tensor in dst_tensors.items():
        other = src_tensors.get(name)
        if other is None:
            unfilled.append(f'{name} {list(tensor.shape)} (not in the pickle)')
        elif other.shape != tensor.shape:
            unfilled.append(f'{name} {list(tensor.shape)}, pickle {list(other.shape)}')
    for name, tensor in src_tensors.items():
        if name not in dst_tensors:
            unused.append(f'{name} {list(tensor.shape)} (pickle only)')
    return unfilled, unused


def load_network_pkl(
    path_or_file,           # file path, or a binary file object
    device = None,          # move modules there; None = keep on CPU
):
    """Load one of our network pickles or an NVIDIA stylegan2-ada-pytorch pickle into a dict of our modules."""
    path = getattr(path_or_file, 'name', path_or_file)
    if isinstance(path_or_file, (str, os.PathLike)):
        if not os.path.isfile(path_or_file):
            raise NetworkPickleError(f'{path}: no such file')
        with open(path_or_file, 'rb') as f:
            return load_network_pkl(f, device=device)
    try:
        raw = _RestrictedUnpickler(path_or_file).load()
    except NetworkPickleError:
        raise
    except pickle.UnpicklingError as exc:
        raise NetworkPickleError(f'{path}: not a valid network pickle: {exc}') from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, RuntimeError, MemoryError) as exc:
        raise NetworkPickleError(f'{path}: not a valid network pickle (truncated or corrupt: {type(exc).__name__}: {exc})') from None
    if not isinstance(raw, dict):
        raise NetworkPickleError(f'{path}: not a network pickle (top level is {type(raw).__name__}, expected a dict)')
    try:
        data = _convert(raw, path)
    except NetworkPickleError:
        raise
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:
        raise NetworkPickleError(f'{path}: cannot rebuild the networks: {exc}') from None
    if not any(isinstance(data.get(k), torch.nn.Module) for k in ('G', 'G_ema', 'D')):
        raise NetworkPickleError(f'{path}: not a network pickle (no G, G_ema or D inside)')
    for key in ('G', 'D', 'G_ema', 'augment_pipe', 'training_set_kwargs'):
        data.setdefault(key, None)
    if device is not None:
        data = {k: v.to(device) if isinstance(v, torch.nn.Module) else v for k, v in data.items()}
    return data


def _to_records(value):
    """Modules -> records, recursively; everything else unchanged."""
    if isinstance(value, torch.nn.Module):
        return _module_to_record(value)
    if isinstance(value, dict):
        return {k: _to_records(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_records(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    return value


def evaluation_network(
    data,       # a loaded pickle (load_network_pkl)
):
    """The generator to sample from or evaluate: the pickle's G_ema, else its G."""
    G = data.get('G_ema')
    if G is None:
        G = data.get('G')
    if G is None:
        raise NetworkPickleError('the pickle has neither G_ema nor G')
    return G


def load_style_generator(
    pkl,                # network pickle path
    device  = 'cpu',    # torch device
):
    """The pickle's StyleGAN2 generator (G_ema, else G) on `device`; NetworkPickleError (one line) for anything else."""
    try:
        G = evaluation_network(load_network_pkl(pkl))
    except NetworkPickleError as exc:
        raise NetworkPickleError(f'{pkl}: the pickle holds no generator' if str(exc).startswith('the pickle') else str(exc)) from None
    if not (hasattr(G, 'mapping') and hasattr(G, 'synthesis')):
        raise NetworkPickleError(f'{pkl}: the generator ({type(G).__name__}) has no mapping and synthesis networks '
                                 f'(a StyleGAN2 generator is needed)')
    return G.to(device)


def tensor_bytes(value):
    """Bytes of the tensors in a nested structure of dicts, lists and tuples (about a pickle's size, for messages)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


# torch's legacy storage format (inside every pickled tensor) names each storage by its memory address: the same tensors
# then give other bytes in another process. The address is replaced by the storage's number in the file.
_LEGACY_KEY_LIST = re.compile(rb'\x80\x02\]q\x00X(....)', re.DOTALL)       # the storage keys list: ]q0 X<len> <key>


def _storage_bytes(storage, number):
    """torch's legacy bytes of one storage (what torch.storage._load_from_bytes reads), named `number` not its address."""
    buf = io.BytesIO()
    torch.save(storage, buf, _use_new_zipfile_serialization=False)
    data = buf.getvalue()
    match = _LEGACY_KEY_LIST.search(data)
    if match is None:
        return data                                         # another layout: torch's bytes as they are (still valid)
    length = struct.unpack('<I', match.group(1))[0]
    key = data[match.end():match.end() + length]
    old, new = b'X' + match.group(1) + key, b'X' + struct.pack('<I', len(str(number))) + str(number).encode()
    return data.replace(old, new) if data.count(old) == 2 else data


class _DeterministicPickler(pickle.Pickler):
    """pickle.Pickler whose tensor storages carry no memory address: the same payload gives the same bytes anywhere."""

    def __init__(self, file):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._storages = 0

    def reducer_override(self, obj):
        if isinstance(obj, torch.storage.TypedStorage):
            self._storages += 1
            return torch.storage._load_from_bytes, (_storage_bytes(obj, self._storages),)
        return NotImplemented


def save_network_pkl(
    path,   # destination .pkl; written to a temporary file first, then renamed
    data,   # dict with modules (G, D, G_ema, augment_pipe) and plain data (tensors, numbers, strings, dicts)
):
    """Write a network pickle atomically (a full disk: a one-line DiskFullError, the old file untouched)."""
    payload = _to_records(dict(data))
    payload['format'] = PICKLE_FORMAT
    with atomic_write(path, 'wb', fsync=True, size_hint=tensor_bytes(payload)) as f:
        _DeterministicPickler(f).dump(payload)
