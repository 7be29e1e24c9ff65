"""dataset_tool_ext.py: per-taxon datasets from folder trees, BOLD-style tables and EcoTaxa exports."""

import hashlib
import http.server
import io
import json
import threading
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import dataset_tool_ext
from stylegan2ada.dataset import ImageFolderDataset
from taxogan_ext import collection, taxonomy

RES = 32        # output side of the test builds
MIN = 64        # --min-size of the test builds
BASE_ARGS = ['--resolution', str(RES), '--min-size', str(MIN), '--workers', '1']

#----------------------------------------------------------------------------
# A small collection: what each file is, where it sits in the taxonomy, and what must become of it.

# (file, taxon path (class, order), kind, seed or source file, expected fate)
SPEC = [
    ('a0.png',      ('Copepoda', 'Calanoida'),     'rgb',       0,          'kept'),
    ('a1.png',      ('Copepoda', 'Calanoida'),     'rgb',       1,          'kept'),
    ('a2.png',      ('Copepoda', 'Calanoida'),     'gray',      2,          'kept'),
    ('a_dup.bmp',   ('Copepoda', 'Calanoida'),     'copy',      'a0.png',   'duplicate'),
    ('a_near.jpg',  ('Copepoda', 'Cyclopoida'),    'jpeg',      'a1.png',   'near_duplicate'),
    ('b0.png',      ('Copepoda', 'Cyclopoida'),    'gray',      3,          'kept'),
    ('b1.png',      ('Copepoda', 'Cyclopoida'),    'rgb',       4,          'kept'),
    ('b_small.png', ('Copepoda', 'Cyclopoida'),    'small',     5,          'too_small'),
    ('b_trunc.jpg', ('Copepoda', 'Cyclopoida'),    'truncated', 6,          'unreadable'),
    ('c0.png',      ('Copepoda', 'Harpacticoida'), 'rgb',       7,          'kept'),
    ('d0.png',      ('Copepoda',),                 'wide',      8,          'kept'),
    ('d_notes.txt', ('Copepoda',),                 'text',      None,       'unreadable'),
    ('x0.png',      ('Copepoda', 'Calanoida'),     'rgb',       9,          'excluded'),
]
WIDE_BG = (30, 120, 200)   # border colour of d0.png, which --square pad must extend

def _pattern(seed: int, w: int, h: int, gray: bool, bg=None) -> np.ndarray:
    """A flat background with a blocky random 'animal' in the middle: distinct seeds give distant dHashes."""
    rng = np.random.default_rng(seed)
    c = 1 if gray else 3
    bg = rng.integers(0, 256, c) if bg is None else np.array(bg)
    arr = np.empty((h, w, c), np.uint8)
    arr[:] = bg
    m = 8
    blocks = rng.integers(0, 256, (6, 6, c), dtype=np.uint8)
    inner = np.asarray(Image.fromarray(blocks.squeeze(-1) if gray else blocks).resize((w - 2 * m, h - 2 * m), Image.NEAREST))
    arr[m:h - m, m:w - m] = inner.reshape(h - 2 * m, w - 2 * m, c)
    return arr.squeeze(-1) if gray else arr

def _write_collection(folder: Path, layout) -> dict:
    """Write SPEC's files at `layout(file, taxon path)`; returns file -> path relative to `folder`."""
    where = {}
    for file, path, kind, arg, _fate in SPEC:
        rel = layout(file, path)
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        where[file] = rel
        if kind in ('rgb', 'gray'):
            Image.fromarray(_pattern(arg, 80, 72, kind == 'gray')).save(target)
        elif kind == 'wide':
            Image.fromarray(_pattern(arg, 96, 64, False, bg=WIDE_BG)).save(target)
        elif kind == 'small':
            Image.fromarray(_pattern(arg, 40, 80, False)).save(target)
        elif kind == 'copy':     # same pixels, another file format
            Image.open(folder / where[arg]).save(target, format='BMP')
        elif kind == 'jpeg':     # re-encoded: pixels differ slightly, dHash (almost) not
            Image.open(folder / where[arg]).convert('RGB').save(target, format='JPEG', quality=90)
        elif kind == 'truncated':
            buf = io.BytesIO()
            Image.fromarray(_pattern(arg, 80, 72, False)).save(buf, format='JPEG', quality=95)
            target.write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
        elif kind == 'text':
            target.write_text('field notes, not an image\n')
    return where

def _expected_drops(where: dict) -> set:
    return {(where[file], fate) for file, _p, _k, _a, fate in SPEC if fate != 'kept'}

def _build(args, expect_ok=True):
    result = CliRunner().invoke(dataset_tool_ext.cmdline, ['build', *args])
    if expect_ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result

def _build_tree(tmp_path: Path) -> Path:
    """SPEC as a folder tree TMP/photos/<class>/<order>/, built into TMP/datasets with BASE_ARGS; returns the latter."""
    src, dest = tmp_path / 'photos', tmp_path / 'datasets'
    _write_collection(src, lambda file, path: '/'.join(path) + '/' + file)
    _build(['--source', str(src), '--dest', str(dest), *BASE_ARGS])
    return dest

def _zip_contents(path: Path) -> tuple[dict, dict]:
    with zipfile.ZipFile(path) as zf:
        meta = json.loads(zf.read('dataset.json'))
        images = {name: np.asarray(Image.open(io.BytesIO(zf.read(name)))) for name in zf.namelist() if name.endswith('.png')}
    return meta, images


# What SPEC leaves in each taxon: kept images per taxon (all) and identified only to it (direct).
SPEC_COUNTS = {'Copepoda': 7, 'Calanoida': 3, 'Cyclopoida': 2, 'Harpacticoida': 1}
SPEC_DIRECT = {'Copepoda': 1, 'Calanoida': 3, 'Cyclopoida': 2, 'Harpacticoida': 1}

