"""Hierarchical plans: stages per method, sharing, order, starting points; skip, rerun, resume; --resume from a pickle."""

import hashlib
import json
import os
import warnings
import zipfile

import pytest
import torch
from click.testing import CliRunner

import train_hier
from stylegan2ada.networks import Discriminator, Generator
from stylegan2ada.pickles import load_network_pkl
from stylegan2ada.util import UserError
from taxogan_ext import hierarchy
from taxogan_ext.taxonomy import ManifestError, manifest_from_dict
from test_pickles import _write_nvidia_pickle, nvidia_modules  # noqa: F401  (nvidia_modules: a fixture)
from training_helpers import write_zip

ORDERS = {'Calanoida': 9, 'Cyclopoida': 7, 'Harpacticoida': 4, 'Siphonostomatoida': 5}
TINY = dict(cbase=64, cmax=8, zdim=8, map=2, batch=4, tick=0.008, snap=1, gamma=0.01, aug='noaug')


def _entry(rank, parent, children, num, labels=None, sha='0' * 64, name='x'):
    return dict(rank=rank, parent=parent, children=list(children), dataset=f'{name}.zip', num_images=num,
                num_images_direct=0 if children else num, labels=labels, sha256=sha)


def _manifest_data(orders=ORDERS, families=None):
    """Manifest JSON of Copepoda > orders (> families: {order: {family: count}})."""
    families = families or {}
    taxa = {'Copepoda': _entry('class', None, sorted(orders), sum(orders.values()), labels=sorted(orders), name='Copepoda')}
    for order in sorted(orders):
        fam = families.get(order, {})
        taxa[order] = _entry('order', 'Copepoda', sorted(fam), orders[order], labels=sorted(fam) or None, name=order)
        for family, count in sorted(fam.items()):
            taxa[family] = _entry('family', order, [], count, name=family)
    ranks = ['class', 'order'] + (['family'] if families else [])
    return dict(format='taxogan-datasets/1', ranks=ranks, resolution=16, channels=3, options={}, taxa=taxa, dropped=[],
                dropped_counts={})


def _manifest(root='/nowhere', **kwargs):
    return manifest_from_dict(_manifest_data(**kwargs), root)


def _keys(plan):
    return [s.key for s in plan.stages]


def _check_order(plan):
    seen = set()
    for stage in plan.stages:
        if stage.start_kind == 'stage':
            assert stage.start in seen, f'{stage.key} runs before its start {stage.start}'
        seen.add(stage.key)

#----------------------------------------------------------------------------
# Plans (no training).

def test_descending_shares_the_parent_stage(tmp_path):
    plan = hierarchy.build_plan(_manifest(), tmp_path, 'descending', parent='Copepoda', kimg_parent=2, kimg_child=1)
    assert _keys(plan) == ['Copepoda', 'Copepoda__Calanoida', 'Copepoda__Cyclopoida', 'Copepoda__Harpacticoida',
                           'Copepoda__Siphonostomatoida']
    top = plan.stage('Copepoda')
    assert (top.start_kind, top.start, top.kimg, top.method, top.num_images) == ('scratch', None, 2.0, 'direct', 25)
    for order, count in ORDERS.items():
        stage = plan.stage(f'Copepoda__{order}')
        assert (stage.start_kind, stage.start, stage.kimg, stage.method, stage.source) == \
            ('stage', 'Copepoda', 1.0, 'descending', 'Copepoda')
        assert stage.chain == ('Copepoda', order) and stage.num_images == count
        assert [e.taxon for e in stage.evaluations] == [order]
    assert [(r.method, r.target, r.stage) for r in plan.rows] == [('descending', o, f'Copepoda__{o}') for o in sorted(ORDERS)]
    _check_order(plan)


def test_direct_stage_is_also_the_lateral_donor(tmp_path):
    plan = hierarchy.build_plan(_manifest(), tmp_path, 'direct,lateral', kimg_parent=2, kimg_child=1)
    # Calanoida (9 images) is the largest sibling: the donor, trained once for direct and lateral.
    assert _keys(plan) == ['Calanoida', 'Cyclopoida', 'Harpacticoida', 'Siphonostomatoida',
                           'Calanoida__Cyclopoida', 'Calanoida__Harpacticoida', 'Calanoida__Siphonostomatoida']
    lateral = {r.target: r for r in plan.rows if r.method == 'lateral'}
    assert lateral['Calanoida'].stage is None and lateral['Calanoida'].note == 'is the donor'
    assert plan.stage('Calanoida__Harpacticoida').source == 'Calanoida'
    assert plan.stage('Calanoida__Harpacticoida').kimg == 1.0 and plan.stage('Calanoida').kimg == 2.0
    _check_order(plan)
    # An explicit donor replaces the default, and the former donor now gets a lateral stage.
    plan = hierarchy.build_plan(_manifest(), tmp_path, 'lateral', donor='Cyclopoida', targets='Calanoida,Harpacticoida')
    assert _keys(plan) == ['Cyclopoida', 'Cyclopoida__Calanoida', 'Cyclopoida__Harpacticoida']


