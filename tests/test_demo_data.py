"""Tests of the procedural demo collection (taxogan_ext/demo_data.py)."""

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from scipy import ndimage

from stylegan2ada.util import TEMP_PREFIX
from taxogan_ext import demo_data
from taxogan_ext.demo_data import CLASS_NAME, ORDERS, demo_counts, write_demo_collection

#----------------------------------------------------------------------------
# Helpers.

def _pngs(root: Path) -> dict:
    """Relative path -> bytes of every PNG under root."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob('*.png'))}

def _order_files(root: Path, order: str) -> list:
    return sorted((root / CLASS_NAME / order).glob('*.png'))

def _silhouette(img: Image.Image) -> np.ndarray:
    """The animal's mask: pixels clearly darker than a robust quadratic fit of the background, largest blob."""
    g = ndimage.uniform_filter(np.asarray(img.convert('L'), dtype=np.float64), 3, mode='nearest')   # [H, W]
    H, W = g.shape
    y, x = np.mgrid[0:H, 0:W] / max(H, W)
    A = np.stack([np.ones_like(x), x, y, x * x, y * y, x * y], axis=-1).reshape(-1, 6)
    gv = g.reshape(-1)
    keep = np.ones(gv.shape, dtype=bool)
    for _ in range(3):   # refit without the dark (animal) pixels found so far
        coef, *_ = np.linalg.lstsq(A[keep], gv[keep], rcond=None)
        res = gv - A @ coef
        keep = res > -6
    mask = (res < -10).reshape(H, W)
    lab, _ = ndimage.label(mask)
    sizes = np.bincount(lab.ravel())[1:]
    return lab == (np.argmax(sizes) + 1)

def _log_elongation(mask: np.ndarray) -> tuple:
    ys, xs = np.nonzero(mask)
    cov = np.cov(np.stack([xs, ys]).astype(np.float64), bias=True)
    l2, l1 = np.linalg.eigvalsh(cov)
    return 0.5 * np.log(l1 / max(l2, 1e-9)), l1, l2

def _shape_features(img: Image.Image) -> np.ndarray:
    """Four scale-free silhouette statistics that tell the body plans apart."""
    mask = _silhouette(img)
    area = float(mask.sum())
    _, l1, l2 = _log_elongation(mask)
    dt = ndimage.distance_transform_edt(mask)
    fill = area / (4 * np.pi * np.sqrt(l1 * l2))        # 1 for a filled ellipse; low when spread out (antennules)
    thick = dt.max() ** 2 / area                         # inscribed disc vs area: high for a broad shield
    thin = float((dt[mask] <= 0.25 * dt.max()).mean())   # share of thin parts (appendages, narrow urosome)
    core_elong, _, _ = _log_elongation(dt > 0.4 * dt.max())   # shape of the thick core: worm vs disc
    return np.array([fill, thick, thin, core_elong])

#----------------------------------------------------------------------------
# Counts.

def test_counts_follow_paper_proportions():
    assert demo_counts(1.0) == dict(zip(ORDERS, (902, 766, 150, 151)))
    # 90.2, 76.6, 15.0, 15.1 rounded.
    assert demo_counts(0.1) == dict(zip(ORDERS, (90, 77, 15, 15)))
    # 45.1, 38.3, 7.5, 7.55: halves round up (Python's round() would give 7 and 8 for 7.5 and 8.5 alike).
    assert demo_counts(0.05, min_per_order=0) == dict(zip(ORDERS, (45, 38, 8, 8)))
    # 18.04, 15.32, 3.0, 3.02 with the floor of 8.
    assert demo_counts(0.02) == dict(zip(ORDERS, (18, 15, 8, 8)))
    assert demo_counts(0.02, min_per_order=0) == dict(zip(ORDERS, (18, 15, 3, 3)))
    with pytest.raises(ValueError, match='scale'):
        demo_counts(0.0)

def test_written_counts_and_tree(tmp_path):
    counts = write_demo_collection(tmp_path, scale=0.02, seed=3, unplaced=3, size_scale=0.2, workers=1, progress=False)
    assert counts == dict(zip(ORDERS, (18, 15, 8, 8)))
    for order, n in counts.items():
        files = _order_files(tmp_path, order)
        assert [f.name for f in files] == [f'{order.lower()}_{i:05d}.png' for i in range(n)]
    assert sorted(p.name for p in (tmp_path / CLASS_NAME).glob('*.png')) == [f'copepoda_{i:05d}.png' for i in range(3)]
    assert len(list(tmp_path.rglob('*.png'))) == 18 + 15 + 8 + 8 + 3
    assert not [p for p in tmp_path.rglob('*') if p.name.startswith('.')]     # no temporary file left
    record = json.loads((tmp_path / demo_data.MANIFEST_NAME).read_text())
    assert record['counts'] == counts and record['num_images'] == 52 and record['options']['seed'] == 3
    assert 'NOT photographs' in (tmp_path / 'README.txt').read_text()

