"""k-NN metrics: precision / recall, density / coverage and data copying against float64 brute force on full distance
matrices; their metric families (names, VGG16 dispatch, _taxon variants); metrics of image sets (calc_metrics.py --images)."""

import io
import json
import os
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import calc_metrics

from stylegan2ada.metrics import (ImageSet, MetricError, calc_metric, density_coverage, mann_whitney_z, memorisation,
                                  nearest_neighbour_distances, parse_metric_name, precision_recall)
from stylegan2ada.metrics import detectors as det_mod
from stylegan2ada.metrics.detectors import DetectorError, resolve_detector
from stylegan2ada.metrics.metric_utils import batch_seed, generate_batch
from stylegan2ada.networks import Generator
from stylegan2ada.pickles import load_network_pkl, save_network_pkl
from taxogan_ext.taxon_detector import train_taxon_classifier
from test_metrics import _no_downloads  # noqa: F401  (autouse: nothing may download; detector lookups fail fast)
from training_helpers import zip_entry

pytestmark = pytest.mark.filterwarnings('ignore:`torch.jit:DeprecationWarning')


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


# ----------------------------------------------------------------------------
# Brute-force float64 references: the full distance matrix, written with explicit differences.

def ref_distances(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=2))       # [N, M]


def ref_radii(x, k):
    d = ref_distances(x, x)
    np.fill_diagonal(d, np.inf)                                                 # a point is not its own neighbour
    return np.sort(d, axis=1)[:, k - 1]


def ref_precision_recall(real, gen, k):
    d = ref_distances(gen, real)                                                # [M, N]
    precision = (d <= ref_radii(real, k)[None, :]).any(axis=1).mean()
    recall = (d.T <= ref_radii(gen, k)[None, :]).any(axis=1).mean()
    return precision, recall


def ref_density_coverage(real, gen, k):
    d = ref_distances(gen, real)                                                # [M, N]
    inside = d <= ref_radii(real, k)[None, :]
    return inside.sum() / (k * len(gen)), inside.any(axis=0).mean()


def _features(seed, n_real=83, n_gen=61, dim=6):
    rnd = np.random.RandomState(seed)
    real = rnd.randn(n_real, dim) @ rnd.randn(dim, dim) + 3.0                  # far from the origin: centring matters
    gen = rnd.randn(n_gen, dim) @ rnd.randn(dim, dim) * 0.8 + 3.4
    return real.astype(np.float32), gen.astype(np.float32)


# ----------------------------------------------------------------------------
# The pure functions.

@pytest.mark.parametrize('chunk', [7, 60, 1000])     # 7 and 60 divide neither 83 nor 61
@pytest.mark.parametrize('k', [1, 3, 5])
def test_precision_recall_match_brute_force(chunk, k):
    real, gen = _features(seed=k)
    precision, recall = precision_recall(real, gen, k=k, chunk=chunk)
    ref_p, ref_r = ref_precision_recall(real, gen, k)
    assert _rel(precision, ref_p) < 1e-9 and _rel(recall, ref_r) < 1e-9
    assert 0.05 < precision < 0.95 and 0.05 < recall < 0.95                    # not a trivial 0 or 1


@pytest.mark.parametrize('chunk', [7, 60, 1000])
@pytest.mark.parametrize('k', [3, 5])
def test_density_coverage_match_brute_force(chunk, k):
    real, gen = _features(seed=10 + k)
    density, coverage = density_coverage(real, gen, k=k, chunk=chunk)
    ref_d, ref_c = ref_density_coverage(real, gen, k)
    assert _rel(density, ref_d) < 1e-9 and _rel(coverage, ref_c) < 1e-9
    assert 0.05 < coverage < 0.95 and density > 0.05


def test_a_set_against_itself_scores_one():
    real, _ = _features(seed=3)
    assert precision_recall(real, real, chunk=10) == (1.0, 1.0)
    density, coverage = density_coverage(real, real, chunk=10)
    assert coverage == 1.0 and _rel(density, ref_density_coverage(real, real, 5)[0]) < 1e-9
    assert density > 1                                                          # each point also sits in its own ball