def test_all_methods_count_and_conditional_labels(tmp_path):
    plan = hierarchy.build_plan(_manifest(), tmp_path, 'all')
    # direct 4 + lateral 3 (Calanoida is the donor) + descending 1 + 4 + conditional 1 = 13 stages, each once.
    assert len(plan.stages) == 13 == len(set(_keys(plan)))
    cond = plan.stage('Copepoda-cond')
    assert cond.cond and cond.data.endswith('Copepoda.zip') and cond.start_kind == 'scratch'
    labels = sorted(ORDERS)
    assert [(e.taxon, e.derived.label, e.derived.label_names) for e in cond.evaluations] == \
        [(o, labels.index(o), tuple(labels)) for o in sorted(ORDERS)]
    assert all(e.data.startswith(str(tmp_path / hierarchy.DERIVED_DIR)) for e in cond.evaluations)
    _check_order(plan)
    plan = hierarchy.build_plan(_manifest(), tmp_path, 'conditional', cond_finetune=True, kimg_child=3)
    ft = plan.stage('Copepoda-cond__Harpacticoida')
    assert ft.cond and ft.start == 'Copepoda-cond' and ft.kimg == 3.0 and ft.data == ft.derived.path
    assert ft.derived.label == labels.index('Harpacticoida') and ft.method == 'conditional-ft'


def test_deeper_chains_with_parent_or_depth(tmp_path):
    manifest = _manifest(families={'Calanoida': {'Calanidae': 5, 'Paracalanidae': 4}})
    plan = hierarchy.build_plan(manifest, tmp_path, 'descending', parent='Copepoda', targets='Calanidae,Calanoida,Paracalanidae')
    # Copepoda -> Calanoida is trained once and feeds both families.
    assert _keys(plan) == ['Copepoda', 'Copepoda__Calanoida', 'Copepoda__Calanoida__Calanidae',
                           'Copepoda__Calanoida__Paracalanidae']
    assert plan.stage('Copepoda__Calanoida__Calanidae').chain == ('Copepoda', 'Calanoida', 'Calanidae')
    plan = hierarchy.build_plan(manifest, tmp_path, 'descending', depth=1, targets='Calanidae')
    assert _keys(plan) == ['Calanoida', 'Calanoida__Calanidae']
    plan = hierarchy.build_plan(manifest, tmp_path, 'descending', depth=2, targets='Calanidae')
    assert _keys(plan) == ['Copepoda', 'Copepoda__Calanoida', 'Copepoda__Calanoida__Calanidae']
    with pytest.raises(hierarchy.PlanError, match='disagrees'):
        hierarchy.build_plan(manifest, tmp_path, 'descending', parent='Copepoda', depth=1, targets='Calanidae')
    with pytest.raises(hierarchy.PlanError, match='only 2 ancestor'):
        hierarchy.build_plan(manifest, tmp_path, 'descending', depth=3, targets='Calanidae')


def test_resume_pickle_replaces_scratch_and_errors(tmp_path):
    pkl = tmp_path / 'calanoida.pkl'
    pkl.write_bytes(b'x')
    plan = hierarchy.build_plan(_manifest(), tmp_path, 'direct', targets='Cyclopoida', resume_pkl=str(pkl), kimg_parent=9,
                                kimg_child=4, train_options=dict(freezed=2, gamma=1.0))
    (stage,) = plan.stages
    assert (stage.key, stage.start_kind, stage.start, stage.kimg, stage.method, stage.origin) == \
        ('from-calanoida__Cyclopoida', 'pickle', str(pkl), 4.0, 'finetune', 'calanoida.pkl')
    assert stage.train_options == dict(freezed=2, gamma=1.0)             # Freeze-D kept: it starts from a network
    plan = hierarchy.build_plan(_manifest(), tmp_path, 'descending', train_options=dict(freezed=2), targets='Cyclopoida')
    assert plan.stage('Copepoda').train_options == {} and plan.stage('Copepoda__Cyclopoida').train_options == dict(freezed=2)
    with pytest.raises(ManifestError, match="unknown taxon 'Calanoid'"):
        hierarchy.build_plan(_manifest(), tmp_path, 'direct', targets='Calanoid')
    with pytest.raises(hierarchy.PlanError, match='not a sibling'):
        hierarchy.build_plan(_manifest(), tmp_path, 'lateral', donor='Copepoda', targets='Calanoida')
    with pytest.raises(hierarchy.PlanError, match='unknown method'):
        hierarchy.build_plan(_manifest(), tmp_path, 'sideways')
    data = _manifest_data()
    data['taxa']['Copepoda']['labels'] = None
    with pytest.raises(hierarchy.PlanError, match='no class Calanoida'):
        hierarchy.build_plan(manifest_from_dict(data, '/nowhere'), tmp_path, 'conditional', targets='Calanoida')

