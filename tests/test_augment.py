"""Tests of the ADA augmentation pipe: each transform against a hand-computed reference or a law."""

import inspect
import math

import numpy as np
import pytest
import torch

from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from stylegan2ada.augment import PRESETS, TRANSFORMS, AugmentPipe, grid_sample_bilinear, resample_affine
from stylegan2ada.ops import default_impl


@pytest.fixture(autouse=True)
def seeded_single_thread():
    """Fixed seed (the 4.5-sigma statistical bounds then give the same verdict every run) and one
    thread: these tensors are tiny, and two threads fighting other jobs for two cores are slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(1234)
    yield
    torch.set_num_threads(threads)


def make_pipe(p=1.0, **kwargs):
    """An AugmentPipe with probability p."""
    pipe = AugmentPipe(**kwargs)
    pipe.p.fill_(p)
    return pipe


def rand_images(n, c=3, size=8, seed=0, dtype=torch.float32):
    """Random images in [-1, 1] whose pixels are all distinct (so symmetries are identifiable)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand([n, c, size, size], generator=g, dtype=torch.float64) * 2 - 1).to(dtype)


def binomial_ok(k, n, prob, z=4.5):
    """True when a count k of n is within z standard deviations of its binomial mean."""
    return abs(k - n * prob) <= z * math.sqrt(n * prob * (1 - prob))


#----------------------------------------------------------------------------
# Construction.

def test_constructor_matches_nvidia_names_and_defaults():
    expected = dict(
        xflip=0, rotate90=0, xint=0, xint_max=0.125, scale=0, rotate=0, aniso=0, xfrac=0,
        scale_std=0.2, rotate_max=1, aniso_std=0.2, xfrac_std=0.125, brightness=0, contrast=0,
        lumaflip=0, hue=0, saturation=0, brightness_std=0.2, contrast_std=0.5, hue_max=1,
        saturation_std=1, imgfilter=0, imgfilter_bands=(1, 1, 1, 1), imgfilter_std=1, noise=0,
        cutout=0, noise_std=0.1, cutout_size=0.5,
    )
    params = inspect.signature(AugmentPipe.__init__).parameters
    assert [n for n in params if n != 'self'] == list(expected)
    assert {n: params[n].default for n in expected} == expected
    pipe = AugmentPipe()
    assert pipe.p.shape == () and float(pipe.p) == 0
    assert {'p', 'Hz_geom', 'Hz_fbank'} <= set(dict(pipe.named_buffers()))
    assert tuple(pipe.Hz_geom.shape) == (12,) and tuple(pipe.Hz_fbank.shape) == (4, 43)
    # The bands split the spectrum: they sum to a unit impulse.
    total = pipe.Hz_fbank.double().sum(dim=0)
    assert abs(total[21].item() - 1) < 1e-6 and total.abs().sum().item() - 1 < 1e-6


def test_rebuild_from_init_kwargs_and_list_bands():
    pipe = AugmentPipe(xflip=1, imgfilter=1, imgfilter_bands=[1, 0, 1, 0], noise_std=0.3)
    again = AugmentPipe(**pipe.init_kwargs)
    assert again.init_kwargs == pipe.init_kwargs
    assert again.imgfilter_bands == (1.0, 0.0, 1.0, 0.0) and again.noise_std == 0.3


def test_presets_and_transforms():
    assert len(TRANSFORMS) == 15 and len(set(TRANSFORMS)) == 15
    assert PRESETS['blit'] == dict(xflip=1, rotate90=1, xint=1)
    assert PRESETS['geom'] == dict(scale=1, rotate=1, aniso=1, xfrac=1)
    assert PRESETS['color'] == dict(brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1)
    assert PRESETS['filter'] == dict(imgfilter=1)
    assert PRESETS['noise'] == dict(noise=1) and PRESETS['cutout'] == dict(cutout=1)
    assert set(PRESETS['bg']) == set(TRANSFORMS[:7])
    assert set(PRESETS['bgc']) == set(TRANSFORMS[:12])
    assert set(PRESETS['bgcf']) == set(TRANSFORMS[:13])
    assert set(PRESETS['bgcfn']) == set(TRANSFORMS[:14])
    assert set(PRESETS['bgcfnc']) == set(TRANSFORMS)
    x = rand_images(2, size=16)
    for name, kwargs in PRESETS.items():
        out = make_pipe(**kwargs)(x)
        assert out.shape == x.shape and torch.isfinite(out).all(), name


