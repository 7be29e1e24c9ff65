"""Upsample, FIR-filter and downsample 2-D images in one op (the resampling used everywhere in StyleGAN2).

Semantics follow NVIDIA's stylegan2-ada-pytorch: insert `up - 1` zeros between pixels, pad (negative
padding crops), convolve with the FIR filter `f` (a true convolution unless `flip_filter`), then keep
every `down`-th pixel. Three paths, all differentiable to any order:
`impl='ref'` follows the definition literally (zero insertion, full-resolution convolution, then
decimation); `impl='fast'` computes only the pixels that are kept (a transposed depthwise
convolution for upsampling, a strided depthwise convolution for downsampling) and folds symmetric
padding into the convolution instead of copying a padded tensor; `impl='triton'` runs a Triton kernel
that computes each output pixel from only the taps that land on real input pixels (one pass for a
2-D filter, two for a separable one), with a backward that is upfirdn2d again (the exact adjoint:
up and down swapped, the filter mirrored, the padding of `_adjoint_padding`). The Triton path gives
no gradient for the filter; calls whose filter requires grad take the fast path.
"""

import functools

import numpy as np
import torch
import torch.nn.functional as F

from .impl import TritonKernels, choose_impl, triton_interpret


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


# oneDNN's depthwise convolutions on the CPU split the work over channels: for a few large channels (images at
# the augment pipe's 2x grid) folding the batch into the channels runs 3-7x faster (forward and double backward;
# 8 x 3 x 127 x 253 with 12 taps: 29.6 -> 4.1 ms forward). With many channels, or small images, it gains nothing.
_FOLD_MAX_CHANNELS = 4
_FOLD_MIN_PIXELS = 64 * 64


def _fold_batch(x):
    """Whether a depthwise pass over x runs faster with the batch folded into the channels (CPU, few large channels)."""
    return (x.device.type == 'cpu' and x.shape[0] > 1 and x.shape[1] <= _FOLD_MAX_CHANNELS
            and x.shape[2] * x.shape[3] >= _FOLD_MIN_PIXELS)


def _fir_pass(x, taps, up, down, padding):
    """One depthwise FIR pass: taps [C, 1, kh, kw] in convolution order, up/down (x, y), padding (x0, x1, y0, y1)."""
    if _fold_batch(x):
        N, C = x.shape[:2]
        y = _fir_pass_grouped(x.reshape(1, N * C, *x.shape[2:]), taps.repeat(N, 1, 1, 1), up, down, padding)
        return y.reshape(N, C, *y.shape[2:])
    return _fir_pass_grouped(x, taps, up, down, padding)


def _fir_pass_grouped(x, taps, up, down, padding):
    """_fir_pass with one group per channel of x."""
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


# ----------------------------------------------------------------------------
# Triton path.
#
# One kernel computes one pass directly in output space: output pixel (oy, ox) sums f over the taps that land on
# real input pixels. With correlation taps k (f mirrored unless flip_filter), output i along an axis reads the
# zero-inserted, padded input at i * down + k, i.e. the upsampled pixel s + k with s = i * down - pad0, which is
# input pixel (s + k) / up when s + k is a multiple of up inside the image. The first such tap is
# k0 = (-s) mod up, then every up-th one: ceil(taps / up) taps per axis, with no multiplications by inserted
# zeros and no padded copies. The right padding never enters: it only sets the output size.

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_BLOCK = 256                 # output pixels per program on the GPU: 2 per thread at 4 warps
_TRITON_BLOCK_INTERPRETED = 4096    # on the CPU: the interpreter runs each program in Python, so fewer, larger ones


