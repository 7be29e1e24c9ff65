"""dataset_tool_ext.py synthesize: generated images per taxon as datasets / tree / EcoTaxa, provenance, resume, filter."""

import hashlib
import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import dataset_tool_ext
from stylegan2ada.dataset import ImageFolderDataset
from stylegan2ada.image_utils import generate_images
from stylegan2ada.metrics.detectors import jit_load
from stylegan2ada.networks import Discriminator, Generator
from stylegan2ada.pickles import save_network_pkl
from stylegan2ada.util import write_json_atomic
from taxogan_ext import collection, hierarchy, synthesize, taxonomy
from taxogan_ext.taxon_detector import DETECTOR_FORMAT, TaxonClassifier, save_taxon_detector

RES = 16
ORDERS = {'Calanoida': 4, 'Cyclopoida': 3, 'Harpacticoida': 2}      # real images per order
BUILD_ARGS = ['--resolution', str(RES), '--min-size', '0', '--near-dup-threshold', '-1', '--workers', '1']
TINY = dict(z_dim=8, w_dim=8, img_resolution=RES, img_channels=3, mapping_kwargs=dict(num_layers=2),
            synthesis_kwargs=dict(channel_base=64, channel_max=8))

#----------------------------------------------------------------------------
# A tiny collection, its datasets, and tiny generators.

def _pattern(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.asarray(PIL.Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).resize((40, 40), PIL.Image.NEAREST))

def _generator(path: Path, seed: int, c_dim: int = 0) -> str:
    torch.manual_seed(seed)
    G = Generator(c_dim=c_dim, **TINY).eval()
    save_network_pkl(path, dict(G=G, G_ema=G))
    return str(path)

def _run(args, ok=True):
    result = CliRunner().invoke(dataset_tool_ext.cmdline, args)
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result

def _one_line_error(args) -> str:
    result = _run(args, ok=False)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('Error: '), result.output
    return lines[0]

@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    """Datasets of Copepoda > three orders (real 16 px images), and one tiny generator per order."""
    root = tmp_path_factory.mktemp('synth')
    for k, (order, n) in enumerate(ORDERS.items()):
        folder = root / 'photos' / 'Copepoda' / order
        folder.mkdir(parents=True)
        for i in range(n):
            PIL.Image.fromarray(_pattern(10 * k + i)).save(folder / f'{order[:3]}{i}.png')
    _run(['build', '--source', str(root / 'photos'), '--dest', str(root / 'datasets'), *BUILD_ARGS])
    pkls = {order: _generator(root / f'{order}.pkl', seed=k + 1) for k, order in enumerate(ORDERS)}
    return root, root / 'datasets', pkls

def _load_G(pkl):
    from stylegan2ada.pickles import evaluation_network, load_network_pkl
    return evaluation_network(load_network_pkl(pkl)).eval()

def _expected_seeds(base: int, taxon: str, candidates) -> list[int]:
    """The documented seed rule, written out independently of the module."""
    first = int.from_bytes(hashlib.sha256(f'taxogan-synthesize/{base}/{taxon}'.encode()).digest()[:4], 'little')
    return [(first + i) % (1 << 32) for i in candidates]

def _decode(data: bytes) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(data)))

def _folder_bytes(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}

def _gen_args(pkls, *taxa):
    return [arg for t in taxa for arg in ('--generator', f'{t}={pkls[t]}')]

#----------------------------------------------------------------------------