def _check_build(
    dest:       Path,
    counts:     dict,       # taxon -> expected num_images
    direct:     dict,       # taxon -> expected num_images_direct
    drops:      set,        # expected {(source, reason)}
    channels:   int,
) -> taxonomy.Manifest:
    """Every count, label and hash of a build against what was put in."""
    manifest = taxonomy.load_manifest(dest)
    assert {name: manifest.num_images(name) for name in manifest.taxa} == counts
    assert {name: t.num_images_direct for name, t in manifest.taxa.items()} == direct
    assert {(d['source'], d['reason']) for d in manifest.dropped} == drops
    assert len(manifest.dropped) == len(drops)
    assert manifest.dropped_counts == {reason: sum(1 for _s, r in drops if r == reason) for reason in taxonomy.DROP_REASONS}
    assert manifest.channels == channels
    assert len(manifest.extra['images']) == counts['Copepoda']
    # The parent holds its children plus the images identified only to it.
    for name, taxon in manifest.taxa.items():
        assert taxon.num_images == taxon.num_images_direct + sum(manifest.num_images(c) for c in taxon.children)
    assert manifest.labels('Copepoda') == ['Calanoida', 'Cyclopoida', 'Harpacticoida', 'Copepoda (unplaced)']
    meta, images = _zip_contents(manifest.dataset_path('Copepoda'))
    assert sorted(images) == [name for name, _c in meta['labels']] and len(images) == counts['Copepoda']
    assert meta['label_names'] == manifest.labels('Copepoda')     # the class names travel with the labels
    per_class = [counts['Calanoida'], counts['Cyclopoida'], counts['Harpacticoida'], direct['Copepoda']]
    assert np.bincount([c for _n, c in meta['labels']], minlength=4).tolist() == per_class
    for image in images.values():
        assert image.shape == ((RES, RES, 3) if channels == 3 else (RES, RES))
    for child in manifest.children('Copepoda'):
        child_meta, child_images = _zip_contents(manifest.dataset_path(child))
        assert child_meta == {'labels': None} and len(child_images) == counts[child]
        for name, pixels in child_images.items():    # the same image under the same name in the parent
            assert np.array_equal(pixels, images[name])
            assert dict(meta['labels'])[name] == manifest.labels('Copepoda').index(child)
    for name in manifest.taxa:
        assert manifest.sha256(name) == hashlib.sha256(manifest.dataset_path(name).read_bytes()).hexdigest()
        assert manifest.verify(name) == 'ok'
    return manifest

def test_zip_carries_its_class_names(tmp_path):
    # dataset.json names the classes in label order wherever the zip has labels, so that the engine reads a zip
    # copied away from its manifest with the same class names.
    manifest = taxonomy.load_manifest(_build_tree(tmp_path))
    alone = tmp_path / 'alone'
    alone.mkdir()
    for name in manifest.taxa:
        (alone / manifest.taxon(name).dataset).write_bytes(manifest.dataset_path(name).read_bytes())
        meta, _images = _zip_contents(alone / manifest.taxon(name).dataset)
        expected = manifest.labels(name)
        assert meta.get('label_names') == expected and (meta['labels'] is None) == (expected is None)
        dataset = ImageFolderDataset(str(alone / manifest.taxon(name).dataset), use_labels=True)
        assert dataset.label_names == expected
        if expected is not None:
            # Each image's class is the index of its child taxon (or of the unplaced class) in those names.
            by_source = {i['file']: i['taxon'] for i in manifest.extra['images']}
            for fname, label in zip(dataset.image_fnames, dataset.raw_labels):
                child = by_source[fname]
                assert expected[int(label)] == (child if child in expected else taxonomy.unplaced_label(name))
    assert manifest.labels('Copepoda') == ['Calanoida', 'Cyclopoida', 'Harpacticoida', 'Copepoda (unplaced)']

#----------------------------------------------------------------------------
# Folder tree.

def test_folder_tree(tmp_path):
    src = tmp_path / 'photos'
    where = _write_collection(src, lambda file, path: '/'.join(path) + '/' + file)
    # A deeper folder counts towards the deepest chosen rank; a file outside any taxon folder has no taxon.
    (src / 'Copepoda/Calanoida/Calanidae').mkdir()
    Image.fromarray(_pattern(20, 80, 72, False)).save(src / 'Copepoda/Calanoida/Calanidae/deep.png')
    Image.fromarray(_pattern(21, 80, 72, False)).save(src / 'stray.png')
    (tmp_path / 'exclude.txt').write_text('# curated: not the whole animal\nCopepoda/Calanoida/x0.png\n')
    dest = tmp_path / 'datasets'
    result = _build(['--source', str(src), '--dest', str(dest), '--exclude', str(tmp_path / 'exclude.txt'),
                     *BASE_ARGS, '--workers', '2'])
    manifest = _check_build(dest, dict(SPEC_COUNTS, Copepoda=8, Calanoida=4), dict(SPEC_DIRECT, Calanoida=4),
                            _expected_drops(where) | {('stray.png', 'no_taxon')}, channels=3)
    assert '8 Copepoda (class) = 4 Calanoida + 2 Cyclopoida + 1 Harpacticoida + 1 unplaced' in result.output
    details = {d['source']: d['detail'] for d in manifest.dropped}
    assert details['Copepoda/Cyclopoida/b_small.png'] == '40x80 < 64'
    assert details['Copepoda/Calanoida/a_dup.bmp'] == 'same pixels as Copepoda/Calanoida/a0.png'
    assert details['Copepoda/Cyclopoida/a_near.jpg'].endswith(' to Copepoda/Calanoida/a1.png')
    assert 'truncated' in details['Copepoda/Cyclopoida/b_trunc.jpg']
    # File names follow the sorted sources; the manifest's image list maps them back.
    images = manifest.extra['images']
    assert [i['file'] for i in images] == [f'img{k:08d}.png' for k in range(8)]
    assert [i['source'] for i in images] == sorted(i['source'] for i in images)
    # --square pad extends the border colour (not black), then a Lanczos resize of the padded square.
    _meta, pixels = _zip_contents(manifest.dataset_path('Copepoda'))
    wide = pixels[next(i['file'] for i in images if i['source'] == 'Copepoda/d0.png')]
    padded = np.empty((96, 96, 3), np.uint8)
    padded[:] = WIDE_BG
    padded[16:80] = _pattern(8, 96, 64, False, bg=WIDE_BG)
    assert np.array_equal(wide, np.asarray(Image.fromarray(padded).resize((RES, RES), Image.LANCZOS)))
    assert wide[0, 0].tolist() == list(WIDE_BG) and wide[-1, -1].tolist() == list(WIDE_BG)
    # A grayscale input becomes R = G = B in a 3-channel set.
    gray = pixels[next(i['file'] for i in images if i['source'] == 'Copepoda/Cyclopoida/b0.png')]
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])
    # info prints the same tree from the manifest.
    info = CliRunner().invoke(dataset_tool_ext.cmdline, ['info', str(dest), '--verify'])
    assert info.exit_code == 0, info.output
    assert manifest.format_tree() in info.output and 'all 4 datasets match' in info.output