def test_a_point_on_the_boundary_counts_as_inside():
    # 1-D grid: every k = 1 radius is exactly 1, and -1 and 4 sit exactly on the balls of 0 and 3.
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    gen = np.array([[-1.0], [10.0], [4.0]])
    assert precision_recall(real, gen, k=1)[0] == pytest.approx(2 / 3, rel=1e-15)
    assert density_coverage(real, gen, k=1) == (pytest.approx(2 / 3, rel=1e-15), 0.5)
    assert ref_precision_recall(real, gen, 1)[0] == pytest.approx(2 / 3)       # the reference agrees on the rule


def test_knn_functions_refuse_bad_input():
    real, gen = _features(seed=4, n_real=5, n_gen=4)
    for call in [lambda: precision_recall(real, gen, k=4),                     # 4 neighbours need 5 generated points
                 lambda: density_coverage(real, real[:, :3]),                  # feature widths differ
                 lambda: precision_recall(real[0], gen)]:                      # not [N, D]
        with pytest.raises(ValueError) as exc:
            call()
        assert '\n' not in str(exc.value)


def test_nearest_neighbour_distances_and_mann_whitney_match_brute_force():
    real, gen = _features(seed=5)
    d = ref_distances(gen, real)
    assert np.allclose(nearest_neighbour_distances(gen, real, chunk=9), d.min(axis=1), rtol=1e-9, atol=0)
    loo = ref_distances(real, real)
    np.fill_diagonal(loo, np.inf)
    assert np.allclose(nearest_neighbour_distances(real, real, exclude_self=True, chunk=9), loo.min(axis=1), rtol=1e-9, atol=0)
    # U counted pair by pair, ties a half (integer samples have many ties).
    rnd = np.random.RandomState(0)
    x, y = rnd.randint(0, 6, size=23), rnd.randint(1, 7, size=31)
    u = (x[:, None] > y[None, :]).sum() + 0.5 * (x[:, None] == y[None, :]).sum()
    m, n = len(x), len(y)
    assert _rel(mann_whitney_z(x, y), (u - m * n / 2) / np.sqrt(m * n * (m + n + 1) / 12)) < 1e-12
    assert mann_whitney_z(x, y) < 0 and mann_whitney_z(y, x) == pytest.approx(-mann_whitney_z(x, y))


def test_memorisation_of_feature_sets():
    rnd = np.random.RandomState(6)
    train, heldout = rnd.randn(200, 8), rnd.randn(200, 8)
    copies = memorisation(train, train[:100])
    assert copies['share'] == 1.0 and copies['ct'] < -8 and np.all(copies['gen_distances'] == 0)
    assert copies['baseline_share'] == pytest.approx(0.05, abs=0.01)
    fresh = memorisation(train, heldout[:100], heldout[100:])
    assert fresh['share'] <= 0.2 and abs(fresh['ct']) < 3
    # The threshold is the 5th percentile of the held-out -> training distances.
    assert fresh['threshold'] == np.quantile(ref_distances(heldout[100:], train).min(axis=1), 0.05)


# ----------------------------------------------------------------------------
# The metric families through the runner, with a tiny TorchScript detector.

class TinyDetector(torch.nn.Module):
    """Features: 4x4 block means and per-channel standard deviations of the image in [0, 1] (51 values)."""

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = img.to(torch.float32) / 255
        return torch.cat([F.adaptive_avg_pool2d(x, 4).flatten(1), x.std(dim=[2, 3])], dim=1)


class Wide4096(torch.nn.Module):
    """Stands in for NVIDIA's VGG16 file: [N, 4096] features."""

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return F.adaptive_avg_pool2d(img.to(torch.float32), 4).flatten(1).repeat(1, 86)[:, :4096]


@pytest.fixture
def tiny_detector(tmp_path):
    path = tmp_path / 'tiny_detector.pt'
    torch.jit.save(torch.jit.script(TinyDetector()), str(path))
    return str(path)


def _images(n, seed, kinds=2, size=16, first=0):
    """uint8 [n, 3, size, size]: `kinds` base colours from the `first` (two "taxa") with pixel noise, every image different."""
    rnd = np.random.RandomState(seed)
    base = np.array([[60, 140, 200], [200, 90, 40], [120, 120, 120]])[(np.arange(n) % kinds + first) % 3]
    return np.clip(base[:, :, None, None] + rnd.randint(-50, 51, size=[n, 3, size, size]), 0, 255).astype(np.uint8)


def _png(image_chw):
    buf = io.BytesIO()
    PIL.Image.fromarray(np.ascontiguousarray(image_chw.transpose(1, 2, 0))).save(buf, format='PNG')
    return buf.getvalue()