#----------------------------------------------------------------------------
# Determinism and sizes.

def test_deterministic_bytes_and_independent_of_workers(tmp_path):
    a, b, c = tmp_path / 'a', tmp_path / 'b', tmp_path / 'c'
    kw = dict(seed=7, unplaced=2, size_scale=0.2, progress=False)
    write_demo_collection(a, scale=0.02, workers=1, **kw)
    write_demo_collection(b, scale=0.02, workers=2, **kw)
    pa, pb = _pngs(a), _pngs(b)
    assert len(pa) == 18 + 15 + 8 + 8 + 2
    assert pa == pb
    assert (a / demo_data.MANIFEST_NAME).read_bytes() == (b / demo_data.MANIFEST_NAME).read_bytes()
    # Image i of an order depends only on (seed, order, i): a smaller collection is a prefix of a larger one.
    write_demo_collection(c, scale=0.01, workers=1, **kw)
    pc = _pngs(c)
    assert len(pc) == 9 + 8 + 8 + 8 + 2
    assert all(pa[name] == data for name, data in pc.items())
    # Another seed draws other images.
    other = demo_data.render_demo_image('Calanoida', 0, seed=8, min_side=64, max_side=80)
    same = Image.open(a / CLASS_NAME / 'Calanoida' / 'calanoida_00000.png')
    assert other.size != same.size or not np.array_equal(np.asarray(other), np.asarray(same))

def test_render_matches_written_file(tmp_path):
    write_demo_collection(tmp_path, scale=0.01, seed=2, min_side=64, max_side=96, workers=1, progress=False)
    for order in ORDERS:
        on_disk = np.asarray(Image.open(tmp_path / CLASS_NAME / order / f'{order.lower()}_00005.png'))
        drawn = np.asarray(demo_data.render_demo_image(order, 5, seed=2, min_side=64, max_side=96))
        assert np.array_equal(on_disk, drawn)

def test_image_sizes_within_bounds(tmp_path):
    write_demo_collection(tmp_path, scale=0.02, seed=0, unplaced=4, size_scale=0.25, workers=1, progress=False)
    lo, hi = round(270 * 0.25), round(400 * 0.25)   # 68 and 100 px
    sizes = []
    for path in tmp_path.rglob('*.png'):
        with Image.open(path) as img:
            assert img.mode == 'RGB'
            sizes.append(img.size)
    sizes = np.array(sizes)    # [N, 2]
    assert sizes.min() >= lo and sizes.max() <= hi
    assert (sizes[:, 0] != sizes[:, 1]).mean() > 0.8       # mostly non-square
    assert len(set(map(tuple, sizes))) > len(sizes) // 2    # and varying
    # Fixed bounds give a fixed size; the defaults give 270..400 px.
    img = demo_data.render_demo_image('Cyclopoida', 3, min_side=90, max_side=90)
    assert img.size == (90, 90)
    w, h = demo_data.render_demo_image('Harpacticoida', 0).size
    assert 270 <= w <= 400 and 270 <= h <= 400

def test_images_are_bright_field_with_a_dark_animal(tmp_path):
    write_demo_collection(tmp_path, scale=0.01, seed=0, size_scale=0.5, workers=1, progress=False)
    for order in ORDERS:
        for path in _order_files(tmp_path, order)[:4]:
            img = Image.open(path)
            mask = _silhouette(img)
            frac = mask.mean()
            assert 0.01 < frac < 0.5, (path.name, frac)   # an animal, neither a speck nor the whole frame
            g = np.asarray(img.convert('L'), dtype=np.float64)
            assert np.median(g[~mask]) > 150               # light background
            # The animal stays in the central square, so a centre crop keeps it whole.
            ys, xs = np.nonzero(mask)
            H, W = mask.shape
            s = min(H, W)
            assert xs.min() >= (W - s) // 2 - 1 and xs.max() <= (W + s) // 2 + 1
            assert ys.min() >= (H - s) // 2 - 1 and ys.max() <= (H + s) // 2 + 1

#----------------------------------------------------------------------------
# The body plans differ: a nearest-centroid classifier on four silhouette statistics.