def test_parallel_build_is_deterministic_and_gray_sets_have_one_channel(tmp_path):
    src = tmp_path / 'photos'
    for i, order in enumerate(['Calanoida', 'Calanoida', 'Cyclopoida']):
        (src / 'Copepoda' / order).mkdir(parents=True, exist_ok=True)
        Image.fromarray(_pattern(i, 72, 80, gray=True)).save(src / 'Copepoda' / order / f'g{i}.png')
    # RGB with channels off by 1 (JPEG-like rounding) still counts as grayscale.
    rgb_gray = np.repeat(_pattern(5, 80, 80, gray=True)[..., None], 3, axis=2)
    rgb_gray[..., 2] = np.clip(rgb_gray[..., 2].astype(np.int16) + 1, 0, 255)
    Image.fromarray(rgb_gray).save(src / 'Copepoda' / 'Cyclopoida' / 'g9.png')
    hashes = []
    for workers in ['1', '2']:
        dest = tmp_path / f'out{workers}'
        _build(['--source', str(src), '--dest', str(dest), *BASE_ARGS, '--workers', workers])
        manifest = taxonomy.load_manifest(dest)
        assert manifest.channels == 1
        assert {n: manifest.num_images(n) for n in manifest.taxa} == {'Copepoda': 4, 'Calanoida': 2, 'Cyclopoida': 2}
        assert manifest.labels('Copepoda') == ['Calanoida', 'Cyclopoida']   # no unplaced class without such images
        _meta, images = _zip_contents(manifest.dataset_path('Copepoda'))
        assert all(image.shape == (RES, RES) for image in images.values())
        hashes.append({name: manifest.sha256(name) for name in manifest.taxa})
    assert hashes[0] == hashes[1]

def test_max_per_taxon_keeps_smallest_content_hashes(tmp_path):
    src = tmp_path / 'photos'
    expected_hash = {}
    for i in range(5):
        (src / 'Copepoda' / 'Calanoida').mkdir(parents=True, exist_ok=True)
        arr = _pattern(40 + i, 80, 72, False)
        Image.fromarray(arr).save(src / 'Copepoda' / 'Calanoida' / f'c{i}.png')
        # Reference: SHA-256 of mode, size and raw pixels.
        expected_hash[f'Copepoda/Calanoida/c{i}.png'] = hashlib.sha256(b'RGB 80x72\n' + arr.tobytes()).hexdigest()
    (src / 'Copepoda' / 'Cyclopoida').mkdir()
    Image.fromarray(_pattern(50, 80, 72, False)).save(src / 'Copepoda' / 'Cyclopoida' / 'y.png')
    dest = tmp_path / 'datasets'
    _build(['--source', str(src), '--dest', str(dest), '--max-per-taxon', '2', *BASE_ARGS])
    manifest = taxonomy.load_manifest(dest)
    assert {n: manifest.num_images(n) for n in manifest.taxa} == {'Copepoda': 3, 'Calanoida': 2, 'Cyclopoida': 1}
    keep = sorted(expected_hash, key=expected_hash.get)[:2]
    assert sorted(i['source'] for i in manifest.extra['images'] if i['taxon'] == 'Calanoida') == sorted(keep)
    assert {d['source'] for d in manifest.dropped if d['reason'] == 'max_per_taxon'} == set(expected_hash) - set(keep)
    assert manifest.dropped_counts['max_per_taxon'] == 3

#----------------------------------------------------------------------------
# BOLD-style table, with URLs served from 127.0.0.1.

class _Server:
    """A local HTTP server over a folder; counts requests and fails the first GET of 'flaky*' files with 503."""

    def __init__(self, folder: Path):
        self.requests = {}
        server = self
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip('/')
                server.requests[name] = server.requests.get(name, 0) + 1
                if name.startswith('flaky') and server.requests[name] == 1:
                    self.send_error(503)
                    return
                if not (folder / name).is_file():
                    self.send_error(404)
                    return
                data = (folder / name).read_bytes()
                self.send_response(200)
                self.send_header('Content-Length', str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            def log_message(self, *args):
                pass
        self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}'
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()

BOLD_COLS = ['processid', 'image_url', *collection.DEFAULT_RANK_COLS]

def _bold_row(pid: str, image: str, path: tuple, phylum: str = 'Arthropoda') -> str:
    return '\t'.join([pid, image, phylum, *path, *[''] * (5 - len(path))])

def test_bold_table_with_downloads(tmp_path):
    where = _write_collection(tmp_path, lambda file, path: 'imgs/' + file)
    served = tmp_path / 'served'
    served.mkdir()
    Image.fromarray(_pattern(30, 80, 72, False)).save(served / 'u0.png')
    Image.fromarray(_pattern(31, 72, 80, True)).save(served / 'flaky.png')
    server = _Server(served)
    try:
        rows = [_bold_row(f'BOLD-{i}', where[file], path) for i, (file, path, *_rest) in enumerate(SPEC)]
        rows += [
            _bold_row('BOLD-U0', f'{server.url}/u0.png', ('Copepoda', 'Calanoida')),
            _bold_row('BOLD-U1', f'{server.url}/flaky.png', ('Copepoda', 'Cyclopoida')),
            _bold_row('BOLD-U2', f'{server.url}/missing.png', ('Copepoda', 'Cyclopoida')),
            _bold_row('BOLD-NOCLASS', 'imgs/a2.png', ()),             # identified only to phylum
            _bold_row('BOLD-NOIMG', '', ('Copepoda', 'Calanoida')),    # a specimen without an image: not listed
        ]
        (tmp_path / 'bold.tsv').write_text('\t'.join(BOLD_COLS) + '\n' + '\n'.join(rows) + '\n')
        x0 = next(f'BOLD-{i}' for i, spec in enumerate(SPEC) if spec[0] == 'x0.png')
        (tmp_path / 'exclude.txt').write_text(x0 + '\n')
        dest = tmp_path / 'datasets'
        _build(['--source', str(tmp_path / 'bold.tsv'), '--dest', str(dest), '--exclude', str(tmp_path / 'exclude.txt'),
                '--retries', '2', '--timeout', '5', *BASE_ARGS])
        # The 503 is retried once; a 404 is final.
        assert server.requests == {'u0.png': 1, 'flaky.png': 2, 'missing.png': 1}
        # A second build reads the cache: no new requests.
        _build(['--source', str(tmp_path / 'bold.tsv'), '--dest', str(tmp_path / 'again'),
                '--cache', str(dest / '.download-cache'), '--exclude', str(tmp_path / 'exclude.txt'), *BASE_ARGS])
        assert server.requests == {'u0.png': 1, 'flaky.png': 2, 'missing.png': 2}
    finally:
        server.close()
    drops = _expected_drops(where) | {(f'{server.url}/missing.png', 'download_failed'), ('imgs/a2.png', 'no_taxon')}
    manifest = _check_build(dest, dict(SPEC_COUNTS, Copepoda=9, Calanoida=4, Cyclopoida=3),
                            dict(SPEC_DIRECT, Calanoida=4, Cyclopoida=3), drops, channels=3)
    assert next(d['detail'] for d in manifest.dropped if d['reason'] == 'download_failed') == 'HTTP 404 Not Found'
    assert next(d['detail'] for d in manifest.dropped if d['reason'] == 'excluded').startswith('listed in ')
    assert len(list((dest / '.download-cache').iterdir())) == 2
    again = taxonomy.load_manifest(tmp_path / 'again')
    assert {n: again.sha256(n) for n in again.taxa} == {n: manifest.sha256(n) for n in manifest.taxa}

