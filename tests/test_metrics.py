"""Metrics: FID/KID against float64 references, name parsing, the runner with a tiny TorchScript detector,
the real-feature cache, the Inception download/offline path, the taxon detector and calc_metrics.py."""

import io
import json
import os
import zipfile

import numpy as np
import PIL.Image
import pytest
import requests
import scipy.linalg
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import calc_metrics

from stylegan2ada.metrics import (MetricError, calc_metric, frechet_distance, kernel_inception_distance, parse_metric_name,
                                  report_metric)
from stylegan2ada.metrics import detectors as det_mod
from stylegan2ada.metrics.detectors import Detector, DetectorError, resolve_detector
from stylegan2ada.metrics.metric_main import select_detector
from stylegan2ada.networks import Generator
from stylegan2ada.pickles import load_network_pkl, save_network_pkl
from stylegan2ada.training_loop import training_loop
from taxogan_ext.taxon_detector import load_taxon_metadata, train_taxon_classifier
from taxogan_ext.taxon_metrics import calc_taxon_accuracy_on_reals
from training_helpers import tiny_loop_kwargs, write_zip, zip_entry

# The tests save their tiny detectors as TorchScript, which torch now marks deprecated.
pytestmark = pytest.mark.filterwarnings('ignore:`torch.jit:DeprecationWarning', 'ignore::scipy.linalg.LinAlgWarning')


# ----------------------------------------------------------------------------
# Independent float64 references.

def ref_fid(a, b):
    """FID from np.cov (bias=True) and scipy's sqrtm, float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False, bias=True), np.cov(b, rowvar=False, bias=True)
    root = scipy.linalg.sqrtm(s_a @ s_b)
    return float(np.real(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(root)))


def ref_fid_eig(a, b):
    """FID with Tr sqrtm(S_a S_b) = sum sqrt(eig(sqrt(S_a) S_b sqrt(S_a))), a symmetric-eigenvalue route."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    s_a, s_b = np.cov(a, rowvar=False, bias=True), np.cov(b, rowvar=False, bias=True)
    w, v = np.linalg.eigh(s_a)
    half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(half @ s_b @ half)
    return float(np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(s_a) + np.trace(s_b) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


def ref_mmd2(x, y):
    """Unbiased MMD^2 with k(u, v) = (u.v/d + 1)^3, written with an explicit off-diagonal mask."""
    d = x.shape[1]
    kernel = lambda u, v: (u @ v.T / d + 1) ** 3
    off = ~np.eye(len(x), dtype=bool)
    return kernel(x, x)[off].mean() + kernel(y, y)[off].mean() - 2 * kernel(x, y).mean()


def ref_kid(real, gen, num_subsets, max_subset_size, seed):
    real, gen = np.asarray(real, np.float64), np.asarray(gen, np.float64)
    m = min(len(real), len(gen), max_subset_size)
    rnd = np.random.RandomState(seed)
    values = []
    for _ in range(num_subsets):
        x = gen[rnd.choice(len(gen), m, replace=False)]      # documented order: generated rows first
        y = real[rnd.choice(len(real), m, replace=False)]
        values.append(ref_mmd2(x, y))
    return float(np.mean(values))


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch, tmp_path):
    """Nothing may download during the tests: Inception lookups fail fast in an empty cache."""
    monkeypatch.setenv('TAXOGAN_OFFLINE', '1')
    monkeypatch.setenv('TAXOGAN_CACHE', str(tmp_path / 'taxogan-cache'))


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


# ----------------------------------------------------------------------------
# Pure functions.

def test_frechet_distance_matches_float64_references():
    rnd = np.random.RandomState(0)
    a = (rnd.randn(300, 16) @ rnd.randn(16, 16)).astype(np.float32)
    b = (rnd.randn(250, 16) @ rnd.randn(16, 16) * 0.7 + 0.5).astype(np.float32)
    value = frechet_distance(a, b)
    assert _rel(value, ref_fid(a, b)) < 1e-6
    assert _rel(value, ref_fid_eig(a, b)) < 1e-6
    assert value > 1
    assert abs(frechet_distance(a, a)) < 1e-8 * np.trace(np.cov(a, rowvar=False))   # a set against itself


def test_frechet_distance_is_finite_for_singular_covariances():
    # Fewer items than dimensions (quick checks, tiny sets): scipy's sqrtm of the product can give NaN here.
    rnd = np.random.RandomState(2)
    a = rnd.randn(6, 16).astype(np.float32)
    b = (rnd.randn(8, 16) * 1.5 + 0.2).astype(np.float32)
    value = frechet_distance(a, b)
    assert np.isfinite(value) and _rel(value, ref_fid_eig(a, b)) < 1e-6
    assert abs(frechet_distance(a, a)) < 1e-8 * np.trace(np.cov(a, rowvar=False))


def test_kid_matches_direct_mmd_reference():
    rnd = np.random.RandomState(1)
    real = rnd.randn(100, 12).astype(np.float32)
    gen = (rnd.randn(90, 12) * 1.2 + 0.3).astype(np.float32)
    value = kernel_inception_distance(real, gen, num_subsets=7, max_subset_size=40, seed=3)
    assert _rel(value, ref_kid(real, gen, 7, 40, 3)) < 1e-6
    assert value > 0
    assert value == kernel_inception_distance(real, gen, num_subsets=7, max_subset_size=40, seed=3)  # repeats exactly
    assert value != kernel_inception_distance(real, gen, num_subsets=7, max_subset_size=40, seed=4)


