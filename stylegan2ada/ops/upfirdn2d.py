"""Upsample, FIR-filter and downsample 2-D images in one op (the resampling used everywhere in StyleGAN2).

Semantics follow NVIDIA's stylegan2-ada-pytorch: insert `up - 1` zeros between pixels, pad (negative
padding crops), convolve with the FIR filter `f` (a true convolution unless `flip_filter`), then keep
every `down`-th pixel. `impl='ref'` is plain PyTorch and supports gradients of any order.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F


def _parse_scaling(scaling):
    """Return (sx, sy) from an int or a pair."""
    if isinstance(scaling, int):
        scaling = [scaling, scaling]
    sx, sy = scaling
    if sx < 1 or sy < 1:
        raise ValueError(f'scaling factors must be >= 1, got {scaling}')
    return int(sx), int(sy)


def _parse_padding(padding):
    """Return (x0, x1, y0, y1) from an int, a pair (x, y) or a quadruple."""
    if isinstance(padding, int):
        padding = [padding, padding]
    if len(padding) == 2:
        px, py = padding
        padding = [px, px, py, py]
    if len(padding) != 4:
        raise ValueError(f'padding must have 1, 2 or 4 elements, got {padding}')
    return tuple(int(p) for p in padding)


def get_filter_size(f):
    """Return (width, height) of a 1-D or 2-D filter; (1, 1) for None."""
    if f is None:
        return 1, 1
    if f.ndim not in (1, 2):
        raise ValueError(f'filter must be 1-D or 2-D, got shape {list(f.shape)}')
    return int(f.shape[-1]), int(f.shape[0])


def setup_filter(
    f,                      # taps as list/array/tensor; None = [1] (identity)
    device      = None,     # device of the result; None = CPU
    normalize   = True,     # scale so that the taps sum to 1
    flip_filter = False,    # mirror the filter
    gain        = 1,        # overall gain (applied as gain ** (ndim / 2) per axis)
    separable   = None,     # keep a 1-D filter separable; None = only when it has >= 8 taps
):
    """Build a float32 FIR filter tensor for upfirdn2d: 1-D (separable) or 2-D."""
    if f is None:
        f = 1
    f = torch.as_tensor(np.asarray(f, dtype=np.float32) if not torch.is_tensor(f) else f, dtype=torch.float32)
    if f.ndim == 0:
        f = f[None]
    if separable is None:
        separable = (f.ndim == 1 and f.numel() >= 8)
    if f.ndim == 1 and not separable:
        f = torch.outer(f, f)
    if f.ndim != (1 if separable else 2):
        raise ValueError(f'cannot build a {"separable" if separable else "2-D"} filter from shape {list(f.shape)}')
    if normalize:
        f = f / f.sum()
    if flip_filter:
        f = f.flip(list(range(f.ndim)))
    f = f * (gain ** (f.ndim / 2))
    return f.to(device=device)


def _upfirdn2d_ref(x, f, up, down, padding, flip_filter, gain):
    """Reference path: zero-insertion, pad/crop, depthwise conv, decimation."""
    N, C, H, W = x.shape                                           # [N, C, H, W]
    upx, upy = up
    downx, downy = down
    px0, px1, py0, py1 = padding

    # Upsample by inserting zeros after every pixel.
    x = x.reshape(N, C, H, 1, W, 1)
    x = F.pad(x, [0, upx - 1, 0, 0, 0, upy - 1])
    x = x.reshape(N, C, H * upy, W * upx)

    # Pad where positive, crop where negative.
    x = F.pad(x, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    x = x[:, :, max(-py0, 0): x.shape[2] - max(-py1, 0), max(-px0, 0): x.shape[3] - max(-px1, 0)]

    # conv2d is a correlation: flip the taps unless asked not to, so the op is a true convolution.
    f = f * (gain ** (f.ndim / 2))
    f = f.to(x.dtype)
    if not flip_filter:
        f = f.flip(list(range(f.ndim)))
    f = f[None, None].repeat([C, 1] + [1] * f.ndim)                # [C, 1, fh, fw] or [C, 1, fw]
    if f.ndim == 4:
        x = F.conv2d(x, f, groups=C)
    else:
        x = F.conv2d(x, f.unsqueeze(2), groups=C)                  # along x
        x = F.conv2d(x, f.unsqueeze(3), groups=C)                  # along y

    return x[:, :, ::downy, ::downx]


_IMPLS = {'ref': _upfirdn2d_ref}


def upfirdn2d(
    x,                      # input images [N, C, H, W]
    f,                      # FIR filter from setup_filter (1-D separable or 2-D); None = identity
    up          = 1,        # upsampling factor, int or (x, y)
    down        = 1,        # downsampling factor, int or (x, y)
    padding     = 0,        # padding in upsampled pixels: int, (x, y) or (x0, x1, y0, y1); negative crops
    flip_filter = False,    # use correlation instead of convolution
    gain        = 1,        # overall gain of the signal
    impl        = 'ref',    # implementation: 'ref' (plain PyTorch, any-order gradients)
):
    """Pad, upsample, filter and downsample a batch of 2-D images."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError('upfirdn2d expects a 4-D tensor [N, C, H, W]')
    if f is None:
        f = torch.ones([1, 1], dtype=torch.float32, device=x.device)
    if impl not in _IMPLS:
        raise ValueError(f'unknown upfirdn2d impl {impl!r}; choose from {sorted(_IMPLS)}')
    return _IMPLS[impl](x, f, _parse_scaling(up), _parse_scaling(down), _parse_padding(padding), flip_filter, gain)


def filter2d(x, f, padding=0, flip_filter=False, gain=1, impl='ref'):
    """Filter images with `f`, keeping their size (padding adds on top)."""
    px0, px1, py0, py1 = _parse_padding(padding)
    fw, fh = get_filter_size(f)
    p = [px0 + fw // 2, px1 + (fw - 1) // 2, py0 + fh // 2, py1 + (fh - 1) // 2]
    return upfirdn2d(x, f, padding=p, flip_filter=flip_filter, gain=gain, impl=impl)


def upsample2d(x, f, up=2, padding=0, flip_filter=False, gain=1, impl='ref'):
    """Upsample images by `up` with the interpolation filter `f`, keeping the signal's scale."""
    upx, upy = _parse_scaling(up)
    px0, px1, py0, py1 = _parse_padding(padding)
    fw, fh = get_filter_size(f)
    p = [px0 + (fw + upx - 1) // 2, px1 + (fw - upx) // 2, py0 + (fh + upy - 1) // 2, py1 + (fh - upy) // 2]
    return upfirdn2d(x, f, up=(upx, upy), padding=p, flip_filter=flip_filter, gain=gain * upx * upy, impl=impl)


def downsample2d(x, f, down=2, padding=0, flip_filter=False, gain=1, impl='ref'):
    """Downsample images by `down` after low-pass filtering with `f`."""
    downx, downy = _parse_scaling(down)
    px0, px1, py0, py1 = _parse_padding(padding)
    fw, fh = get_filter_size(f)
    p = [px0 + (fw - downx + 1) // 2, px1 + (fw - downx) // 2, py0 + (fh - downy + 1) // 2, py1 + (fh - downy) // 2]
    return upfirdn2d(x, f, down=(downx, downy), padding=p, flip_filter=flip_filter, gain=gain, impl=impl)