def _build_triton_kernel():
    """Define the upfirdn2d Triton kernel (imports triton; triton.jit reads TRITON_INTERPRET now)."""
    import triton
    import triton.language as tl

    @triton.jit
    def upfirdn2d_kernel(
        x_ptr, f_ptr, y_ptr,                                    # input, filter [FILTER_H, FILTER_W] contiguous, output
        channels, in_h, in_w, out_h, out_w, total,              # sizes; total = N * C * out_h * out_w
        x_stride_n, x_stride_c, x_stride_h, x_stride_w,         # input strides in elements (any layout)
        y_stride_n, y_stride_c, y_stride_h, y_stride_w,         # output strides in elements
        pad_x0, pad_y0,                                         # left/top padding in upsampled pixels; < 0 crops
        gain,                                                   # scale of the result
        UP_X: tl.constexpr, UP_Y: tl.constexpr,
        DOWN_X: tl.constexpr, DOWN_Y: tl.constexpr,
        FILTER_W: tl.constexpr, FILTER_H: tl.constexpr,
        FLIP_FILTER: tl.constexpr,                              # True = correlation (taps in f's order)
        CHANNELS_LAST: tl.constexpr,                            # order the flat index (n, y, x, c), as the output lies
        INDEX_64: tl.constexpr,                                 # 64-bit offsets for tensors past 2**31 elements
        ACC_FP64: tl.constexpr,                                 # accumulate in float64 (float64 inputs), else float32
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        if INDEX_64:
            pid = pid.to(tl.int64)
        idx = pid * BLOCK + tl.arange(0, BLOCK)                 # flat output index [BLOCK]
        live = idx < total
        if CHANNELS_LAST:
            c = idx % channels
            rest = idx // channels
            ox = rest % out_w
            rest = rest // out_w
            oy = rest % out_h
            n = rest // out_h
        else:
            ox = idx % out_w
            rest = idx // out_w
            oy = rest % out_h
            rest = rest // out_h
            c = rest % channels
            n = rest // channels

        # Upsampled position of correlation tap 0, and the first tap that lands on a real (not inserted) pixel.
        # ((a % m) + m) % m is the non-negative remainder whether % truncates or floors.
        sx = ox * DOWN_X - pad_x0
        sy = oy * DOWN_Y - pad_y0
        if UP_X == 1:
            kx0 = 0
        else:
            kx0 = ((-sx) % UP_X + UP_X) % UP_X
        if UP_Y == 1:
            ky0 = 0
        else:
            ky0 = ((-sy) % UP_Y + UP_Y) % UP_Y

        # tl.full, not tl.zeros: zeros is a @jit library function, fixed as compiled or interpreted when triton
        # is imported, so it would break a kernel built for the interpreter after an earlier `import triton`.
        if ACC_FP64:
            acc = tl.full([BLOCK], 0.0, dtype=tl.float64)
        else:
            acc = tl.full([BLOCK], 0.0, dtype=tl.float32)
        x_base = x_ptr + n * x_stride_n + c * x_stride_c
        for ty in tl.static_range((FILTER_H + UP_Y - 1) // UP_Y):
            ky = ky0 + ty * UP_Y                                # correlation tap row
            iy = (sy + ky) // UP_Y                              # exact: sy + ky is a multiple of UP_Y
            ok_y = live & (iy >= 0) & (iy < in_h)
            if UP_Y > 1:
                ok_y = ok_y & (ky < FILTER_H)
            if FLIP_FILTER:
                fy = ky
            else:
                fy = FILTER_H - 1 - ky                          # a true convolution mirrors the filter
            for tx in tl.static_range((FILTER_W + UP_X - 1) // UP_X):
                kx = kx0 + tx * UP_X
                ix = (sx + kx) // UP_X
                ok = ok_y & (ix >= 0) & (ix < in_w)
                if UP_X > 1:
                    ok = ok & (kx < FILTER_W)
                if FLIP_FILTER:
                    fx = kx
                else:
                    fx = FILTER_W - 1 - kx
                pixel = tl.load(x_base + iy * x_stride_h + ix * x_stride_w, mask=ok, other=0.0)
                if UP_X == 1 and UP_Y == 1:
                    tap = tl.load(f_ptr + (fy * FILTER_W + fx))    # the same tap for the whole block
                else:
                    tap = tl.load(f_ptr + (fy * FILTER_W + fx), mask=ok, other=0.0)
                acc += pixel.to(acc.dtype) * tap.to(acc.dtype)

        acc = acc * gain
        y_offset = n * y_stride_n + c * y_stride_c + oy * y_stride_h + ox * y_stride_w
        tl.store(y_ptr + y_offset, acc.to(y_ptr.dtype.element_ty), mask=live)

    return upfirdn2d_kernel


@functools.cache
def _triton_kernels(
    interpret,              # TRITON_INTERPRET when built: part of the key, since triton.jit reads it when decorating
):
    """The op's Triton kernels, built on first use, with the memo of their first failure (cache_clear() resets)."""
    return TritonKernels('upfirdn2d', _build_triton_kernel)


def triton_supported(
    x,                      # input images
    f,                      # FIR filter; None = identity
):
    """Whether the Triton path covers this call: a floating-point input, a filter on its device needing no gradient."""
    return x.dtype in _TRITON_DTYPES and (f is None or (not f.requires_grad and f.device == x.device))


def _is_channels_last(x):
    """Whether x lies in memory as [N, H, W, C] (and not also as [N, C, H, W], as when C == 1)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _output_size(in_size, up, down, pad0, pad1, taps):
    """Output length along one axis: the zero-inserted, padded length, convolved ('valid'), every down-th pixel."""
    return (in_size * up + pad0 + pad1 - taps) // down + 1


def _adjoint_padding(
    in_size,                # forward input length along the axis
    out_size,               # forward output length along the axis
    up,                     # forward upsampling factor
    down,                   # forward downsampling factor
    pad0,                   # forward left/top padding in upsampled pixels
    taps,                   # filter length along the axis
):
    """Padding (pad0, pad1) that makes upfirdn2d(dy, f, up=down, down=up, mirrored f) the forward's exact adjoint."""
    # Forward: y[i] = sum_j x[j] fc[j * up - i * down + pad0] (fc: correlation taps). Its adjoint
    # dx[j] = sum_i dy[i] fc[j * up - i * down + pad0] is an upfirdn2d of dy with up and down swapped and the
    # mirrored taps fc'[k] = fc[taps - 1 - k], whose tap index i * down - j * up + pad0' must be taps - 1 - that:
    # pad0' = taps - 1 - pad0. The right padding only sets the output length; the least one giving in_size
    # outputs, (in_size - 1) * up + taps - pad0' - out_size * down, crops nothing that reaches an output.
    return taps - 1 - pad0, (in_size - 1) * up + pad0 + 1 - out_size * down


def _launch_triton_pass(
    kernel,                 # the JIT (or interpreted) upfirdn2d kernel
    x,                      # input [N, C, H, W], any strides
    f2d,                    # contiguous filter [fh, fw]: [1, fw] or [fh, 1] for one axis of a separable filter
    up,                     # (x, y) upsampling factors
    down,                   # (x, y) downsampling factors
    pad0,                   # (x, y) left/top padding in upsampled pixels
    out_size,               # (width, height) of the result
    flip_filter,            # correlation instead of convolution
    gain,                   # float scale of the result
    dtype,                  # dtype of the result
):
    """Run one kernel pass into a new [N, C, out_h, out_w] tensor, channels_last when x is."""
    N, C, H, W = x.shape                                            # [N, C, H, W]
    out_w, out_h = out_size
    memory_format = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
    y = torch.empty([N, C, out_h, out_w], dtype=dtype, device=x.device, memory_format=memory_format)
    total = y.numel()
    if total == 0:
        return y
    x_extent = sum((size - 1) * abs(stride) for size, stride in zip(x.shape, x.stride())) + 1
    block = _TRITON_BLOCK_INTERPRETED if x.device.type == 'cpu' else _TRITON_BLOCK
    kernel[((total + block - 1) // block,)](
        x, f2d, y, C, H, W, out_h, out_w, total, *x.stride(), *y.stride(), pad0[0], pad0[1], float(gain),
        UP_X=up[0], UP_Y=up[1], DOWN_X=down[0], DOWN_Y=down[1], FILTER_W=f2d.shape[1], FILTER_H=f2d.shape[0],
        FLIP_FILTER=bool(flip_filter), CHANNELS_LAST=(memory_format == torch.channels_last),
        INDEX_64=max(total, x_extent) >= 2 ** 31, ACC_FP64=(x.dtype == torch.float64),
        BLOCK=block, num_warps=4)
    return y


def _upfirdn2d_triton_forward(kernel, x, f, up, down, padding, flip_filter, gain):
    """The Triton kernel passes of one upfirdn2d: one pass for a 2-D filter, two (x, then y) for a separable one."""
    N, C, H, W = x.shape                                            # [N, C, H, W]
    px0, px1, py0, py1 = padding
    fw, fh = get_filter_size(f)
    out_w = _output_size(W, up[0], down[0], px0, px1, fw)
    out_h = _output_size(H, up[1], down[1], py0, py1, fh)
    f = f.contiguous()
    f_last, gain_last = f, gain                                     # the filter and gain of the last pass
    if x.dtype == torch.float64:
        # Triton passes float scalars as float32: fold the gain into the last pass's taps to keep float64 exact.
        f_last, gain_last = f.to(torch.float64) * gain, 1
    if f.ndim == 2:
        return _launch_triton_pass(kernel, x, f_last, up, down, (px0, py0), (out_w, out_h), flip_filter, gain_last, x.dtype)
    # Separable: the x pass keeps a float32 (float64) intermediate, the y pass writes the input's dtype.
    mid = _launch_triton_pass(kernel, x, f.reshape(1, fw), (up[0], 1), (down[0], 1), (px0, 0), (out_w, H), flip_filter, 1,
                              torch.float64 if x.dtype == torch.float64 else torch.float32)
    return _launch_triton_pass(kernel, mid, f_last.reshape(fh, 1), (1, up[1]), (1, down[1]), (0, py0), (out_w, out_h),
                               flip_filter, gain_last, x.dtype)


class _Upfirdn2dTriton(torch.autograd.Function):
    """upfirdn2d by the Triton kernel; the backward is upfirdn2d again (the adjoint), so every order differentiates.

    The filter gets no gradient (None): it is a fixed resampling filter, and calls whose filter requires grad
    never take this path.
    """

    @staticmethod
    def forward(ctx, x, f, up, down, padding, flip_filter, gain, kernel):
        ctx.save_for_backward(f)
        ctx.args = (x.shape, up, down, padding, flip_filter, gain)
        return _upfirdn2d_triton_forward(kernel, x, f, up, down, padding, flip_filter, gain)

    @staticmethod
    def backward(ctx, dy):
        f, = ctx.saved_tensors
        (N, C, H, W), up, down, (px0, px1, py0, py1), flip_filter, gain = ctx.args
        dx = None
        if ctx.needs_input_grad[0]:
            fw, fh = get_filter_size(f)
            qx0, qx1 = _adjoint_padding(W, dy.shape[3], up[0], down[0], px0, fw)
            qy0, qy1 = _adjoint_padding(H, dy.shape[2], up[1], down[1], py0, fh)
            dx = _upfirdn2d_triton(dy, f, down, up, (qx0, qx1, qy0, qy1), not flip_filter, gain)
        return dx, None, None, None, None, None, None, None


def _upfirdn2d_triton(x, f, up, down, padding, flip_filter, gain):
    """Triton path: fused kernels in output space; falls back to the fast path (one warning) if Triton fails."""
    fw, fh = get_filter_size(f)
    px0, px1, py0, py1 = padding
    if _output_size(x.shape[3], up[0], down[0], px0, px1, fw) < 1 or _output_size(x.shape[2], up[1], down[1], py0, py1, fh) < 1:
        raise ValueError(f'upfirdn2d: padding {list(padding)} leaves no output pixels for input {list(x.shape)} '
                         f'and a {fh}x{fw} filter')
    return _triton_kernels(triton_interpret()).run(
        launch=lambda kernel: _Upfirdn2dTriton.apply(x, f, up, down, padding, flip_filter, gain, kernel),
        fallback=lambda: _upfirdn2d_fast(x, f, up, down, padding, flip_filter, gain))


# All paths take (x, f, up, down, padding, flip_filter, gain) with parsed arguments.
_IMPLS = {'ref': _upfirdn2d_ref, 'fast': _upfirdn2d_fast, 'triton': _upfirdn2d_triton}


def upfirdn2d(
    x,                      # input images [N, C, H, W]
    f,                      # FIR filter from setup_filter (1-D separable or 2-D); None = identity
    up          = 1,        # upsampling factor, int or (x, y)
    down        = 1,        # downsampling factor, int or (x, y)
    padding     = 0,        # padding in upsampled pixels: int, (x, y) or (x0, x1, y0, y1); negative crops
    flip_filter = False,    # use correlation instead of convolution
    gain        = 1,        # overall gain of the signal
    impl        = None,     # 'ref', 'fast' or 'triton' (all any-order differentiable); None = 'triton' on CUDA, else 'fast'
):
    """Pad, upsample, filter and downsample a batch of 2-D images."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError('upfirdn2d expects a 4-D tensor [N, C, H, W]')
    if f is None:
        f = torch.ones([1, 1], dtype=torch.float32, device=x.device)
    if f.ndim not in (1, 2):
        raise ValueError(f'upfirdn2d filter must be 1-D or 2-D, got shape {list(f.shape)}')
    impl = choose_impl('upfirdn2d', impl, triton_ok=triton_supported(x, f), device_type=x.device.type)
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