def _write_zip(path, images):
    with zipfile.ZipFile(path, 'w') as zf:
        for i, img in enumerate(images):
            zf.writestr(zip_entry(f'img{i:08d}.png'), _png(img))
    return str(path)


def _write_folder(path, images):
    os.makedirs(path)
    for i, img in enumerate(images):
        with open(os.path.join(path, f'img{i:08d}.png'), 'wb') as f:
            f.write(_png(img))
    return str(path)


def test_metric_names():
    assert tuple(parse_metric_name('pr50k3_full')) == ('pr50k3_full', 'pr', 50000, True, None)
    assert tuple(parse_metric_name('pr2k3')) == ('pr2k3', 'pr', 2000, False, None)
    assert tuple(parse_metric_name('pr203_full_taxon')) == ('pr203_full_taxon', 'pr', 20, True, 'taxon')   # 20 images, k = 3
    assert tuple(parse_metric_name('dc10k_full_taxon')) == ('dc10k_full_taxon', 'dc', 10000, True, 'taxon')
    assert tuple(parse_metric_name('mem1k_taxon')) == ('mem1k_taxon', 'mem', 1000, False, 'taxon')
    for bad in ['pr50k', 'pr50k5_full', 'pr3', 'mem1k_full', 'mem', 'dc']:
        with pytest.raises(MetricError) as exc:
            parse_metric_name(bad)
        assert 'pr<N>[k]3[_full][_taxon]' in str(exc.value) and 'mem<N>[k][_taxon]' in str(exc.value)


def test_pr_dc_results_equal_the_functions_on_the_features(tmp_path, tiny_detector):
    reals, fakes = _images(30, seed=0), _images(25, seed=1)
    data = _write_zip(tmp_path / 'reals.zip', reals)
    images = ImageSet(_write_zip(tmp_path / 'fakes.zip', fakes))
    common = dict(detector=tiny_detector, device='cpu', progress=False, cache_dir=str(tmp_path / 'c'), batch_size=7)
    feats = lambda x: resolve_detector(tiny_detector).features(torch.from_numpy(x), 'cpu')
    pr = calc_metric('pr1003_full', images, dict(path=data), **common)          # asks for 100: the set has 25
    assert pr['num_real'] == 30 and pr['num_gen'] == 25 and pr['images'] == images.path
    assert pr['results'] == dict(zip(['pr1003_full_precision', 'pr1003_full_recall'], precision_recall(feats(reals), feats(fakes), k=3)))
    dc = calc_metric('dc20_full', images, dict(path=data), **common)            # the first 20 images
    assert dc['num_gen'] == 20
    assert dc['results'] == dict(zip(['dc20_full_density', 'dc20_full_coverage'], density_coverage(feats(reals), feats(fakes[:20]), k=5)))
    same = calc_metric('pr303_full', ImageSet(data), dict(path=data), **common)
    assert same['results'] == {'pr303_full_precision': 1.0, 'pr303_full_recall': 1.0}


def test_memorisation_acceptance(tmp_path, tiny_detector):
    # Two "taxa" of training images and held-out images of the same two taxa.
    train = _write_zip(tmp_path / 'train.zip', _images(60, seed=2))
    heldout = _write_zip(tmp_path / 'heldout.zip', _images(60, seed=3))
    more = _write_zip(tmp_path / 'more.zip', _images(60, seed=4))
    common = dict(detector=tiny_detector, device='cpu', progress=False, cache_dir=str(tmp_path / 'c'), batch_size=16)
    copies = calc_metric('mem60', ImageSet(train), dict(path=train), **common)   # the training images themselves
    assert copies['results']['mem60_share'] >= 0.9 and copies['results']['mem60_ct'] < -3 and copies['copying']
    assert copies['reference'] == 'leave-one-out' and copies['num_reference'] == 60
    real = calc_metric('mem60', ImageSet(heldout), dict(path=train), **common)  # new images of the same taxa
    assert real['results']['mem60_share'] <= 0.2 and real['results']['mem60_ct'] > -3 and not real['copying']
    # With a held-out reference set: the training images still are copies, other new images are not.
    copies = calc_metric('mem60', ImageSet(train), dict(path=train), heldout=heldout, **common)
    assert copies['results']['mem60_share'] >= 0.9 and copies['reference'] == heldout and copies['num_reference'] == 60
    real = calc_metric('mem60', ImageSet(more), dict(path=train), heldout=heldout, **common)
    assert real['results']['mem60_share'] <= 0.2 and abs(real['results']['mem60_ct']) < 3
    # The reported numbers are the pure function's on the detector's features.
    feats = lambda path: resolve_detector(tiny_detector).features(ImageSet(path).images(0, 60), 'cpu')
    expected = memorisation(feats(train), feats(more), feats(heldout))
    assert real['results'] == {'mem60_share': expected['share'], 'mem60_ct': expected['ct']}
    assert real['threshold'] == expected['threshold']


