"""The `impl=` switch shared by every op: 'ref' (plain reference path) or 'fast'; None picks 'fast' where it applies."""

IMPL_CHOICES = ('ref', 'fast')


def choose_impl(
    op,                 # op name, for the error message
    impl,               # 'ref', 'fast' or None
    fast_ok = True,     # whether the fast path supports this call
):
    """Resolve an op's `impl` argument: None means 'fast' when fast_ok, else 'ref'; anything unknown is an error."""
    if impl is None:
        return 'fast' if fast_ok else 'ref'
    if impl not in IMPL_CHOICES:
        raise ValueError(f'unknown {op} impl {impl!r}; choose from {list(IMPL_CHOICES)} or None')
    if impl == 'fast' and not fast_ok:
        raise ValueError(f"{op}: impl='fast' does not support this case; use impl=None or 'ref'")
    return impl