def test_kid_is_unbiased():
    rnd = np.random.RandomState(2)
    draws, biased = [], []
    for _ in range(400):
        x, y = rnd.randn(20, 6), rnd.randn(20, 6)      # two samples of one distribution
        draws.append(kernel_inception_distance(x, y, num_subsets=1, max_subset_size=20, seed=0))
        d = x.shape[1]
        biased.append(((x @ x.T / d + 1) ** 3).mean() + ((y @ y.T / d + 1) ** 3).mean() - 2 * ((x @ y.T / d + 1) ** 3).mean())
    mean, sem = np.mean(draws), np.std(draws) / np.sqrt(len(draws))
    assert abs(mean) < 3 * sem
    assert np.mean(biased) > 10 * np.std(biased) / np.sqrt(len(biased))   # keeping the diagonal would be biased upwards


def test_metric_name_parsing():
    # The last field: the detector kind whose suffix the name carries (taxogan_ext registers 'taxon' and acc).
    assert tuple(parse_metric_name('fid50k_full')) == ('fid50k_full', 'fid', 50000, True, None)
    assert tuple(parse_metric_name('kid50k')) == ('kid50k', 'kid', 50000, False, None)
    assert tuple(parse_metric_name('fid2k_full_taxon')) == ('fid2k_full_taxon', 'fid', 2000, True, 'taxon')
    assert tuple(parse_metric_name('kid500')) == ('kid500', 'kid', 500, False, None)
    assert tuple(parse_metric_name('acc_taxon')) == ('acc_taxon', 'acc', 10000, False, 'taxon')
    assert tuple(parse_metric_name('acc2k_taxon')) == ('acc2k_taxon', 'acc', 2000, False, 'taxon')
    for bad in ['fid', 'fid50k_taxon_full', 'acc', 'acc2k', 'is50k', 'fid0k', 'kid5k_full_extra', 'FID50k']:
        with pytest.raises(MetricError) as exc:
            parse_metric_name(bad)
        assert 'valid forms' in str(exc.value) and '\n' not in str(exc.value)
    # The forms are assembled from the registered families (the engine's first) and detector kinds.
    assert str(exc.value).endswith('valid forms: fid<N>[k][_full][_taxon], kid<N>[k][_full][_taxon], '
                                   'pr<N>[k]3[_full][_taxon], dc<N>[k][_full][_taxon], mem<N>[k][_taxon], acc[<N>[k]]_taxon '
                                   '(e.g. fid50k_full, kid50k_full, fid2k, kid5k_full_taxon, pr50k3_full, dc10k_full, mem1k, '
                                   'acc_taxon)')


# ----------------------------------------------------------------------------
# A tiny TorchScript detector, fake generators, tiny datasets.

class TinyDetector(torch.nn.Module):
    """Features: the 2x2 block means and the per-channel standard deviation of the image in [0, 1]."""

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert img.dtype == torch.uint8 and img.shape[1] == 3
        x = img.to(torch.float32) / 255
        return torch.cat([F.adaptive_avg_pool2d(x, 2).flatten(1), x.std(dim=[2, 3])], dim=1)


