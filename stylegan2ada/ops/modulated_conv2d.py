"""Modulated (style-scaled) convolution with optional demodulation: StyleGAN2's core op."""

import torch

from .conv2d_resample import conv2d_resample
from .fma import fma


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
    impl            = 'ref',    # upfirdn2d implementation
):
    """Scale the input channels of `weight` by `styles` per sample, demodulate, and convolve."""
    batch_size = x.shape[0]
    out_channels, in_channels, kh, kw = weight.shape
    if styles.shape != (batch_size, in_channels):
        raise ValueError(f'styles must be [{batch_size}, {in_channels}], got {list(styles.shape)}')

    # In fp16 large activations overflow: rescale weight and styles first (demodulation undoes it).
    if x.dtype == torch.float16 and demodulate:
        weight = weight * (1 / (in_channels * kh * kw) ** 0.5 / weight.norm(float('inf'), dim=[1, 2, 3], keepdim=True))
        styles = styles / styles.norm(float('inf'), dim=1, keepdim=True)

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
                            flip_weight=flip_weight, impl=impl)
        if demodulate and noise is not None:
            return fma(x, dcoefs.to(x.dtype).reshape(batch_size, -1, 1, 1), noise.to(x.dtype))
        if demodulate:
            return x * dcoefs.to(x.dtype).reshape(batch_size, -1, 1, 1)
        if noise is not None:
            return x + noise.to(x.dtype)
        return x

    # Fused: fold the batch into groups so each sample convolves with its own weights.
    x = x.reshape(1, -1, *x.shape[2:])                                      # [1, N * C_in, H, W]
    w = w.reshape(-1, in_channels, kh, kw)                                  # [N * C_out, C_in, kh, kw]
    x = conv2d_resample(x, w.to(x.dtype), f=resample_filter, up=up, down=down, padding=padding,
                        groups=batch_size, flip_weight=flip_weight, impl=impl)
    x = x.reshape(batch_size, -1, *x.shape[2:])                             # [N, C_out, H', W']
    if noise is not None:
        x = x + noise.to(x.dtype)
    return x