def test_bad_input():
    with pytest.raises(ValueError, match='imgfilter_bands'):
        AugmentPipe(imgfilter_bands=(1, 1, 1))
    with pytest.raises(ValueError, match='xflip'):
        AugmentPipe(xflip=-1)
    with pytest.raises(ValueError, match=r'\[N, C, H, W\]'):
        make_pipe(xflip=1)(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match='1 or 3 channels'):
        make_pipe(brightness=1)(torch.zeros(2, 2, 8, 8))


#----------------------------------------------------------------------------
# Probability.

def test_p0_is_exact_identity():
    x = rand_images(4, size=16)
    pipe = make_pipe(0.0, **PRESETS['bgcfnc'])
    out = pipe(x)
    assert out is x
    assert torch.equal(make_pipe(0.7)(x), x)                        # nothing enabled


def _pipe_p_read(pipe, p_as_tensor):
    """p read as a float on the host (CPU training) or as a device tensor (GPU, CUDA graphs): both paths must agree."""
    pipe.skip_at_p0 = not p_as_tensor
    return pipe


@pytest.mark.parametrize('p_as_tensor', [False, True])
def test_probability_is_p_times_multiplier(p_as_tensor):
    n = 2000
    x = rand_images(n, size=4)
    for p, mult in [(0.3, 1.0), (0.8, 0.5)]:
        changed = (_pipe_p_read(make_pipe(p, brightness=mult), p_as_tensor)(x) != x).flatten(1).any(dim=1).sum().item()
        assert binomial_ok(changed, n, p * mult), (p, mult, changed)


@pytest.mark.parametrize('p_as_tensor', [False, True])
def test_rotate_split_keeps_total_probability(p_as_tensor):
    # Pre- and post-rotation each fire with 1 - sqrt(1 - p): at least one fires with probability p.
    n = 600
    x = rand_images(n, c=1, size=8)
    changed = ((_pipe_p_read(make_pipe(0.5, rotate=1), p_as_tensor)(x) - x).abs().flatten(1).amax(dim=1) > 1e-4).sum().item()
    assert binomial_ok(changed, n, 0.5), changed


#----------------------------------------------------------------------------
# Pixel blitting: exact.

def test_xflip_is_exact_and_half_the_time():
    n = 400
    x = rand_images(n)
    out = make_pipe(xflip=1)(x)
    same = (out == x).flatten(1).all(dim=1)
    flipped = (out == x.flip(3)).flatten(1).all(dim=1)
    assert (same ^ flipped).all()                                  # every sample is one or the other, exactly
    assert binomial_ok(flipped.sum().item(), n, 0.5), flipped.sum().item()


def test_rotate90_is_an_exact_quarter_turn():
    n = 400
    x = rand_images(n)
    out = make_pipe(rotate90=1)(x)
    match = torch.stack([(out == torch.rot90(x, k, dims=(2, 3))).flatten(1).all(dim=1) for k in range(4)], dim=1)
    assert (match.sum(dim=1) == 1).all()
    counts = match.sum(dim=0).tolist()
    assert all(binomial_ok(c, n, 0.25) for c in counts), counts


def reflect(i, n):
    """Mirror index onto [0, n) about the edge pixels, in numpy (the reference)."""
    i = np.mod(i, 2 * n - 2)
    return np.where(i >= n, 2 * n - 2 - i, i)


def test_xint_is_an_exact_reflected_shift():
    n, size = 200, 16
    x = rand_images(n, size=size)
    out = make_pipe(xint=1)(x).numpy()
    xn = x.numpy()
    ii, jj = np.meshgrid(np.arange(size), np.arange(size), indexing='ij')
    found = []
    for b in range(n):
        hits = [(dx, dy) for dx in range(-2, 3) for dy in range(-2, 3)   # xint_max 0.125 * 16 px = 2 px
                if np.array_equal(out[b], xn[b][:, reflect(ii - dy, size), reflect(jj - dx, size)])]
        assert len(hits) == 1, b
        found.append(hits[0])
    dxs = np.array(found)[:, 0]
    # round(U(-2, 2)): P(0) = P(+-1) = 1/4, P(+-2) = 1/8.
    assert set(dxs.tolist()) == {-2, -1, 0, 1, 2}
    assert binomial_ok((dxs == 0).sum(), n, 0.25) and binomial_ok((np.abs(dxs) == 2).sum(), n, 0.25)