#----------------------------------------------------------------------------
# Running plans with a stand-in for training (skip, rerun).

def _sha(path):
    return hashlib.sha256(open(path, 'rb').read()).hexdigest()


def _write_datasets(root, orders=ORDERS, seed=0):
    """Real 16 px zips and their manifest (Copepoda labelled by order)."""
    root.mkdir(parents=True, exist_ok=True)
    data = _manifest_data(orders)
    names = sorted(orders)
    labels = [names.index(o) for o in names for _ in range(orders[o])]
    write_zip(root / 'Copepoda.zip', num_images=len(labels), labels=labels, seed=seed)
    for i, order in enumerate(names):
        write_zip(root / f'{order}.zip', num_images=orders[order], seed=seed + 10 + i)
    for name in data['taxa']:
        data['taxa'][name]['sha256'] = _sha(root / f'{name}.zip')
    (root / 'manifest.json').write_text(json.dumps(data))
    return manifest_from_dict(data, root)


class FakeTraining:
    """Stands in for train_stage: records its calls and writes a final 'pickle' with unique content."""

    def __init__(self):
        self.calls = []

    def __call__(self, stage, run_dir, resume_snapshot, start_pkl, progress_callback):
        self.calls.append((stage.key, resume_snapshot, start_pkl))
        os.makedirs(run_dir, exist_ok=True)
        progress_callback(int(stage.kimg * 1000), int(stage.kimg * 1000))
        path = os.path.join(run_dir, 'network-snapshot-000001.pkl')
        with open(path, 'w') as f:
            f.write(f'{stage.key} {len(self.calls)} {start_pkl}')
        return path


def _fake_eval(pkl, evaluation, metrics, detector, run_dir=None):
    return dict(metrics={m: float(len(evaluation.taxon)) for m in metrics}, detector_id='fake')


def _run(manifest, outdir, methods='descending', train_fn=None, **kwargs):
    plan = hierarchy.build_plan(manifest, outdir, methods, kimg_parent=0.002, kimg_child=0.001, **kwargs)
    train_fn = train_fn or FakeTraining()
    records = hierarchy.run_plan(plan, manifest, train_fn, ['fid10_full'], 'fake.pt', evaluate_fn=_fake_eval,
                                 log=lambda *_: None, progress=False)
    return plan, train_fn, records


def test_finished_stages_are_skipped(tmp_path):
    manifest = _write_datasets(tmp_path / 'ds')
    out = tmp_path / 'exp'
    plan, first, records = _run(manifest, out)
    assert [c[0] for c in first.calls] == _keys(plan)
    # Children start from the parent's final pickle.
    assert all(c[2] == str(out / 'Copepoda' / 'network-snapshot-000001.pkl') for c in first.calls[1:])
    assert [(r['stage'], r['taxon'], r['metrics']['fid10_full']) for r in records] == \
        [('Copepoda', 'Copepoda', 8.0)] + [(f'Copepoda__{o}', o, float(len(o))) for o in sorted(ORDERS)]
    _, second, records = _run(manifest, out)
    assert second.calls == [] and records == []
    states = hierarchy.plan_states(plan, hierarchy.read_results(out / hierarchy.RESULTS_FILE), ['fid10_full'], 'fake.pt')
    assert {s.status for s in states.values()} == {'done'}
    assert 'Copepoda (25 img, 0.002 kimg, from scratch)  [done]' in hierarchy.format_plan(plan, states)
    # Other metrics: evaluate again, train nothing.
    plan = hierarchy.build_plan(manifest, out, 'descending', kimg_parent=0.002, kimg_child=0.001)
    third = FakeTraining()
    records = hierarchy.run_plan(plan, manifest, third, ['kid10_full'], 'fake.pt', evaluate_fn=_fake_eval, log=lambda *_: None,
                                 progress=False)
    assert third.calls == [] and len(records) == 5 and all('kid10_full' in r['metrics'] for r in records)