def test_datasets_tree_and_ecotaxa_read_back_like_real_data(setup, tmp_path):
    root, datasets, pkls = setup
    out = tmp_path / 'out'
    _run(['synthesize', *_gen_args(pkls, 'Cyclopoida', 'Calanoida'), '--datasets', str(datasets), '--num', '5',
          '--seed', '7', '--with-real', '--format', 'datasets,tree,ecotaxa', '--outdir', str(out), '--quiet'])
    record = json.loads((out / synthesize.SYNTHESIS_FILE).read_text())
    assert sorted(os.listdir(out)) == ['datasets', 'ecotaxa', 'synthesis.json', 'tree']    # staging removed

    # Provenance: pickles and their SHA-256, seeds by the documented rule, sampling options, real/synthetic per image.
    for taxon in ('Calanoida', 'Cyclopoida'):
        gen = record['generators'][taxon]
        assert gen['pkl'] == pkls[taxon] and gen['sha256'] == hashlib.sha256(open(pkls[taxon], 'rb').read()).hexdigest()
        assert gen['label'] is None and gen['path'] == ['Copepoda', taxon]
        syn = [e for e in record['images'] if e['taxon'] == taxon and e['synthetic']]
        assert [e['seed'] for e in syn] == _expected_seeds(7, taxon, range(5))
        assert [e['file'] for e in syn] == [f'syn-{taxon}-{k:06d}.png' for k in range(5)]
        assert record['taxa'][taxon] == dict(num_real=ORDERS[taxon], num_synthetic=5, num_real_written=ORDERS[taxon],
                                             tried=5, kept=5, acceptance_rate=1.0)
    assert record['truncation_psi'] == 1.0 and record['noise_mode'] == 'const' and record['filter'] is None
    assert sum(not e['synthetic'] for e in record['images']) == 7
    assert all(e['file'].startswith('real-') != e['synthetic'] for e in record['images'])

    # datasets: as build writes them; the parent zip labelled by child, with the class names.
    manifest = taxonomy.load_manifest(out / 'datasets')
    assert list(manifest.taxa) == ['Copepoda', 'Calanoida', 'Cyclopoida'] and manifest.ranks == ['class', 'order']
    assert {n: manifest.num_images(n) for n in manifest.taxa} == {'Copepoda': 17, 'Calanoida': 9, 'Cyclopoida': 8}
    assert manifest.labels('Copepoda') == ['Calanoida', 'Cyclopoida'] and manifest.resolution == RES
    assert all(manifest.verify(n) == 'ok' for n in manifest.taxa)
    parent = ImageFolderDataset(str(out / 'datasets' / 'Copepoda.zip'), use_labels=True)
    assert len(parent) == 17 and parent.label_names == ['Calanoida', 'Cyclopoida']
    for i, name in enumerate(parent.image_fnames):
        taxon = next(t for t in ('Calanoida', 'Cyclopoida') if t in name)
        assert int(np.argmax(parent.get_label(i))) == ['Calanoida', 'Cyclopoida'].index(taxon)

    # Every synthetic image is its generator's output for the recorded seed, made again here one at a time.
    with zipfile.ZipFile(out / 'datasets' / 'Calanoida.zip') as zf, \
            zipfile.ZipFile(datasets / 'Calanoida.zip') as real_zf:
        for e in record['images']:
            if e['taxon'] != 'Calanoida':
                continue
            data = zf.read(e['file'])
            assert hashlib.sha256(data).hexdigest() == e['sha256']
            if e['synthetic']:
                ref = generate_images(_load_G(pkls['Calanoida']), [e['seed']])[0].numpy().transpose(1, 2, 0)
                np.testing.assert_array_equal(_decode(data), ref)
            else:
                assert data == real_zf.read(e['source'])                # real images: the source bytes

    # tree: build reads it back to the same taxa and counts.
    _run(['build', '--source', str(out / 'tree'), '--dest', str(tmp_path / 'rebuilt'), '--tree-ranks', 'class,order',
          *BUILD_ARGS])
    rebuilt = taxonomy.load_manifest(tmp_path / 'rebuilt')
    assert {n: rebuilt.num_images(n) for n in rebuilt.taxa} == {n: manifest.num_images(n) for n in manifest.taxa}
    assert sum(rebuilt.dropped_counts.values()) == 0

    # ecotaxa: the dataset tool's EcoTaxa reader gives the same taxa; the extra columns say what each object is.
    table = out / 'ecotaxa' / synthesize.ECOTAXA_TABLE
    records = collection.read_ecotaxa(table, ['class', 'order'], None, None)
    assert sorted((r.source, r.lineage) for r in records) == sorted(
        (e['file'], (('class', 'Copepoda'), ('order', e['taxon']))) for e in record['images'])
    header, rows = collection.read_table(table)
    assert len(rows) == 17 and table.read_text().splitlines()[1].split('\t')[:2] == ['[t]', '[f]']
    by_file = {e['file']: e for e in record['images']}
    for _line, row in rows:
        e = by_file[row['img_file_name']]
        assert row['object_synthetic'] == ('1' if e['synthetic'] else '0')
        assert row['object_seed'] == (str(e['seed']) if e['synthetic'] else '')
        assert row['object_generator_sha256'] == (record['generators'][e['taxon']]['sha256'] if e['synthetic'] else '')
        assert (out / 'ecotaxa' / row['img_file_name']).read_bytes() == zipfile.ZipFile(
            out / 'datasets' / f'{e["taxon"]}.zip').read(e['file'])
    _run(['build', '--source', str(table), '--dest', str(tmp_path / 'from-eco'), *BUILD_ARGS])
    eco = taxonomy.load_manifest(tmp_path / 'from-eco')
    assert {n: eco.num_images(n) for n in eco.taxa} == {n: manifest.num_images(n) for n in manifest.taxa}


