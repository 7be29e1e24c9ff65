"""Modulated (style-scaled) convolution with optional demodulation: StyleGAN2's core op.

`impl='ref'` builds the per-sample weights [N, C_out, C_in, kh, kw] to get the demodulation
coefficients, as the definition reads. `impl='fast'` gets the same coefficients from a matrix
product, sum_{i,k} (w_oik s_ni)^2 = sum_i s_ni^2 sum_k w_oik^2, so the 5-D tensor is only built where
the fused convolution needs it (once, with styles and coefficients multiplied beforehand), and it
runs its convolutions through conv2d_resample's fast path. `impl='triton'` is the fast path with
conv2d_resample's Triton path (its FIR up/downsampling by upfirdn2d's Triton kernels).
"""

import functools

import torch

from .conv2d_resample import conv2d_resample
from .fma import fma
from .impl import choose_impl
from .upfirdn2d import triton_supported


def _finish_nonfused(x, dcoefs, noise, demodulate, impl):
    """Non-fused tail: scale by the demodulation coefficients and add noise."""
    batch_size = x.shape[0]
    if demodulate and noise is not None:
        return fma(x, dcoefs.to(x.dtype).reshape(batch_size, -1, 1, 1), noise.to(x.dtype), impl=impl)
    if demodulate:
        return x * dcoefs.to(x.dtype).reshape(batch_size, -1, 1, 1)
    if noise is not None:
        return x + noise.to(x.dtype)
    return x


def _modulated_conv2d_ref(x, weight, styles, noise, up, down, padding, resample_filter, demodulate, flip_weight, fused_modconv):
    """Reference path: per-sample weights, demodulation from their squared sum."""
    batch_size = x.shape[0]
    in_channels, kh, kw = weight.shape[1:]
    w = None
    dcoefs = None
    if demodulate or fused_modconv:
        w = weight.unsqueeze(0) * styles.reshape(batch_size, 1, -1, 1, 1)   # [N, C_out, C_in, kh, kw]
    if demodulate:
        dcoefs = (w.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()            # [N, C_out]
    if demodulate and fused_modconv:
        w = w * dcoefs.reshape(batch_size, -1, 1, 1, 1)

    if not fused_modconv:
        # Modulate the activations instead of the weights: one shared convolution.
        x = x * styles.to(x.dtype).reshape(batch_size, -1, 1, 1)
        x = conv2d_resample(x, weight.to(x.dtype), f=resample_filter, up=up, down=down, padding=padding,
                            flip_weight=flip_weight, impl='ref')
        return _finish_nonfused(x, dcoefs, noise, demodulate, impl='ref')

    # Fused: fold the batch into groups so each sample convolves with its own weights.
    x = x.reshape(1, -1, *x.shape[2:])                                      # [1, N * C_in, H, W]
    w = w.reshape(-1, in_channels, kh, kw)                                  # [N * C_out, C_in, kh, kw]
    x = conv2d_resample(x, w.to(x.dtype), f=resample_filter, up=up, down=down, padding=padding,
                        groups=batch_size, flip_weight=flip_weight, impl='ref')
    x = x.reshape(batch_size, -1, *x.shape[2:])                             # [N, C_out, H', W']
    if noise is not None:
        x = x + noise.to(x.dtype)
    return x


def _modulated_conv2d_fast(x, weight, styles, noise, up, down, padding, resample_filter, demodulate, flip_weight, fused_modconv,
                           conv_impl='fast'):
    """Fast path: demodulation coefficients from a [N, C_in] x [C_in, C_out] product, no 5-D temporaries."""
    batch_size = x.shape[0]
    in_channels, kh, kw = weight.shape[1:]
    dcoefs = None
    if demodulate:
        dcoefs = (styles.square() @ weight.square().sum(dim=[2, 3]).t() + 1e-8).rsqrt()   # [N, C_out]

    if not fused_modconv:
        x = x * styles.to(x.dtype).reshape(batch_size, -1, 1, 1)
        x = conv2d_resample(x, weight.to(x.dtype), f=resample_filter, up=up, down=down, padding=padding,
                            flip_weight=flip_weight, impl=conv_impl)
        return _finish_nonfused(x, dcoefs, noise, demodulate, impl='fast')

    # Fused: styles and coefficients combine into [N, C_out or 1, C_in] first, then one 5-D product.
    scale = styles.reshape(batch_size, 1, in_channels)
    if demodulate:
        scale = scale * dcoefs.reshape(batch_size, -1, 1)                   # [N, C_out, C_in]
    w = weight.unsqueeze(0) * scale.unsqueeze(3).unsqueeze(4)               # [N, C_out, C_in, kh, kw]
    x = x.reshape(1, -1, *x.shape[2:])                                      # [1, N * C_in, H, W]
    w = w.reshape(-1, in_channels, kh, kw)                                  # [N * C_out, C_in, kh, kw]
    x = conv2d_resample(x, w.to(x.dtype), f=resample_filter, up=up, down=down, padding=padding,
                        groups=batch_size, flip_weight=flip_weight, impl=conv_impl)
    x = x.reshape(batch_size, -1, *x.shape[2:])                             # [N, C_out, H', W']
    if noise is not None:
        x = x + noise.to(x.dtype)
    return x


# All paths take (x, weight, styles, noise, up, down, padding, resample_filter, demodulate, flip_weight, fused_modconv).
_IMPLS = {
    'ref':    _modulated_conv2d_ref,
    'fast':   _modulated_conv2d_fast,
    'triton': functools.partial(_modulated_conv2d_fast, conv_impl='triton'),
}


def modulated_conv2d(
    x,                          # input [N, C_in, H, W]
    weight,                     # weight [C_out, C_in, kh, kw]
    styles,                     # per-sample input-channel scales [N, C_in]
    noise           = None,     # noise to add after the convolution, broadcastable to the output; None = none
    up              = 1,        # integer upsampling factor
    down            = 1,        # integer downsampling factor
    padding         = 0,        # convolution padding
    resample_filter = None,     # FIR filter for up/down
    demodulate      = True,     # normalise each output channel to unit expected variance
    flip_weight     = True,     # see conv2d_resample
    fused_modconv   = True,     # True = one grouped convolution with per-sample weights
    impl            = None,     # 'ref', 'fast' or 'triton' (all any-order differentiable); None = 'triton' on CUDA, else 'fast'
):
    """Scale the input channels of `weight` by `styles` per sample, demodulate, and convolve."""
    batch_size = x.shape[0]
    out_channels, in_channels, kh, kw = weight.shape
    if styles.shape != (batch_size, in_channels):
        raise ValueError(f'styles must be [{batch_size}, {in_channels}], got {list(styles.shape)}')
    impl = choose_impl('modulated_conv2d', impl, triton_ok=triton_supported(x, resample_filter), device_type=x.device.type)

    # In fp16 large activations overflow: rescale weight and styles first (demodulation undoes it).
    if x.dtype == torch.float16 and demodulate:
        weight = weight * (1 / (in_channels * kh * kw) ** 0.5 / weight.norm(float('inf'), dim=[1, 2, 3], keepdim=True))
        styles = styles / styles.norm(float('inf'), dim=1, keepdim=True)
    return _IMPLS[impl](x, weight, styles, noise, up, down, padding, resample_filter, demodulate, flip_weight, fused_modconv)
