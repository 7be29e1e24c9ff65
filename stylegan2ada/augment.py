"""Adaptive discriminator augmentation (ADA): the transforms of Karras et al. 2020, appendix B.

Every transform is applied independently per sample with probability `p * multiplier`. The order
is the paper's: pixel blitting (xflip, rotate90, xint), general geometry (scale, rotate, aniso,
xfrac), colour (brightness, contrast, lumaflip, hue, saturation), image-space filtering and
corruptions (noise, cutout). The geometric transforms of a sample are composed into 3x3 matrices:
the blits move whole pixels, so they run as an exact gather (mirror-reflected at the borders); the
general part runs as a single resampling pass (reflection padding by the image size minus one,
2x upsampling with the sym6 wavelet low-pass, bilinear grid_sample through the inverse matrix, 2x
downsampling with the same filter). Doing the blits as a gather keeps flips and quarter turns exact,
which resampling with the asymmetric sym6 filter would not be. All colour transforms form one 4x4
matrix on (r, g, b, 1).
The pipeline is differentiable w.r.t. the images, to any order, so gradients reach G and R1 may be
taken through it.

The pipe is static: every sample goes through every enabled stage in one batched pass (a sample a
stage leaves alone gets the identity and is selected back bit-exactly with torch.where), so every
tensor shape in the forward pass and its backward passes depends only on the input's shape, and
nothing reads device values on the host (no .item(), .tolist(), nonzero, boolean indexing or
per-call host-to-device copies). On a GPU that keeps the launch queue full and lets cuDNN's
benchmark mode tune each convolution once. The one host read left is the `p == 0` shortcut, taken
only when p lives on the CPU, where reading it is free.

Constructor keyword names and defaults are NVIDIA's, because their network pickles store the
augment pipe by its init kwargs and we rebuild it from them; the buffer names are theirs too
(`p`, `Hz_geom`, `Hz_fbank`) so tensors copy by name. Our other constants are non-persistent
buffers: they move with the module but stay out of the state dict, so pickles load strictly.
"""

import math
import statistics

import numpy as np
import torch
import torch.nn.functional as F

from .ops import downsample2d, setup_filter, upsample2d
from .ops.impl import choose_impl

#----------------------------------------------------------------------------
# Transform names and NVIDIA's --augpipe presets.

TRANSFORMS = (
    'xflip', 'rotate90', 'xint',                                    # pixel blitting
    'scale', 'rotate', 'aniso', 'xfrac',                            # general geometry
    'brightness', 'contrast', 'lumaflip', 'hue', 'saturation',      # colour
    'imgfilter',                                                    # image-space filtering
    'noise', 'cutout',                                              # corruptions
)


def _build_presets():
    """Return NVIDIA's presets: six transform groups and their cumulative unions bg ... bgcfnc."""
    groups = {
        'blit':   dict(xflip=1, rotate90=1, xint=1),
        'geom':   dict(scale=1, rotate=1, aniso=1, xfrac=1),
        'color':  dict(brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1),
        'filter': dict(imgfilter=1),
        'noise':  dict(noise=1),
        'cutout': dict(cutout=1),
    }
    chain = list(groups)                                            # blit, geom, color, filter, noise, cutout
    table = dict(groups)
    for k, name in enumerate(['bg', 'bgc', 'bgcf', 'bgcfn', 'bgcfnc'], start=2):
        table[name] = {t: m for g in chain[:k] for t, m in groups[g].items()}
    return table


PRESETS = _build_presets()

#----------------------------------------------------------------------------
# Wavelet low-pass filters (orthonormal: taps sum to sqrt(2), squares sum to 1).

# Symlet 6 decomposition low-pass, the anti-aliasing filter of the geometric pass.
_SYM6 = (
    0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
    0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
    -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148,
)


def _sym2():
    """Symlet 2 (= Daubechies 2) low-pass taps, in closed form."""
    r3 = math.sqrt(3)
    return np.array([1 - r3, 3 - r3, 3 + r3, 1 + r3]) / (4 * math.sqrt(2))


def _upsample_taps(h, factor):
    """Insert factor-1 zeros between the taps of a 1-D filter: H(z) -> H(z^factor)."""
    out = np.zeros((len(h) - 1) * factor + 1)
    out[::factor] = h
    return out


def _filter_bank(num_bands=4):
    """Return [num_bands, taps] zero-phase filters splitting the spectrum into octaves, lowest band first.

    With L(z) = H(z)H(1/z)/2 and P(z) = H(-z)H(-1/z)/2 for the sym2 low-pass H, L + P = 1 (the
    power-complementary property of an orthonormal wavelet), so the bands below sum to a unit
    impulse: band k (from the top) = P(z^(2^k)) * prod_{j<k} L(z^(2^j)); the last band keeps the
    low-pass residual.
    """
    h = _sym2()
    lo = np.convolve(h, h[::-1]) / 2                                # L(z), 7 taps
    hi = np.convolve(h * (-1) ** np.arange(len(h)), (h * (-1) ** np.arange(len(h)))[::-1]) / 2  # P(z)
    bands = []
    lowpass = np.ones(1)                                            # prod_{j<k} L(z^(2^j))
    for k in range(num_bands - 1):
        bands.append(np.convolve(lowpass, _upsample_taps(hi, 2 ** k)))
        lowpass = np.convolve(lowpass, _upsample_taps(lo, 2 ** k))
    bands.append(lowpass)
    bands = bands[::-1]                                             # lowest band first
    taps = max(len(b) for b in bands)
    bank = np.zeros([num_bands, taps])
    for i, b in enumerate(bands):                                   # centre the shorter (symmetric) filters
        o = (taps - len(b)) // 2
        bank[i, o:o + len(b)] = b
    return bank


