"""Graphs of device work: capture a function's kernels once, replay them with one call.

At 256 px on one GPU a training phase launches about 1500 kernels and the host, not the GPU, sets the pace
(docs/benchmarks.md). A CUDA graph records the kernels of one call of a function; a replay runs them all again for
the cost of one launch. A replay repeats the capture exactly: the same kernels on the same memory with the same
Python-time constants. So a function is fit for a graph only when it is *static*: its shapes are fixed, it reads no
device value on the host, no Python value inside it changes between calls, and it updates the state it keeps
(parameters, optimizer moments, running means) in place. Inputs are copied into the tensors the capture read;
outputs are read from the tensors the capture returned, before the next replay overwrites them.

Two backends share one interface (`capture(fn)` runs fn once and returns its result; `replay()` runs it again and
returns the result of that run):
- 'cuda': torch.cuda.CUDAGraph, the fast path (captured with thread-local error checking, so that a DataLoader's
  pin-memory thread may keep working meanwhile).
- 'oplog': the reference model of the same semantics on any device. It records the aten ops that one call runs, with
  the tensors they read, and replays them: a tensor made during the capture is replaced by the one the replay made in
  its place; any other tensor (parameters, optimizer state, static inputs) is read again as it is then, as a CUDA graph
  reads the same memory; Python scalars and shapes stay as captured. A host read of a device value raises, as it cannot
  be captured. Tests train through it and compare with eager training: equal results mean the function is static.
"""

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

BACKENDS = ('cuda', 'oplog')

# Ops that hand a device value to the host: a graph cannot contain them.
_HOST_READS = frozenset([
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.equal.default,
    torch.ops.aten.nonzero.default,
])


class GraphCaptureError(RuntimeError):
    """A function cannot be captured (it reads a device value on the host, ...)."""


class CudaGraph:
    """A function captured as one torch.cuda.CUDAGraph; graphs that share `pool` share memory (replay one at a time)."""

    def __init__(self,
        pool,               # torch.cuda.graph_pool_handle() shared by graphs that never run concurrently; None = own pool
    ):
        self._pool = pool
        self._graph = torch.cuda.CUDAGraph()
        self._result = None
        self.num_replays = 0                # replays after the capture (tests and benchmarks check graphs really ran)

    def capture(self, fn):
        """Record fn's kernels (capture runs nothing), then replay them once; returns fn's result tensors."""
        with torch.cuda.graph(self._graph, pool=self._pool, capture_error_mode='thread_local'):
            self._result = fn()
        self._graph.replay()
        return self._result

    def replay(self):
        """Run the recorded kernels again; the returned tensors (the same ones each time) hold this run's values."""
        self._graph.replay()
        self.num_replays += 1
        return self._result


def _is_empty(t):
    return t.untyped_storage().nbytes() == 0


def _storage_key(t):
    # The storage object itself, not its data address: meta tensors have none, and views share the storage object.
    return StorageWeakRef(t.untyped_storage()).cdata


class _OpRecorder(TorchDispatchMode):
    """Runs and records every aten op, describing each tensor argument as made-in-capture or external."""

    def __init__(self):
        super().__init__()
        self.ops = []                       # (func, spec of (args, kwargs), reference per leaf)
        self._made = {}                     # storage -> (op index, output leaf index) of the op that made it
        self._alive = []                    # every output, kept so that no storage object is reused meanwhile
        self.devices = set()                # device types of the tensors the ops read

    def reference(self, x):
        """How a replay gets this value: ('made', op, leaf, size, stride, offset), ('ext', tensor), ('empty', ...)."""
        if not isinstance(x, torch.Tensor):
            return ('const', x)
        if _is_empty(x):
            return ('empty', tuple(x.shape), tuple(x.stride()), x.dtype, x.device)
        maker = self._made.get(_storage_key(x))
        if maker is None:
            return ('ext', x)
        return ('made', *maker, tuple(x.shape), tuple(x.stride()), x.storage_offset())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _HOST_READS:
            raise GraphCaptureError(f'{func} reads a device value on the host: a graph cannot contain it')
        leaves, spec = tree_flatten((args, kwargs))
        refs = [self.reference(x) for x in leaves]
        self.devices.update(x.device.type for x in leaves if isinstance(x, torch.Tensor))
        out = func(*args, **kwargs)
        read = {_storage_key(x) for x in leaves if isinstance(x, torch.Tensor) and not _is_empty(x)}
        index = len(self.ops)
        for j, t in enumerate(tree_flatten(out)[0]):
            if isinstance(t, torch.Tensor) and not _is_empty(t):
                storage = _storage_key(t)
                if storage not in read and storage not in self._made:     # new memory, not a view or an in-place result
                    self._made[storage] = (index, j)
        self._alive.append(out)
        self.ops.append((func, spec, refs))
        return out


class OpLogGraph:
    """The CPU model of CudaGraph (see the module docstring): records aten ops at capture, reruns them at replay."""

    def __init__(self):
        self._ops = None
        self._devices = set()
        self._result = None                 # (spec, references) of fn's result
        self.num_replays = 0                # replays after the capture (as CudaGraph counts them)

    def capture(self, fn):
        """Run fn once, recording its ops; returns its result."""
        recorder = _OpRecorder()
        with recorder:
            result = fn()
        leaves, spec = tree_flatten(result)
        self._ops = recorder.ops
        self._devices = recorder.devices
        self._result = (spec, [recorder.reference(x) for x in leaves])
        return result

    def devices(self):
        """Device types of every tensor the recorded ops read, e.g. {'cuda'}: a 'cpu' beside another device would be a
        host computation, which a CUDA graph runs once, at capture, and then replays as a frozen value."""
        return set(self._devices)

    def replay(self):
        """Rerun the recorded ops on the current values of external tensors; returns this run's result."""
        self.num_replays += 1
        made = []
        with torch.no_grad():               # the recorded ops include the backward ones: replay them as plain kernels
            for func, spec, refs in self._ops:
                args, kwargs = tree_unflatten([_resolve(ref, made) for ref in refs], spec)
                made.append(tree_flatten(func(*args, **kwargs))[0])
        spec, refs = self._result
        return tree_unflatten([_resolve(ref, made) for ref in refs], spec)


def _resolve(ref, made):
    kind = ref[0]
    if kind in ('const', 'ext'):
        return ref[1]
    if kind == 'empty':
        _, size, stride, dtype, device = ref
        return torch.empty_strided(size, stride, dtype=dtype, device=device)
    _, op, leaf, size, stride, offset = ref
    return made[op][leaf].as_strided(size, stride, offset)


def make_graph(
    backend,                # 'cuda' or 'oplog'
    pool    = None,         # CUDA memory pool shared with other graphs; None = the graph's own (ignored by 'oplog')
):
    """A new, empty graph of the given backend."""
    if backend == 'cuda':
        return CudaGraph(pool)
    if backend == 'oplog':
        return OpLogGraph()
    raise ValueError(f'unknown graph backend {backend!r}; expected one of {BACKENDS}')
