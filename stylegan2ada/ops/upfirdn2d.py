"""Upsample, FIR-filter and downsample 2-D images in one op (the resampling used everywhere in StyleGAN2).

Semantics follow NVIDIA's stylegan2-ada-pytorch: insert `up - 1` zeros between pixels, pad (negative
padding crops), convolve with the FIR filter `f` (a true convolution unless `flip_filter`), then keep
every `down`-th pixel. Both paths are plain PyTorch and support gradients of any order:
`impl='ref'` follows the definition literally (zero insertion, full-resolution convolution, then
decimation); `impl='fast'` computes only the pixels that are kept (a transposed depthwise
convolution for upsampling, a strided depthwise convolution for downsampling) and folds symmetric
padding into the convolution instead of copying a padded tensor.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

from .impl import choose_impl


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


def _pad_or_crop(x, px0, px1, py0, py1):
    """Pad where positive, crop where negative; a view (no copy) when nothing is padded."""
    if max(px0, px1, py0, py1) > 0:
        return F.pad(x, [px0, px1, py0, py1])
    if min(px0, px1, py0, py1) < 0:
        return x[:, :, -py0: x.shape[2] + py1, -px0: x.shape[3] + px1]
    return x


def _fir_pass(x, taps, up, down, padding):
    """One depthwise FIR pass: taps [C, 1, kh, kw] in convolution order, up/down (x, y), padding (x0, x1, y0, y1)."""
    C = x.shape[1]
    kh, kw = taps.shape[2], taps.shape[3]
    upx, upy = up
    downx, downy = down
    px0, px1, py0, py1 = padding
    if upx == 1 and upy == 1:
        # The symmetric part of the padding goes into conv2d (no padded copy); the stride computes only
        # the pixels that decimation keeps: output i of a stride-s correlation is output s*i of the full one.
        sx, sy = max(min(px0, px1), 0), max(min(py0, py1), 0)
        x = _pad_or_crop(x, px0 - sx, px1 - sx, py0 - sy, py1 - sy)
        return F.conv2d(x, taps.flip([2, 3]), stride=(downy, downx), padding=(sy, sx), groups=C)

    # Polyphase upsampling: conv_transpose2d scatters each input pixel through the taps at stride `up`,
    # which is the full convolution of the zero-inserted image with the taps. Output k of the reference
    # (pad by p0, valid convolution) is element k + (k_taps - 1) - p0 of that full result, so the full
    # result is cropped by k_taps - 1 - p0 on the left and k_taps - up - p1 on the right (negative = pad).
    cx0, cx1 = kw - 1 - px0, kw - upx - px1
    cy0, cy1 = kh - 1 - py0, kh - upy - py1
    tx, ty = max(min(cx0, cx1), 0), max(min(cy0, cy1), 0)            # symmetric crop done by conv_transpose2d
    x = F.conv_transpose2d(x, taps, stride=(upy, upx), padding=(ty, tx), groups=C)
    x = _pad_or_crop(x, tx - cx0, tx - cx1, ty - cy0, ty - cy1)
    if downx > 1 or downy > 1:
        x = x[:, :, ::downy, ::downx]
    return x


def _upfirdn2d_fast(x, f, up, down, padding, flip_filter, gain):
    """Fast path: polyphase (transposed) upsampling, strided downsampling, padding folded into the conv."""
    C = x.shape[1]
    f = f * (gain ** (f.ndim / 2))
    f = f.to(x.dtype)
    if flip_filter:
        f = f.flip(list(range(f.ndim)))                                # taps in convolution order
    px0, px1, py0, py1 = padding
    if f.numel() == 1 and up == (1, 1) and down == (1, 1):
        return _pad_or_crop(x, px0, px1, py0, py1) * f.reshape([])     # a 1-tap filter only pads and scales
    if f.ndim == 2:
        taps = f[None, None].expand(C, 1, f.shape[0], f.shape[1])       # [C, 1, fh, fw], no per-call copy
        return _fir_pass(x, taps, up, down, padding)
    # Separable: one pass along x, then one along y.
    x = _fir_pass(x, f[None, None, None].expand(C, 1, 1, f.shape[0]), (up[0], 1), (down[0], 1), (px0, px1, 0, 0))
    return _fir_pass(x, f[None, None, :, None].expand(C, 1, f.shape[0], 1), (1, up[1]), (1, down[1]), (0, 0, py0, py1))


# Both paths take (x, f, up, down, padding, flip_filter, gain) with parsed arguments.
_IMPLS = {'ref': _upfirdn2d_ref, 'fast': _upfirdn2d_fast}


def upfirdn2d(
    x,                      # input images [N, C, H, W]
    f,                      # FIR filter from setup_filter (1-D separable or 2-D); None = identity
    up          = 1,        # upsampling factor, int or (x, y)
    down        = 1,        # downsampling factor, int or (x, y)
    padding     = 0,        # padding in upsampled pixels: int, (x, y) or (x0, x1, y0, y1); negative crops
    flip_filter = False,    # use correlation instead of convolution
    gain        = 1,        # overall gain of the signal
    impl        = None,     # 'ref' or 'fast' (both any-order differentiable); None = 'fast' (it covers every case)
):
    """Pad, upsample, filter and downsample a batch of 2-D images."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError('upfirdn2d expects a 4-D tensor [N, C, H, W]')
    if f is None:
        f = torch.ones([1, 1], dtype=torch.float32, device=x.device)
    if f.ndim not in (1, 2):
        raise ValueError(f'upfirdn2d filter must be 1-D or 2-D, got shape {list(f.shape)}')
    impl = choose_impl('upfirdn2d', impl)
    return _IMPLS[impl](x, f, _parse_scaling(up), _parse_scaling(down), _parse_padding(padding), flip_filter, gain)


def filter2d(x, f, padding=0, flip_filter=False, gain=1, impl=None):
    """Filter images with `f`, keeping their size (padding adds on top)."""
    px0, px1, py0, py1 = _parse_padding(padding)
    fw, fh = get_filter_size(f)
    p = [px0 + fw // 2, px1 + (fw - 1) // 2, py0 + fh // 2, py1 + (fh - 1) // 2]
    return upfirdn2d(x, f, padding=p, flip_filter=flip_filter, gain=gain, impl=impl)


def upsample2d(x, f, up=2, padding=0, flip_filter=False, gain=1, impl=None):
    """Upsample images by `up` with the interpolation filter `f`, keeping the signal's scale."""
    upx, upy = _parse_scaling(up)
    px0, px1, py0, py1 = _parse_padding(padding)
    fw, fh = get_filter_size(f)
    p = [px0 + (fw + upx - 1) // 2, px1 + (fw - upx) // 2, py0 + (fh + upy - 1) // 2, py1 + (fh - upy) // 2]
    return upfirdn2d(x, f, up=(upx, upy), padding=p, flip_filter=flip_filter, gain=gain * upx * upy, impl=impl)


def downsample2d(x, f, down=2, padding=0, flip_filter=False, gain=1, impl=None):
    """Downsample images by `down` after low-pass filtering with `f`."""
    downx, downy = _parse_scaling(down)
    px0, px1, py0, py1 = _parse_padding(padding)
    fw, fh = get_filter_size(f)
    p = [px0 + (fw - downx + 1) // 2, px1 + (fw - downx) // 2, py0 + (fh - downy + 1) // 2, py1 + (fh - downy) // 2]
    return upfirdn2d(x, f, down=(downx, downy), padding=p, flip_filter=flip_filter, gain=gain, impl=impl)