class _Killed(Exception):
    """Stands for a kill (click would turn a KeyboardInterrupt into its own exit)."""


def test_interrupted_or_damaged_export_resumes_with_the_same_bytes(setup, tmp_path, monkeypatch):
    _root, datasets, pkls = setup
    args = [*_gen_args(pkls, 'Calanoida', 'Cyclopoida'), '--datasets', str(datasets), '--num', '20',
            '--noise-mode', 'random', '--format', 'datasets,tree,ecotaxa', '--quiet']
    _run(['synthesize', *args, '--outdir', str(tmp_path / 'ref')])
    reference = _folder_bytes(tmp_path / 'ref')

    # Killed after 20 staged images: block 0 of Calanoida complete, block 1 begun.
    real_write, real_render = synthesize._write_png, synthesize.render
    written, renders = [], []
    def failing_write(path, data):
        if len(written) == 20:
            raise _Killed
        written.append(path)
        real_write(path, data)
    monkeypatch.setattr(synthesize, '_write_png', failing_write)
    result = _run(['synthesize', *args, '--outdir', str(tmp_path / 'b')], ok=False)
    assert isinstance(result.exception, _Killed) and len(written) == 20
    assert not (tmp_path / 'b' / synthesize.SYNTHESIS_FILE).exists()
    monkeypatch.setattr(synthesize, '_write_png', real_write)
    monkeypatch.setattr(synthesize, 'render', lambda *a, **k: renders.append(a[1]) or real_render(*a, **k))
    _run(['synthesize', *args, '--outdir', str(tmp_path / 'b')])
    # Only the unfinished blocks were made again: Calanoida's second, both of Cyclopoida.
    assert [seeds[0] for seeds in renders] == [_expected_seeds(0, 'Calanoida', [16])[0],
                                               *_expected_seeds(0, 'Cyclopoida', [0, 16])]
    assert _folder_bytes(tmp_path / 'b') == reference

    # A complete export is left alone; a damaged one is repaired to the same bytes.
    renders.clear()
    result = _run(['synthesize', *args, '--outdir', str(tmp_path / 'b')])
    assert 'nothing to do' in result.output and renders == []
    os.remove(tmp_path / 'b' / 'tree' / 'Copepoda' / 'Cyclopoida' / 'syn-Cyclopoida-000003.png')
    zip_path = tmp_path / 'b' / 'datasets' / 'Calanoida.zip'
    zip_path.write_bytes(zip_path.read_bytes()[:100])
    _run(['synthesize', *args, '--outdir', str(tmp_path / 'b')])
    assert _folder_bytes(tmp_path / 'b') == reference


def _fake_trained_plan(datasets: Path, outdir: Path, pkls: dict) -> hierarchy.Plan:
    """A descending plan whose stages are 'trained' (stage.json + a pickle per stage), as train_hier.py leaves it."""
    manifest = taxonomy.load_manifest(datasets)
    plan = hierarchy.build_plan(manifest, str(outdir), ['descending'], targets=['Calanoida', 'Cyclopoida'],
                                parent='Copepoda')
    for k, stage in enumerate(plan.stages):
        folder = outdir / stage.key
        folder.mkdir(parents=True)
        pkl = pkls.get(stage.taxon) or _generator(folder / 'g.pkl', seed=100 + k)
        final = folder / 'network-snapshot-000001.pkl'
        final.write_bytes(Path(pkl).read_bytes())
        write_json_atomic(folder / hierarchy.STAGE_FILE, dict(state='trained', final_pkl=final.name))
    write_json_atomic(outdir / hierarchy.PLAN_FILE, plan.to_dict())
    return plan