def test_bold_csv_with_custom_columns(tmp_path):
    where = _write_collection(tmp_path, lambda file, path: 'imgs/' + file)
    lines = ['sample,file,Class,Order']
    lines += [f'S{i},{where[file]},{path[0]},{path[1] if len(path) > 1 else ""}'
              for i, (file, path, *_rest) in enumerate(SPEC) if file != 'x0.png']
    (tmp_path / 'table.csv').write_text('\n'.join(lines) + '\n')
    dest = tmp_path / 'datasets'
    _build(['--source', str(tmp_path / 'table.csv'), '--dest', str(dest), '--rank-cols', 'Class,Order',
            '--ranks', 'Class,Order', '--path-col', 'file', *BASE_ARGS])
    drops = {item for item in _expected_drops(where) if item[1] != 'excluded'}
    manifest = _check_build(dest, SPEC_COUNTS, SPEC_DIRECT, drops, channels=3)
    assert manifest.ranks == ['Class', 'Order'] and manifest.taxon('Calanoida').rank == 'Order'

#----------------------------------------------------------------------------
# EcoTaxa export.

LINEAGE = 'living>Eukaryota>Opisthokonta>Holozoa>Metazoa>Arthropoda>Crustacea>Multicrustacea>Hexanauplia'

def test_ecotaxa_export(tmp_path):
    where = _write_collection(tmp_path, lambda file, path: 'images/' + file)
    rows = ['object_id\timg_file_name\tobject_annotation_status\tobject_annotation_hierarchy', '[t]\t[t]\t[t]\t[t]']
    rows += [f'obj_{i}\t{where[file]}\tvalidated\t{LINEAGE}>{">".join(path)}' for i, (file, path, *_rest) in enumerate(SPEC)]
    Image.fromarray(_pattern(60, 80, 72, True)).save(tmp_path / 'images' / 'unsorted.png')
    rows.append('obj_u\timages/unsorted.png\tunclassified\t')     # not annotated
    (tmp_path / 'ecotaxa_export.tsv').write_text('\n'.join(rows) + '\n')
    x0 = next(f'obj_{i}' for i, spec in enumerate(SPEC) if spec[0] == 'x0.png')
    (tmp_path / 'exclude.txt').write_text(x0 + '\n')
    dest = tmp_path / 'datasets'
    # The root is found by itself: Copepoda is the deepest taxon every annotated row shares.
    result = _build(['--source', str(tmp_path / 'ecotaxa_export.tsv'), '--dest', str(dest),
                     '--exclude', str(tmp_path / 'exclude.txt'), *BASE_ARGS])
    assert 'EcoTaxa root: Copepoda taken as the class' in result.output   # said, so a wrong guess is seen
    drops = _expected_drops(where) | {('images/unsorted.png', 'no_taxon')}
    manifest = _check_build(dest, SPEC_COUNTS, SPEC_DIRECT, drops, channels=3)
    assert manifest.options['format'] == 'ecotaxa'

    # With detritus in the export the hierarchies share nothing: --root names the top taxon.
    with open(tmp_path / 'ecotaxa_export.tsv', 'a') as f:
        f.write('obj_d\timages/d0.png\tvalidated\tnot-living>detritus\n')
    failed = _build(['--source', str(tmp_path / 'ecotaxa_export.tsv'), '--dest', str(tmp_path / 'x'), *BASE_ARGS],
                    expect_ok=False)
    assert failed.exit_code == 1 and 'pass --root' in failed.output
    _build(['--source', str(tmp_path / 'ecotaxa_export.tsv'), '--dest', str(tmp_path / 'rooted'), '--root', 'Copepoda',
            '--exclude', str(tmp_path / 'exclude.txt'), *BASE_ARGS])
    rooted = taxonomy.load_manifest(tmp_path / 'rooted')
    assert {n: rooted.num_images(n) for n in rooted.taxa} == SPEC_COUNTS
    assert [d['detail'] for d in rooted.dropped if d['source'] == 'images/d0.png'] == [
        "not-living>detritus does not contain --root 'Copepoda'"]

#----------------------------------------------------------------------------
# Manifest API.

def test_manifest_api(tmp_path):
    dest = _build_tree(tmp_path)
    m = taxonomy.load_manifest(dest)
    assert list(m.taxa) == ['Copepoda', 'Calanoida', 'Cyclopoida', 'Harpacticoida']   # tree order
    assert m.children('Copepoda') == ['Calanoida', 'Cyclopoida', 'Harpacticoida'] and m.children('Calanoida') == []
    assert m.parent('Cyclopoida') == 'Copepoda' and m.parent('Copepoda') is None
    assert m.ancestors('Harpacticoida') == ['Copepoda'] and m.ancestors('Copepoda') == []
    assert m.siblings('Calanoida') == ['Cyclopoida', 'Harpacticoida'] and m.siblings('Copepoda') == []
    assert m.dataset_path('Calanoida') == dest / 'Calanoida.zip' and m.rank('Calanoida') == 'order'
    assert m.num_images('Copepoda') == 8    # x0 is not excluded here
    assert m.format_tree() == ('8 Copepoda (class) = 4 Calanoida + 2 Cyclopoida + 1 Harpacticoida + 1 unplaced\n'
                               '  4 Calanoida (order)\n  2 Cyclopoida (order)\n  1 Harpacticoida (order)')
    assert taxonomy.load_manifest(dest / 'manifest.json').taxa == m.taxa
    with pytest.raises(taxonomy.ManifestError, match="unknown taxon 'Poecilostomatoida'"):
        m.children('Poecilostomatoida')
    data = json.loads((dest / 'manifest.json').read_text())
    data['taxa']['Calanoida']['parent'] = 'Cyclopoida'
    (tmp_path / 'bad').mkdir()
    (tmp_path / 'bad' / 'manifest.json').write_text(json.dumps(data))
    with pytest.raises(taxonomy.ManifestError, match="lists child 'Calanoida', whose parent is not 'Copepoda'"):
        taxonomy.load_manifest(tmp_path / 'bad')
    (tmp_path / 'bad' / 'manifest.json').write_text('{"format": ')
    with pytest.raises(taxonomy.ManifestError, match='not valid JSON'):
        taxonomy.load_manifest(tmp_path / 'bad')
    with pytest.raises(taxonomy.ManifestError, match='no such file'):
        taxonomy.load_manifest(tmp_path / 'nowhere')
    (dest / 'Cyclopoida.zip').write_bytes(b'changed')
    assert m.verify('Cyclopoida') == 'SHA-256 differs from the manifest' and m.verify('Calanoida') == 'ok'

