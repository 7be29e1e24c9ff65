"""Tests of the ADA augmentation pipe: each transform against a hand-computed reference or a law."""

import inspect
import math

import numpy as np
import pytest
import torch

from stylegan2ada.augment import PRESETS, TRANSFORMS, AugmentPipe, grid_sample_bilinear


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


def test_probability_is_p_times_multiplier():
    n = 2000
    x = rand_images(n, size=4)
    for p, mult in [(0.3, 1.0), (0.8, 0.5)]:
        changed = (make_pipe(p, brightness=mult)(x) != x).flatten(1).any(dim=1).sum().item()
        assert binomial_ok(changed, n, p * mult), (p, mult, changed)


def test_rotate_split_keeps_total_probability():
    # Pre- and post-rotation each fire with 1 - sqrt(1 - p): at least one fires with probability p.
    n = 600
    x = rand_images(n, c=1, size=8)
    changed = ((make_pipe(0.5, rotate=1)(x) - x).abs().flatten(1).amax(dim=1) > 1e-4).sum().item()
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
