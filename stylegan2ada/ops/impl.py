"""The `impl=` switch shared by every op: 'ref' (plain reference path) or 'fast'; None picks 'fast' where it applies.

`default_impl('ref')` is the one switch for a whole network: inside the block, every op called with impl=None (as the
networks call them) takes that path. It is a context variable, set and reset by the block, so it never leaks into
other code, tests or threads.
"""

import contextlib
import contextvars

IMPL_CHOICES = ('ref', 'fast')

_scoped_impl = contextvars.ContextVar('stylegan2ada_ops_impl', default=None)


@contextlib.contextmanager
def default_impl(
    impl,               # 'ref' or 'fast': what impl=None means inside the block; None = each op's own choice
):
    """Within the block, ops called with impl=None use `impl` ('fast' falls back to 'ref' where it does not apply)."""
    if impl is not None and impl not in IMPL_CHOICES:
        raise ValueError(f'unknown ops impl {impl!r}; choose from {list(IMPL_CHOICES)} or None')
    token = _scoped_impl.set(impl)
    try:
        yield
    finally:
        _scoped_impl.reset(token)


def choose_impl(
    op,                 # op name, for the error message
    impl,               # 'ref', 'fast' or None
    fast_ok = True,     # whether the fast path supports this call
):
    """Resolve an op's `impl` argument: None means default_impl's choice, else 'fast' when fast_ok, else 'ref'."""
    if impl is None:
        return 'ref' if _scoped_impl.get() == 'ref' or not fast_ok else 'fast'
    if impl not in IMPL_CHOICES:
        raise ValueError(f'unknown {op} impl {impl!r}; choose from {list(IMPL_CHOICES)} or None')
    if impl == 'fast' and not fast_ok:
        raise ValueError(f"{op}: impl='fast' does not support this case; use impl=None or 'ref'")
    return impl