def tiny_features_numpy(images):
    """The same features computed in numpy float64 from uint8 [N, C, H, W] (C repeated to 3)."""
    x = np.asarray(images, np.float64) / 255
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    n, c, h, w = x.shape
    blocks = x.reshape(n, c, 2, h // 2, 2, w // 2).mean(axis=(3, 5)).reshape(n, c * 4)
    return np.concatenate([blocks, x.reshape(n, c, -1).std(axis=2, ddof=1)], axis=1)


class Inception2048(torch.nn.Module):
    """Stands in for NVIDIA's file in the download test: returns [N, 2048]."""

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return img.to(torch.float32).mean(dim=[2, 3]).repeat(1, 683)[:, :2048]


class FakeG(torch.nn.Module):
    """Image bank[class] (+ z[:, 0] * z_scale, + random noise * noise_scale)."""

    def __init__(self, bank, c_dim=0, z_scale=0.0, noise_scale=0.0):
        super().__init__()
        self.register_buffer('bank', torch.as_tensor(bank, dtype=torch.float32))   # [K, C, H, W] in [-1, 1]
        self.z_dim, self.c_dim = 4, c_dim
        self.img_channels, self.img_resolution = self.bank.shape[1], self.bank.shape[2]
        self.z_scale, self.noise_scale = z_scale, noise_scale

    def forward(self, z, c, truncation_psi=1, noise_mode='random'):
        assert truncation_psi == 1 and noise_mode == 'random'   # the protocol
        index = c.argmax(dim=1) if self.c_dim else torch.zeros(len(z), dtype=torch.int64)
        out = self.bank[index] + self.z_scale * z[:, :1, None, None]
        if self.noise_scale:
            out = out + self.noise_scale * torch.randn_like(out)
        return out


def _png(array_hwc):
    buf = io.BytesIO()
    PIL.Image.fromarray(array_hwc[:, :, 0] if array_hwc.shape[2] == 1 else array_hwc).save(buf, format='PNG')
    return buf.getvalue()


def _write_dataset(path, images, classes=None, label_names=None):
    """uint8 images [N, C, H, W] -> a dataset zip (with dataset.json when classes are given)."""
    with zipfile.ZipFile(path, 'w') as zf:
        for i, img in enumerate(images):
            zf.writestr(zip_entry(f'img{i:08d}.png'), _png(np.ascontiguousarray(img.transpose(1, 2, 0))))
        if classes is not None:
            meta = {'labels': [[f'img{i:08d}.png', int(c)] for i, c in enumerate(classes)]}
            if label_names is not None:
                meta['label_names'] = label_names
            zf.writestr(zip_entry('dataset.json'), json.dumps(meta))
    return str(path)


@pytest.fixture
def tiny_detector(tmp_path):
    path = tmp_path / 'tiny_detector.pt'
    torch.jit.save(torch.jit.script(TinyDetector()), str(path))
    return str(path)


def _real_images(n=12, channels=3, size=16, seed=0):
    rnd = np.random.RandomState(seed)
    base = rnd.randint(0, 256, size=[n, channels, 1, 1])
    return np.clip(base + rnd.randint(-60, 61, size=[n, channels, size, size]), 0, 255).astype(np.uint8)


def _expected_uint8(bank_image):
    """The protocol's conversion, written out in numpy (float32 arithmetic, as on the float32 images)."""
    return np.clip(np.asarray(bank_image, np.float32) * np.float32(127.5) + np.float32(128), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------
# The runner.

@pytest.mark.parametrize('channels', [3, 1])
def test_fid_and_kid_of_constant_generator_match_hand_computation(tmp_path, tiny_detector, channels):
    reals = _real_images(channels=channels)
    data = _write_dataset(tmp_path / 'reals.zip', reals)
    bank = np.linspace(-0.9, 0.8, channels * 16 * 16, dtype=np.float32).reshape(1, channels, 16, 16)
    G = FakeG(bank)
    kwargs = dict(path=data, use_labels=False, xflip=False)

    fid = calc_metric('fid40_full', G, kwargs, detector=tiny_detector, device='cpu', progress=False, cache_dir=str(tmp_path / 'c'), batch_size=5)
    f_real = tiny_features_numpy(reals)
    f_gen = tiny_features_numpy(_expected_uint8(bank))[0]
    # Every generated image is the same: S_g = 0, so FID = |mu_g - mu_r|^2 + Tr(S_r).
    expected = np.sum((f_gen - f_real.mean(0)) ** 2) + np.trace(np.cov(f_real, rowvar=False, bias=True))
    assert fid['metric'] == 'fid40_full' and fid['num_real'] == 12 and fid['num_gen'] == 40
    assert _rel(fid['results']['fid40_full'], expected) < 1e-5

    kid = calc_metric('kid40_full', G, kwargs, detector=tiny_detector, device='cpu', progress=False, cache_dir=str(tmp_path / 'c'), batch_size=5)
    # Subsets hold all 12 reals (m = 12), so the value does not depend on which ones are drawn.
    d = f_real.shape[1]
    k_gg = (f_gen @ f_gen / d + 1) ** 3
    k_rr = (f_real @ f_real.T / d + 1) ** 3
    k_gr = (f_real @ f_gen / d + 1) ** 3
    expected_kid = k_gg + k_rr[~np.eye(12, dtype=bool)].mean() - 2 * k_gr.mean()
    assert _rel(kid['results']['kid40_full'], expected_kid) < 1e-5


def test_generated_images_repeat_with_the_seed(tmp_path, tiny_detector):
    data = _write_dataset(tmp_path / 'reals.zip', _real_images())
    G = FakeG(np.zeros([1, 3, 16, 16], np.float32), z_scale=0.3, noise_scale=0.2)
    kwargs = dict(path=data)
    run = lambda seed: calc_metric('kid30', G, kwargs, detector=tiny_detector, device='cpu', progress=False,
                                   cache_dir=str(tmp_path / 'c'), batch_size=7, seed=seed)['results']['kid30']
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = run(0)
    assert torch.equal(torch.get_rng_state(), state)   # the caller's random state is left alone
    assert run(0) == first and run(1) != first


def test_conditional_generator_draws_labels_from_the_dataset(tmp_path, tiny_detector):
    reals = _real_images(n=10)
    classes = [0, 0, 0, 0, 0, 0, 0, 1, 1, 1]
    data = _write_dataset(tmp_path / 'reals.zip', reals, classes)
    bank = np.stack([np.full([3, 16, 16], -0.5, np.float32), np.full([3, 16, 16], 0.5, np.float32)])
    G = FakeG(bank, c_dim=2)
    fid = calc_metric('fid2000', G, dict(path=data, use_labels=True), detector=tiny_detector, device='cpu', progress=False,
                      cache_dir=str(tmp_path / 'c'), batch_size=500)
    # Generated features take two values with frequencies near 0.7 / 0.3: FID from that mixture.
    f_real = tiny_features_numpy(reals)
    f0, f1 = tiny_features_numpy(_expected_uint8(bank))
    p = 0.7
    mu_g = p * f0 + (1 - p) * f1
    s_g = p * (1 - p) * np.outer(f0 - f1, f0 - f1)
    s_r = np.cov(f_real, rowvar=False, bias=True)
    expected = np.sum((mu_g - f_real.mean(0)) ** 2) + np.trace(s_g + s_r - 2 * np.real(scipy.linalg.sqrtm(s_g @ s_r)))
    assert abs(fid['results']['fid2000'] - expected) < 0.05 * expected
    with pytest.raises(MetricError) as exc:   # labels off -> the conditional G cannot be fed
        calc_metric('fid10', G, dict(path=data), detector=tiny_detector, device='cpu', progress=False, cache_dir=str(tmp_path / 'c'))
    assert 'reals.zip' in str(exc.value) and 'conditional' in str(exc.value)


class CountingDetector(Detector):
    """Counts the images passed to the detector."""

    def __init__(self, path):
        super().__init__('file', path)
        self.seen = 0

    def features(self, images, device):
        self.seen += len(images)
        return super().features(images, device)


def test_real_features_are_cached(tmp_path, tiny_detector):
    data = _write_dataset(tmp_path / 'reals.zip', _real_images(n=9))
    G = FakeG(np.zeros([1, 3, 16, 16], np.float32), z_scale=0.5)
    detector = CountingDetector(tiny_detector)
    run = lambda metric: calc_metric(metric, G, dict(path=data), detector=detector, device='cpu', progress=False,
                                     cache_dir=str(tmp_path / 'cache'), batch_size=4)['results'][metric]
    first = run('fid20_full')
    assert detector.seen == 9 + 20
    assert run('fid20_full') == first and detector.seen == 9 + 20 + 20   # second run: only the generated images
    assert len(os.listdir(tmp_path / 'cache' / 'gan-metrics')) == 1
    run('kid20_full')                                                    # other statistics (all rows): a new entry
    assert detector.seen == 9 + 20 + 20 + 9 + 20
    # Other dataset content -> another key, computed afresh.
    other = _write_dataset(tmp_path / 'other' / 'reals.zip', _real_images(n=9, seed=5)) if (tmp_path / 'other').mkdir() is None else None
    calc_metric('fid20_full', G, dict(path=other), detector=detector, device='cpu', progress=False, cache_dir=str(tmp_path / 'cache'), batch_size=4)
    assert detector.seen == 9 + 20 + 20 + 9 + 20 + 9 + 20
    assert len(os.listdir(tmp_path / 'cache' / 'gan-metrics')) == 3


def test_full_metrics_ignore_mirroring_and_subsets(tmp_path, tiny_detector):
    reals = _real_images(n=8)
    data = _write_dataset(tmp_path / 'reals.zip', reals)
    G = FakeG(np.zeros([1, 3, 16, 16], np.float32), z_scale=0.5)
    common = dict(detector=tiny_detector, device='cpu', progress=False, cache_dir=str(tmp_path / 'c'))
    plain = calc_metric('fid16_full', G, dict(path=data), **common)
    mirrored = calc_metric('fid16_full', G, dict(path=data, xflip=True, max_size=3), **common)
    assert mirrored['num_real'] == 8 and mirrored['results'] == plain['results']
    partial = calc_metric('fid16', G, dict(path=data, xflip=True), **common)
    assert partial['num_real'] == 16                                      # x-flip as configured: 8 images, twice
    subset = calc_metric('fid16', G, dict(path=data, xflip=True, max_size=3), **common)
    assert subset['num_real'] == 16 and subset['results'] == partial['results']   # the training subset is not used


def test_report_metric_appends_json_lines(tmp_path, tiny_detector):
    data = _write_dataset(tmp_path / 'reals.zip', _real_images(n=6))
    G = FakeG(np.zeros([1, 3, 16, 16], np.float32), z_scale=0.5)
    result = calc_metric('fid8_full', G, dict(path=data), detector=tiny_detector, device='cpu', progress=False, cache_dir=str(tmp_path / 'c'))
    path = report_metric(result, str(tmp_path / 'run'), str(tmp_path / 'run' / 'network-snapshot-000004.pkl'))
    report_metric(result, str(tmp_path / 'run'), None)
    lines = [json.loads(line) for line in open(path, encoding='utf-8')]
    assert os.path.basename(path) == 'metric-fid8_full.jsonl' and len(lines) == 2
    assert lines[0]['results'] == result['results'] and lines[0]['snapshot_pkl'] == 'network-snapshot-000004.pkl'
    assert lines[1]['snapshot_pkl'] is None and lines[0]['num_gpus'] == 1


# ----------------------------------------------------------------------------
# Detectors: resolving, the Inception download, offline use.

def test_resolve_detector_and_naming(tmp_path, tiny_detector):
    with pytest.raises(DetectorError) as exc:
        resolve_detector(str(tmp_path / 'missing.pt'))
    assert 'missing.pt' in str(exc.value) and '\n' not in str(exc.value)
    with pytest.raises(DetectorError) as exc:
        resolve_detector(f'taxon:{tiny_detector}')
    assert 'not a taxon detector' in str(exc.value)
    plain = resolve_detector(tiny_detector)
    assert plain.kind == 'file' and plain.suffix == '' and plain.id.startswith('tiny_detector-')
    assert plain.class_names is None                    # a feature extractor, not a classifier
    with pytest.raises(DetectorError) as exc:
        plain.predict(torch.zeros([1, 3, 16, 16], dtype=torch.uint8), 'cpu')
    assert 'not a classifier' in str(exc.value) and '\n' not in str(exc.value)
    spec = parse_metric_name('fid2k_full_taxon')
    with pytest.raises(MetricError) as exc:
        select_detector(spec, [tiny_detector])
    assert 'taxon detector' in str(exc.value)


def _fake_requests_get(payload, fail=False):
    class Response:
        headers = {'Content-Length': str(len(payload))}

        def __enter__(self):
            return self

        def __exit__(self, *args):
            return False

        def raise_for_status(self):
            pass

        def iter_content(self, chunk_size):
            for start in range(0, len(payload), chunk_size):
                yield payload[start:start + chunk_size]

    def get(url, stream, timeout):
        assert url == det_mod.INCEPTION_URL and stream
        if fail:
            raise requests.ConnectionError('no network')
        return Response()
    return get


def test_inception_offline_error_names_path_and_url(tmp_path, monkeypatch):
    monkeypatch.setenv('TAXOGAN_CACHE', str(tmp_path / 'cache'))
    monkeypatch.delenv('TAXOGAN_OFFLINE', raising=False)
    monkeypatch.setattr(requests, 'get', _fake_requests_get(b'', fail=True))
    expected_path = str(tmp_path / 'cache' / 'inception-2015-12-05.pt')
    with pytest.raises(DetectorError) as exc:
        _ = resolve_detector('inception').id
    message = str(exc.value)
    assert '\n' not in message and expected_path in message and det_mod.INCEPTION_URL in message and 'download failed' in message
    monkeypatch.setenv('TAXOGAN_OFFLINE', '1')
    with pytest.raises(DetectorError) as exc:
        _ = resolve_detector('inception').path
    assert expected_path in str(exc.value) and det_mod.INCEPTION_URL in str(exc.value)
    assert not os.path.exists(expected_path) and os.listdir(tmp_path / 'cache') == []   # no partial files left


def test_inception_download_verifies_and_records_checksum(tmp_path, monkeypatch):
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(Inception2048()), buf)
    payload = buf.getvalue()
    monkeypatch.delenv('TAXOGAN_OFFLINE', raising=False)
    wrong = io.BytesIO()
    torch.jit.save(torch.jit.script(TinyDetector()), wrong)        # 15 features, not 2048: refused, nothing kept
    monkeypatch.setattr(requests, 'get', _fake_requests_get(wrong.getvalue()))
    with pytest.raises(DetectorError) as exc:
        det_mod.inception_path(str(tmp_path), progress=False)
    assert 'not a usable Inception' in str(exc.value) and os.listdir(tmp_path) == []
    monkeypatch.setattr(requests, 'get', _fake_requests_get(payload))
    path = det_mod.inception_path(str(tmp_path), progress=False)
    sha = det_mod.hashlib.sha256(payload).hexdigest()
    assert open(path, 'rb').read() == payload
    assert open(path + '.sha256').read().split()[0] == sha
    detector = Detector('inception', cache_dir=str(tmp_path))
    assert detector.id == f'inception-2015-12-05-{sha[:16]}'
    assert detector.features(torch.zeros([2, 1, 8, 8], dtype=torch.uint8), 'cpu').shape == (2, 2048)
    with open(path, 'ab') as f:       # a changed file is refused
        f.write(b'x')
    with pytest.raises(DetectorError) as exc:
        det_mod.inception_path(str(tmp_path), progress=False)
    assert 'differs' in str(exc.value) and path in str(exc.value)
    # A wrong checksum during download leaves nothing behind.
    with pytest.raises(DetectorError):
        det_mod.download_file(det_mod.INCEPTION_URL, str(tmp_path / 'other.pt'), expected_sha256='0' * 64, progress=False)
    assert not (tmp_path / 'other.pt').exists() and not [f for f in os.listdir(tmp_path) if f.startswith('.tmp')]


# ----------------------------------------------------------------------------
# The taxon detector.

TAXA = ('Alpha', 'Beta', 'Gamma')


def _taxon_images(k, n, seed, contrast=1.0, noise=12):
    """Three kinds of 16 px images, unchanged in kind by flips and quarter turns (contrast < 1: fainter patterns)."""
    rnd = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:16, 0:16]
    out = []
    for _ in range(n):
        if k == 0:
            pattern = ((yy // 2 + xx // 2) % 2) * 200 + 30                       # checkerboard
        elif k == 1:
            pattern = 220 * np.exp(-((yy - 7.5) ** 2 + (xx - 7.5) ** 2) / 18)    # bright blob on dark
        else:
            pattern = np.full([16, 16], 120.0)                                   # flat grey
        if contrast != 1:
            pattern = 120 + contrast * (pattern - 120)
        tint = rnd.uniform(0.8, 1.2, size=[3, 1, 1])
        img = pattern[None] * tint + rnd.normal(0, noise, size=[3, 16, 16])
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)


@pytest.fixture(scope='module')
def taxon_setup(tmp_path_factory):
    """Datasets folder (3 leaf taxa + their parent with labels, manifest) and a trained taxon detector."""
    root = tmp_path_factory.mktemp('datasets')
    per_class = [_taxon_images(k, 20, seed=k) for k in range(3)]
    taxa_entries = {'Root': {'rank': 'class', 'parent': None, 'children': list(TAXA), 'dataset': 'Root.zip',
                             'num_images': 60, 'num_images_direct': 0, 'labels': list(TAXA), 'sha256': ''}}
    for k, name in enumerate(TAXA):
        _write_dataset(root / f'{name}.zip', per_class[k])
        taxa_entries[name] = {'rank': 'order', 'parent': 'Root', 'children': [], 'dataset': f'{name}.zip',
                              'num_images': 20, 'num_images_direct': 20, 'labels': None, 'sha256': ''}
    _write_dataset(root / 'Root.zip', np.concatenate(per_class), classes=np.repeat(np.arange(3), 20))
    manifest = {'format': 'taxogan-datasets/1', 'ranks': ['class', 'order'], 'resolution': 16, 'channels': 3,
                'options': {}, 'taxa': taxa_entries, 'dropped': [], 'dropped_counts': {}}
    (root / 'manifest.json').write_text(json.dumps(manifest))
    out = root.parent / 'taxon.pt'
    meta = train_taxon_classifier(str(root), str(out), resolution=16, epochs=12, batch_size=16, channels=(16, 32),
                                  lr=3e-3, heldout_fraction=0.25, progress=False)
    return root, str(out), meta, per_class


def test_taxon_detector_trains_and_acc_on_heldout_reals_equals_its_accuracy(taxon_setup):
    root, path, meta, per_class = taxon_setup
    assert meta['class_names'] == list(TAXA) and meta['num_heldout'] == 15 and meta['num_train'] == 45
    assert meta['heldout_accuracy'] >= 0.9
    module = torch.jit.load(path)
    assert module.get_class_names() == list(TAXA) and list(module.class_names) == list(TAXA)
    assert module.heldout_accuracy == pytest.approx(meta['heldout_accuracy'])
    assert module(torch.zeros([2, 3, 32, 32], dtype=torch.uint8), return_features=True).shape == (2, 32)
    reals = calc_taxon_accuracy_on_reals(f'taxon:{path}', data=str(root), device='cpu', progress=False)
    # The metric path (files -> uint8 -> TorchScript) reproduces the training-time held-out accuracy.
    assert reals['acc_taxon'] == meta['heldout_accuracy'] and reals['num_images'] == 15
    assert reals['per_taxon'] == pytest.approx(meta['heldout_accuracy_per_class'])
    plain = resolve_detector(path)          # a taxon file given as a plain path keeps the _taxon suffix
    assert (plain.kind, plain.suffix, plain.spec) == ('taxon', '_taxon', f'taxon:{path}')
    assert plain.class_names == list(TAXA)
    image = per_class[2][0]
    assert plain.predict(torch.from_numpy(image[None]), 'cpu').tolist() == [_prediction(path, image)]


def _prediction(path, image_uint8):
    module = torch.jit.load(path)
    return int(module.logits(torch.from_numpy(image_uint8[None])).argmax())


def test_acc_taxon_of_generators(taxon_setup, tmp_path):
    root, path, _, per_class = taxon_setup
    # Unconditional G that always draws one Beta image: acc_taxon is 1 against Beta.zip iff the classifier says Beta.
    beta_image = per_class[1][0]
    bank = (beta_image.astype(np.float32)[None] - 127.5) / 127.5
    G = FakeG(bank)
    common = dict(detector=f'taxon:{path}', device='cpu', progress=False, cache_dir=str(tmp_path / 'c'))
    for zip_name, taxon_index in [('Beta.zip', 1), ('Gamma.zip', 2)]:
        result = calc_metric('acc50_taxon', G, dict(path=str(root / zip_name)), **common)
        expected = float(_prediction(path, _expected_uint8(bank[0])) == taxon_index)
        assert result['results'] == {'acc50_taxon': expected} and result['num_gen'] == 50
    assert calc_metric('acc50_taxon', G, dict(path=str(root / 'Gamma.zip')), taxon='Beta', **common)['results']['acc50_taxon'] == \
        float(_prediction(path, _expected_uint8(bank[0])) == 1)
    # Conditional G over Root's classes: image of class c is an image of taxon c, except Gamma gets a Beta image.
    images = [per_class[0][1], per_class[1][1], per_class[1][2]]
    cond_bank = (np.stack(images).astype(np.float32) - 127.5) / 127.5
    Gc = FakeG(cond_bank, c_dim=3)
    result = calc_metric('acc300_taxon', Gc, dict(path=str(root / 'Root.zip'), use_labels=True), **common)
    hits = [float(_prediction(path, _expected_uint8(cond_bank[k])) == k) for k in range(3)]
    assert result['per_taxon'] == {name: hits[k] for k, name in enumerate(TAXA)}
    # Labels are drawn uniformly from 60 images (20 per class): the overall share is the mixture of the three.
    assert abs(result['results']['acc300_taxon'] - np.mean(hits)) <= 0.12
    # Root.zip has no label_names (the names came from the manifest); a zip that carries them needs no manifest.
    (tmp_path / 'alone').mkdir()
    alone = _write_dataset(tmp_path / 'alone' / 'Root.zip', np.concatenate(per_class), classes=np.repeat(np.arange(3), 20),
                           label_names=list(TAXA))
    again = calc_metric('acc300_taxon', Gc, dict(path=alone, use_labels=True), **common)
    assert again['results'] == result['results'] and again['per_taxon'] == result['per_taxon']
    with pytest.raises(MetricError) as exc:
        calc_metric('acc50_taxon', G, dict(path=str(root / 'Root.zip')), **common)   # Root is above the classes
    assert "'Root'" in str(exc.value)


def test_fid_with_taxon_detector_gets_the_suffix(taxon_setup, tmp_path):
    root, path, _, _ = taxon_setup
    G = FakeG(np.zeros([1, 3, 16, 16], np.float32), z_scale=0.5)
    result = calc_metric('fid30_full', G, dict(path=str(root / 'Alpha.zip')), detector=f'taxon:{path}', device='cpu',
                         progress=False, cache_dir=str(tmp_path / 'c'))
    assert result['metric'] == 'fid30_full_taxon' and list(result['results']) == ['fid30_full_taxon']
    assert result['results']['fid30_full_taxon'] > 0


# ----------------------------------------------------------------------------
# calc_metrics.py with real network pickles.

def _tiny_pickle(path, dataset_kwargs, c_dim=0):
    torch.manual_seed(0)
    G = Generator(z_dim=8, c_dim=c_dim, w_dim=8, img_resolution=16, img_channels=3, mapping_kwargs=dict(num_layers=2),
                  synthesis_kwargs=dict(channel_base=64, channel_max=16))
    save_network_pkl(str(path), dict(G=G, D=None, G_ema=G, augment_pipe=None, training_set_kwargs=dataset_kwargs))
    return G


def _read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding='utf-8')]