def test_where_a_stage_starts_from(tmp_path):
    manifest = _write_datasets(tmp_path / 'ds')
    out = tmp_path / 'exp'
    plan = hierarchy.build_plan(manifest, out, 'descending', targets='Cyclopoida', kimg_parent=0.002, kimg_child=0.001)
    top, child = plan.stages
    assert hierarchy.stage_start_pkl(top, out) is None and hierarchy.stage_start_sha256(top, out) is None
    # Before the start stage is trained: its folder (train_hier.py checks the options with it), and no hash.
    assert hierarchy.stage_start_pkl(child, out, final=False) == str(out / 'Copepoda')
    assert hierarchy.stage_start_sha256(child, out) is None
    _run(manifest, out, targets='Cyclopoida')
    final = out / 'Copepoda' / 'network-snapshot-000001.pkl'
    assert hierarchy.stage_start_pkl(child, out) == str(final) and hierarchy.stage_start_sha256(child, out) == _sha(final)
    # From a pickle: the pickle itself, hashed afresh.
    pkl = tmp_path / 'calanoida.pkl'
    pkl.write_bytes(b'weights')
    (stage,) = hierarchy.build_plan(manifest, out, 'direct', targets='Cyclopoida', resume_pkl=str(pkl)).stages
    assert hierarchy.stage_start_pkl(stage, out) == hierarchy.stage_start_pkl(stage, out, final=False) == str(pkl)
    assert hierarchy.stage_start_sha256(stage, out) == hashlib.sha256(b'weights').hexdigest()


def test_dataset_hash_change_reruns_stage_and_dependents(tmp_path):
    manifest = _write_datasets(tmp_path / 'ds')
    out = tmp_path / 'exp'
    _run(manifest, out, methods='direct,descending')
    # New Harpacticoida images: its two stages rerun, nothing else.
    changed = dict(ORDERS, Harpacticoida=6)
    manifest = _write_datasets(tmp_path / 'ds', orders=changed)
    plan = hierarchy.build_plan(manifest, out, 'direct,descending', kimg_parent=0.002, kimg_child=0.001)
    states = hierarchy.plan_states(plan, hierarchy.read_results(out / hierarchy.RESULTS_FILE), ['fid10_full'], 'fake.pt')
    # The Copepoda zip holds the Harpacticoida images too, so the parent changed: every descending stage waits on it.
    assert states['Copepoda'].status == 'rerun' and 'dataset changed' in states['Copepoda'].detail
    assert states['Harpacticoida'].status == 'rerun' and states['Calanoida'].status == 'done'
    assert states['Copepoda__Calanoida'].status == 'waiting'
    _, again, _ = _run(manifest, out, methods='direct,descending')
    assert sorted(c[0] for c in again.calls) == sorted(['Harpacticoida', 'Copepoda'] + [f'Copepoda__{o}' for o in ORDERS])
    assert sorted(os.listdir(out / hierarchy.SUPERSEDED_DIR)) == sorted(
        ['Harpacticoida-1', 'Copepoda-1'] + [f'Copepoda__{o}-1' for o in ORDERS])
    # Only a child's own zip changed: the parent is kept, the child reruns.
    manifest = _write_datasets(tmp_path / 'ds', orders=changed, seed=0)
    data = json.loads((tmp_path / 'ds' / 'manifest.json').read_text())
    write_zip(tmp_path / 'ds' / 'Cyclopoida.zip', num_images=7, seed=99)
    data['taxa']['Cyclopoida']['sha256'] = _sha(tmp_path / 'ds' / 'Cyclopoida.zip')
    manifest = manifest_from_dict(data, tmp_path / 'ds')
    _, third, _ = _run(manifest, out, methods='direct,descending')
    assert sorted(c[0] for c in third.calls) == ['Copepoda__Cyclopoida', 'Cyclopoida']