# Expected share of image power per band, lowest first: a 1/f spectrum puts most power in the lowest
# octave. Band gains are normalised against it so that filtering keeps the expected power.
_BAND_POWER = (10 / 13, 1 / 13, 1 / 13, 1 / 13)

#----------------------------------------------------------------------------
# Bilinear resampling with gradients of any order.

class _Sample(torch.autograd.Function):
    """y = grid_sample(x, grid) as a linear map of x; its backward is the adjoint map."""

    @staticmethod
    def forward(ctx, x, grid):
        ctx.save_for_backward(grid)
        ctx.x_shape = x.shape
        return F.grid_sample(x, grid, mode='bilinear', padding_mode='zeros', align_corners=False)

    @staticmethod
    def backward(ctx, dy):
        grid, = ctx.saved_tensors
        return _SampleAdjoint.apply(dy, grid, ctx.x_shape), None


class _SampleAdjoint(torch.autograd.Function):
    """The adjoint of `_Sample`; its backward is `_Sample` again, so the pair nests to any order."""

    @staticmethod
    def forward(ctx, dy, grid, x_shape):
        ctx.save_for_backward(grid)
        # The kernel reads only the shape of `input` when the grid gradient is not asked for.
        shape_carrier = dy.new_zeros([]).expand(x_shape)
        dx, _ = torch.ops.aten.grid_sampler_2d_backward(dy, shape_carrier, grid, 0, 0, False, [True, False])
        return dx

    @staticmethod
    def backward(ctx, ddx):
        grid, = ctx.saved_tensors
        return _Sample.apply(ddx, grid), None, None


def grid_sample_bilinear(
    x,                      # images [N, C, H, W]
    grid,                   # sampling positions [N, Ho, Wo, 2] in [-1, 1] (align_corners=False); no gradient
):
    """Bilinear grid_sample (zero padding) whose gradient w.r.t. x is differentiable again.

    torch's own double backward of grid_sample is missing in older releases; here the grid never
    needs a gradient (it comes from random augmentation parameters), so the op is linear in x.
    """
    return _Sample.apply(x, grid.detach())

#----------------------------------------------------------------------------
# Small helpers. All of them keep shapes fixed by their arguments' shapes and never read values on the host.

def _reflect_index(i, n):
    """Map integer indices onto [0, n) by mirroring about the edge pixels (period 2n - 2)."""
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * n - 2
    i = i.remainder(period)
    return torch.where(i >= n, period - i, i)


def _reflect_pad(x, left, right, top, bottom):
    """Pad [N, C, H, W] by mirror reflection by any amount (F.pad's reflect mode needs pad < size)."""
    H, W = x.shape[-2:]
    dev = x.device
    if left or right:
        x = x.index_select(3, _reflect_index(torch.arange(-left, W + right, device=dev), W))
    if top or bottom:
        x = x.index_select(2, _reflect_index(torch.arange(-top, H + bottom, device=dev), H))
    return x


def _mat3(a, b, tx, c, d, ty):
    """Stack per-sample 2-D affine maps [[a, b, tx], [c, d, ty], [0, 0, 1]] into [N, 3, 3]."""
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    return torch.stack([a, b, tx, c, d, ty, zero, zero, one], dim=-1).reshape(-1, 3, 3)


def _pre_affine(G, sx, sy, tx, ty):
    """[[sx, 0, tx], [0, sy, ty], [0, 0, 1]] @ G for G [N, 3, 3] and Python floats, by row arithmetic."""
    return torch.stack([G[:, 0] * sx + G[:, 2] * tx, G[:, 1] * sy + G[:, 2] * ty, G[:, 2]], dim=1)


def _post_affine(G, sx, sy, tx, ty):
    """G @ [[sx, 0, tx], [0, sy, ty], [0, 0, 1]] for G [N, 3, 3] and Python floats, by column arithmetic."""
    col0, col1, col2 = G[:, :, 0], G[:, :, 1], G[:, :, 2]
    return torch.stack([col0 * sx, col1 * sy, col0 * tx + col1 * ty + col2], dim=2)


def _is_identity(M):
    """Per sample: whether the square matrix M[i] is exactly the identity; [N] bool, computed on the device."""
    eye = torch.eye(M.shape[-1], device=M.device, dtype=M.dtype)
    return (M == eye).flatten(1).all(dim=1)