def test_plan_method_uses_the_networks_the_utility_measures_use(setup, tmp_path):
    _root, datasets, pkls = setup
    plan_dir = tmp_path / 'plan'
    plan = _fake_trained_plan(datasets, plan_dir, pkls)
    rows = hierarchy.row_generators(plan, plan_dir)['descending']
    out = tmp_path / 'out'
    _run(['synthesize', '--plan', str(plan_dir), '--method', 'descending', '--top-up', '6', '--outdir', str(out),
          '--quiet'])
    record = json.loads((out / synthesize.SYNTHESIS_FILE).read_text())
    for taxon in ('Calanoida', 'Cyclopoida'):
        gen = record['generators'][taxon]
        assert (gen['pkl'], gen['sha256'], gen['stage']) == (rows[taxon].pkl, rows[taxon].sha256, rows[taxon].stage)
    # --top-up 6: Calanoida has 4 real images, Cyclopoida 3.
    assert {t: v['num_synthetic'] for t, v in record['taxa'].items()} == {'Calanoida': 2, 'Cyclopoida': 3}
    manifest = taxonomy.load_manifest(out / 'datasets')
    assert {n: manifest.num_images(n) for n in manifest.taxa} == {'Copepoda': 5, 'Calanoida': 2, 'Cyclopoida': 3}
    e = next(e for e in record['images'] if e['taxon'] == 'Cyclopoida')
    ref = generate_images(_load_G(rows['Cyclopoida'].pkl), [e['seed']])[0].numpy().transpose(1, 2, 0)
    np.testing.assert_array_equal(_decode(zipfile.ZipFile(out / 'datasets' / 'Cyclopoida.zip').read(e['file'])), ref)

    line = _one_line_error(['synthesize', '--plan', str(plan_dir), '--method', 'lateral', '--num', '2',
                            '--outdir', str(tmp_path / 'x')])
    assert '--method lateral' in line and 'descending' in line
    line = _one_line_error(['synthesize', '--plan', str(plan_dir), '--method', 'descending', '--taxa', 'Harpacticoida',
                            '--num', '2', '--outdir', str(tmp_path / 'x')])
    assert "'Harpacticoida' is not a target of the plan" in line and 'Calanoida, Cyclopoida' in line


def _classifier(path: Path, balance_with=None) -> str:
    """An untrained taxon classifier; with balance_with (uint8 images), its Calanoida bias is set so that Calanoida is
    the top class for about half of those images (a filter that keeps some and rejects some)."""
    torch.manual_seed(3)
    model = TaxonClassifier(list(ORDERS), resolution=RES, channels=(8, 16)).eval()
    if balance_with is not None:
        with torch.no_grad():
            logits = model.logits(balance_with)                                               # [N, K]
            margin = logits[:, 1:].max(dim=1).values - logits[:, 0]                           # [N] what Calanoida lacks
            model.head.bias[0] += float(margin.median())
    save_taxon_detector(model, dict(format=DETECTOR_FORMAT, class_names=list(ORDERS), resolution=RES), str(path))
    return str(path)


def test_filter_keeps_the_first_images_at_or_above_the_threshold(setup, tmp_path):
    _root, datasets, pkls = setup
    # The reference: the classifier's probability of Calanoida for the first 64 candidates, computed here.
    seeds = _expected_seeds(0, 'Calanoida', range(64))
    images = generate_images(_load_G(pkls['Calanoida']), seeds)
    detector = _classifier(tmp_path / 'taxon.pt', balance_with=images[:32])
    with torch.no_grad():
        probs = torch.softmax(jit_load(detector).logits(images).to(torch.float64), dim=1)
    p, top = probs[:, 0].numpy(), probs.argmax(dim=1).numpy()
    threshold = float(np.quantile(p[:32], 0.6))
    # Kept: Calanoida is the classifier's top class, with p >= the threshold.
    passing = [i for i in range(64) if p[i] >= threshold and top[i] == 0]
    assert 5 <= len(passing) < 64 and passing[4] < 64 and passing[4] >= 5      # some images are rejected
    out = tmp_path / 'out'
    result = _run(['synthesize', *_gen_args(pkls, 'Calanoida'), '--datasets', str(datasets), '--num', '5',
                   '--filter', f'taxon:{detector}', '--filter-threshold', repr(threshold), '--format', 'datasets,ecotaxa',
                   '--outdir', str(out), '--quiet'])
    record = json.loads((out / synthesize.SYNTHESIS_FILE).read_text())
    kept = [e for e in record['images'] if e['synthetic']]
    assert [e['candidate'] for e in kept] == passing[:5]
    assert [e['seed'] for e in kept] == [seeds[i] for i in passing[:5]]
    np.testing.assert_allclose([e['p'] for e in kept], p[passing[:5]], rtol=1e-6)
    summary = record['taxa']['Calanoida']
    assert summary['tried'] == passing[4] + 1 and summary['acceptance_rate'] == 5 / (passing[4] + 1)
    assert [r['candidate'] for r in summary['rejected']] == [i for i in range(passing[4] + 1) if i not in passing]
    assert record['filter']['threshold'] == threshold and record['filter']['classes'] == {'Calanoida': 0}
    assert f'Calanoida: kept 5 of {passing[4] + 1} generated images' in result.output
    header, rows = collection.read_table(out / 'ecotaxa' / synthesize.ECOTAXA_TABLE)
    assert [float(row['object_filter_probability']) for _l, row in rows] == [e['p'] for e in kept]

    # A threshold no image reaches: one line naming the taxon, the acceptance rate and the threshold.
    line = _one_line_error(['synthesize', *_gen_args(pkls, 'Calanoida'), '--datasets', str(datasets), '--num', '4',
                            '--filter', f'taxon:{detector}', '--filter-threshold', '1', '--max-tries-factor', '3',
                            '--outdir', str(tmp_path / 'none'), '--quiet'])
    assert 'Calanoida: only 0 of 12 generated images (0.0%) pass the filter (top class with p >= 1)' in line
    assert 'lower --filter-threshold' in line


