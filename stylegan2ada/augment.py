"""Adaptive discriminator augmentation (ADA): the transforms of Karras et al. 2020, appendix B.

Every transform is applied independently per sample with probability `p * multiplier`. The order
is the paper's: pixel blitting (xflip, rotate90, xint), general geometry (scale, rotate, aniso,
xfrac), colour (brightness, contrast, lumaflip, hue, saturation), image-space filtering and
corruptions (noise, cutout). The geometric transforms of a sample are composed into 3x3 matrices:
the blits move whole pixels, so they run as an exact gather (mirror-reflected at the borders); the
general part runs as a single resampling pass (reflection padding over the transformed footprint,
2x upsampling with the sym6 wavelet low-pass, bilinear grid_sample through the inverse matrix, 2x
downsampling with the same filter). Doing the blits as a gather keeps flips and quarter turns exact,
which resampling with the asymmetric sym6 filter would not be. All colour transforms form one 4x4
matrix on (r, g, b, 1).
The pipeline is differentiable w.r.t. the images, to any order, so gradients reach G and R1 may be
taken through it.

Constructor keyword names and defaults are NVIDIA's, because their network pickles store the
augment pipe by its init kwargs and we rebuild it from them; the buffer names are theirs too
(`p`, `Hz_geom`, `Hz_fbank`) so tensors copy by name.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

from .ops import downsample2d, setup_filter, upsample2d

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
# Small helpers.

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


def _const3(a, b, tx, c, d, ty, like):
    """One constant 2-D affine map [1, 3, 3] on the device and dtype of `like`."""
    return torch.tensor([[[a, b, tx], [c, d, ty], [0, 0, 1]]], device=like.device, dtype=like.dtype)


def _on_subset(x, mask, fn):
    """Apply fn to the samples where mask is True; the rest pass through untouched."""
    idx = mask.nonzero()[:, 0]
    if idx.numel() == 0:
        return x
    if idx.numel() == x.shape[0]:
        return fn(x, idx)
    return x.index_copy(0, idx, fn(x.index_select(0, idx), idx))

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

        self.register_buffer('p', torch.zeros([]))                  # overall probability, set by ADA
        self.register_buffer('Hz_geom', setup_filter(_SYM6))        # [12], taps sum to 1
        self.register_buffer('Hz_fbank', torch.as_tensor(_filter_bank(), dtype=torch.float32))  # [4, 43]

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
        """Augment a batch; returns the input object itself when nothing can happen (p == 0)."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
            raise ValueError('AugmentPipe expects float images of shape [N, C, H, W]')
        if not any(getattr(self, t) > 0 for t in TRANSFORMS):
            return images
        q = None
        if debug_percentile is not None:
            q = float(debug_percentile)
            if not 0 <= q <= 1:
                raise ValueError(f'debug_percentile must be in [0, 1], got {q}')
        elif float(self.p) <= 0:
            return images
        N, C, H, W = images.shape
        if min(H, W) < 2:
            raise ValueError(f'AugmentPipe needs images of at least 2x2 pixels, got {H}x{W}')
        ctx = dict(N=N, device=images.device, dtype=images.dtype, q=q,
                   p=self.p.to(device=images.device, dtype=images.dtype))
        images = self._geometry(images, ctx)
        images = self._colour(images, ctx)
        images = self._imgfilter(images, ctx)
        images = self._corruptions(images, ctx)
        return images

    #------------------------------------------------------------------------
    # Random parameters.

    def _draw(self, ctx, prob, value, identity, shape=()):
        """Per sample: `value` with probability `prob` (a scalar tensor), else `identity` ([N, *shape])."""
        take = torch.rand([ctx['N'], *[1] * len(shape)], device=ctx['device'], dtype=ctx['dtype']) < prob
        return torch.where(take, value, torch.as_tensor(identity, device=ctx['device'], dtype=ctx['dtype']))

    def _normal_quantile(self, ctx):
        """z-score of the debug percentile (clamped so 0 and 1 stay finite)."""
        q = min(max(ctx['q'], 1e-6), 1 - 1e-6)
        return math.sqrt(2) * torch.erfinv(torch.tensor(2 * q - 1, dtype=torch.float64)).item()

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
        """Compose the geometric transforms per sample and execute them (blit exactly, else resample)."""
        if not any(getattr(self, t) > 0 for t in ('xflip', 'rotate90', 'xint', 'scale', 'rotate', 'aniso', 'xfrac')):
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
            k = self._gate(ctx, self.rotate90, torch.floor(self._rand(ctx) * 4).clamp(max=3), 0).long()
            cos = torch.tensor([1., 0., -1., 0.], device=dev, dtype=dt)[k]
            sin = torch.tensor([0., 1., 0., -1.], device=dev, dtype=dt)[k]
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
        p_rot = 1 - torch.sqrt((1 - self.rotate * ctx['p']).clamp(0, 1))
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

        # Blits are exact gathers of whole pixels, done first; the general part (plus any blit that does
        # not land on whole pixels, e.g. a quarter turn of a non-square image) is one resampling pass.
        eye = torch.eye(3, device=dev, dtype=dt)
        G_inv = A_inv                                               # left for the resampling pass
        resample = (A_inv != eye).flatten(1).any(dim=1)             # [N]
        blit = (B_inv != eye).flatten(1).any(dim=1)                 # [N]
        if blit.any():
            src = self._source_pixels(B_inv, H, W)                  # [N, 2, H*W]
            whole = (src - src.round()).abs().amax(dim=(1, 2)) < 1e-4
            gather = blit & whole
            images = _on_subset(images, gather, lambda x, idx: self._blit(x, src[idx].round().long()))
            G_inv = torch.where(gather[:, None, None], A_inv, B_inv @ A_inv)
            resample = resample | (blit & ~whole)
        return _on_subset(images, resample, lambda x, idx: self._resample(x, G_inv[idx]))

    @staticmethod
    def _source_pixels(G_inv, H, W):
        """Input pixel coordinates (x, y) read by every output pixel: [N, 2, H*W]."""
        dev, dt = G_inv.device, G_inv.dtype
        ys, xs = torch.meshgrid(torch.arange(H, device=dev, dtype=dt), torch.arange(W, device=dev, dtype=dt),
                                indexing='ij')
        cx, cy = (W - 1) / 2, (H - 1) / 2
        pts = torch.stack([xs.flatten() - cx, ys.flatten() - cy, torch.ones_like(xs.flatten())])  # [3, H*W], centred
        src = G_inv @ pts                                           # [N, 3, H*W]
        return src[:, :2] + torch.tensor([cx, cy], device=dev, dtype=dt)[None, :, None]

    @staticmethod
    def _blit(images, src):
        """Gather whole pixels (mirror-reflected at the borders): exact xflip / rotate90 / xint."""
        N, C, H, W = images.shape
        sx = _reflect_index(src[:, 0], W)
        sy = _reflect_index(src[:, 1], H)
        flat = (sy * W + sx)[:, None, :].expand(N, C, H * W)       # [N, C, H*W]
        return images.reshape(N, C, H * W).gather(2, flat).reshape(N, C, H, W)

    def _resample(self, images, G_inv):
        """Execute per-sample inverse maps G_inv [n, 3, 3] (centred pixel coordinates) in one pass."""
        n, C, H, W = images.shape
        dev, dt = images.device, images.dtype
        q = self.Hz_geom.numel() // 4                               # 3 px: half the filter's support at 2x
        cx, cy = (W - 1) / 2, (H - 1) / 2

        # Pad by reflection so that the input covers the footprint of the output region (the image plus
        # the q-pixel border the downsampling filter reads), with q + 1 more pixels for the upsampling
        # filter and the bilinear neighbours. Capped so a wild zoom-out cannot exhaust memory; beyond
        # the cap grid_sample reads zeros.
        ex, ey = cx + q, cy + q
        corners = torch.tensor([[-ex, ex, ex, -ex], [-ey, -ey, ey, ey], [1, 1, 1, 1]], device=dev, dtype=dt)
        src = G_inv @ corners                                       # [n, 3, 4]
        lo = src[:, :2].amin(dim=(0, 2))
        hi = src[:, :2].amax(dim=(0, 2))
        need = torch.cat([-lo, hi]) - torch.tensor([cx, cy, cx, cy], device=dev, dtype=dt) + (q + 1)
        cap = torch.tensor([W, H, W, H], device=dev, dtype=dt) * 4
        left, top, right, bottom = [int(v) for v in need.ceil().clamp(min=0).minimum(cap).tolist()]
        images = _reflect_pad(images, left, right, top, bottom)
        # Centred coordinates of the padded image.
        G_inv = _const3(1, 0, (left - right) / 2, 0, 1, (top - bottom) / 2, G_inv) @ G_inv

        # 2x upsampling: a centred coordinate u becomes 2u + d, d the filter's delay.
        images = upsample2d(images, self.Hz_geom, up=2)             # [n, C, 2(H+top+bottom), 2(W+left+right)]
        d = self.geom_shift
        M = _const3(2, 0, d, 0, 2, d, G_inv) @ G_inv @ _const3(0.5, 0, -d / 2, 0, 0.5, -d / 2, G_inv)  # on the 2x grids

        # affine_grid works in [-1, 1] units of the whole image (align_corners=False: u_norm = 2u / size).
        Hi, Wi = images.shape[2:]
        Ho, Wo = 2 * (H + 2 * q), 2 * (W + 2 * q)
        theta = _const3(2 / Wi, 0, 0, 0, 2 / Hi, 0, M) @ M @ _const3(Wo / 2, 0, 0, 0, Ho / 2, 0, M)
        theta = theta[:, :2, :]                                     # [n, 2, 3]
        grid = F.affine_grid(theta, [n, C, Ho, Wo], align_corners=False)
        images = grid_sample_bilinear(images, grid)                 # [n, C, Ho, Wo]

        # 2x downsampling with the mirrored filter (undoes the upsampling's delay), cropping the border.
        return downsample2d(images, self.Hz_geom, down=2, padding=-2 * q, flip_filter=True)  # [n, C, H, W]

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
        v = torch.tensor([1, 1, 1, 0], device=dev, dtype=dt) / math.sqrt(3)  # grey (luma) axis
        vv = torch.outer(v, v)
        M = I4.expand(N, 4, 4)

        if self.brightness > 0:
            b = self._gate(ctx, self.brightness, self._randn(ctx) * self.brightness_std, 0)
            T = I4.repeat(N, 1, 1)
            T[:, :3, 3] = b[:, None]
            M = T @ M
        if self.contrast > 0:
            c = self._gate(ctx, self.contrast, torch.exp2(self._randn(ctx) * self.contrast_std), 1)
            S = torch.diag_embed(torch.stack([c, c, c, torch.ones_like(c)], dim=1))
            M = S @ M
        if self.lumaflip > 0:
            i = self._gate(ctx, self.lumaflip, torch.floor(self._rand(ctx) * 2).clamp(max=1), 0)
            M = (I4 - 2 * vv * i[:, None, None]) @ M                # Householder reflection of the grey component
        if self.hue > 0 and rgb_only:
            theta = self._gate(ctx, self.hue, (self._rand(ctx) * 2 - 1) * math.pi * self.hue_max, 0)
            cos, sin = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
            cross = torch.zeros(4, 4, device=dev, dtype=dt)         # [v]_x, the cross-product matrix of v
            cross[0, 1], cross[0, 2], cross[1, 2] = -v[2], v[1], -v[0]
            cross = cross - cross.T
            R = cos * I4 + sin * cross + (1 - cos) * vv             # Rodrigues: rotation about v
            R[:, 3, :] = torch.tensor([0, 0, 0, 1], device=dev, dtype=dt)
            M = R @ M
        if self.saturation > 0 and rgb_only:
            s = self._gate(ctx, self.saturation, torch.exp2(self._randn(ctx) * self.saturation_std), 1)
            off = I4 - vv
            off[3, 3] = 0                                           # scale chroma only, keep the homogeneous 1
            M = (I4 - off + off * s[:, None, None]) @ M

        x = images.reshape(N, C, H * W)
        if C == 3:
            x = M[:, :3, :3] @ x + M[:, :3, 3:]
        else:
            # A grey pixel is (x, x, x): transform it and average the three outputs.
            x = x * M[:, :3, :3].sum(dim=2).mean(dim=1)[:, None, None] + M[:, :3, 3].mean(dim=1)[:, None, None]
        return x.reshape(N, C, H, W)

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
        strength = torch.tensor(self.imgfilter_bands, device=dev, dtype=dt)  # [B]
        w = torch.tensor(_BAND_POWER, device=dev, dtype=dt)          # [B]
        t = torch.exp2(self._randn(ctx, [B]) * self.imgfilter_std)  # [N, B] candidate gain per band
        if ctx['q'] is not None:
            t = torch.where(strength > 0, t, torch.ones_like(t))
        else:
            take = torch.rand([N, B], device=dev, dtype=dt) < ctx['p'] * self.imgfilter * strength
            t = torch.where(take, t, torch.ones_like(t))
        # Each amplified band i, taken alone, is the gain vector (1, .., t_i, .., 1) divided by
        # sqrt(sum_j w_j g_j^2) = sqrt(1 - w_i + w_i t_i^2); their product is t over the product of norms.
        g = t / torch.sqrt(1 - w + w * t.square()).prod(dim=1, keepdim=True)  # [N, B]
        filt = g @ bank                                             # [N, taps], zero-phase
        pad = bank.shape[1] // 2

        def run(x, idx):
            n = x.shape[0]
            k = filt[idx].repeat_interleave(C, dim=0)[:, None, None, :]  # [n*C, 1, 1, taps]
            x = _reflect_pad(x, pad, pad, pad, pad).reshape(1, n * C, H + 2 * pad, W + 2 * pad)
            x = F.conv2d(x, k, groups=n * C)                        # along x
            x = F.conv2d(x, k.transpose(2, 3), groups=n * C)        # along y
            return x.reshape(n, C, H, W)

        return _on_subset(images, (g != 1).any(dim=1), run)

    #------------------------------------------------------------------------
    # Corruptions.

    def _corruptions(self, images, ctx):
        """Additive Gaussian noise with a random sigma per sample, then cutout."""
        N, C, H, W = images.shape
        dev, dt = ctx['device'], ctx['dtype']
        if self.noise > 0:
            if ctx['q'] is not None:
                # Quantile of |N(0, 1)|: sqrt(2) erfinv(q).
                half = math.sqrt(2) * torch.erfinv(torch.tensor(min(ctx['q'], 1 - 1e-6), dtype=torch.float64)).item()
                sigma = torch.full([N], half * self.noise_std, device=dev, dtype=dt)
            else:
                sigma = torch.randn([N], device=dev, dtype=dt).abs() * self.noise_std
                sigma = self._draw(ctx, ctx['p'] * self.noise, sigma, 0)
            images = images + torch.randn_like(images) * sigma[:, None, None, None]
        if self.cutout > 0:
            size = self._gate(ctx, self.cutout, torch.full([N], self.cutout_size, device=dev, dtype=dt), 0)
            centre = self._rand(ctx, [2])                            # [N, 2], fraction of the image
            px = (torch.arange(W, device=dev, dtype=dt) + 0.5) / W  # pixel centres
            py = (torch.arange(H, device=dev, dtype=dt) + 0.5) / H
            half = (size / 2)[:, None]
            out_x = (px[None] - centre[:, :1]).abs() >= half        # [N, W]
            out_y = (py[None] - centre[:, 1:]).abs() >= half        # [N, H]
            keep = (out_x[:, None, :] | out_y[:, :, None]).to(dt)   # [N, H, W]
            images = images * keep[:, None]
        return images