def _select(changed, new, old):
    """Per sample: `new` where `changed` ([N] bool), else `old` bit-exactly; [N, ...] like both."""
    return torch.where(changed.reshape([-1] + [1] * (old.ndim - 1)), new, old)

#----------------------------------------------------------------------------
# The resampling pass of the general geometry: fixed shapes, a reference path and a fast path.
#
# Both compute, per sample, out = down( sample_M( up( reflect(x) ) ) ): the image mirror-reflected about
# its edge pixels by the image size minus one on each side (NVIDIA's cap; zeros beyond), 2x upsampled
# with the sym6 low-pass, bilinearly sampled through the inverse map on the 2x grid, and 2x downsampled
# with the mirrored filter. The margin is fixed, so no shape depends on the draw.
#
# 'ref' materialises what the definition says: the image padded to (3H - 2) x (3W - 2) and upsampled to
# twice that (at 256 px, batch 16, 3 channels, float32: 113 MB padded, 451 MB upsampled).
# 'fast' uses that the reflected image is periodic (period 2W - 2, 2H - 2), and so is its upsampled
# version, the upsampling being shift-equivariant: it upsamples one period only (plus the filter's
# reach, which upsample2d's negative padding crops inside the convolution) and wraps the sampling
# positions into it, reading zeros beyond the reference's padded extent as the reference does. It
# materialises (2H - 1) x (2W - 1) at 2x (200 MB at 256 px, batch 16): 2.25x less memory and arithmetic.
# It agrees with 'ref' to round-off wherever the sampled footprint keeps 4 px clear of the margin's
# outer edge (there the reference's upsampling reads its own zero border), which only zoom-outs by
# more than about 2x (turned by 45 deg; 3x unturned) reach. Never materialising the upsampled period
# at all would take a fused kernel that evaluates the upsampling filter at each bilinear tap.

def _sampling_map(G_inv, H, W, q, delay):
    """Per-sample affine maps [N, 3, 3]: output 2x grid (normalised) -> input 2x grid (centred coordinates)."""
    # A centred coordinate u becomes 2u + d on the 2x grid, d the upsampling filter's delay.
    M = _post_affine(_pre_affine(G_inv, 2, 2, delay, delay), 0.5, 0.5, -delay / 2, -delay / 2)
    Ho, Wo = 2 * (H + 2 * q), 2 * (W + 2 * q)                   # the output keeps q px for the downsampling filter
    return _post_affine(M, Wo / 2, Ho / 2, 0, 0)                # affine_grid's output positions are normalised


def _resample_ref(images, G_inv, filt, delay):
    """Reference path: reflect-pad by the image size minus one, upsample it all, sample, downsample."""
    N, C, H, W = images.shape
    q = filt.numel() // 4                                       # 3 px: half the filter's support at 2x
    images = F.pad(images, [W - 1, W - 1, H - 1, H - 1], mode='reflect')  # [N, C, 3H-2, 3W-2]; pad < size
    images = upsample2d(images, filt, up=2)                     # [N, C, 2(3H-2), 2(3W-2)]
    Hi, Wi = images.shape[2:]
    # affine_grid and grid_sample work in [-1, 1] units of the whole image (align_corners=False: u_norm =
    # 2u / size); the padding is symmetric, so centred coordinates stay centred.
    theta = _pre_affine(_sampling_map(G_inv, H, W, q, delay), 2 / Wi, 2 / Hi, 0, 0)
    Ho, Wo = 2 * (H + 2 * q), 2 * (W + 2 * q)
    grid = F.affine_grid(theta[:, :2, :], [N, C, Ho, Wo], align_corners=False)  # [N, Ho, Wo, 2]
    images = grid_sample_bilinear(images, grid)                 # [N, C, Ho, Wo]
    return downsample2d(images, filt, down=2, padding=-2 * q, flip_filter=True)  # [N, C, H, W]


def _wrap_coordinate(u, half_extent, offset, period):
    """Centred 2x-grid coordinates -> normalised positions in the upsampled period (whose size is period + 1).

    u + offset is the index into the infinite periodic upsampled image; it is wrapped into [0, period).
    Positions outside the reference's padded extent (|u| > half_extent) go far outside, to read zeros
    (one coordinate out of range is enough for grid_sample to read zeros).
    """
    inside = u.abs() <= half_extent
    index = (u + offset).remainder(period)                     # [0, period): both bilinear neighbours exist
    return torch.where(inside, (2 * index + 1) / (period + 1) - 1, -3.0)


