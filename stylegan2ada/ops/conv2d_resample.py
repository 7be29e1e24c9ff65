"""2-D convolution with optional FIR up/downsampling, arranged so no pixel is computed twice.

Upsampling uses a transposed convolution followed by the FIR filter; downsampling filters first and
then convolves with stride. The arithmetic matches NVIDIA's conv2d_resample. All paths share this
arrangement and its torch convolutions; they differ in the FIR filtering they call: `impl='ref'` uses
upfirdn2d's reference path, `impl='fast'` its fast path (strided/transposed depthwise convolutions,
padding folded in), `impl='triton'` its Triton kernels (CUDA, or Triton's interpreter on the CPU).
"""

import functools

import torch.nn.functional as F

from . import upfirdn2d as _up
from .impl import choose_impl


def _conv(x, w, stride=1, padding=0, groups=1, transpose=False, flip_weight=True):
    """conv2d / conv_transpose2d where flip_weight=False turns the correlation into a convolution."""
    if not flip_weight:
        w = w.flip([2, 3])
    if transpose:
        return F.conv_transpose2d(x, w, stride=stride, padding=padding, groups=groups)
    return F.conv2d(x, w, stride=stride, padding=padding, groups=groups)


def _conv2d_resample(x, w, f, up, down, padding, groups, flip_weight, flip_filter, impl):
    """Both paths: the convolution arranged around the FIR filter, which runs with upfirdn2d's path `impl`."""
    out_channels, in_per_group, kh, kw = w.shape
    fw, fh = _up.get_filter_size(f)
    px0, px1, py0, py1 = _up._parse_padding(padding)

    # Account for the filter's support in the padding.
    if up > 1:
        px0 += (fw + up - 1) // 2
        px1 += (fw - up) // 2
        py0 += (fh + up - 1) // 2
        py1 += (fh - up) // 2
    if down > 1:
        px0 += (fw - down + 1) // 2
        px1 += (fw - down) // 2
        py0 += (fh - down + 1) // 2
        py1 += (fh - down) // 2

    # 1x1 kernels: resample on the cheaper side of the convolution.
    if kw == 1 and kh == 1 and down > 1 and up == 1:
        x = _up.upfirdn2d(x, f, down=down, padding=[px0, px1, py0, py1], flip_filter=flip_filter, impl=impl)
        return _conv(x, w, groups=groups, flip_weight=flip_weight)
    if kw == 1 and kh == 1 and up > 1 and down == 1:
        x = _conv(x, w, groups=groups, flip_weight=flip_weight)
        return _up.upfirdn2d(x, f, up=up, padding=[px0, px1, py0, py1], gain=up ** 2, flip_filter=flip_filter, impl=impl)

    # Downsampling only: low-pass, then strided convolution.
    if down > 1 and up == 1:
        x = _up.upfirdn2d(x, f, padding=[px0, px1, py0, py1], flip_filter=flip_filter, impl=impl)
        return _conv(x, w, stride=down, groups=groups, flip_weight=flip_weight)

    # Upsampling: transposed convolution, then the interpolation filter.
    if up > 1:
        if groups == 1:
            w = w.transpose(0, 1)                                  # [C_in, C_out, kh, kw]
        else:
            w = w.reshape(groups, out_channels // groups, in_per_group, kh, kw)
            w = w.transpose(1, 2)
            w = w.reshape(groups * in_per_group, out_channels // groups, kh, kw)
        px0 -= kw - 1
        px1 -= kw - up
        py0 -= kh - 1
        py1 -= kh - up
        pxt = max(min(-px0, -px1), 0)
        pyt = max(min(-py0, -py1), 0)
        x = _conv(x, w, stride=up, padding=[pyt, pxt], groups=groups, transpose=True, flip_weight=(not flip_weight))
        x = _up.upfirdn2d(x, f, padding=[px0 + pxt, px1 + pxt, py0 + pyt, py1 + pyt], gain=up ** 2,
                          flip_filter=flip_filter, impl=impl)
        if down > 1:
            x = _up.upfirdn2d(x, f, down=down, flip_filter=flip_filter, impl=impl)
        return x

    # Plain convolution with symmetric padding.
    if px0 == px1 and py0 == py1 and px0 >= 0 and py0 >= 0:
        return _conv(x, w, padding=[py0, px0], groups=groups, flip_weight=flip_weight)

    # General case (asymmetric padding).
    x = _up.upfirdn2d(x, None, padding=[px0, px1, py0, py1], impl=impl)
    return _conv(x, w, groups=groups, flip_weight=flip_weight)


# All paths take (x, w, f, up, down, padding, groups, flip_weight, flip_filter).
_IMPLS = {
    'ref':    functools.partial(_conv2d_resample, impl='ref'),
    'fast':   functools.partial(_conv2d_resample, impl='fast'),
    'triton': functools.partial(_conv2d_resample, impl='triton'),
}



def conv2d_resample(
    x,                      # input [N, C_in, H, W]
    w,                      # weight [C_out, C_in // groups, kh, kw]
    f           = None,     # FIR filter from setup_filter; None = box/identity
    up          = 1,        # integer upsampling factor
    down        = 1,        # integer downsampling factor
    padding     = 0,        # padding of the convolution, in pixels of the upsampled image
    groups      = 1,        # grouped convolution
    flip_weight = True,     # False = true convolution (mirrored weights), as NVIDIA uses when up > 1
    flip_filter = False,    # passed to upfirdn2d
    impl        = None,     # 'ref', 'fast' or 'triton' (FIR filtering by that upfirdn2d path); None = 'triton' on CUDA, else 'fast'
):
    """Convolve x with w, with FIR-filtered up/downsampling around the convolution."""
    if not (isinstance(up, int) and up >= 1 and isinstance(down, int) and down >= 1):
        raise ValueError(f'up and down must be integers >= 1, got {up}, {down}')
    impl = choose_impl('conv2d_resample', impl, triton_ok=_up.triton_supported(x, f), device_type=x.device.type)
    return _IMPLS[impl](x, w, f, up, down, padding, groups, flip_weight, flip_filter)