#----------------------------------------------------------------------------
# Bad input: a one-line error naming the file and the problem.

def _one_line_error(args) -> str:
    result = CliRunner().invoke(dataset_tool_ext.cmdline, args)
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('Error: '), result.output
    return lines[0]

def test_bad_input(tmp_path):
    src = tmp_path / 'photos'
    (src / 'Copepoda' / 'Calanoida').mkdir(parents=True)
    Image.fromarray(_pattern(0, 80, 72, False)).save(src / 'Copepoda' / 'Calanoida' / 'a.png')
    table = tmp_path / 'bold.tsv'
    table.write_text('processid\timage_url\tphylum_name\tclass_name\tfamily_name\tgenus_name\tspecies_name\n'
                     'P1\ta.png\tArthropoda\tCopepoda\t\t\t\n')
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'a_file').write_text('')
    dest = str(tmp_path / 'out')
    line = _one_line_error(['build', '--source', str(table), '--dest', dest])
    assert str(table) in line and "no column 'order_name'" in line
    (tmp_path / 'eco.tsv').write_text('object_id\timg_file_name\nobj_1\ta.png\n')
    line = _one_line_error(['build', '--source', str(tmp_path / 'eco.tsv'), '--dest', dest, '--format', 'ecotaxa'])
    assert 'eco.tsv' in line and "no column 'object_annotation_hierarchy'" in line
    line = _one_line_error(['build', '--source', str(src), '--dest', dest, '--ranks', 'class,ordr'])
    assert "unknown rank 'ordr'" in line
    line = _one_line_error(['build', '--source', str(table), '--dest', dest, '--ranks', 'class,suborder',
                            '--rank-cols', 'phylum_name,class_name'])
    assert str(table) in line and "unknown rank 'suborder'" in line
    line = _one_line_error(['build', '--source', str(src), '--dest', dest, '--ranks', 'order,class'])
    assert 'from the top down' in line
    line = _one_line_error(['build', '--source', str(tmp_path / 'empty'), '--dest', dest])
    assert 'no images found' in line
    line = _one_line_error(['build', '--source', str(tmp_path / 'nothing'), '--dest', dest])
    assert 'no such file or folder' in line
    # A destination below a regular file cannot be created, even by root.
    line = _one_line_error(['build', '--source', str(src), '--dest', str(tmp_path / 'a_file' / 'out'), *BASE_ARGS])
    assert 'destination is not writable' in line and 'a_file' in line
    line = _one_line_error(['build', '--source', str(src), '--dest', dest, '--resolution', '48'])
    assert 'power of two' in line
    line = _one_line_error(['build', '--source', str(src), '--dest', dest, '--exclude', str(tmp_path / 'no.txt')])
    assert 'no.txt' in line and 'exclusion list' in line
    line = _one_line_error(['build', '--source', str(src), '--dest', dest])   # 80x72 < the default 256
    assert 'all 1 images were dropped (too_small 1); nothing to build' in line
    line = _one_line_error(['info', str(tmp_path / 'empty')])
    assert 'manifest.json: no such file' in line
    (tmp_path / 'homonyms').mkdir()
    for parent in ['Copepoda', 'Ostracoda']:
        (tmp_path / 'homonyms' / parent / 'Incertae').mkdir(parents=True)
        Image.fromarray(_pattern(1, 80, 72, False)).save(tmp_path / 'homonyms' / parent / 'Incertae' / 'a.png')
    line = _one_line_error(['build', '--source', str(tmp_path / 'homonyms'), '--dest', dest])
    assert "taxon 'Incertae' appears both" in line
    line = _one_line_error(['build', '--source', str(src), '--dest', dest, '--ranks', ','])
    assert '--ranks is empty' in line
    line = _one_line_error(['build', '--source', str(src), '--dest', dest, '--ranks', 'class,order,family'])
    assert "no image is identified to rank 'family'" in line and 'class, order' in line
    (tmp_path / 'latin1.txt').write_bytes('caf\xe9\n'.encode('latin-1'))
    line = _one_line_error(['build', '--source', str(src), '--dest', dest, '--exclude', str(tmp_path / 'latin1.txt')])
    assert 'latin1.txt' in line and 'not UTF-8' in line
    (tmp_path / 'urls.tsv').write_text('processid\timage_url\tclass_name\torder_name\nP1\thttp://127.0.0.1:9/a.jpg\tCopepoda\tCalanoida\n')
    line = _one_line_error(['build', '--source', str(tmp_path / 'urls.tsv'), '--dest', dest, '--rank-cols', 'class_name,order_name',
                            '--cache', str(tmp_path / 'a_file' / 'cache')])
    assert 'cannot create the download cache' in line and 'a_file' in line

def test_dry_run_writes_nothing(tmp_path):
    src = tmp_path / 'photos'
    _write_collection(src, lambda file, path: '/'.join(path) + '/' + file)
    dest = tmp_path / 'datasets'
    result = _build(['--source', str(src), '--dest', str(dest), '--dry-run', *BASE_ARGS])
    assert not dest.exists()
    # Before the image checks: every listed file of a taxon is a candidate.
    assert '13 Copepoda (class) = 5 Calanoida + 5 Cyclopoida + 1 Harpacticoida + 2 unplaced' in result.output
    assert 'Copepoda.zip, Calanoida.zip, Cyclopoida.zip, Harpacticoida.zip, manifest.json' in result.output