def test_options_change_reruns_but_io_options_do_not(tmp_path):
    manifest = _write_datasets(tmp_path / 'ds')
    out = tmp_path / 'exp'
    _run(manifest, out, methods='direct', targets='Harpacticoida', train_options=dict(gamma=1.0))
    _, same, _ = _run(manifest, out, methods='direct', targets='Harpacticoida', train_options=dict(gamma=1.0, snap=7, workers=2))
    assert same.calls == []
    plan = hierarchy.build_plan(manifest, out, 'direct', targets='Harpacticoida', kimg_parent=0.002, train_options=dict(gamma=2.0))
    states = hierarchy.plan_states(plan, hierarchy.read_results(out / hierarchy.RESULTS_FILE), ['fid10_full'], 'fake.pt')
    assert states['Harpacticoida'].detail == 'rerun: options changed (gamma: 1.0 -> 2.0)'
    plan = hierarchy.build_plan(manifest, out, 'direct', targets='Harpacticoida', kimg_parent=0.002, train_options=dict(gamma=1.0),
                                overrides=dict(ema_kimg=0.5))
    states = hierarchy.plan_states(plan, hierarchy.read_results(out / hierarchy.RESULTS_FILE), ['fid10_full'], 'fake.pt')
    assert states['Harpacticoida'].detail == 'rerun: overrides changed (ema_kimg: default -> 0.5)'


def test_zip_edited_after_the_build_is_refused(tmp_path):
    manifest = _write_datasets(tmp_path / 'ds')
    write_zip(tmp_path / 'ds' / 'Siphonostomatoida.zip', num_images=5, seed=123)     # manifest not updated
    with pytest.raises(hierarchy.PlanError, match='Siphonostomatoida.zip: SHA-256 differs'):
        _run(manifest, tmp_path / 'exp', methods='direct', targets='Siphonostomatoida')


def test_conditional_evaluates_each_child_on_its_labelled_zip(tmp_path):
    manifest = _write_datasets(tmp_path / 'ds')
    plan, calls, records = _run(manifest, tmp_path / 'exp', methods='conditional', targets='Cyclopoida,Harpacticoida')
    assert [c[0] for c in calls.calls] == ['Copepoda-cond'] and [r['taxon'] for r in records] == ['Cyclopoida', 'Harpacticoida']
    path = plan.stage('Copepoda-cond').evaluations[1].data
    with zipfile.ZipFile(path) as z, zipfile.ZipFile(tmp_path / 'ds' / 'Harpacticoida.zip') as src:
        meta = json.loads(z.read('dataset.json'))
        images = sorted(n for n in src.namelist() if n.endswith('.png'))
        assert meta['labels'] == [[n, sorted(ORDERS).index('Harpacticoida')] for n in images]
        assert meta['label_names'] == sorted(ORDERS)
        assert all(z.read(n) == src.read(n) for n in images)
    # A lost record is evaluated again, alone: no training, no second record of the other taxon.
    results = tmp_path / 'exp' / hierarchy.RESULTS_FILE
    results.write_text(results.read_text().splitlines(keepends=True)[0])
    _, calls, records = _run(manifest, tmp_path / 'exp', methods='conditional', targets='Cyclopoida,Harpacticoida')
    assert calls.calls == [] and [r['taxon'] for r in records] == ['Harpacticoida']

#----------------------------------------------------------------------------
# Real training with tiny networks: interrupted stages resume; --resume from a pickle.

def _tiny_options(**extra):
    return dict(TINY, **extra)