def test_blits_of_non_square_images():
    x = torch.rand(64, 3, 8, 12) * 2 - 1
    out = make_pipe(xflip=1, rotate90=1)(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    # A flip alone stays exact on a non-square image.
    out = make_pipe(xflip=1)(x)
    assert ((out == x) | (out == x.flip(3))).flatten(1).all(dim=1).all()


#----------------------------------------------------------------------------
# General geometry: compare with the analytic transform of a smooth image.

def blob(x, y):
    """A smooth off-centre anisotropic Gaussian."""
    return torch.exp(-((x - 4) ** 2 / (2 * 3.0 ** 2) + (y + 2) ** 2 / (2 * 2.0 ** 2)))


def centred_grid(size):
    """(y, x) pixel coordinates relative to the image centre, float64 [size, size] each."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    return torch.meshgrid(r, r, indexing='ij')


def z_of(q):
    """Standard normal quantile."""
    return math.sqrt(2) * torch.erfinv(torch.tensor(2 * q - 1, dtype=torch.float64)).item()


@pytest.mark.parametrize('name, q, source', [
    # source(x, y) = input coordinates read by output pixel (x, y), centred pixel units.
    ('scale',  0.9, lambda x, y, s=2 ** (z_of(0.9) * 0.2): (x / s, y / s)),
    ('rotate', 0.6, lambda x, y, t=0.2 * math.pi: (math.cos(t) * x + math.sin(t) * y,
                                                    -math.sin(t) * x + math.cos(t) * y)),
    ('aniso',  0.2, lambda x, y, s=2 ** (z_of(0.2) * 0.2): (x / s, y * s)),
    ('xfrac',  0.8, lambda x, y, t=z_of(0.8) * 0.125 * 32: (x - t, y - t)),
])
def test_general_geometry_matches_analytic(name, q, source):
    size = 32
    ys, xs = centred_grid(size)
    img = blob(xs, ys).expand(1, 3, size, size).float()
    out = make_pipe(**{name: 1})(img, debug_percentile=q)[0, 0].double()
    ref = blob(*source(xs, ys))
    err = (out - ref)[6:-6, 6:-6].abs().max().item()               # interior: borders hold reflected content
    assert err < 0.02, err
    assert (ref - img[0, 0].double()).abs().max() > 0.1            # the transform really moved the blob


def test_scale_distribution_is_lognormal():
    # A centred isotropic blob scaled by s has second moment s^2 times the original: log2 s ~ N(0, 0.2^2).
    n, size = 300, 32
    ys, xs = centred_grid(size)
    r2 = xs ** 2 + ys ** 2
    img = torch.exp(-r2 / (2 * 3.0 ** 2)).expand(n, 1, size, size).float()
    out = make_pipe(scale=1)(img)[:, 0].double()
    m2 = (out * r2).sum(dim=(1, 2)) / out.sum(dim=(1, 2))
    log2s = 0.5 * torch.log2(m2 / (img[0, 0].double() * r2).sum() * img[0, 0].double().sum())
    assert abs(log2s.mean().item()) < 4.5 * 0.2 / math.sqrt(n)
    assert abs(log2s.std().item() / 0.2 - 1) < 0.2


#----------------------------------------------------------------------------
# Colour.

def test_brightness_adds_one_offset_per_sample():
    n = 2000
    x = rand_images(n, size=4)
    d = (make_pipe(brightness=1)(x) - x).flatten(1)                # [N, C*H*W]
    assert (d.amax(dim=1) - d.amin(dim=1)).max() < 1e-6            # same offset on every channel and pixel
    b = d[:, 0].double()
    assert abs(b.mean().item()) < 4.5 * 0.2 / math.sqrt(n)
    assert abs(b.std().item() / 0.2 - 1) < 0.1


def test_contrast_scales_about_mid_grey():
    n = 2000
    x = rand_images(n, size=4, dtype=torch.float64)
    out = make_pipe(contrast=1)(x)
    c = out.flatten(1)[:, 0] / x.flatten(1)[:, 0]
    assert torch.allclose(out, x * c[:, None, None, None], atol=1e-12)
    # Deviations from the per-sample mean scale by the same factor as the mean itself.
    dev_in = x - x.mean(dim=(1, 2, 3), keepdim=True)
    dev_out = out - out.mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(dev_out, dev_in * c[:, None, None, None], atol=1e-12)
    log2c = torch.log2(c)
    assert abs(log2c.mean().item()) < 4.5 * 0.5 / math.sqrt(n)
    assert abs(log2c.std().item() / 0.5 - 1) < 0.1


def test_lumaflip_reflects_the_grey_component():
    n = 400
    x = rand_images(n, size=4, dtype=torch.float64)
    out = make_pipe(lumaflip=1)(x)
    grey = x.mean(dim=1, keepdim=True)
    kept = ((out - x).abs().flatten(1).amax(dim=1) < 1e-12)
    flipped = ((out - (x - 2 * grey)).abs().flatten(1).amax(dim=1) < 1e-12)
    assert (kept ^ flipped).all() and binomial_ok(flipped.sum().item(), n, 0.5)
    # On a 1-channel image the flip is a negation.
    g = rand_images(n, c=1, size=4, dtype=torch.float64)
    out = make_pipe(lumaflip=1)(g)
    kept = (out - g).abs().flatten(1).amax(dim=1) < 1e-12
    negated = (out + g).abs().flatten(1).amax(dim=1) < 1e-12
    assert (kept ^ negated).all() and binomial_ok(negated.sum().item(), n, 0.5)


def test_hue_rotates_about_the_grey_axis():
    x = rand_images(3, size=4, dtype=torch.float64)
    q = 0.75                                                        # theta = (2q - 1) * pi = pi / 2
    out = make_pipe(hue=1)(x, debug_percentile=q).numpy()
    theta = (2 * q - 1) * math.pi
    v = np.ones(3) / math.sqrt(3)
    px = x.numpy().transpose(0, 2, 3, 1)                            # [N, H, W, 3]
    grey = (px @ v)[..., None] * v
    chroma = px - grey
    ref = grey + math.cos(theta) * chroma + math.sin(theta) * np.cross(v, chroma)  # Rodrigues
    assert np.abs(out.transpose(0, 2, 3, 1) - ref).max() < 1e-12
    # Random draws: luma and chroma magnitude are preserved per pixel.
    y = make_pipe(hue=1)(x)
    assert torch.allclose(y.mean(dim=1), x.mean(dim=1), atol=1e-12)
    chroma_norm = lambda t: (t - t.mean(dim=1, keepdim=True)).norm(dim=1)
    assert torch.allclose(chroma_norm(y), chroma_norm(x), atol=1e-12)


def test_saturation_scales_chroma_and_keeps_grey():
    n = 1000
    grey = rand_images(n, c=1, size=4, dtype=torch.float64).expand(n, 3, 4, 4)
    assert (make_pipe(saturation=1, saturation_std=3)(grey) - grey).abs().max() < 1e-12
    x = rand_images(n, size=4, dtype=torch.float64)
    out = make_pipe(saturation=1)(x)
    assert torch.allclose(out.mean(dim=1), x.mean(dim=1), atol=1e-12)
    ch_in = x - x.mean(dim=1, keepdim=True)
    ch_out = out - out.mean(dim=1, keepdim=True)
    s = ch_out.flatten(1)[:, 0] / ch_in.flatten(1)[:, 0]
    assert torch.allclose(ch_out, ch_in * s[:, None, None, None], atol=1e-10)
    log2s = torch.log2(s)
    assert abs(log2s.mean().item()) < 4.5 / math.sqrt(n) and abs(log2s.std().item() - 1) < 0.1


def test_hue_and_saturation_skip_single_channel():
    g = rand_images(4, c=1, size=8)
    assert torch.equal(make_pipe(hue=1, saturation=1)(g), g)
    out = make_pipe(brightness=1)(g)
    d = (out - g).flatten(1)
    assert (d.amax(dim=1) - d.amin(dim=1)).max() < 1e-6 and d.abs().amax() > 0


#----------------------------------------------------------------------------
# Image-space filtering.

def test_imgfilter_with_unit_gains_is_identity():
    x = rand_images(4, size=16)
    out = make_pipe(imgfilter=1, imgfilter_std=0)(x, debug_percentile=0.9)
    assert (out - x).abs().max() < 1e-5


def test_imgfilter_band_gains_keep_expected_power():
    # Only the top band is amplified, by t: 1-D gains (1, 1, 1, t) / sqrt((12 + t^2) / 13). The top
    # band passes Nyquist and blocks DC, the bottom band the reverse, and the filter runs along x and
    # then y, so a constant is scaled by g0^2 and a checkerboard by g3^2: both read the gains back.
    n, size = 400, 8
    ii, jj = np.meshgrid(np.arange(size), np.arange(size), indexing='ij')
    checker = torch.tensor((-1.0) ** (ii + jj))
    x = (0.3 + 0.2 * checker).expand(n, 3, size, size).clone()
    out = make_pipe(imgfilter=1, imgfilter_bands=(0, 0, 0, 1))(x.double())
    dc = out.mean(dim=(1, 2, 3)) / 0.3
    nyq = (out * checker).mean(dim=(1, 2, 3)) / 0.2
    assert torch.allclose(out, 0.3 * dc[:, None, None, None] + 0.2 * nyq[:, None, None, None] * checker, atol=1e-5)
    g0, g3 = dc.sqrt(), nyq.sqrt()
    t = g3 / g0
    assert torch.allclose(g0, torch.sqrt(13 / (12 + t ** 2)), atol=1e-5)
    assert ((t - 1).abs() > 1e-3).float().mean() > 0.9             # p = 1: (almost) every sample amplified
    log2t = torch.log2(t)
    assert abs(log2t.mean().item()) < 4.5 / math.sqrt(n) and abs(log2t.std().item() - 1) < 0.15


#----------------------------------------------------------------------------
# Corruptions.

def test_noise_sigma_is_half_normal():
    n, std = 1000, 0.1
    out = make_pipe(noise=1, noise_std=std)(torch.zeros(n, 1, 16, 16, dtype=torch.float64))
    assert abs(out.square().mean().sqrt().item() / std - 1) < 0.15  # E[sigma^2] = std^2
    sigma = out.flatten(1).std(dim=1)
    se = std * math.sqrt(1 - 2 / math.pi) / math.sqrt(n)            # E|Z| = sqrt(2/pi), Var|Z| = 1 - 2/pi
    assert abs(sigma.mean().item() - std * math.sqrt(2 / math.pi)) < 4.5 * se + 1e-3


def test_cutout_zeroes_a_square_of_the_expected_area():
    n, size = 1000, 16
    out = make_pipe(cutout=1)(torch.ones(n, 3, size, size))
    zero = (out == 0)
    assert (zero == zero[:, :1]).all()                              # same on every channel
    zero = zero[:, 0]
    rows, cols = zero.any(dim=2), zero.any(dim=1)
    assert (zero == (rows[:, :, None] & cols[:, None, :])).all()    # a rectangle
    h, w = rows.sum(dim=1), cols.sum(dim=1)
    assert (h <= 8).all() and (w <= 8).all()                        # cutout_size 0.5 of 16 px
    inside = ~(rows[:, 0] | rows[:, -1] | cols[:, 0] | cols[:, -1])
    assert inside.any() and ((h[inside] == 8) & (w[inside] == 8)).all()
    # E[side] = 16 * (0.5 - 2 * 0.25^2 / 2) = 7 px when the centre is uniform: E[area] = 49 px.
    area = zero.sum(dim=(1, 2)).double()
    assert abs(area.mean().item() - 49) < 4.5 * area.std().item() / math.sqrt(n)


#----------------------------------------------------------------------------
# Gradients.

def test_gradients_reach_the_input():
    x = rand_images(8, size=16).requires_grad_()
    w = rand_images(8, size=16, seed=1)
    out = make_pipe(**PRESETS['bgcfnc'])(x)
    g, = torch.autograd.grad((out * w).sum(), x, create_graph=True)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    gg, = torch.autograd.grad(g.square().sum(), x)                  # second order exists too
    assert torch.isfinite(gg).all()


def test_gradcheck_first_and_second_order():
    # debug_percentile makes the pipe deterministic (noise excluded: it draws at any percentile).
    pipe = make_pipe(**PRESETS['bgcf'], cutout=1)
    x = rand_images(1, size=4, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: pipe(t, debug_percentile=0.7), (x,), eps=1e-6, atol=1e-5)
    # Second order (R1 through the pipe) on one channel: geometry, filter and cutout.
    g = rand_images(1, c=1, size=5, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda t: pipe(t, debug_percentile=0.3), (g,), eps=1e-6, atol=1e-5)


def test_grid_sample_matches_torch():
    x = rand_images(2, size=5, dtype=torch.float64).requires_grad_()
    grid = torch.rand(2, 4, 6, 2, dtype=torch.float64) * 2.4 - 1.2
    ours = grid_sample_bilinear(x, grid)
    ref = torch.nn.functional.grid_sample(x, grid, mode='bilinear', padding_mode='zeros', align_corners=False)
    assert torch.equal(ours, ref)
    w = torch.rand_like(ref)
    g_ours, = torch.autograd.grad((ours * w).sum(), x)
    g_ref, = torch.autograd.grad((ref * w).sum(), x)
    assert torch.allclose(g_ours, g_ref, atol=1e-12)
    assert torch.autograd.gradgradcheck(lambda t: grid_sample_bilinear(t, grid), (x,))


#----------------------------------------------------------------------------
# Static shapes, no host synchronisation (issue 11): every sample runs through every enabled stage,
# untouched samples are selected back bit-exactly, and nothing reads device values on the host.

SYNC_OPS = ('aten._local_scalar_dense', 'aten.nonzero', 'aten.is_nonzero', 'aten.masked_select', 'aten.item')


class RecordOps(TorchDispatchMode):
    """Record (op name, input shapes) and the devices of every tensor each dispatched op reads or returns."""

    def __init__(self):
        super().__init__()
        self.calls = []                                             # [(name, shapes)]
        self.devices = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        self.calls.append((str(func), tuple(tuple(t.shape) for t in inputs)))  # e.g. aten.mul.Tensor
        self.devices.update(t.device.type for t in inputs + outputs)
        return out


def run_r1_like(pipe, x, probe):
    """Forward, a gradient w.r.t. the images with create_graph, and a second backward (what R1 does)."""
    x = x.detach().requires_grad_()
    out = pipe(x)
    grad, = torch.autograd.grad((out.tanh() * probe).sum(), x, create_graph=True)
    grad.square().sum().backward()
    return out


@pytest.mark.parametrize('preset', ['bgc', 'bgcfnc'])
@pytest.mark.parametrize('impl', ['ref', 'fast'])
def test_shapes_do_not_depend_on_the_draw(preset, impl):
    # A pipe that works on a random subset per stage, or pads by a margin that follows the draw, gives its
    # convolutions new shapes on every call (cuDNN's benchmark mode re-tunes each time). Two draws must
    # dispatch the very same ops on the very same shapes, forward and both backward passes.
    x = rand_images(8, size=32)
    pipe = make_pipe(0.5, **PRESETS[preset])
    pipe.skip_at_p0 = False                                         # no host read of p (as on a GPU)
    traces, outputs = [], []
    for seed in (1, 2):
        torch.manual_seed(seed)
        probe = rand_images(8, size=32, seed=seed + 10).requires_grad_()
        with default_impl(impl), RecordOps() as rec:
            outputs.append(run_r1_like(pipe, x, probe).detach())
        traces.append(rec.calls)
        assert not [c for c in rec.calls if c[0].startswith(SYNC_OPS)], preset
    assert not torch.equal(outputs[0], outputs[1])                  # two different draws
    assert any(name.startswith('aten.convolution') for name, _ in traces[0])
    assert traces[0] == traces[1]


@pytest.mark.parametrize('preset', ['bgc', 'bgcfnc'])
@pytest.mark.parametrize('debug_percentile', [None, 0.3])
def test_no_data_dependent_ops_on_the_meta_device(preset, debug_percentile):
    # Meta tensors have shapes but no values: any op that needs a value on the host (.item(), float(p),
    # .tolist(), nonzero, boolean masks, a Python `if` on a tensor) raises. Every tensor the pass touches
    # stays on meta, so nothing is copied from the host either (torch.tensor(list, device=...) would
    # show up as a CPU tensor).
    pipe = make_pipe(0.5, **PRESETS[preset]).to('meta')
    x = torch.empty(8, 3, 32, 32, device='meta')
    probe = torch.empty(8, 3, 32, 32, device='meta').requires_grad_()
    with RecordOps() as rec:
        x = x.requires_grad_()
        out = pipe(x, debug_percentile=debug_percentile)
        grad, = torch.autograd.grad((out.tanh() * probe).sum(), x, create_graph=True)
        grad.square().sum().backward()
    assert out.shape == x.shape and probe.grad.shape == x.shape
    assert rec.devices == {'meta'}
    assert not [c for c in rec.calls if c[0].startswith(SYNC_OPS)]
    assert any(name.startswith('aten.grid_sampler_2d') for name, _ in rec.calls)


def test_untouched_samples_are_bit_exact_copies():
    # Each stage runs on every sample; the ones it did not pick are selected back from its input, so
    # they carry no resampling or filtering round-off. Per stage alone: every sample is either exactly
    # its input or clearly changed, and the exact ones come at the stage's rate.
    n = 400
    x = rand_images(n, size=8)
    cases = [
        (dict(scale=1, rotate=1, aniso=1, xfrac=1), 0.3, 0.7 ** 4),  # rotate: either half fires with P = p overall
        (dict(imgfilter=1), 0.3, 0.7 ** 4),                          # 4 bands, each with probability p
        (dict(brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1), 0.2, 0.8 ** 5),
        (dict(noise=1, cutout=1), 0.4, 0.6 ** 2),
    ]
    for kwargs, p, rate in cases:
        out = make_pipe(p, **kwargs)(x)
        diff = (out - x).abs().flatten(1).amax(dim=1)
        exact = diff == 0
        assert (exact | (diff > 1e-4)).all(), kwargs                 # no near-misses from a round trip
        assert binomial_ok(exact.sum().item(), n, rate), (kwargs, exact.sum().item())


@pytest.mark.parametrize('impl', ['ref', 'fast'])
def test_full_path_at_p0_is_exact_identity(impl):
    # Where reading p is not free (p on a GPU) the pipe always runs every stage; at p = 0 it must give
    # back the input exactly, and the gradient must be exactly the incoming one.
    x = rand_images(6, size=16).requires_grad_()
    w = rand_images(6, size=16, seed=1)
    pipe = make_pipe(0.0, **PRESETS['bgcfnc'])
    pipe.skip_at_p0 = False
    with default_impl(impl), RecordOps() as rec:
        out = pipe(x)
        grad, = torch.autograd.grad((out * w).sum(), x)
    assert out is not x and any(name.startswith('aten.grid_sampler_2d') for name, _ in rec.calls)
    assert torch.equal(out, x)
    assert torch.equal(grad, w)


def test_constants_are_non_persistent_buffers():
    # The state dict holds exactly NVIDIA's tensors (their pickles load strictly); our constants move
    # with the module and stay exact for float64 images.
    pipe = make_pipe(0.4, **PRESETS['bgcfnc'])
    assert set(pipe.state_dict()) == {'p', 'Hz_geom', 'Hz_fbank'}
    again = AugmentPipe(**pipe.init_kwargs)
    again.load_state_dict(pipe.state_dict(), strict=True)
    assert float(again.p) == pytest.approx(0.4)
    moved = pipe.to('meta')
    assert {t.device.type for t in moved.buffers()} == {'meta'}
    assert {'colour_grey', 'colour_chroma', 'colour_cross', 'colour_offset', 'band_strength', 'band_power'} \
        <= set(dict(moved.named_buffers()))
    # The grey projection and its complement are exact projections in float64.
    fresh = AugmentPipe()
    grey, chroma = fresh.colour_grey, fresh.colour_chroma
    assert fresh.colour_grey.dtype == torch.float64
    assert torch.allclose(grey @ grey, grey, atol=1e-15) and torch.allclose(chroma @ chroma, chroma, atol=1e-15)
    assert torch.allclose(fresh.colour_cross @ fresh.colour_cross, -chroma, atol=1e-15)


#----------------------------------------------------------------------------
# The resampling pass: reference and fast paths, the fixed margin.

def random_maps(n, max_zoom_out, seed=0, dtype=torch.float64):
    """Inverse maps [n, 3, 3]: random rotations, zoom-outs by 1 to max_zoom_out, shifts ~N(0, 1) px."""
    g = torch.Generator().manual_seed(seed)
    theta = (torch.rand(n, generator=g, dtype=dtype) * 2 - 1) * math.pi
    s = torch.exp2(-torch.rand(n, generator=g, dtype=dtype) * math.log2(max_zoom_out))  # zoom in [1/max, 1]
    G = torch.zeros(n, 3, 3, dtype=dtype)
    G[:, 0, 0], G[:, 0, 1] = theta.cos() / s, theta.sin() / s
    G[:, 1, 0], G[:, 1, 1] = -theta.sin() / s, theta.cos() / s
    G[:, :2, 2] = torch.randn(n, 2, generator=g, dtype=dtype)
    G[:, 2, 2] = 1
    return G


@pytest.mark.parametrize('shape', [(24, 24), (20, 23)])
def test_resample_fast_matches_ref(shape):
    # The fast path upsamples one period of the reflected image instead of the whole padded image; the
    # two agree to round-off wherever the sampled footprint stays 4 px inside the W - 1 margin, in values
    # and in gradients. Here: any rotation, zoom-out up to 1/0.9, shifts ~N(0, 1) px (the 20 x 23 footprint
    # with its 3 px border, turned by 45 deg and zoomed out, reaches 18.8 / 0.9 + 3 < 9.5 + 19 - 4 px in y).
    pipe = AugmentPipe()
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(32, 2, *shape, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_()
    G = random_maps(32, 1 / 0.9)
    ref = resample_affine(x, G, pipe.Hz_geom, pipe.geom_shift, impl='ref')
    fast = resample_affine(x, G, pipe.Hz_geom, pipe.geom_shift, impl='fast')
    assert ref.shape == fast.shape == x.shape
    assert (fast - ref).abs().max() < 1e-12
    w = torch.rand_like(ref)
    g_ref, = torch.autograd.grad((ref * w).sum(), x)
    g_fast, = torch.autograd.grad((fast * w).sum(), x)
    assert (g_fast - g_ref).abs().max() < 1e-12


@pytest.mark.parametrize('impl', ['ref', 'fast'])
def test_resample_gradients_of_any_order(impl):
    # R1 differentiates twice through the pass: both paths are linear in the images with exact adjoints.
    pipe = AugmentPipe()
    x = rand_images(2, c=1, size=5, dtype=torch.float64)[:, :, :, :4].requires_grad_()  # 5 x 4
    G = random_maps(2, 1.5, seed=4)
    fn = lambda t: resample_affine(t, G, pipe.Hz_geom, pipe.geom_shift, impl=impl)
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradgradcheck(fn, (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize('impl', ['ref', 'fast'])
def test_resample_margin_is_the_image_size_minus_one(impl):
    # Reflection covers W - 1 px on each side (NVIDIA's cap); further out the sampler reads zeros. Zoom a
    # constant image out by z = 6: output pixel i reads input z (i - c) from the centre c, so the middle
    # of the output reads reflected ones, its rim reads beyond the margin. An output pixel mixes inputs
    # within 3z + 4 px (the downsampling filter spans +-3 output px, the upsampling one +-3 input px).
    size, z = 32, 6
    pipe = AugmentPipe()
    x = torch.ones(1, 1, size, size, dtype=torch.float64)
    G = torch.diag(torch.tensor([z, z, 1.0], dtype=torch.float64))[None]
    out = resample_affine(x, G, pipe.Hz_geom, pipe.geom_shift, impl=impl)[0, 0]
    c = (size - 1) / 2
    r = (torch.arange(size, dtype=torch.float64) - c).abs() * z  # input distance from the centre, per axis
    reach, edge = 3 * z + 4, c + size - 1                          # the padded image ends at c + W - 1
    inner, outer = r <= edge - reach, r >= edge + reach
    assert r[inner].max() > c + 4                                  # centred on reflected pixels
    assert (out[inner][:, inner] - 1).abs().max() < 1e-6             # the float32 taps sum to 1 +- 2e-7
    assert out[outer].abs().max() < 1e-6 and out[:, outer].abs().max() < 1e-6


def test_quarter_turn_of_odd_aspect_images_is_resampled():
    # With W - H odd a quarter turn about the centre lands between pixels: no exact blit exists, so the
    # turn goes to the resampling pass (the only blit that does). Half turns stay exact gathers.
    x = rand_images(64, size=12)[:, :, :, :11]                      # 12 x 11
    out = make_pipe(rotate90=1)(x, debug_percentile=0.6)            # k = 2: a half turn, for every sample
    assert torch.equal(out, torch.rot90(x, 2, dims=(2, 3)))
    ys, xs = centred_grid(24)
    img = blob(xs, ys)[:, 1:].expand(1, 1, 24, 23).float()         # smooth, 24 x 23
    out = make_pipe(rotate90=1)(img, debug_percentile=0.3)[0, 0]   # k = 1: a quarter turn
    # The turned image keeps its centre: output (x, y) reads input (y, -x) in centred coordinates, and with
    # W - H = 1 that falls half a pixel between columns and rows.
    xs_o = torch.arange(23, dtype=torch.float64) - 11
    ys_o = torch.arange(24, dtype=torch.float64) - 11.5
    yy, xx = torch.meshgrid(ys_o, xs_o, indexing='ij')
    src_x, src_y = yy, -xx                                          # inverse of a +90 deg turn, centred
    expected = torch.exp(-((src_x + 0.5 - 4) ** 2 / (2 * 3.0 ** 2) + (src_y + 2) ** 2 / (2 * 2.0 ** 2)))
    assert out.shape == (24, 23)
    assert (out.double() - expected)[6:-6, 6:-6].abs().max() < 0.02