def test_orders_separable_by_silhouette(tmp_path):
    kw = dict(scale=0.05, min_per_order=20, size_scale=0.4, workers=2, progress=False)
    counts = write_demo_collection(tmp_path / 'train', seed=0, **kw)
    assert counts == dict(zip(ORDERS, (45, 38, 20, 20)))
    write_demo_collection(tmp_path / 'test', seed=1, **kw)

    feats = {split: [np.stack([_shape_features(Image.open(p)) for p in _order_files(tmp_path / split, order)])
                     for order in ORDERS] for split in ('train', 'test')}
    train = np.concatenate(feats['train'])
    mu, sd = train.mean(axis=0), train.std(axis=0)
    centroids = np.stack([((f - mu) / sd).mean(axis=0) for f in feats['train']])   # [4, 4]
    correct, total, per_order = 0, 0, []
    for k, f in enumerate(feats['test']):
        z = (f - mu) / sd
        pred = np.argmin(((z[:, None, :] - centroids[None]) ** 2).sum(axis=-1), axis=1)
        per_order.append(float((pred == k).mean()))
        correct += int((pred == k).sum())
        total += len(pred)
    accuracy = correct / total
    assert accuracy >= 0.9, (accuracy, per_order)
    assert min(per_order) >= 0.75, per_order

#----------------------------------------------------------------------------
# Skipping, redrawing, stale files.

def _stamps(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, p.stat().st_ino) for p in root.rglob('*') if p.is_file()}

def test_rerun_with_same_options_skips(tmp_path):
    kw = dict(scale=0.01, seed=1, unplaced=1, size_scale=0.2, workers=1, progress=False)
    counts = write_demo_collection(tmp_path, **kw)
    before = _stamps(tmp_path)
    assert write_demo_collection(tmp_path, **kw) == counts
    assert _stamps(tmp_path) == before
    # workers does not change the output, so it does not force a redraw either.
    write_demo_collection(tmp_path, **(kw | dict(workers=2)))
    assert _stamps(tmp_path) == before
    # force redraws everything (new files replace the old ones), with the same bytes.
    old = _pngs(tmp_path)
    write_demo_collection(tmp_path, force=True, **kw)
    after = _stamps(tmp_path)
    assert all(after[name] != before[name] for name in old)
    assert _pngs(tmp_path) == old

def test_incomplete_or_changed_collection_is_redrawn(tmp_path):
    kw = dict(seed=1, size_scale=0.2, workers=1, progress=False)
    write_demo_collection(tmp_path, scale=0.02, **kw)
    missing = tmp_path / CLASS_NAME / 'Cyclopoida' / 'cyclopoida_00004.png'
    data = missing.read_bytes()
    missing.unlink()
    write_demo_collection(tmp_path, scale=0.02, **kw)
    assert missing.read_bytes() == data
    # A smaller collection in the same folder removes the images it no longer has, and only ours.
    foreign = tmp_path / CLASS_NAME / 'Calanoida' / 'my_photo.png'
    foreign.write_bytes(b'not ours')
    write_demo_collection(tmp_path, scale=0.01, **kw)
    assert len(_order_files(tmp_path, 'Calanoida')) == 9 + 1
    assert len(_order_files(tmp_path, 'Cyclopoida')) == 8
    assert foreign.read_bytes() == b'not ours'
    # A temporary file of a killed run goes at the next write; one that is not ours stays.
    killed = tmp_path / CLASS_NAME / 'Calanoida' / f'{TEMP_PREFIX}calanoida_00003.png.k9x2'
    other = tmp_path / CLASS_NAME / 'Calanoida' / f'{TEMP_PREFIX}notes.txt.k9x2'
    killed.write_bytes(b'half an image')
    other.write_bytes(b'not ours')
    write_demo_collection(tmp_path, scale=0.01, force=True, **kw)
    assert not killed.exists() and other.read_bytes() == b'not ours'
    assert json.loads((tmp_path / demo_data.MANIFEST_NAME).read_text())['options']['scale'] == 0.01

#----------------------------------------------------------------------------
# Command line.

def test_cli(tmp_path):
    runner = CliRunner()
    out = tmp_path / 'demo'
    args = ['--out', str(out), '--scale', '0.01', '--seed', '0', '--size-scale', '0.2', '--workers', '1', '--unplaced', '2']
    res = runner.invoke(demo_data.main, args)
    assert res.exit_code == 0, res.output
    assert '35 images' in res.output   # 9 + 8 + 8 + 8 + 2
    assert len(list(out.rglob('*.png'))) == 35

    res = runner.invoke(demo_data.main, ['--out', str(out), '--min-side', '300', '--max-side', '200'])
    assert res.exit_code == 1 and 'Error: --min-side (300) must not exceed --max-side (200)' in res.output
    res = runner.invoke(demo_data.main, ['--out', str(out), '--size-scale', '0.05'])
    assert res.exit_code == 1 and '--size-scale' in res.output
    a_file = tmp_path / 'file.txt'
    a_file.write_text('x')
    res = runner.invoke(demo_data.main, ['--out', str(a_file)])
    assert res.exit_code == 1 and 'is not a folder' in res.output and str(a_file) in res.output
    res = runner.invoke(demo_data.main, ['--out', str(out), '--scale', '0'])
    assert res.exit_code == 2 and '--scale' in res.output and 'Traceback' not in res.output