def test_interrupted_stage_resumes_from_its_snapshot(tmp_path):
    manifest = _write_datasets(tmp_path / 'ds')
    kwargs = dict(targets='Harpacticoida', train_options=_tiny_options())

    def interrupting(stage, run_dir, resume_snapshot, start_pkl, callback):
        def stop(cur_nimg, total_nimg):
            callback(cur_nimg, total_nimg)
            if stage.key == 'Copepoda__Harpacticoida' and cur_nimg >= 8:
                raise KeyboardInterrupt
        return train_hier.train_stage(stage, run_dir, resume_snapshot, start_pkl, stop)

    out = tmp_path / 'exp'
    plan = hierarchy.build_plan(manifest, out, 'descending', kimg_parent=0.016, kimg_child=0.016, **kwargs)
    with pytest.raises(UserError, match='interrupted; snapshot written'):     # one line, no traceback
        hierarchy.run_plan(plan, manifest, interrupting, ['fid10_full'], 'fake.pt', evaluate_fn=_fake_eval,
                           log=lambda *_: None, progress=False)
    states = hierarchy.plan_states(plan, [], ['fid10_full'], 'fake.pt')
    child = states['Copepoda__Harpacticoida']
    assert child.status == "resume" and child.done_kimg == 0.012 and states['Copepoda'].status == 'evaluate'

    calls = []

    def recording(stage, run_dir, resume_snapshot, start_pkl, callback):
        calls.append((stage.key, resume_snapshot))
        return train_hier.train_stage(stage, run_dir, resume_snapshot, start_pkl, callback)

    hierarchy.run_plan(plan, manifest, recording, ['fid10_full'], 'fake.pt', evaluate_fn=_fake_eval, log=lambda *_: None,
                       progress=False)
    assert calls == [('Copepoda__Harpacticoida', child.snapshot)]
    final = load_network_pkl(str(out / 'Copepoda__Harpacticoida' / 'network-snapshot-000000.pkl'))
    options = json.loads((out / 'Copepoda__Harpacticoida' / 'training_options.json').read_text())
    assert final['progress']['cur_nimg'] == 16 and options['resume_mode'] == 'full'
    assert options['ada_kimg'] == 100          # the fine-tuning settings survive the resume

    # The same stage without the interruption gives the same network, weight for weight.
    straight = tmp_path / 'straight'
    plan = hierarchy.build_plan(manifest, straight, 'descending', kimg_parent=0.016, kimg_child=0.016, **kwargs)
    (straight / 'Copepoda').mkdir(parents=True)
    for name in os.listdir(out / 'Copepoda'):
        if os.path.isfile(out / 'Copepoda' / name):
            (straight / 'Copepoda' / name).write_bytes((out / 'Copepoda' / name).read_bytes())
    hierarchy.run_plan(plan, manifest, train_hier.train_stage, ['fid10_full'], 'fake.pt', evaluate_fn=_fake_eval,
                       log=lambda *_: None, progress=False)
    other = load_network_pkl(str(straight / 'Copepoda__Harpacticoida' / 'network-snapshot-000000.pkl'))
    for key in ('G', 'D', 'G_ema'):
        for (name, a), b in zip(final[key].state_dict().items(), other[key].state_dict().values()):
            assert torch.equal(a, b), f'{key}.{name}'


def _script_detector(path):
    """A TorchScript feature detector: per-channel means over a 2x2 grid and their squares (24 features)."""
    class Features(torch.nn.Module):
        def forward(self, img: torch.Tensor, return_features: bool = True) -> torch.Tensor:
            x = torch.nn.functional.adaptive_avg_pool2d(img.to(torch.float32) / 255, 2).flatten(1)
            return torch.cat([x, x * x], dim=1)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)      # torch.jit.script is deprecated but what detectors load
        torch.jit.script(Features()).save(str(path))
    return str(path)


def test_cli_resume_from_a_pickle(tmp_path):
    _write_datasets(tmp_path / 'ds')
    detector = _script_detector(tmp_path / 'det.pt')
    tiny = ['--cbase', '64', '--cmax', '8', '--zdim', '8', '--map', '2', '--batch', '4', '--tick', '0.008', '--snap', '1',
            '--gamma', '0.01', '--aug', 'noaug', '--metrics', 'fid20_full,kid20_full', '--detector', detector, '--quiet',
            '--datasets', str(tmp_path / 'ds'), '--cache', str(tmp_path / 'cache')]
    runner = CliRunner()
    result = runner.invoke(train_hier.main, tiny + ['--outdir', str(tmp_path / 'a'), '--method', 'direct', '--targets', 'Calanoida',
                                                    '--kimg-parent', '0.016', '--no-report'])
    assert result.exit_code == 0, result.output
    pkl = str(tmp_path / 'calanoida.pkl')
    os.replace(tmp_path / 'a' / 'Calanoida' / 'network-snapshot-000000.pkl', pkl)
    assert load_network_pkl(pkl)['progress']['cur_nimg'] == 16

    args = tiny + ['--outdir', str(tmp_path / 'b'), '--resume', pkl, '--targets', 'Cyclopoida', '--kimg-child', '0.008',
                   '--ema-kimg', '0.002']
    result = runner.invoke(train_hier.main, args + ['--dry-run'])
    assert result.exit_code == 0, result.output
    assert 'Cyclopoida (7 img, 0.008 kimg, from calanoida.pkl)  [to train]  -> direct Cyclopoida' in result.output
    result = runner.invoke(train_hier.main, args)
    assert result.exit_code == 0, result.output
    stage_dir = tmp_path / 'b' / 'from-calanoida__Cyclopoida'
    options = json.loads((stage_dir / 'training_options.json').read_text())
    assert options['resume_pkl'] == pkl and options['resume_mode'] == 'weights' and options['ema_kimg'] == 0.002
    final = load_network_pkl(str(stage_dir / 'network-snapshot-000000.pkl'))
    assert final['progress']['cur_nimg'] == 8             # fine-tuned from 0, not continued from the pickle's 16
    (record,) = hierarchy.read_results(tmp_path / 'b' / hierarchy.RESULTS_FILE)
    assert (record['method'], record['origin'], record['taxon']) == ('finetune', 'calanoida.pkl', 'Cyclopoida')
    assert set(record['metrics']) == {'fid20_full', 'kid20_full'} and record['metrics']['fid20_full'] > 0
    table = (tmp_path / 'b' / 'table.md').read_text()
    assert '| Cyclopoida | 7 |' in table and 'fine-tuned (from calanoida.pkl)' in table
    assert (tmp_path / 'b' / 'grid-Cyclopoida.png').is_file()
    # Bad input: one line naming the problem.
    result = runner.invoke(train_hier.main, tiny + ['--outdir', str(tmp_path / 'c'), '--resume', str(tmp_path / 'missing.pkl')])
    assert result.exit_code != 0 and 'missing.pkl: no such file' in result.output