def test_conditional_network_class_by_index_or_name(setup, tmp_path):
    _root, datasets, _pkls = setup
    cond = _generator(tmp_path / 'cond.pkl', seed=9, c_dim=3)
    base = ['synthesize', '--datasets', str(datasets), '--num', '3', '--quiet']
    _run([*base, '--generator', f'Cyclopoida={cond}@Cyclopoida', '--outdir', str(tmp_path / 'by-name')])
    _run([*base, '--generator', f'Cyclopoida={cond}@1', '--outdir', str(tmp_path / 'by-index')])
    record = json.loads((tmp_path / 'by-name' / synthesize.SYNTHESIS_FILE).read_text())
    assert record['generators']['Cyclopoida']['label'] == 1
    assert record['generators']['Cyclopoida']['label_name'] == 'Cyclopoida'
    for zip_name in ('Copepoda.zip', 'Cyclopoida.zip'):       # the same images (the options recorded differ)
        assert (tmp_path / 'by-name' / 'datasets' / zip_name).read_bytes() == \
            (tmp_path / 'by-index' / 'datasets' / zip_name).read_bytes()
    e = record['images'][0]
    ref = generate_images(_load_G(cond), [e['seed']], label=np.eye(3, dtype=np.float32)[1])[0].numpy().transpose(1, 2, 0)
    np.testing.assert_array_equal(_decode(zipfile.ZipFile(tmp_path / 'by-name' / 'datasets' / 'Cyclopoida.zip').read(e['file'])), ref)
    line = _one_line_error([*base, '--generator', f'Cyclopoida={cond}', '--outdir', str(tmp_path / 'x')])
    assert 'conditional network (3 classes)' in line and 'Cyclopoida=PKL@CLASS' in line
    line = _one_line_error([*base, '--generator', f'Cyclopoida={cond}@Ostracoda', '--outdir', str(tmp_path / 'x')])
    assert "class 'Ostracoda' is not a class name" in line


def test_bad_input_is_one_line_naming_it(setup, tmp_path):
    _root, datasets, pkls = setup
    torch.manual_seed(0)
    d_only = tmp_path / 'd.pkl'
    save_network_pkl(d_only, dict(D=Discriminator(c_dim=0, img_resolution=RES, img_channels=3, channel_base=64, channel_max=8)))
    (tmp_path / 'notes.pkl').write_text('not a pickle')
    base = ['synthesize', '--datasets', str(datasets), '--num', '2', '--quiet']
    out = ['--outdir', str(tmp_path / 'out')]
    line = _one_line_error([*base, '--generator', f'Calanoida={d_only}', *out])
    assert f'--generator Calanoida={d_only}: not a generator pickle' in line
    line = _one_line_error([*base, '--generator', f'Calanoida={tmp_path / "notes.pkl"}', *out])
    assert 'notes.pkl: not a generator pickle' in line
    line = _one_line_error([*base, '--generator', f'Ostracoda={pkls["Calanoida"]}', *out])
    assert "taxon 'Ostracoda' is not in the datasets" in line
    line = _one_line_error([*base, '--generator', f'Copepoda={pkls["Calanoida"]}', '--generator',
                            f'Calanoida={pkls["Calanoida"]}', *out])
    assert 'overlap' in line
    line = _one_line_error([*base, '--top-up', '5', '--generator', f'Calanoida={pkls["Calanoida"]}', *out])
    assert 'exactly one of --num' in line
    line = _one_line_error([*base, '--generator', f'Calanoida={pkls["Calanoida"]}', '--format', 'datasets,csv', *out])
    assert '--format csv: unknown format' in line
    line = _one_line_error([*base, '--generator', f'Calanoida={pkls["Calanoida"]}', '--filter', 'inception', *out])
    assert 'expected taxon:PATH' in line
    (tmp_path / 'busy').mkdir()
    (tmp_path / 'busy' / 'thesis.tex').write_text('')
    line = _one_line_error([*base, '--generator', f'Calanoida={pkls["Calanoida"]}', '--outdir', str(tmp_path / 'busy')])
    assert 'busy' in line and 'holds something other than an export (thesis.tex)' in line
    assert not (tmp_path / 'out').exists()      # nothing written by a refused export

#----------------------------------------------------------------------------