def test_interrupted_build_leaves_previous_datasets_intact(tmp_path, monkeypatch):
    src = tmp_path / 'photos'
    _write_collection(src, lambda file, path: '/'.join(path) + '/' + file)
    dest = tmp_path / 'datasets'
    _build(['--source', str(src), '--dest', str(dest), *BASE_ARGS])
    before = sorted(p.name for p in dest.iterdir())
    real_write_zip = collection.write_zip
    calls = []
    def write_zip_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_write_zip(*args, **kwargs)
    monkeypatch.setattr(collection, 'write_zip', write_zip_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        collection.build_datasets(_build_options(src, dest, square='crop'), log=lambda *a: None)
    # No temporary zip or staging folder is left; the old zips still match the old manifest.
    assert sorted(p.name for p in dest.iterdir()) == before
    manifest = taxonomy.load_manifest(dest)
    assert all(manifest.verify(name) == 'ok' for name in manifest.taxa)

def _build_options(src, dest, **overrides) -> collection.BuildOptions:
    return collection.BuildOptions(source=str(src), dest=str(dest), resolution=RES, min_size=MIN, workers=1,
                                   download_threads=2, timeout=5.0, retries=0, **overrides)

def test_each_stage_accounts_for_what_it_was_given(tmp_path):
    # The build is its stages: each passes on or drops every item it gets, and their drops, sorted by source, are the
    # manifest's. The duplicate stage agrees with a brute-force search over Python ints.
    src = tmp_path / 'photos'
    where = _write_collection(src, lambda file, path: '/'.join(path) + '/' + file)
    (tmp_path / 'exclude.txt').write_text('Copepoda/Calanoida/x0.png\n')
    options = collection.checked_options(_build_options(src, tmp_path / 'datasets', max_per_taxon=1,
                                                        exclude=str(tmp_path / 'exclude.txt')))
    quiet = lambda *a: None
    records, fmt = collection.read_records(options, quiet)
    assert fmt == 'tree' and [r.source for r in records] == sorted(where.values())
    placed = collection.place_records(records, options, quiet)
    fetched = collection.fetch_records(placed.kept, options)
    (tmp_path / 'staged').mkdir()
    decoded = collection.decode_images(fetched.kept, options, tmp_path / 'staged')
    unique = collection.drop_duplicates(decoded.kept, options.near_dup_threshold)
    capped = collection.cap_per_taxon(unique.kept, options.max_per_taxon)
    stages = [(records, placed), (placed.kept, fetched), (fetched.kept, decoded), (decoded.kept, unique), (unique.kept, capped)]
    reasons = [{d['reason'] for d in sifted.dropped} for _given, sifted in stages]
    assert reasons == [{'excluded'}, set(), {'too_small', 'unreadable'}, {'duplicate', 'near_duplicate'}, {'max_per_taxon'}]
    for given, sifted in stages:
        assert len(sifted.kept) + len(sifted.dropped) == len(given)
    # --max-per-taxon 1: one image each of Calanoida (3 left), Cyclopoida (2), Harpacticoida (1), Copepoda itself (1).
    assert sorted(i.record.path[-1] for i in capped.kept) == ['Calanoida', 'Copepoda', 'Cyclopoida', 'Harpacticoida']

    kept, near = [], {}
    for image in decoded.kept:
        if any(image.facts['content'] == k.facts['content'] for k in kept):
            continue
        distances = [bin(image.facts['dhash'] ^ k.facts['dhash']).count('1') for k in kept]
        if distances and min(distances) <= options.near_dup_threshold:
            near[image.record.source] = (min(distances), kept[distances.index(min(distances))].record.source)
            continue
        kept.append(image)
    assert [i.record.source for i in unique.kept] == [i.record.source for i in kept]
    assert {d['source']: d['detail'] for d in unique.dropped if d['reason'] == 'near_duplicate'} == \
        {source: f'dHash distance {n} to {other}' for source, (n, other) in near.items()}

    collection.build_datasets(options, log=quiet)
    drops = sorted((d for _given, sifted in stages for d in sifted.dropped), key=lambda d: d['source'])
    assert taxonomy.load_manifest(tmp_path / 'datasets').dropped == drops

def test_near_duplicates_are_dropped_up_to_and_including_the_threshold():
    # dHashes at chosen Hamming distances from the first image: 4 (= the threshold) is a near duplicate, 5 is not; an
    # exact copy is a duplicate whatever its hash; a later image is compared with kept images only; -1 turns it off.
    def image(source, content, dhash):
        return collection.StagedImage(record=types.SimpleNamespace(source=source), staged='', facts=dict(content=content, dhash=dhash))
    bits = lambda *positions: sum(1 << p for p in positions)
    images = [image('a', 'A', 0), image('b', 'B', bits(1, 7, 20, 63)), image('c', 'C', bits(0, 1, 2, 3, 4)),
              image('d', 'A', bits(10, 11, 12, 13, 14, 15, 16, 17)), image('e', 'E', bits(0, 1, 2, 3, 4, 40))]
    sifted = collection.drop_duplicates(images, threshold=4)
    assert [i.record.source for i in sifted.kept] == ['a', 'c']
    assert sifted.dropped == [dict(source='b', reason='near_duplicate', detail='dHash distance 4 to a'),
                              dict(source='d', reason='duplicate', detail='same pixels as a'),
                              dict(source='e', reason='near_duplicate', detail='dHash distance 1 to c')]
    assert [i.record.source for i in collection.drop_duplicates(images, threshold=-1).kept] == ['a', 'b', 'c', 'e']
    assert [i.record.source for i in collection.drop_duplicates(images, threshold=3).kept] == ['a', 'b', 'c']

#----------------------------------------------------------------------------
# Image helpers, against hand-computed values.

def test_image_helpers():
    # Border median: 3x3 image, border values 1..8 around a centre of 200 -> median of the 8 border pixels.
    img = Image.fromarray(np.array([[1, 2, 3], [8, 200, 4], [7, 6, 5]], np.uint8))
    assert collection.border_colour(img) == 4     # median(1..8) = 4.5, rounded half to even
    assert collection.to_square(Image.new('RGB', (10, 6)), 'crop').size == (6, 6)
    assert collection.to_square(Image.new('RGB', (10, 6)), 'pad').size == (10, 10)
    assert collection.to_square(Image.new('RGB', (10, 6)), 'stretch').size == (10, 6)
    crop = np.asarray(collection.to_square(Image.fromarray(np.arange(60, dtype=np.uint8).reshape(6, 10)), 'crop'))
    assert crop[0].tolist() == [2, 3, 4, 5, 6, 7]    # centre columns 2..7
    # dHash: brightness rising to the right sets every bit, falling clears every bit.
    ramp = np.tile(np.arange(9, dtype=np.uint8) * 20, (8, 1))
    assert collection.dhash64(Image.fromarray(ramp)) == 2 ** 64 - 1
    assert collection.dhash64(Image.fromarray(ramp[:, ::-1].copy())) == 0
    # 16-bit grayscale maps 65535 -> 255 and 257 * k -> k.
    img16 = Image.fromarray(np.array([[0, 257 * 100, 65535]], np.uint16))
    canon, gray = collection.to_canonical(img16)
    assert gray and canon.mode == 'L' and np.asarray(canon).tolist() == [[0, 100, 255]]
    colour = np.zeros((4, 4, 3), np.uint8)
    colour[0, 0] = (10, 13, 10)     # |R - G| = 3 > 2: colour
    assert collection.to_canonical(Image.fromarray(colour))[1] is False
    colour[0, 0] = (10, 12, 10)
    assert collection.to_canonical(Image.fromarray(colour))[1] is True

def test_default_min_size_is_256_on_both_sides(tmp_path):
    results = {}
    for w, h in [(300, 260), (256, 256), (255, 400), (400, 200)]:
        Image.fromarray(_pattern(w, w, h, False)).save(tmp_path / f'{w}x{h}.png')
        task = dict(index=0, local=str(tmp_path / f'{w}x{h}.png'), min_size=256, resolution=16, square='pad',
                    compress_level=1, stage=str(tmp_path / f'{w}x{h}.staged.png'))
        results[(w, h)] = collection.process_image(task)
    assert [r['status'] for r in results.values()] == ['ok', 'ok', 'too_small', 'too_small']
    assert results[(255, 400)]['detail'] == '255x400 < 256'
    assert Image.open(tmp_path / '300x260.staged.png').size == (16, 16)

def test_exif_rotation_is_applied(tmp_path):
    # 80x40, left half black, right half white, stored with EXIF orientation 6 (shown rotated 90 degrees clockwise).
    arr = np.zeros((40, 80), np.uint8)
    arr[:, 40:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(tmp_path / 'rotated.png', exif=exif)
    task = dict(index=0, local=str(tmp_path / 'rotated.png'), min_size=0, resolution=40, square='crop',
                compress_level=1, stage=str(tmp_path / 'staged.png'))
    assert collection.process_image(task)['width'] == 80     # as stored
    staged = np.asarray(Image.open(tmp_path / 'staged.png'))
    # Upright it is 40x80 with the black half on top; the centre crop keeps rows 20..59.
    assert staged.shape == (40, 40) and (staged[:20] == 0).all() and (staged[20:] == 255).all()

#----------------------------------------------------------------------------
# NumPy 1 or 2: the near-duplicate check counts bits without np.bitwise_count (NumPy >= 2 only) where it is missing.

def test_popcount_paths_agree_with_python_ints():
    rnd = np.random.RandomState(0)
    values = np.concatenate([rnd.randint(0, 2 ** 62, size=200, dtype=np.int64).astype(np.uint64) * np.uint64(4) + np.uint64(3),
                             np.array([0, 1, 2 ** 63, 2 ** 64 - 1], dtype=np.uint64)]).reshape(4, 51)
    expected = [[bin(int(v)).count('1') for v in row] for row in values]
    impls = ['ref', 'bytes', 'auto'] + (['numpy'] if hasattr(np, 'bitwise_count') else [])
    for impl in impls:
        counts = collection.popcount64(values, impl=impl)
        assert counts.shape == (4, 51) and counts.tolist() == expected, impl
    assert collection.popcount64(np.array([], dtype=np.uint64), impl='bytes').shape == (0,)
    with pytest.raises(ValueError, match="impl 'fast'"):
        collection.popcount64(values, impl='fast')

def test_near_duplicates_found_without_bitwise_count(tmp_path, monkeypatch):
    # As on NumPy 1: the build must drop the same near duplicate with the same dHash distance.
    src = tmp_path / 'photos'
    where = _write_collection(src, lambda file, path: '/'.join(path) + '/' + file)
    _build(['--source', str(src), '--dest', str(tmp_path / 'numpy2'), *BASE_ARGS])
    monkeypatch.delattr(np, 'bitwise_count', raising=False)
    _build(['--source', str(src), '--dest', str(tmp_path / 'numpy1'), *BASE_ARGS])
    near = [{d['source']: d['detail'] for d in taxonomy.load_manifest(tmp_path / name).dropped if d['reason'] == 'near_duplicate'}
            for name in ('numpy2', 'numpy1')]
    assert near[0] == near[1] and list(near[1]) == [where['a_near.jpg']]

#----------------------------------------------------------------------------
# Speed (issue 22): each image decoded and encoded once, JPEG draft decoding within a grey level, no torch.

def _child_entries_equal_parent(dest: Path) -> int:
    """Assert each child zip's image entries are byte-identical to the parent's of the same name; returns how many."""
    manifest = taxonomy.load_manifest(dest)
    checked = 0
    with zipfile.ZipFile(manifest.dataset_path('Copepoda')) as parent:
        for child in manifest.children('Copepoda'):
            with zipfile.ZipFile(manifest.dataset_path(child)) as zf:
                for info in zf.infolist():
                    if info.filename.endswith('.png'):
                        assert zf.read(info) == parent.read(info.filename)
                        assert info.CRC == parent.getinfo(info.filename).CRC
                        checked += 1
    return checked

@pytest.mark.parametrize('channels', ['auto', '3', '1'])
def test_parent_and_child_zips_hold_byte_identical_entries(tmp_path, channels):
    src = tmp_path / 'photos'
    _write_collection(src, lambda file, path: '/'.join(path) + '/' + file)
    manifest = collection.build_datasets(_build_options(src, tmp_path / 'datasets', channels=channels), log=lambda *a: None)
    in_children = sum(manifest.num_images(child) for child in manifest.children('Copepoda'))
    assert in_children > 0 and _child_entries_equal_parent(tmp_path / 'datasets') == in_children

def test_each_image_is_decoded_and_encoded_once(tmp_path, monkeypatch):
    # Mixed gray and colour under --channels auto: the gray images are encoded (as RGB) once the count is known, not
    # staged as gray PNGs and encoded again; nothing decodes a staged image.
    src = tmp_path / 'photos'
    _write_collection(src, lambda file, path: '/'.join(path) + '/' + file)
    encoded, opened = [], []
    write_png, image_open = collection._write_png, collection.Image.open
    monkeypatch.setattr(collection, '_write_png', lambda path, img, level: encoded.append(img.mode) or write_png(path, img, level))
    monkeypatch.setattr(collection.Image, 'open', lambda fp, *a, **k: opened.append(str(fp)) or image_open(fp, *a, **k))
    manifest = collection.build_datasets(_build_options(src, tmp_path / 'datasets'), log=lambda *a: None)
    counts = manifest.dropped_counts
    # Every image that decoded is encoded once, as RGB (duplicates are found after encoding), and no more.
    assert encoded == ['RGB'] * (manifest.num_images('Copepoda') + counts['duplicate'] + counts['near_duplicate'])
    assert not any(name.endswith('.png') and '.build-' in name for name in opened)

def _specimen_jpeg(path: Path, w: int, h: int, seed: int) -> None:
    """A flat slide with a finely textured specimen (3-pixel features) in the middle, saved at JPEG quality 90."""
    rng = np.random.default_rng(seed)
    arr = np.empty((h, w, 3), np.uint8)
    arr[:] = rng.integers(150, 256, 3)
    tex = Image.fromarray(rng.integers(0, 256, (h // 6, w // 6, 3), dtype=np.uint8)).resize((w // 2, h // 2), Image.BICUBIC)
    arr[h // 4:h // 4 + h // 2, w // 4:w // 4 + w // 2] = np.asarray(tex)
    Image.fromarray(arr).save(path, quality=90)

@pytest.mark.parametrize('square', collection.SQUARE_MODES)
def test_jpeg_draft_is_within_one_grey_level_of_a_full_decode(tmp_path, square):
    # The bound stated in docs/dataset_tool.md: mean absolute difference <= 1 grey level (of 255) at 256 px.
    sizes = [(1100, 800), (800, 1300), (2100, 1500), (1536, 1536), (3200, 2100), (1600, 1200)]
    for i, (w, h) in enumerate(sizes):
        _specimen_jpeg(tmp_path / f'{i}.jpg', w, h, i)
        out = {}
        for draft in (False, True):
            task = dict(index=0, local=str(tmp_path / f'{i}.jpg'), min_size=0, resolution=256, square=square,
                        compress_level=1, stage=str(tmp_path / f'{i}-{draft}.png'), draft=draft)
            facts = collection.process_image(task)
            assert facts['status'] == 'ok' and (facts['width'], facts['height']) == (w, h)    # as stored
            out[draft] = np.asarray(Image.open(task['stage'])).astype(np.float64)
        assert out[True].shape == out[False].shape == (256, 256, 3)
        if collection.draft_scale(w, h, 256, square) > 1:
            assert np.abs(out[True] - out[False]).mean() <= 1.0, (w, h, square)
        else:
            assert np.array_equal(out[True], out[False])
    assert collection.draft_scale(1100, 800, 256, 'pad') == 1 and collection.draft_scale(1600, 1200, 256, 'pad') == 2
    assert collection.draft_scale(3200, 2100, 256, 'crop') == 2 and collection.draft_scale(3200, 2100, 256, 'pad') == 4

def test_jpeg_draft_follows_exif_rotation(tmp_path):
    # A wide JPEG stored with orientation 6 is tall upright; the reduced decode squares the upright image too.
    _specimen_jpeg(tmp_path / 'plain.jpg', 1400, 900, 0)     # crop to 128 px: decoded at 1/2
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(tmp_path / 'plain.jpg').save(tmp_path / 'rotated.jpg', quality=90, exif=exif)
    out = {}
    for draft in (False, True):
        task = dict(index=0, local=str(tmp_path / 'rotated.jpg'), min_size=0, resolution=128, square='crop',
                    compress_level=1, stage=str(tmp_path / f'{draft}.png'), draft=draft)
        assert collection.process_image(task)['status'] == 'ok'
        out[draft] = np.asarray(Image.open(task['stage'])).astype(np.float64)
    assert np.abs(out[True] - out[False]).mean() <= 1.0

def test_wide_and_tall_images_resize_to_the_same_pixels(tmp_path):
    # square_resized skips the row pass over the padded rows of a wide image and over the padded columns of a tall
    # one: bit-identical to pad + resize, for smooth and noisy images (noise next to the padding is the hard case).
    rng = np.random.default_rng(5)
    sizes = [(900, 400, 'RGB', 256), (513, 512, 'L', 256), (400, 900, 'RGB', 256), (300, 300, 'RGB', 256),
             (1, 700, 'RGB', 256), (3, 300, 'L', 256), (511, 512, 'RGB', 256), (257, 1999, 'L', 64), (600, 601, 'RGB', 32),
             (50, 100, 'RGB', 256), (7, 200, 'L', 256), (90, 255, 'RGB', 256)]                  # upscaled
    sizes += [(int(rng.integers(1, h)), h, 'RGB' if i % 2 else 'L', 256) for i, h in enumerate(rng.integers(257, 1200, 12))]
    for i, (w, h, mode, res) in enumerate(sizes):
        channels = (3,) if mode == 'RGB' else ()
        if i % 3 == 0:
            img = Image.fromarray(rng.integers(0, 256, (h, w) + channels, dtype=np.uint8))
        else:
            arr = rng.integers(0, 256, (max(h // 4, 1), max(w // 4, 1)) + channels, dtype=np.uint8)
            img = Image.fromarray(arr).resize((w, h), Image.BICUBIC)
        expected = collection.to_square(img, 'pad').resize((res, res), Image.Resampling.LANCZOS)
        assert np.array_equal(np.asarray(collection.square_resized(img, 'pad', res)), np.asarray(expected)), (w, h, mode)

def test_zip_entries_are_pillows_png_of_their_pixels(tmp_path):
    # The zips' bytes are the manifest's SHA-256s, and those are every trained stage's fingerprint: the same photos must
    # give the same bytes as every earlier build, or a rebuild (make datasets) would retrain every stage of every plan.
    # Earlier builds stored Pillow's PNG at --compress-level (default 1); the reference re-encodes each entry's pixels.
    src = tmp_path / 'photos'
    _write_collection(src, lambda file, path: '/'.join(path) + '/' + file)
    manifest = collection.build_datasets(_build_options(src, tmp_path / 'datasets'), log=lambda *a: None)
    checked = 0
    with zipfile.ZipFile(manifest.dataset_path('Copepoda')) as zf:
        for name in zf.namelist():
            if not name.endswith('.png'):
                continue
            data = zf.read(name)
            buf = io.BytesIO()
            Image.open(io.BytesIO(data)).save(buf, format='PNG', compress_level=1)
            assert buf.getvalue() == data, name
            checked += 1
    assert checked == manifest.num_images('Copepoda') > 0

def test_gray_test_finds_one_coloured_pixel_outside_its_sample():
    arr = np.full((64, 80, 3), 128, np.uint8)
    arr[13, 51] = (128, 131, 128)       # not on the 8-pixel sampling grid
    assert collection.to_canonical(Image.fromarray(arr))[1] is False
    arr[13, 51] = (128, 130, 128)
    assert collection.to_canonical(Image.fromarray(arr))[1] is True

def test_dataset_path_does_not_import_torch(tmp_path):
    # Importing torch took 0.8 s of the tool's 1.5 s start-up; a build of local files needs neither it nor requests.
    src = tmp_path / 'photos'
    _write_collection(src, lambda file, path: '/'.join(path) + '/' + file)
    code = ('import sys; import dataset_tool_ext; '
            f'sys.argv = ["dataset_tool_ext.py", "build", "--source", {str(src)!r}, "--dest", {str(tmp_path / "d")!r}, '
            f'"--resolution", "{RES}", "--min-size", "{MIN}", "--workers", "2"]; '
            'import click; dataset_tool_ext.cmdline.main(standalone_mode=False); '
            'print(sorted(m for m in ("torch", "scipy", "requests") if m in sys.modules))')
    import subprocess  # pylint: disable=import-outside-toplevel
    import sys  # pylint: disable=import-outside-toplevel
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, '-c', code], cwd=root, capture_output=True, text=True, check=False,
                          env=dict(__import__('os').environ, PYTHONPATH=str(root)))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == '[]'
    assert (tmp_path / 'd' / 'Copepoda.zip').is_file()