def test_retrained_detector_reevaluates_without_training(tmp_path):
    # The detector file is an input of the evaluation: the same path with new content (a retrained taxon
    # classifier) must not let old figures stand.
    manifest = _write_datasets(tmp_path / 'ds')
    out = tmp_path / 'exp'
    detector = tmp_path / 'det.pt'
    with zipfile.ZipFile(detector, 'w') as z:
        z.writestr('det/data.pkl', b'first')
    plan = hierarchy.build_plan(manifest, out, 'descending', kimg_parent=0.002, kimg_child=0.001)
    run = lambda: hierarchy.run_plan(plan, manifest, training, ['fid10_full'], str(detector), evaluate_fn=_fake_eval,
                                     log=lambda *_: None, progress=False)
    training = FakeTraining()
    assert len(run()) == 5 and len(training.calls) == 5
    training = FakeTraining()
    assert run() == [] and training.calls == []                          # same file: done
    with zipfile.ZipFile(detector, 'w') as z:
        z.writestr('det/data.pkl', b'second')
    states = hierarchy.plan_states(plan, hierarchy.read_results(out / hierarchy.RESULTS_FILE), ['fid10_full'], str(detector))
    assert {s.status for s in states.values()} == {'evaluate'}
    records = run()
    assert training.calls == [] and len(records) == 5
    assert {r['detector_id'] for r in records} == {hierarchy.detector_identity(str(detector))}


def test_cli_metrics_none_trains_without_evaluating_then_evaluates_later(tmp_path):
    _write_datasets(tmp_path / 'ds')
    tiny = ['--cbase', '64', '--cmax', '8', '--zdim', '8', '--map', '2', '--batch', '4', '--tick', '0.008', '--snap', '1',
            '--gamma', '0.01', '--aug', 'noaug', '--quiet', '--datasets', str(tmp_path / 'ds'), '--cache', str(tmp_path / 'cache'),
            '--outdir', str(tmp_path / 'exp'), '--method', 'direct', '--targets', 'Harpacticoida', '--kimg-parent', '0.008']
    runner = CliRunner()
    # No detector is needed (this one does not exist), none is loaded, nothing is evaluated.
    for value in ('none', ''):
        result = runner.invoke(train_hier.main, tiny + ['--metrics', value, '--detector', str(tmp_path / 'missing.pt')])
        assert result.exit_code == 0, result.output
    (record,) = hierarchy.read_results(tmp_path / 'exp' / hierarchy.RESULTS_FILE)   # the second run: done, skipped
    assert record['metrics'] == {} and record['requested_metrics'] == [] and record['pkl'] == 'Harpacticoida/network-snapshot-000000.pkl'
    assert load_network_pkl(str(tmp_path / 'exp' / record['pkl']))['progress']['cur_nimg'] == 8
    table = (tmp_path / 'exp' / 'table.md').read_text()
    assert '| Harpacticoida | 4 | not evaluated |' in table
    assert '| Harpacticoida | Harpacticoida | 0.008 | Harpacticoida/network-snapshot-000000.pkl |' in table
    assert 'Metrics: none; detector: none.' in table
    # Evaluating later trains nothing and replaces the row; --metrics none afterwards adds no figureless record.
    detector = _script_detector(tmp_path / 'det.pt')
    result = runner.invoke(train_hier.main, tiny + ['--metrics', 'fid10_full', '--detector', detector])
    assert result.exit_code == 0, result.output
    assert 'evaluating fid10_full on Harpacticoida' in result.output and 'training on' not in result.output
    result = runner.invoke(train_hier.main, tiny + ['--metrics', 'none', '--detector', detector])
    assert result.exit_code == 0 and 'done, skipped' in result.output, result.output
    records = hierarchy.read_results(tmp_path / 'exp' / hierarchy.RESULTS_FILE)
    assert [sorted(r['metrics']) for r in records] == [[], ['fid10_full']]
    table = (tmp_path / 'exp' / 'table.md').read_text()
    assert 'not evaluated' not in table and 'Not evaluated' not in table and 'fid10_full' in table
    # none among metric names is an error in one line.
    result = runner.invoke(train_hier.main, tiny + ['--metrics', 'fid10_full,none'])
    assert result.exit_code == 1 and result.output.count('\n') == 1 and 'cannot be combined' in result.output, result.output