def test_pr_uses_vgg16_in_place_of_inception(tmp_path, tiny_detector, monkeypatch):
    data = _write_zip(tmp_path / 'reals.zip', _images(12, seed=5))
    images = ImageSet(data)
    cache = tmp_path / 'cache'
    common = dict(device='cpu', progress=False, cache_dir=str(cache))
    # Offline without the file: one line naming where it goes and where it comes from; nothing is left behind.
    with pytest.raises(DetectorError) as exc:
        calc_metric('pr123_full', images, dict(path=data), **common)
    message = str(exc.value)
    assert '\n' not in message and str(cache / 'vgg16.pt') in message and det_mod.VGG16_URL in message
    assert not cache.exists() or os.listdir(cache) == []
    # A copy put in the cache by hand is used for pr and dc; fid keeps Inception (missing here); a plain file is used as given.
    cache.mkdir()
    torch.jit.save(torch.jit.script(Wide4096()), str(cache / 'vgg16.pt'))
    result = calc_metric('pr123_full', images, dict(path=data), **common)
    assert result['detector'] == 'vgg16' and result['detector_id'].startswith('vgg16-')
    assert result['results'] == {'pr123_full_precision': 1.0, 'pr123_full_recall': 1.0}
    assert (cache / 'vgg16.pt.sha256').is_file()
    assert calc_metric('dc12_full', images, dict(path=data), **common)['detector'] == 'vgg16'
    with pytest.raises(DetectorError) as exc:
        calc_metric('fid12_full', images, dict(path=data), **common)
    assert 'inception-2015-12-05.pt' in str(exc.value)
    assert calc_metric('pr123_full', images, dict(path=data), detector=tiny_detector, **common)['detector'] == tiny_detector


def test_knn_metrics_with_the_taxon_detector(tmp_path):
    root = tmp_path / 'datasets'
    root.mkdir()
    kinds = {'Alpha': 0, 'Beta': 1}
    for name, kind in kinds.items():
        _write_zip(root / f'{name}.zip', _images(24, seed=7 + kind, kinds=1, first=kind))
    manifest = {'format': 'taxogan-datasets/1', 'ranks': ['order'], 'resolution': 16, 'channels': 3, 'taxa': {
        name: {'rank': 'order', 'parent': None, 'children': [], 'dataset': f'{name}.zip', 'num_images': 24,
               'num_images_direct': 24, 'labels': None, 'sha256': ''} for name in kinds}}
    (root / 'manifest.json').write_text(json.dumps(manifest))
    train_taxon_classifier(str(root), str(tmp_path / 't.pt'), resolution=16, epochs=1, batch_size=16, channels=(8, 8),
                           heldout_fraction=0.25, progress=False)
    alpha = str(root / 'Alpha.zip')
    common = dict(detector=f'taxon:{tmp_path / "t.pt"}', device='cpu', progress=False, cache_dir=str(tmp_path / 'c'))
    # Plain names get the suffix (figures of the taxon detector never pass for VGG16 ones); results follow the name.
    pr = calc_metric('pr243_full', ImageSet(alpha), dict(path=alpha), **common)
    assert pr['metric'] == 'pr243_full_taxon' and pr['results'] == {'pr243_full_taxon_precision': 1.0, 'pr243_full_taxon_recall': 1.0}
    dc = calc_metric('dc24_full_taxon', ImageSet(alpha), dict(path=alpha), **common)
    assert set(dc['results']) == {'dc24_full_taxon_density', 'dc24_full_taxon_coverage'} and dc['results']['dc24_full_taxon_coverage'] == 1.0
    mem = calc_metric('mem24_taxon', ImageSet(alpha), dict(path=alpha), **common)
    assert mem['results']['mem24_taxon_share'] == 1.0


# ----------------------------------------------------------------------------
# calc_metrics.py --images.