def _resample_fast(images, G_inv, filt, delay):
    """Fast path: upsample one period of the reflected image and wrap the sampling positions into it."""
    N, C, H, W = images.shape
    q = filt.numel() // 4
    Px, Py = 2 * W - 2, 2 * H - 2                               # period of the mirror reflection about the edge pixels
    m = filt.numel() // 4 + 1                                   # input px the upsampling filter reaches past a period
    dev = images.device
    x = images.index_select(3, _reflect_index(torch.arange(-m, Px + m, device=dev), W))
    x = x.index_select(2, _reflect_index(torch.arange(-m, Py + m, device=dev), H))  # [N, C, Py+2m, Px+2m]
    # Upsample, cropping to one period plus one sample (the bilinear neighbour of the last position):
    # output j of the uncropped result is 2x index j - 2m of the infinite periodic image.
    x = upsample2d(x, filt, up=2, padding=[-2 * m, 1 - 2 * m, -2 * m, 1 - 2 * m])  # [N, C, 2Py+1, 2Px+1]

    # The sampling positions, as centred coordinates u on the reference's padded 2x image (size Wi), are
    # reference indices u + (Wi - 1) / 2; the reference starts W - 1 input pixels, i.e. Px 2x pixels,
    # before the period's first sample, so the period's index is u + (Wi - 1) / 2 - Px.
    Ho, Wo = 2 * (H + 2 * q), 2 * (W + 2 * q)
    Hi, Wi = 2 * (3 * H - 2), 2 * (3 * W - 2)
    grid = F.affine_grid(_sampling_map(G_inv, H, W, q, delay)[:, :2, :], [N, C, Ho, Wo], align_corners=False)
    grid = torch.stack([_wrap_coordinate(grid[..., 0], Wi / 2, (Wi - 1) / 2 - Px, 2 * Px),
                        _wrap_coordinate(grid[..., 1], Hi / 2, (Hi - 1) / 2 - Py, 2 * Py)], dim=-1)  # [N, Ho, Wo, 2]
    x = grid_sample_bilinear(x, grid)                           # [N, C, Ho, Wo]
    return downsample2d(x, filt, down=2, padding=-2 * q, flip_filter=True)  # [N, C, H, W]


# Both paths take (images, G_inv, filt, delay).
_RESAMPLE_IMPLS = {'ref': _resample_ref, 'fast': _resample_fast}


def resample_affine(
    images,                 # [N, C, H, W]
    G_inv,                  # [N, 3, 3] per-sample inverse maps (output -> input), centred pixel coordinates
    filt,                   # sym6 low-pass from setup_filter (the pipe's Hz_geom)
    delay,                  # the filter's delay in taps (the pipe's geom_shift)
    impl    = None,         # 'ref' or 'fast' (same results, see above); None = default_impl's choice, else 'fast'
):
    """Warp every image through its inverse affine map: reflection outside, anti-aliased, fixed shapes."""
    impl = choose_impl('resample_affine', impl)
    return _RESAMPLE_IMPLS[impl](images, G_inv, filt, delay)

#----------------------------------------------------------------------------