def test_cli_resume_nvidia_pickle_of_other_sizes_at_256px(tmp_path, nvidia_modules):
    # train_hier.py --resume <NVIDIA pickle made with channel_base 8192> on a 256 px dataset: the stage builds networks of
    # the pickle's sizes (not --cfg auto's 16384 / 512-dim ones), says so in one line, and copies every tensor.
    root = tmp_path / 'ds'
    root.mkdir()
    data = _manifest_data()
    data['resolution'] = 256
    write_zip(root / 'Calanoida.zip', num_images=4, resolution=256)
    data['taxa']['Calanoida']['sha256'] = _sha(root / 'Calanoida.zip')
    (root / 'manifest.json').write_text(json.dumps(data))
    g_kwargs = dict(z_dim=64, w_dim=64, c_dim=0, img_resolution=256, img_channels=3, mapping_kwargs=dict(num_layers=2),
                    synthesis_kwargs=dict(channel_base=8192, channel_max=16, num_fp16_res=4, conv_clamp=256))
    d_kwargs = dict(c_dim=0, img_resolution=256, img_channels=3, channel_base=8192, channel_max=16, num_fp16_res=4, conv_clamp=256,
                    block_kwargs={}, mapping_kwargs={}, epilogue_kwargs=dict(mbstd_group_size=4))
    torch.manual_seed(0)
    G, D = Generator(**g_kwargs), Discriminator(**d_kwargs)
    with torch.no_grad():
        for tensor in list(G.parameters()) + list(D.parameters()):
            tensor.copy_(torch.randn_like(tensor))
    pkl = tmp_path / 'calanoida-8192.pkl'
    _write_nvidia_pickle(pkl, G.requires_grad_(False), D.requires_grad_(False), G, dict(G_kwargs=g_kwargs, D_kwargs=d_kwargs))
    args = ['--datasets', str(root), '--outdir', str(tmp_path / 'exp'), '--resume', str(pkl), '--targets', 'Calanoida',
            '--kimg-child', '0.004', '--batch', '4', '--tick', '0.004', '--snap', '1', '--gamma', '0.01', '--aug', 'noaug',
            '--glr', '1e-12', '--dlr', '1e-12', '--metrics', 'none', '--no-report', '--quiet', '--device', 'cpu']
    result = CliRunner().invoke(train_hier.main, args)
    assert result.exit_code == 0, result.output
    line = ('stage from-calanoida-8192__Calanoida: networks from calanoida-8192.pkl: z_dim 64, w_dim 64, mapping 2 layers, '
            'channel_base 8192, channel_max 16, fp16 resolutions 4, conv_clamp 256, c_dim 0, D architecture resnet')
    assert line in result.output.splitlines(), result.output
    stage_dir = tmp_path / 'exp' / 'from-calanoida-8192__Calanoida'
    final = load_network_pkl(str(stage_dir / 'network-snapshot-000000.pkl'))
    assert final['G'].init_kwargs == g_kwargs
    for key, src in (('G', G), ('G_ema', G), ('D', D)):
        for name, tensor in src.named_parameters():
            assert torch.allclose(final[key].state_dict()[name], tensor, atol=1e-6, rtol=0), f'{key}.{name}'
    assert 'kept as initialised' not in (stage_dir / 'log.txt').read_text()
    # The same plan asking for other sizes is refused before anything trains (one line), unless --resume-partial.
    result = CliRunner().invoke(train_hier.main, args + ['--outdir', str(tmp_path / 'other'), '--cmax', '32'])
    assert result.exit_code == 1 and result.output.count('\n') == 1, result.output
    assert '--cmax 32 (pickle: 16)' in result.output and '--resume-partial' in result.output
    assert not (tmp_path / 'other' / 'from-calanoida-8192__Calanoida').exists()