def _read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding='utf-8')]


def test_calc_metrics_on_image_sets_equals_the_network(tmp_path, tiny_detector):
    data = _write_zip(tmp_path / 'reals.zip', _images(20, seed=6))
    torch.manual_seed(0)
    G = Generator(z_dim=8, c_dim=0, w_dim=8, img_resolution=16, img_channels=3, mapping_kwargs=dict(num_layers=2),
                  synthesis_kwargs=dict(channel_base=64, channel_max=16))
    pkl = tmp_path / 'run' / 'net.pkl'
    save_network_pkl(str(pkl), dict(G=G, D=None, G_ema=G, augment_pipe=None, training_set_kwargs=dict(path=data)))
    # The network's images exactly as the metrics draw them: batches of 5, one seed per batch.
    G = load_network_pkl(str(pkl))['G_ema'].eval()
    generated = np.concatenate([generate_batch(G, None, 5, batch_seed(0, b), torch.device('cpu'))[0].numpy() for b in range(5)])
    folder = _write_folder(tmp_path / 'export' / 'images', generated)
    archive = _write_zip(tmp_path / 'export' / 'images.zip', generated)
    metrics = 'fid25_full,kid25_full,pr253_full,dc25_full,mem25'
    common = ['--metrics', metrics, '--detector', tiny_detector, '--cache', str(tmp_path / 'c'), '--device', 'cpu',
              '--batch', '5', '--quiet']
    values = {}
    for source, args in [('network', ['--network', str(pkl)]), ('folder', ['--images', folder, '--data', data]),
                         ('zip', ['--images', archive, '--data', data])]:
        out = CliRunner().invoke(calc_metrics.main, args + common + ['--run-dir', str(tmp_path / source)])
        assert out.exit_code == 0, out.output
        lines = [_read_jsonl(tmp_path / source / f'metric-{m}.jsonl')[0] for m in metrics.split(',')]
        values[source] = {k: v for line in lines for k, v in line['results'].items()}
        assert all(line['num_gen'] == 25 for line in lines)
    assert len(values['network']) == 8 and values['network']['fid25_full'] > 0
    for source in ['folder', 'zip']:
        assert values[source].keys() == values['network'].keys()
        assert all(_rel(values[source][k], values['network'][k]) < 1e-9 for k in values['network']), (source, values)
    # Without --run-dir the records go beside the image set, not into it.
    out = CliRunner().invoke(calc_metrics.main, ['--images', folder, '--data', data, '--metrics', 'pr253_full',
                                                 '--detector', tiny_detector, '--device', 'cpu', '--quiet'])
    assert out.exit_code == 0, out.output
    line = _read_jsonl(tmp_path / 'export' / 'metric-pr253_full.jsonl')[0]
    assert line['images'] == folder and line['snapshot_pkl'] is None and sorted(os.listdir(folder))[-1].endswith('.png')


def test_calc_metrics_image_set_errors(tmp_path, tiny_detector):
    data = _write_zip(tmp_path / 'reals.zip', _images(6, seed=0))
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'notes.txt').write_text('not images')
    pkl = tmp_path / 'net.pkl'
    pkl.write_bytes(b'')
    small = _write_zip(tmp_path / 'small.zip', _images(3, seed=1, size=8))
    cases = [
        (['--images', str(tmp_path / 'nope'), '--data', data], 'nope: no such folder or zip'),
        (['--images', str(tmp_path / 'empty'), '--data', data], 'no images found'),
        (['--images', str(tmp_path / 'notes.txt'), '--data', data], 'notes.txt: not a .zip file or a folder'),
        (['--images', data], '--images needs --data'),
        (['--images', data, '--network', str(pkl), '--data', data], 'exclude each other'),
        (['--data', data], '--network or --images is required'),
        (['--images', small, '--data', data], 'expected 8x8'),                 # the reals are 16 px
        (['--images', data, '--data', data, '--metrics', 'mem6', '--heldout', str(tmp_path / 'gone.zip')], 'gone.zip'),
    ]
    for args, expected in cases:
        out = CliRunner().invoke(calc_metrics.main, args + ['--detector', tiny_detector, '--device', 'cpu', '--quiet'])
        assert out.exit_code == 1 and out.output.startswith('Error: ') and expected in out.output, (args, out.output)
        assert len(out.output.strip().splitlines()) == 1