class AugmentPipe(torch.nn.Module):
    """The ADA augmentation pipeline; `p` (a buffer) scales every transform's probability."""

    def __init__(self,
        xflip           = 0,                # probability multiplier: mirror along x
        rotate90        = 0,                # probability multiplier: rotation by a random multiple of 90 deg
        xint            = 0,                # probability multiplier: integer translation
        xint_max        = 0.125,            # integer translation range, fraction of the image size
        scale           = 0,                # probability multiplier: isotropic scaling
        rotate          = 0,                # probability multiplier: arbitrary rotation
        aniso           = 0,                # probability multiplier: anisotropic scaling
        xfrac           = 0,                # probability multiplier: fractional translation
        scale_std       = 0.2,              # std of log2 isotropic scale
        rotate_max      = 1,                # rotation range, 1 = full circle
        aniso_std       = 0.2,              # std of log2 anisotropic scale
        xfrac_std       = 0.125,            # std of fractional translation, fraction of the image size
        brightness      = 0,                # probability multiplier: additive brightness
        contrast        = 0,                # probability multiplier: contrast (scaling about mid-grey)
        lumaflip        = 0,                # probability multiplier: luma flip (reflect along the grey axis)
        hue             = 0,                # probability multiplier: hue rotation about the grey axis
        saturation      = 0,                # probability multiplier: saturation (scaling off the grey axis)
        brightness_std  = 0.2,              # std of the brightness offset (image units, range [-1, 1])
        contrast_std    = 0.5,              # std of log2 contrast
        hue_max         = 1,                # hue rotation range, 1 = full circle
        saturation_std  = 1,                # std of log2 saturation
        imgfilter       = 0,                # probability multiplier: random gains of frequency bands
        imgfilter_bands = (1, 1, 1, 1),     # per-band probability multipliers, lowest band first
        imgfilter_std   = 1,                # std of log2 band gain
        noise           = 0,                # probability multiplier: additive Gaussian noise
        cutout          = 0,                # probability multiplier: zeroed rectangle
        noise_std       = 0.1,              # noise sigma ~ |N(0, noise_std^2)| per sample
        cutout_size     = 0.5,              # cutout side, fraction of the image size
    ):
        kwargs = dict(locals())                                     # the constructor arguments, first thing
        kwargs.pop('self')
        kwargs.pop('__class__', None)
        super().__init__()
        kwargs['imgfilter_bands'] = tuple(float(b) for b in imgfilter_bands)
        if len(kwargs['imgfilter_bands']) != 4:
            raise ValueError(f'imgfilter_bands needs 4 values (one per band), got {list(imgfilter_bands)}')
        for name, value in kwargs.items():
            if name != 'imgfilter_bands':
                value = float(value)
                if not math.isfinite(value) or value < 0:
                    raise ValueError(f'AugmentPipe: {name} must be a finite number >= 0, got {value}')
                kwargs[name] = value
            setattr(self, name, kwargs[name])
        self.init_kwargs = kwargs                                   # what a pickle needs to rebuild us

        # True: when p lives on the CPU, read it (free there) and return the input itself at p == 0.
        # False: never read p on the host and always run the full static graph, as the pipe does
        # whenever p lives on an accelerator (then p == 0 gives outputs equal to the inputs).
        self.skip_at_p0 = True

        self.register_buffer('p', torch.zeros([]))                  # overall probability, set by ADA
        self.register_buffer('Hz_geom', setup_filter(_SYM6))        # [12], taps sum to 1
        self.register_buffer('Hz_fbank', torch.as_tensor(_filter_bank(), dtype=torch.float32))  # [4, 43]

        # Our constants: non-persistent buffers, so they move with .to(device) (no host-to-device copy
        # per call) yet stay out of the state dict (NVIDIA pickles and ours load strictly). float64 so
        # float64 images get exact constants; forward casts them to the images' dtype on the device.
        v = np.array([1, 1, 1, 0]) / math.sqrt(3)                   # grey (luma) axis in (r, g, b, 1)
        grey = np.outer(v, v)                                       # projection onto the grey axis
        cross = np.zeros([4, 4])                                    # [v]_x, the cross-product matrix of v
        cross[0, 1], cross[0, 2], cross[1, 2] = -v[2], v[1], -v[0]
        cross -= cross.T
        offset = np.zeros([4, 4])                                   # adds the homogeneous 1 to r, g and b
        offset[:3, 3] = 1
        constants = dict(
            colour_grey   = grey,                                   # [4, 4]
            colour_chroma = np.diag([1., 1, 1, 0]) - grey,          # [4, 4] projection onto the chroma plane
            colour_cross  = cross,                                  # [4, 4]
            colour_offset = offset,                                 # [4, 4]
            band_strength = np.array(kwargs['imgfilter_bands']),    # [4] probability multiplier per band
            band_power    = np.array(_BAND_POWER),                  # [4] expected share of image power per band
        )
        for name, value in constants.items():
            self.register_buffer(name, torch.as_tensor(value, dtype=torch.float64), persistent=False)

        # sym6 is not symmetric: its centroid (its delay at low frequencies) sits 0.40 taps before the
        # middle, so the 2x grid is offset by that much; the downsampling with the mirrored filter undoes it.
        taps = np.asarray(_SYM6)
        self.geom_shift = float((np.arange(len(taps)) * taps).sum() / taps.sum() - (len(taps) - 1) / 2)

    def extra_repr(self):
        on = [f'{t}={getattr(self, t):g}' for t in TRANSFORMS if getattr(self, t) > 0]
        return 'transforms: ' + (', '.join(on) if on else 'none')

    #------------------------------------------------------------------------

    def forward(self,
        images,                     # [N, C, H, W] float, range [-1, 1]
        debug_percentile = None,    # in [0, 1]: apply every enabled transform at this quantile; None = random
    ):
        """Augment a batch; returns the input itself when nothing can happen (no transform; p == 0 on the CPU)."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
            raise ValueError('AugmentPipe expects float images of shape [N, C, H, W]')
        if not any(getattr(self, t) > 0 for t in TRANSFORMS):
            return images
        q = None
        if debug_percentile is not None:
            q = float(debug_percentile)
            if not 0 <= q <= 1:
                raise ValueError(f'debug_percentile must be in [0, 1], got {q}')
        N, C, H, W = images.shape
        if min(H, W) < 2:
            raise ValueError(f'AugmentPipe needs images of at least 2x2 pixels, got {H}x{W}')
        p = self._probability(images)
        if q is None and self.skip_at_p0 and isinstance(p, float) and p <= 0:
            return images
        ctx = dict(N=N, device=images.device, dtype=images.dtype, q=q, p=p)
        images = self._geometry(images, ctx)
        images = self._colour(images, ctx)
        images = self._imgfilter(images, ctx)
        images = self._corruptions(images, ctx)
        return images

    def _probability(self, images):
        """p as a Python float where reading it is free and wanted (on the CPU, skip_at_p0), else a device tensor."""
        if self.skip_at_p0 and self.p.device.type == 'cpu':
            return float(self.p)
        return self.p.to(device=images.device, dtype=images.dtype)   # no copy when already there

    def _constant(self, name, ctx):
        """A constant buffer in the images' dtype (a cast on the device; the buffer already lives there)."""
        return getattr(self, name).to(device=ctx['device'], dtype=ctx['dtype'])

    #------------------------------------------------------------------------
    # Random parameters. Every enabled transform draws for every sample; a sample it does not pick gets
    # the transform's identity value, so the amount of work never depends on the draw.

    def _draw(self, ctx, prob, value, identity, shape=()):
        """Per sample: `value` with probability `prob` (a float or scalar tensor), else `identity` (a float)."""
        take = torch.rand([ctx['N'], *[1] * len(shape)], device=ctx['device'], dtype=ctx['dtype']) < prob
        return torch.where(take, value, identity)

    def _normal_quantile(self, ctx):
        """z-score of the debug percentile (clamped so 0 and 1 stay finite)."""
        return statistics.NormalDist().inv_cdf(min(max(ctx['q'], 1e-6), 1 - 1e-6))

    def _randn(self, ctx, shape=()):
        """Standard normal draws [N, *shape], or the debug percentile's z-score."""
        if ctx['q'] is not None:
            return torch.full([ctx['N'], *shape], self._normal_quantile(ctx), device=ctx['device'], dtype=ctx['dtype'])
        return torch.randn([ctx['N'], *shape], device=ctx['device'], dtype=ctx['dtype'])

    def _rand(self, ctx, shape=()):
        """Uniform [0, 1) draws [N, *shape], or the debug percentile."""
        if ctx['q'] is not None:
            return torch.full([ctx['N'], *shape], ctx['q'], device=ctx['device'], dtype=ctx['dtype'])
        return torch.rand([ctx['N'], *shape], device=ctx['device'], dtype=ctx['dtype'])

    def _gate(self, ctx, mult, value, identity, shape=()):
        """Gate a parameter by its probability; in debug mode every enabled transform is always on."""
        if ctx['q'] is not None:
            return value
        return self._draw(ctx, ctx['p'] * mult, value, identity, shape)

    #------------------------------------------------------------------------
    # Geometry.

    def _geometry(self, images, ctx):
        """Compose the geometric transforms per sample and execute them (blit exactly, then resample)."""
        blits = any(getattr(self, t) > 0 for t in ('xflip', 'rotate90', 'xint'))
        general = any(getattr(self, t) > 0 for t in ('scale', 'rotate', 'aniso', 'xfrac'))
        if not blits and not general:
            return images
        N, _, H, W = images.shape
        dev, dt = ctx['device'], ctx['dtype']
        one, zero = torch.ones([N], device=dev, dtype=dt), torch.zeros([N], device=dev, dtype=dt)

        # Pixel blitting, built in exact integer arithmetic: B_inv maps output pixels to input pixels.
        B_inv = torch.eye(3, device=dev, dtype=dt).expand(N, 3, 3)
        if self.xflip > 0:
            i = self._gate(ctx, self.xflip, torch.floor(self._rand(ctx) * 2).clamp(max=1), 0)
            B_inv = B_inv @ _mat3(1 - 2 * i, zero, zero, zero, one, zero)
        if self.rotate90 > 0:
            k = self._gate(ctx, self.rotate90, torch.floor(self._rand(ctx) * 4).clamp(max=3), 0)
            # Exact cos/sin of k * 90 deg by comparison (torch.cos(k * pi / 2) would leave round-off).
            cos = (k == 0).to(dt) - (k == 2).to(dt)
            sin = (k == 1).to(dt) - (k == 3).to(dt)
            B_inv = B_inv @ _mat3(cos, sin, zero, -sin, cos, zero)  # inverse of a rotation by k * 90 deg
        if self.xint > 0:
            t = (self._rand(ctx, [2]) * 2 - 1) * self.xint_max
            t = self._gate(ctx, self.xint, t, 0, [2])
            tx, ty = torch.round(t[:, 0] * W), torch.round(t[:, 1] * H)
            B_inv = B_inv @ _mat3(one, zero, -tx, zero, one, -ty)

        # General geometry (needs resampling). A_inv starts as the identity.
        A_inv = torch.eye(3, device=dev, dtype=dt).expand(N, 3, 3)
        if self.scale > 0:
            s = self._gate(ctx, self.scale, torch.exp2(self._randn(ctx) * self.scale_std), 1)
            A_inv = A_inv @ _mat3(1 / s, zero, zero, zero, 1 / s, zero)
        # Rotation is split into one before and one after the anisotropic scaling (so the stretch axis
        # is random); each happens with probability p_rot so that P(either) = rotate * p.
        p_any = self.rotate * ctx['p']
        if torch.is_tensor(p_any):
            p_rot = 1 - (1 - p_any).clamp(0, 1).sqrt()
        else:
            p_rot = 1 - math.sqrt(min(max(1 - p_any, 0), 1))
        if self.rotate > 0:
            theta = (self._rand(ctx) * 2 - 1) * math.pi * self.rotate_max
            theta = theta if ctx['q'] is not None else self._draw(ctx, p_rot, theta, 0)
            A_inv = A_inv @ _mat3(torch.cos(theta), torch.sin(theta), zero, -torch.sin(theta), torch.cos(theta), zero)
        if self.aniso > 0:
            s = self._gate(ctx, self.aniso, torch.exp2(self._randn(ctx) * self.aniso_std), 1)
            A_inv = A_inv @ _mat3(1 / s, zero, zero, zero, s, zero)
        if self.rotate > 0:
            theta = (self._rand(ctx) * 2 - 1) * math.pi * self.rotate_max
            theta = zero if ctx['q'] is not None else self._draw(ctx, p_rot, theta, 0)
            A_inv = A_inv @ _mat3(torch.cos(theta), torch.sin(theta), zero, -torch.sin(theta), torch.cos(theta), zero)
        if self.xfrac > 0:
            t = self._gate(ctx, self.xfrac, self._randn(ctx, [2]) * self.xfrac_std, 0, [2])
            A_inv = A_inv @ _mat3(one, zero, -t[:, 0] * W, zero, one, -t[:, 1] * H)

        # Blits are exact gathers of whole pixels, done first, on every sample (an identity blit gathers
        # each pixel from itself: a bit-exact copy). A blit that does not land on whole pixels, i.e. a
        # quarter turn of an image whose W - H is odd, gathers the identity and goes to the resampling pass.
        G_inv = A_inv                                               # left for the resampling pass
        if blits:
            pix = self._pixel_coords(H, W, dev, dt)                 # [3, H*W]
            src = (self._centred(B_inv, H, W) @ pix)[:, :2]         # [N, 2, H*W] input (x, y) per output pixel
            whole = (src - src.round()).abs().amax(dim=(1, 2)) < 1e-4  # [N]
            src = torch.where(whole[:, None, None], src.round(), pix[:2])
            images = self._blit(images, src.long())
            G_inv = torch.where(whole[:, None, None], A_inv, B_inv @ A_inv)
        # Decided by the configuration and the shape only: xflip, xint and quarter turns with W - H even
        # always land on whole pixels.
        if general or (self.rotate90 > 0 and (W - H) % 2 != 0):
            resampled = resample_affine(images, G_inv, self.Hz_geom, self.geom_shift)
            images = _select(~_is_identity(G_inv), resampled, images)
        return images

    @staticmethod
    def _pixel_coords(H, W, device, dtype):
        """Homogeneous pixel coordinates (x, y, 1) of every pixel, row-major: [3, H*W]."""
        ys, xs = torch.meshgrid(torch.arange(H, device=device, dtype=dtype),
                                torch.arange(W, device=device, dtype=dtype), indexing='ij')
        return torch.stack([xs.flatten(), ys.flatten(), torch.ones_like(xs.flatten())])

    @staticmethod
    def _centred(G_inv, H, W):
        """Conjugate maps in centred coordinates by the centring: the same maps on pixel indices [N, 3, 3]."""
        cx, cy = (W - 1) / 2, (H - 1) / 2
        return _post_affine(_pre_affine(G_inv, 1, 1, cx, cy), 1, 1, -cx, -cy)

    @staticmethod
    def _blit(images, src):
        """Gather whole pixels (mirror-reflected at the borders): exact xflip / rotate90 / xint."""
        N, C, H, W = images.shape
        sx = _reflect_index(src[:, 0], W)
        sy = _reflect_index(src[:, 1], H)
        flat = (sy * W + sx)[:, None, :].expand(N, C, H * W)       # [N, C, H*W]
        return images.reshape(N, C, H * W).gather(2, flat).reshape(N, C, H, W)

    #------------------------------------------------------------------------
    # Colour.

    def _colour(self, images, ctx):
        """Compose the colour transforms into one 4x4 matrix per sample and apply it."""
        N, C, H, W = images.shape
        rgb_only = C > 1                                            # hue and saturation need colour
        active = [self.brightness, self.contrast, self.lumaflip] + ([self.hue, self.saturation] if rgb_only else [])
        if not any(m > 0 for m in active):
            return images
        if C not in (1, 3):
            raise ValueError(f'colour augmentations need 1 or 3 channels, got {C}')
        dev, dt = ctx['device'], ctx['dtype']
        I4 = torch.eye(4, device=dev, dtype=dt)
        grey = self._constant('colour_grey', ctx)                   # [4, 4]
        chroma = self._constant('colour_chroma', ctx)               # [4, 4]
        M = I4.expand(N, 4, 4)

        # Each factor is exactly I4 at its identity parameter, so an untouched sample keeps M == I4.
        if self.brightness > 0:
            b = self._gate(ctx, self.brightness, self._randn(ctx) * self.brightness_std, 0)
            M = (I4 + b[:, None, None] * self._constant('colour_offset', ctx)) @ M
        if self.contrast > 0:
            c = self._gate(ctx, self.contrast, torch.exp2(self._randn(ctx) * self.contrast_std), 1)
            M = torch.diag_embed(torch.stack([c, c, c, torch.ones_like(c)], dim=1)) @ M
        if self.lumaflip > 0:
            i = self._gate(ctx, self.lumaflip, torch.floor(self._rand(ctx) * 2).clamp(max=1), 0)
            M = (I4 - 2 * grey * i[:, None, None]) @ M              # Householder reflection of the grey component
        if self.hue > 0 and rgb_only:
            theta = self._gate(ctx, self.hue, (self._rand(ctx) * 2 - 1) * math.pi * self.hue_max, 0)
            cos, sin = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
            # Rodrigues, I + sin [v]_x + (1 - cos) [v]_x^2 with [v]_x^2 = -chroma: a rotation about v.
            M = (I4 + sin * self._constant('colour_cross', ctx) - (1 - cos) * chroma) @ M
        if self.saturation > 0 and rgb_only:
            s = self._gate(ctx, self.saturation, torch.exp2(self._randn(ctx) * self.saturation_std), 1)
            M = (I4 + (s - 1)[:, None, None] * chroma) @ M          # scale chroma only, keep grey and the 1

        x = images.reshape(N, C, H * W)
        if C == 3:
            x = M[:, :3, :3] @ x + M[:, :3, 3:]
        else:
            # A grey pixel is (x, x, x): transform it and average the three outputs.
            x = x * M[:, :3, :3].sum(dim=2).mean(dim=1)[:, None, None] + M[:, :3, 3].mean(dim=1)[:, None, None]
        return _select(~_is_identity(M), x.reshape(N, C, H, W), images)

    #------------------------------------------------------------------------
    # Image-space filtering.

    def _imgfilter(self, images, ctx):
        """Amplify random frequency bands by log-normal gains, keeping the expected image power."""
        if self.imgfilter <= 0:
            return images
        N, C, H, W = images.shape
        dev, dt = ctx['device'], ctx['dtype']
        bank = self.Hz_fbank.to(dt)                                 # [B, taps]
        B = bank.shape[0]
        strength = self._constant('band_strength', ctx)             # [B]
        w = self._constant('band_power', ctx)                       # [B]
        t = torch.exp2(self._randn(ctx, [B]) * self.imgfilter_std)  # [N, B] candidate gain per band
        if ctx['q'] is not None:
            t = torch.where(strength > 0, t, 1)
        else:
            take = torch.rand([N, B], device=dev, dtype=dt) < ctx['p'] * self.imgfilter * strength
            t = torch.where(take, t, 1)
        # Each amplified band i, taken alone, is the gain vector (1, .., t_i, .., 1) divided by
        # sqrt(sum_j w_j g_j^2) = sqrt(1 - w_i + w_i t_i^2); their product is t over the product of norms.
        g = t / torch.sqrt(1 - w + w * t.square()).prod(dim=1, keepdim=True)  # [N, B]
        filt = g @ bank                                             # [N, taps], zero-phase
        pad = bank.shape[1] // 2

        # Every sample is filtered (unit gains sum the bands to an impulse only up to round-off, so the
        # untouched samples are selected back from the input).
        k = filt.repeat_interleave(C, dim=0)[:, None, None, :]      # [N*C, 1, 1, taps]
        x = _reflect_pad(images, pad, pad, pad, pad).reshape(1, N * C, H + 2 * pad, W + 2 * pad)
        x = F.conv2d(x, k, groups=N * C)                            # along x
        x = F.conv2d(x, k.transpose(2, 3), groups=N * C)            # along y
        return _select((g != 1).any(dim=1), x.reshape(N, C, H, W), images)

    #------------------------------------------------------------------------
    # Corruptions.

    def _corruptions(self, images, ctx):
        """Additive Gaussian noise with a random sigma per sample, then cutout (both exact no-ops at their identity)."""
        N, C, H, W = images.shape
        dev, dt = ctx['device'], ctx['dtype']
        if self.noise > 0:
            if ctx['q'] is not None:
                # Quantile of |N(0, 1)|: the normal quantile at (1 + q) / 2.
                half = statistics.NormalDist().inv_cdf((1 + min(ctx['q'], 1 - 1e-6)) / 2)
                sigma = torch.full([N], half * self.noise_std, device=dev, dtype=dt)
            else:
                sigma = torch.randn([N], device=dev, dtype=dt).abs() * self.noise_std
                sigma = self._draw(ctx, ctx['p'] * self.noise, sigma, 0)
            images = images + torch.randn_like(images) * sigma[:, None, None, None]  # + 0 where sigma = 0
        if self.cutout > 0:
            size = self._gate(ctx, self.cutout, torch.full([N], self.cutout_size, device=dev, dtype=dt), 0)
            centre = self._rand(ctx, [2])                            # [N, 2], fraction of the image
            px = (torch.arange(W, device=dev, dtype=dt) + 0.5) / W  # pixel centres
            py = (torch.arange(H, device=dev, dtype=dt) + 0.5) / H
            half = (size / 2)[:, None]
            out_x = (px[None] - centre[:, :1]).abs() >= half        # [N, W]; all True where size = 0
            out_y = (py[None] - centre[:, 1:]).abs() >= half        # [N, H]
            keep = (out_x[:, None, :] | out_y[:, :, None]).to(dt)   # [N, H, W]
            images = images * keep[:, None]
        return images
