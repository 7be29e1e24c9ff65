"""The `impl=` switch shared by every op: 'ref' (plain reference path), 'fast' (torch, fewer passes) or 'triton'
(fused Triton kernels, for the ops and calls that have them); None picks the best path that applies.

None picks 'triton' when the op supports the call, its tensors are on CUDA and Triton can be imported; else 'fast'
where the fast path covers the call; else 'ref'. `default_impl(...)` is the one switch for a whole network: inside
the block, every op called with impl=None (as the networks call them) takes that path where it applies. It is a
context variable, set and reset by the block, so it never leaks into other code, tests or threads.

Triton itself is imported only when a call can use it (never when stylegan2ada is imported). Its kernels are built on
first use and kept by each op in a `functools.cache` (`stylegan2ada.ops.reset_triton()` clears them), together with
the op's first failure to build or launch them: after one, that op warns once and runs its fast path from then on.
"""

import contextlib
import contextvars
import functools
import importlib.util
import os
import warnings

import torch

IMPL_CHOICES = ('ref', 'fast', 'triton')

_scoped_impl = contextvars.ContextVar('stylegan2ada_ops_impl', default=None)


@contextlib.contextmanager
def default_impl(
    impl,               # 'ref', 'fast' or 'triton': what impl=None means inside the block; None = each op's own choice
):
    """Within the block, ops called with impl=None use `impl` where it applies ('triton' -> 'fast' -> 'ref')."""
    if impl is not None and impl not in IMPL_CHOICES:
        raise ValueError(f'unknown ops impl {impl!r}; choose from {list(IMPL_CHOICES)} or None')
    token = _scoped_impl.set(impl)
    try:
        yield
    finally:
        _scoped_impl.reset(token)


def triton_interpret():
    """Whether TRITON_INTERPRET asks for Triton's CPU interpreter (read now, as triton.jit reads it when decorating)."""
    return os.environ.get('TRITON_INTERPRET', '0').strip().lower() in ('1', 'true', 'yes', 'on', 'y')


@functools.cache
def triton_importable():
    """Whether `import triton` works in this process (tried once; cache_clear() forgets the answer)."""
    if importlib.util.find_spec('triton') is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install is as good as none: the torch paths still work
        return False
    return True


def triton_unavailable_reason(
    device_type,        # device type of the op's tensors: 'cuda', 'cpu', ...
):
    """Why Triton kernels cannot run on tensors of this device type here; None when they can."""
    if not triton_importable():
        return 'Triton is not installed (pip install triton) or cannot be imported'
    if device_type == 'cuda':
        return None
    if device_type == 'cpu' and triton_interpret():
        return None
    if device_type == 'cpu':
        return 'the tensors are on the CPU; Triton runs there only in its interpreter (set TRITON_INTERPRET=1)'
    return f'Triton kernels run on CUDA tensors, not on {device_type!r}'


def choose_impl(
    op,                     # op name, for the error message
    impl,                   # 'ref', 'fast', 'triton' or None
    fast_ok     = True,     # whether the fast path supports this call
    triton_ok   = False,    # whether the op's Triton kernels support this call (op, dtype, arguments)
    device_type = None,     # device type of the op's tensors ('cuda', 'cpu', ...); only read for Triton
):
    """Resolve an op's `impl` argument (None: default_impl's choice, else 'triton' on CUDA, else 'fast', else 'ref')."""
    if impl is not None and impl not in IMPL_CHOICES:
        raise ValueError(f'unknown {op} impl {impl!r}; choose from {list(IMPL_CHOICES)} or None')
    if impl is None:
        scoped = _scoped_impl.get()
        if scoped == 'ref':
            return 'ref'
        if scoped == 'triton' and triton_ok:
            impl = 'triton'                                             # asked for: checked below like an explicit one
        elif scoped is None and triton_ok and device_type == 'cuda' and triton_importable():
            return 'triton'
        else:
            return 'fast' if fast_ok else 'ref'
    if impl == 'fast' and not fast_ok:
        raise ValueError(f"{op}: impl='fast' does not support this case; use impl=None or 'ref'")
    if impl == 'triton':
        if not triton_ok:
            raise ValueError(f"{op}: impl='triton' does not support this case; use impl=None, 'fast' or 'ref'")
        reason = triton_unavailable_reason(device_type)
        if reason is not None:
            raise ValueError(f"{op}: impl='triton' cannot run here: {reason}")
    return impl


def _capturing_cuda_graph():
    """Whether the current CUDA stream is being captured into a graph (False without CUDA)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class TritonKernels:
    """One op's Triton kernels: built on first use; after the first failure to build or launch them, the fast path."""

    def __init__(
        self,
        op,             # op name, for the warning
        build,          # () -> the op's kernels (whatever its launch functions take)
    ):
        self.op = op
        self.build = build
        self.kernels = None
        self.failure = None         # first line of the first error; once set, the op no longer tries Triton

    def run(
        self,
        launch,         # kernels -> result; raises if Triton cannot compile or launch
        fallback,       # () -> the same result from the op's torch fast path
    ):
        """launch(kernels), or fallback() with one warning if the kernels failed (now or on an earlier call)."""
        if self.failure is None:
            try:
                if self.kernels is None:
                    self.kernels = self.build()
                return launch(self.kernels)
            except torch.cuda.OutOfMemoryError:
                raise                       # not Triton's fault: the fast path would need the memory too
            except Exception as error:  # any compile/driver/launch error: training must go on, on the torch path
                if _capturing_cuda_graph():
                    raise                   # the graph's capture failed, not Triton: it runs eagerly, on these kernels
                lines = str(error).strip().splitlines()
                self.failure = f'{type(error).__name__}: {lines[0] if lines else ""}'.strip().rstrip(':')
                warnings.warn(f"{self.op}: Triton kernel failed ({self.failure}); using the 'fast' path from now on",
                              RuntimeWarning, stacklevel=2)
        return fallback()