def test_calc_metrics_cli_with_tiny_detector(tmp_path, tiny_detector):
    data = _write_dataset(tmp_path / 'reals.zip', _real_images(n=10))
    _tiny_pickle(tmp_path / 'run' / 'network-snapshot-000000.pkl', dict(path=data, use_labels=False, xflip=False))
    pkl = str(tmp_path / 'run' / 'network-snapshot-000000.pkl')
    G = load_network_pkl(pkl)['G_ema']          # the generator exactly as the CLI sees it
    args = ['--network', pkl, '--metrics', 'fid24_full,kid24_full', '--detector', tiny_detector, '--cache', str(tmp_path / 'c'),
            '--device', 'cpu', '--batch', '5', '--quiet']
    out = CliRunner().invoke(calc_metrics.main, args)
    assert out.exit_code == 0, out.output
    fid_line = _read_jsonl(tmp_path / 'run' / 'metric-fid24_full.jsonl')[0]
    kid_line = _read_jsonl(tmp_path / 'run' / 'metric-kid24_full.jsonl')[0]
    direct = calc_metric('fid24_full', G, dict(path=data), detector=tiny_detector, device='cpu', progress=False,
                         cache_dir=str(tmp_path / 'c2'), batch_size=5)
    assert fid_line['results']['fid24_full'] == pytest.approx(direct['results']['fid24_full'], rel=1e-9)
    assert fid_line['snapshot_pkl'] == 'network-snapshot-000000.pkl' and 'kid24_full' in kid_line['results']
    assert 'fid24_full' in out.output

    # Two CPU processes (gloo): the same images (up to the rounding of another thread count) -> the same value.
    out2 = CliRunner().invoke(calc_metrics.main, args[:3] + ['fid24_full', '--gpus', '2', '--run-dir', str(tmp_path / 'run2')] + args[4:])
    assert out2.exit_code == 0, out2.output
    two = _read_jsonl(tmp_path / 'run2' / 'metric-fid24_full.jsonl')[0]
    assert two['num_gpus'] == 2 and two['results']['fid24_full'] == pytest.approx(fid_line['results']['fid24_full'], rel=1e-4)


def test_calc_metrics_cli_errors(tmp_path, tiny_detector, monkeypatch):
    data = _write_dataset(tmp_path / 'reals.zip', _real_images(n=4))
    _tiny_pickle(tmp_path / 'net.pkl', dict(path=data))
    pkl = str(tmp_path / 'net.pkl')
    monkeypatch.setenv('TAXOGAN_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setenv('TAXOGAN_OFFLINE', '1')
    cases = [
        (['--network', str(tmp_path / 'nope.pkl'), '--detector', tiny_detector], 'nope.pkl'),
        (['--network', pkl, '--metrics', 'fid5k_bogus', '--detector', tiny_detector], 'valid forms'),
        (['--network', pkl, '--data', str(tmp_path / 'missing.zip'), '--detector', tiny_detector], 'missing.zip'),
        (['--network', pkl, '--metrics', 'fid10_full'], str(tmp_path / 'cache' / 'inception-2015-12-05.pt')),
        (['--network', pkl, '--metrics', 'acc_taxon', '--detector', tiny_detector], 'taxon detector'),
    ]
    for args, expected in cases:
        out = CliRunner().invoke(calc_metrics.main, args + ['--device', 'cpu', '--quiet'])
        assert out.exit_code == 1 and out.output.startswith('Error: ') and expected in out.output, out.output
        assert len(out.output.strip().splitlines()) == 1


def test_calc_metrics_cli_taxon_end_to_end_offline(tmp_path, monkeypatch):
    monkeypatch.setenv('TAXOGAN_OFFLINE', '1')
    monkeypatch.setenv('TAXOGAN_CACHE', str(tmp_path / 'cache'))
    root = tmp_path / 'datasets'
    root.mkdir()
    for k, name in enumerate(TAXA):
        _write_dataset(root / f'{name}.zip', _taxon_images(k, 12, seed=10 + k))
    manifest = {'format': 'taxogan-datasets/1', 'ranks': ['class', 'order'], 'resolution': 16, 'channels': 3, 'taxa': {
        name: {'rank': 'order', 'parent': None, 'children': [], 'dataset': f'{name}.zip', 'num_images': 12,
               'num_images_direct': 12, 'labels': None, 'sha256': ''} for name in TAXA}}
    (root / 'manifest.json').write_text(json.dumps(manifest))
    out = CliRunner().invoke(calc_metrics.main, ['train-detector', '--data', str(root), '--out', str(tmp_path / 't.pt'),
                                                 '--res', '16', '--epochs', '8', '--batch', '16', '--device', 'cpu'])
    assert out.exit_code == 0, out.output
    meta = load_taxon_metadata(str(tmp_path / 't.pt'))
    assert f'held-out accuracy: {meta["heldout_accuracy"]:.4f}' in out.output
    assert f'acc_taxon of the held-out real images: {meta["heldout_accuracy"]:.4f}' in out.output

    _tiny_pickle(tmp_path / 'run' / 'net.pkl', dict(path=str(root / 'Beta.zip')))
    args = ['--network', str(tmp_path / 'run' / 'net.pkl'), '--metrics', 'fid20_full,acc20_taxon', '--detector', f'taxon:{tmp_path / "t.pt"}',
            '--device', 'cpu', '--quiet']
    out = CliRunner().invoke(calc_metrics.main, args)
    assert out.exit_code == 0, out.output
    fid = _read_jsonl(tmp_path / 'run' / 'metric-fid20_full_taxon.jsonl')[0]
    acc = _read_jsonl(tmp_path / 'run' / 'metric-acc20_taxon.jsonl')[0]
    assert fid['results']['fid20_full_taxon'] > 0 and 0 <= acc['results']['acc20_taxon'] <= 1
    assert acc['per_taxon'].keys() == {'Beta'} and acc['num_gen'] == 20
    out = CliRunner().invoke(calc_metrics.main, ['eval-detector', '--detector', str(tmp_path / 't.pt'), '--device', 'cpu'])
    assert out.exit_code == 0 and f'recorded held-out accuracy: {meta["heldout_accuracy"]:.4f}' in out.output


def test_training_loop_evaluates_each_snapshot(tmp_path, tiny_detector):
    # The training hook (train.py --metrics) gives the same number as calc_metric on the snapshot it names.
    data = write_zip(tmp_path / 'd.zip', num_images=8)
    run_dir = tmp_path / 'run'
    training_loop(**tiny_loop_kwargs(data, run_dir, metrics=['fid8_full', 'kid8_full'], detector=tiny_detector))
    lines = [json.loads(line) for line in open(run_dir / 'metric-fid8_full.jsonl', encoding='utf-8')]
    assert [line['snapshot_pkl'] for line in lines] == ['network-snapshot-000000.pkl'] * 3    # one per snapshot tick
    assert (run_dir / 'metric-kid8_full.jsonl').read_text().count('\n') == 3
    G = load_network_pkl(run_dir / 'network-snapshot-000000.pkl')['G_ema']
    again = calc_metric('fid8_full', G, dict(path=data), detector=tiny_detector, device='cpu', progress=False,
                        cache_dir=str(tmp_path / 'c'))
    assert np.isfinite(lines[-1]['results']['fid8_full'])
    assert again['results']['fid8_full'] == pytest.approx(lines[-1]['results']['fid8_full'], rel=1e-6)


def test_taxon_detector_training_repeats_exactly(taxon_setup, tmp_path):
    # Dropout draws from torch's global RNG: seeded inside the trainer, so a second training gives the same weights
    # (and so the same _taxon metrics), whatever the caller did to the RNG before; the caller's state is kept.
    # Both trainings run here, with the same thread count (float sums depend on it).
    root = taxon_setup[0]
    paths = [tmp_path / 'first.pt', tmp_path / 'second.pt']
    for seed, path in zip([1, 12345], paths):
        torch.manual_seed(seed)
        torch.rand(7)
        state = torch.get_rng_state()
        train_taxon_classifier(str(root), str(path), resolution=16, epochs=4, batch_size=16, channels=(16, 32),
                               lr=3e-3, heldout_fraction=0.25, progress=False)
        assert torch.equal(torch.get_rng_state(), state)
    first, second = (torch.jit.load(str(p)).state_dict() for p in paths)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_class_weights_give_every_class_the_same_total_weight():
    # Inverse frequency, normalised so that the weights average 1 over the images: 6, 2 and 1 images of three classes
    # weigh 0.5, 1.5 and 3, and each class then counts 3 in the loss, as a 150-image order counts as a 900-image one.
    from taxogan_ext.taxon_detector import class_weights
    labels = torch.tensor([0] * 6 + [1] * 2 + [2])
    weights = class_weights(labels, ['A', 'B', 'C'], 'test')
    assert torch.allclose(weights, torch.tensor([0.5, 1.5, 3.0]))
    assert torch.allclose(weights[labels].sum(), torch.tensor(9.0))
    with pytest.raises(DetectorError, match='test: no training images for C'):
        class_weights(torch.tensor([0, 1]), ['A', 'B', 'C'], 'test')
