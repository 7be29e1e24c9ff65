"""Do the generated images help? The held-out split, CAS and augmentation gain, and their plan / CLI / report wiring."""

import csv
import dataclasses
import hashlib
import io
import json
import os
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import calc_metrics
import train_hier
from test_metrics import _taxon_images
from taxogan_ext import hierarchy, report, utility
from taxogan_ext.taxonomy import load_manifest

TAXA = ('Alpha', 'Beta', 'Gamma')
CONTRAST = 0.2      # faint patterns (checkerboard, blob, flat) in noise: a classifier of the real images gets some wrong
COUNTS = {'Alpha': 64, 'Beta': 40, 'Gamma': 24}       # unbalanced: the gain tops Beta and Gamma up
# A tiny classifier: 16 px, two stages; every arm gets the same budget.
TINY = utility.UtilityOptions(utility_seeds=3, utility_steps=200, utility_batch=16, utility_res=16, utility_lr=3e-3,
                              channels=(16, 32))


def _png(chw):
    buf = io.BytesIO()
    PIL.Image.fromarray(chw.transpose(1, 2, 0)).save(buf, format='PNG')
    return buf.getvalue()


def _write_zip(path, members, labels=None, label_names=None):
    with zipfile.ZipFile(path, 'w') as zf:
        for name, data in members:
            zf.writestr(name, data)
        meta = {'labels': labels} if labels is None else {'labels': labels, 'label_names': label_names}
        zf.writestr('dataset.json', json.dumps(meta))


def _sha(path):
    return hashlib.sha256(open(path, 'rb').read()).hexdigest()


def write_collection(root, counts=COUNTS, images_fn=None):
    """A datasets folder as dataset_tool_ext.py writes it: Root.zip (labelled by taxon) and one zip per taxon, the
    same file name and bytes for an image in every zip that holds it. images_fn(k, n) -> uint8 [n, 3, 16, 16] makes
    taxon k's images (default: its faint pattern in noise)."""
    root.mkdir(parents=True, exist_ok=True)
    members = {}
    for k, t in enumerate(TAXA):
        images = images_fn(k, counts[t]) if images_fn else _taxon_images(k, counts[t], k, contrast=CONTRAST, noise=40)
        members[t] = [(f'{t.lower()}-{i:03d}.png', _png(img)) for i, img in enumerate(images)]
    everything = sorted(m for t in TAXA for m in members[t])
    labels = [[name, next(k for k, t in enumerate(TAXA) if name.startswith(t.lower()))] for name, _ in everything]
    _write_zip(root / 'Root.zip', everything, labels, list(TAXA))
    taxa = {'Root': dict(rank='class', parent=None, children=list(TAXA), dataset='Root.zip', num_images=len(everything),
                         num_images_direct=0, labels=list(TAXA), sha256=_sha(root / 'Root.zip'))}
    for t in TAXA:
        _write_zip(root / f'{t}.zip', members[t])
        taxa[t] = dict(rank='order', parent='Root', children=[], dataset=f'{t}.zip', num_images=counts[t],
                       num_images_direct=counts[t], labels=None, sha256=_sha(root / f'{t}.zip'))
    manifest = dict(format='taxogan-datasets/1', ranks=['class', 'order'], resolution=16, channels=3, options={}, taxa=taxa,
                    dropped=[], dropped_counts={})
    (root / 'manifest.json').write_text(json.dumps(manifest))
    return root


def _zip_hashes(path):
    """{sha256 of the bytes, sha256 of the decoded pixels} of every image in a zip."""
    out = set()
    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            if name.endswith('.png'):
                data = zf.read(name)
                out.add(hashlib.sha256(data).hexdigest())
                out.add(hashlib.sha256(np.asarray(PIL.Image.open(io.BytesIO(data))).tobytes()).hexdigest())
    return out


def assert_heldout_never_trained(split_dir, other_zips=()):
    """No held-out image (by the hash of its bytes or of its pixels) is in any training zip."""
    held = _zip_hashes(split_dir / utility.HELDOUT_ZIP)
    record = json.loads((split_dir / utility.HOLDOUT_FILE).read_text())
    assert {i['sha256'] for i in record['images']} <= held and len(record['images']) * 2 == len(held)
    zips = [p for p in split_dir.glob('*.zip') if p.name != utility.HELDOUT_ZIP] + list(other_zips)
    assert len(zips) >= 4
    for path in zips:
        assert not held & _zip_hashes(path), path


@pytest.fixture(scope='module')
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp('utility')
    write_collection(root / 'ds')
    utility.write_holdout_split(root / 'ds', root / 'split', 0.25, seed=0)
    return root, utility.load_holdout(root / 'split')


class BankG(torch.nn.Module):
    """A stand-in generator: z picks one of its images (float [-1, 1]); z_dim 8, unconditional."""

    def __init__(self, images_uint8):
        super().__init__()
        self.register_buffer('bank', torch.from_numpy(np.stack(images_uint8)).float() / 127.5 - 1)
        self.z_dim, self.c_dim, self.img_resolution, self.img_channels = 8, 0, 16, 3

    def forward(self, z, c, truncation_psi=1, noise_mode='const'):
        index = (torch.special.ndtr(z[:, 0]) * len(self.bank)).long().clamp(0, len(self.bank) - 1)
        return self.bank[index]


class NoiseG(torch.nn.Module):
    """A generator of the same noise for every taxon."""

    def __init__(self):
        super().__init__()
        self.z_dim, self.c_dim, self.img_resolution, self.img_channels = 8, 0, 16, 3

    def forward(self, z, c, truncation_psi=1, noise_mode='const'):
        return torch.tanh(z[:, :3, None, None] + torch.randn([len(z), 3, 16, 16]))


def _training_images(holdout, taxon):
    with zipfile.ZipFile(holdout.manifest.dataset_path(taxon)) as zf:
        return [np.asarray(PIL.Image.open(io.BytesIO(zf.read(n)))).transpose(2, 0, 1)
                for n in sorted(zf.namelist()) if n.endswith('.png')]

#----------------------------------------------------------------------------

def test_holdout_split_is_stratified_seeded_and_never_in_a_training_zip(split, tmp_path):
    root, holdout = split
    # A quarter of each taxon (rounded), taken out of the taxon's zip and of the parent's, which keeps its labels right.
    assert holdout.record['num_heldout'] == {'Alpha': 16, 'Beta': 10, 'Gamma': 6}
    manifest = holdout.manifest
    assert {t: manifest.num_images(t) for t in TAXA} == {'Alpha': 48, 'Beta': 30, 'Gamma': 18}
    assert manifest.num_images('Root') == 96 and all(manifest.verify(t) == 'ok' for t in manifest.taxa)
    assert manifest.extra['holdout']['fraction'] == 0.25
    with zipfile.ZipFile(manifest.dataset_path('Root')) as zf:
        meta = json.loads(zf.read('dataset.json'))
        assert sorted(n for n, _ in meta['labels']) == sorted(n for n in zf.namelist() if n.endswith('.png'))
        assert all(TAXA[k].lower() == n.split('-')[0] for n, k in meta['labels']) and meta['label_names'] == list(TAXA)
    assert_heldout_never_trained(root / 'split')
    assert [len(holdout.test_names(t)) for t in TAXA + ('Root',)] == [16, 10, 6, 32]
    # Writing it again with the same settings keeps the files; another seed holds out other images; a split of a split,
    # or a split into its own folder, is refused.
    mtime = os.stat(root / 'split' / 'Root.zip').st_mtime_ns
    utility.write_holdout_split(root / 'ds', root / 'split', 0.25, seed=0)
    assert os.stat(root / 'split' / 'Root.zip').st_mtime_ns == mtime
    other = utility.write_holdout_split(root / 'ds', tmp_path / 'seed1', 0.25, seed=1)
    assert utility.load_holdout(other.root).record['images'] != holdout.record['images']
    with pytest.raises(utility.UtilityError, match='already a held-out split'):
        utility.write_holdout_split(root / 'split', tmp_path / 'again', 0.25)
    with pytest.raises(utility.UtilityError, match='another folder'):
        utility.write_holdout_split(root / 'ds', root / 'ds', 0.25)
    with pytest.raises(utility.UtilityError, match='no held-out real images'):
        utility.load_holdout(root / 'ds')


def test_metric_names():
    assert utility.parse_utility_metric('cas_taxon') == utility.UtilitySpec('cas_taxon', 'cas', None)
    assert utility.parse_utility_metric('gain2k_taxon') == utility.UtilitySpec('gain2k_taxon', 'gain', 2000)
    assert utility.parse_utility_metric('gain20_filtered_taxon') == utility.UtilitySpec('gain20_filtered_taxon', 'gain', 20, True)
    assert utility.parse_utility_metric('fid50k_full') is None and not utility.is_utility_metric('cas_full')


def test_interval_is_the_student_t_interval():
    mean, low, high = utility.mean_interval([0.1, 0.3, 0.2])
    half = 4.302652729911275 * 0.1 / np.sqrt(3)         # t(0.975, 2) x sd / sqrt(n)
    assert (mean, low, high) == pytest.approx((0.2, 0.2 - half, 0.2 + half))
    assert np.isnan(utility.mean_interval([0.5])[1])


def test_cas_of_the_real_images_is_the_real_accuracy_and_noise_is_chance(split, tmp_path):
    _, holdout = split
    evaluator = utility.UtilityEvaluator(holdout, TAXA, TINY, progress=False)
    assert evaluator.num_train == {'Alpha': 48, 'Beta': 30, 'Gamma': 18} and evaluator.num_test == {'Alpha': 16, 'Beta': 10, 'Gamma': 6}
    # "Generators" that return their taxon's real training images (drawn with replacement: 100 draws cover nearly all):
    # a classifier trained on their output is a classifier trained on the real images, balanced by resampling, so CAS
    # is about the real-trained accuracy.
    real_sources = {t: utility.GeneratorSource(G=BankG(_training_images(holdout, t))) for t in TAXA}
    result = utility.calc_utility(evaluator, ['cas100_taxon', 'gain_taxon'], real_sources, cache_dir=str(tmp_path))
    cas, gain = result['cas100_taxon'], result['gain_taxon']
    assert 0.7 <= cas['real_accuracy'] < 1 and abs(cas['value'] - cas['real_accuracy']) <= 0.15, (cas['value'], cas['real_accuracy'])
    assert cas['num_generated'] == {t: 100 for t in TAXA} and gain['num_added'] == {'Alpha': 0, 'Beta': 18, 'Gamma': 30}
    assert len(cas['per_seed']) == 3 and cas['interval'][0] <= cas['value'] <= cas['interval'][1]
    assert gain['accuracy_real'] == pytest.approx(cas['real_accuracy'])     # the same real arm, seed by seed
    assert gain['value'] == pytest.approx(np.mean(gain['per_seed']))
    # The same noise for every taxon: nothing to learn, CAS is chance (1/3) and adding it does not help.
    noise = {t: utility.GeneratorSource(G=NoiseG()) for t in TAXA}
    result = utility.calc_utility(evaluator, ['cas_taxon', 'gain20_taxon'], noise, cache_dir=str(tmp_path))
    cas, gain = result['cas_taxon'], result['gain20_taxon']
    assert cas['interval'][0] <= 1 / 3 <= cas['interval'][1] and abs(cas['value'] - 1 / 3) <= 0.15, cas['per_seed']
    assert gain['num_added'] == {t: 20 for t in TAXA}
    assert gain['interval'][0] <= 0 and gain['value'] <= 0.05, gain['per_seed']


def test_gain_of_more_real_images_is_positive_and_cas_beats_the_few_real_ones(tmp_path):
    # Positive control: two real training images per taxon (a weak classifier), and a "generator" that returns 100
    # other real images of its taxon, drawn from the same distribution but kept out of training and of the held-out
    # set. Adding them must help, with the whole interval above 0, and a classifier trained on them alone must beat the
    # one trained on the two real images. (A gain arm that never adds the generated images gives exactly 0.)
    contrast = 0.1
    write_collection(tmp_path / 'ds', {t: 24 for t in TAXA},
                     images_fn=lambda k, n: _taxon_images(k, n, k, contrast=contrast, noise=40))
    utility.write_holdout_split(tmp_path / 'ds', tmp_path / 'split', 0.9, seed=0)
    options = dataclasses.replace(TINY, utility_seeds=5, utility_steps=400, utility_lr=1e-2, utility_batch=32)
    evaluator = utility.UtilityEvaluator(utility.load_holdout(tmp_path / 'split'), TAXA, options, progress=False)
    assert evaluator.num_train == {t: 2 for t in TAXA} and evaluator.num_test == {t: 22 for t in TAXA}
    others = {t: utility.GeneratorSource(G=BankG(list(_taxon_images(k, 100, 100 + k, contrast=contrast, noise=40))))
              for k, t in enumerate(TAXA)}
    result = utility.calc_utility(evaluator, ['gain100_taxon', 'cas100_taxon'], others, cache_dir=str(tmp_path / 'cache'))
    gain, cas = result['gain100_taxon'], result['cas100_taxon']
    assert gain['num_added'] == cas['num_generated'] == {t: 100 for t in TAXA}
    assert gain['interval'][0] > 0.1 and gain['value'] > 0.2, gain['per_seed']
    assert gain['accuracy_augmented'] == pytest.approx(gain['accuracy_real'] + gain['value'])
    assert cas['interval'][0] > cas['real_accuracy'], (cas['per_seed'], cas['real_accuracy'])


def test_accuracies_are_measured_on_the_heldout_images(tmp_path):
    # Labels that carry no information (every image is noise): a classifier memorises its training images but is at
    # chance (1/3) on held-out ones. Scoring the training images instead would report the memorised accuracy.
    write_collection(tmp_path / 'ds', {t: 24 for t in TAXA},
                     images_fn=lambda k, n: np.random.RandomState(50 + k).randint(0, 256, [n, 3, 16, 16]).astype(np.uint8))
    utility.write_holdout_split(tmp_path / 'ds', tmp_path / 'split', 0.67, seed=0)
    options = dataclasses.replace(TINY, utility_steps=800, utility_lr=1e-2, utility_batch=32)
    evaluator = utility.UtilityEvaluator(utility.load_holdout(tmp_path / 'split'), TAXA, options, progress=False)
    assert evaluator.num_train == {t: 8 for t in TAXA} and evaluator.num_test == {t: 16 for t in TAXA}
    heldout, training = [], []
    for seed in range(options.utility_seeds):
        model = utility.fit_classifier_steps(evaluator.real_x, evaluator.real_y, TAXA, options, seed)
        with torch.no_grad():
            predicted = model.classify(evaluator.test_x).argmax(dim=1).numpy()
            training.append(float((model.classify(evaluator.real_x).argmax(dim=1) == evaluator.real_y).double().mean()))
        truth = evaluator.test_y.numpy()
        reference = np.array([np.mean(predicted[truth == k] == k) for k in range(len(TAXA))])      # [K] by hand
        np.testing.assert_array_equal(evaluator.real_accuracy(seed), reference)
        heldout.append(reference.mean())
    assert min(training) >= 0.9, training                   # the premise: the training images are memorised
    mean, low, high = utility.mean_interval(heldout)
    assert low <= 1 / 3 <= high and mean <= 0.45, heldout


def test_filtered_measures_keep_the_images_the_classifier_assigns_to_their_taxon(split, tmp_path):
    from taxogan_ext.taxon_detector import DETECTOR_FORMAT, save_taxon_detector
    _, holdout = split
    # A filter classifier trained on the real training images only, and generators of which half the images show
    # the next taxon: the filter removes most of those, so the classifier trained on what it keeps does better.
    plain = utility.UtilityEvaluator(holdout, TAXA, TINY, progress=False)
    strong = dataclasses.replace(TINY, utility_steps=400, utility_lr=1e-2, utility_batch=32)   # TINY's misses Gamma
    model = utility.fit_classifier_steps(plain.real_x, plain.real_y, TAXA, strong, seed=0)
    save_taxon_detector(model, dict(format=DETECTOR_FORMAT, class_names=list(TAXA), resolution=16), str(tmp_path / 'filter.pt'))
    options = dataclasses.replace(TINY, utility_filter=f'taxon:{tmp_path / "filter.pt"}', utility_filter_threshold=0.5)
    evaluator = utility.UtilityEvaluator(holdout, TAXA, options, progress=False)
    images = {t: _training_images(holdout, t) for t in TAXA}
    mixed = {t: utility.GeneratorSource(G=BankG(images[t][:18] + images[TAXA[(k + 1) % 3]][:18]), identity=f'mixed-{t}')
             for k, t in enumerate(TAXA)}
    result = utility.calc_utility(evaluator, ['cas60_taxon', 'cas60_filtered_taxon'], mixed, cache_dir=str(tmp_path / 'cache'))
    plain_cas, filtered_cas = result['cas60_taxon'], result['cas60_filtered_taxon']
    assert filtered_cas['value'] > plain_cas['value'] + 0.1, (plain_cas['per_seed'], filtered_cas['per_seed'])
    assert filtered_cas['filter']['threshold'] == 0.5 and filtered_cas['filter']['sha256'] == _sha(tmp_path / 'filter.pt')
    # The filtered images are the accepted candidates of the same latents, in order (reference: filter by hand).
    judge = evaluator.accept('Beta')
    candidates = utility.generate(mixed['Beta'], 96, 7, 16)
    with torch.no_grad():
        logits = evaluator.taxon_filter().detector.load('cpu').logits(((candidates + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
    probs = torch.softmax(logits.double(), dim=1)
    keep = (probs.argmax(dim=1) == 1) & (probs[:, 1] >= 0.5)           # Beta the top class, with p >= 0.5
    assert 10 < int(keep.sum()) < 90
    kept = utility.generate(mixed['Beta'], int(keep.sum()), 7, 16, accept=judge)
    assert torch.equal(kept, candidates[keep])
    # The unfiltered measure does not depend on the filter settings (its cached result is reused), the filtered one does.
    again = utility.calc_utility(utility.UtilityEvaluator(holdout, TAXA, dataclasses.replace(options, utility_filter_threshold=0.9),
                                                          progress=False), ['cas60_taxon'], mixed, cache_dir=str(tmp_path / 'cache'))
    assert again['cas60_taxon']['cached']
    stricter = utility.UtilityEvaluator(holdout, TAXA, dataclasses.replace(options, utility_filter_threshold=0.9), progress=False)
    assert utility.cache_key(stricter, utility.parse_utility_metric('cas60_filtered_taxon'), mixed) != filtered_cas['cache_key']
    # No filter given, a missing file, or a threshold no image reaches: one line each.
    with pytest.raises(utility.UtilityError, match='cas_filtered_taxon: the filtered measures need --utility-filter'):
        utility.check_filter(['cas_taxon', 'cas_filtered_taxon'], TINY)
    with pytest.raises(utility.UtilityError, match='no such file'):
        utility.check_filter(['gain_filtered_taxon'], dataclasses.replace(TINY, utility_filter='taxon:/nothing.pt'))
    impossible = utility.UtilityEvaluator(holdout, TAXA, dataclasses.replace(options, utility_filter_threshold=1.0), progress=False)
    with pytest.raises(utility.UtilityError, match=r'Alpha: only 0 of \d+ generated images \(0.0%\) pass the filter'):
        utility.calc_utility(impossible, ['cas10_filtered_taxon'], mixed, cache_dir=str(tmp_path / 'cache'))


def test_measures_repeat_exactly_and_are_cached_by_their_inputs(split, tmp_path):
    _, holdout = split
    options = dataclasses.replace(TINY, utility_seeds=2, utility_steps=40)
    images = {t: _training_images(holdout, t) for t in TAXA}

    def sources(identity):
        return {t: utility.GeneratorSource(G=BankG(images[t]), identity=identity) for t in TAXA}
    first = utility.calc_utility(utility.UtilityEvaluator(holdout, TAXA, options, progress=False), ['gain_taxon'],
                                 sources(None), cache_dir=str(tmp_path))['gain_taxon']
    again = utility.calc_utility(utility.UtilityEvaluator(holdout, TAXA, options, progress=False), ['gain_taxon'],
                                 sources('abc'), cache_dir=str(tmp_path))['gain_taxon']
    assert not first['cached'] and not again['cached'] and first['per_seed'] == again['per_seed']
    evaluator = utility.UtilityEvaluator(holdout, TAXA, options, progress=False)
    cached = utility.calc_utility(evaluator, ['gain_taxon'], sources('abc'), cache_dir=str(tmp_path))['gain_taxon']
    assert cached['cached'] and cached['per_seed'] == again['per_seed'] and evaluator._real_accuracy == {}
    # Another generator (identity), another option or another split is measured anew.
    assert not utility.calc_utility(evaluator, ['gain_taxon'], sources('abd'), cache_dir=str(tmp_path))['gain_taxon']['cached']
    longer = utility.UtilityEvaluator(holdout, TAXA, dataclasses.replace(options, utility_steps=41),
                                      progress=False)
    assert utility.cache_key(longer, utility.parse_utility_metric('gain_taxon'), sources('abc')) != \
        utility.cache_key(evaluator, utility.parse_utility_metric('gain_taxon'), sources('abc'))
    with pytest.raises(utility.UtilityError, match='overlap'):
        utility.UtilityEvaluator(holdout, ['Root', 'Alpha'], options, progress=False)
    with pytest.raises(utility.UtilityError, match='no generator for Gamma'):
        evaluator.measure([utility.parse_utility_metric('cas_taxon')], {t: sources(None)[t] for t in TAXA[:2]})

#----------------------------------------------------------------------------
# train_hier.py --holdout with the utility metrics, the report, and calc_metrics.py utility.

NET = ['--cbase', '64', '--cmax', '8', '--zdim', '8', '--map', '2', '--batch', '4', '--tick', '0.008', '--snap', '1',
       '--gamma', '0.01', '--aug', 'noaug', '--quiet', '--kimg-parent', '0.008', '--kimg-child', '0.004']
UTIL = ['--utility-seeds', '2', '--utility-steps', '30', '--utility-batch', '16', '--utility-res', '16']


def test_train_hier_holds_out_measures_each_method_and_reports(tmp_path):
    write_collection(tmp_path / 'ds')
    args = NET + UTIL + ['--datasets', str(tmp_path / 'ds'), '--outdir', str(tmp_path / 'exp'), '--cache', str(tmp_path / 'cache'),
                         '--method', 'direct,descending', '--parent', 'Root', '--holdout', '0.25',
                         '--metrics', 'cas_taxon,gain_taxon']
    runner = CliRunner()
    result = runner.invoke(train_hier.main, args)
    assert result.exit_code == 0, result.output
    split_dir = tmp_path / 'exp' / train_hier.HOLDOUT_DIR
    assert 'held out 32 real images' in result.output
    # Every stage trained on the split's zips; no held-out image in any of them.
    stages = [json.loads((tmp_path / 'exp' / s / 'training_options.json').read_text()) for s in ('Root', 'Alpha', 'Root__Alpha')]
    assert all(os.path.dirname(s['training_set_kwargs']['path']) == str(split_dir) for s in stages)
    assert_heldout_never_trained(split_dir)
    records = utility.read_utility_records(tmp_path / 'exp' / utility.UTILITY_FILE)
    assert sorted((r['method'], r['metric']) for r in records) == [('descending', 'cas_taxon'), ('descending', 'gain_taxon'),
                                                                    ('direct', 'cas_taxon'), ('direct', 'gain_taxon')]
    descending = next(r for r in records if r['method'] == 'descending' and r['metric'] == 'cas_taxon')
    assert descending['stages'] == {t: f'Root__{t}' for t in TAXA} and descending['seeds'] == 2
    # Both methods share the real-trained arm (same split, seeds and options).
    assert len({json.dumps(r['real_per_taxon']) for r in records}) == 1
    table = (tmp_path / 'exp' / 'table.md').read_text()
    assert '## Do the generated images help a classifier?' in table and '| Gamma | 18 / 6 |' in table
    assert 'gain descending' in table and (tmp_path / 'exp' / report.GAIN_FILE).is_file()
    assert PIL.Image.open(tmp_path / 'exp' / report.GAIN_FILE).size[0] > 400
    rows = list(csv.DictReader(open(tmp_path / 'exp' / 'table.csv')))
    mean = next(r for r in rows if r['taxon'] == report.BALANCED and r['method'] == 'direct')
    direct_gain = next(r for r in records if r['method'] == 'direct' and r['metric'] == 'gain_taxon')
    assert float(mean['gain']) == pytest.approx(direct_gain['value'], abs=1e-5)
    # Run again: nothing trained, nothing measured (cached), no new record.
    result = runner.invoke(train_hier.main, args)
    assert result.exit_code == 0 and 'training on' not in result.output, result.output
    assert len(utility.read_utility_records(tmp_path / 'exp' / utility.UTILITY_FILE)) == 4
    # calc_metrics.py utility gives the same numbers for the same networks (and reads them from the same cache).
    gens = [f'--generator={t}={tmp_path / "exp" / p}' for t, p in descending['pkls'].items()]
    result = runner.invoke(calc_metrics.main, ['utility', '--datasets', str(split_dir), '--metrics', 'cas_taxon',
                                               '--cache', str(tmp_path / 'cache'), '--quiet'] + gens + UTIL)
    assert result.exit_code == 0, result.output
    assert f'cas_taxon {descending["value"]:.3f}' in result.output
    # The filtered measures beside the plain ones: nothing retrained, the plain ones cached; a filter that accepts no
    # image leaves those cells "not measured", named in the log and the table, and the plain ones stand.
    from taxogan_ext.taxon_detector import DETECTOR_FORMAT, TaxonClassifier, save_taxon_detector
    torch.manual_seed(0)
    save_taxon_detector(TaxonClassifier(list(TAXA), resolution=16, channels=(8, 16)).eval(),
                        dict(format=DETECTOR_FORMAT, class_names=list(TAXA), resolution=16), str(tmp_path / 'filter.pt'))
    filtered_args = [a if a != 'cas_taxon,gain_taxon' else 'cas_taxon,gain_taxon,cas_filtered_taxon' for a in args]
    result = runner.invoke(train_hier.main, filtered_args + ['--utility-filter', f'taxon:{tmp_path / "filter.pt"}',
                                                             '--utility-filter-threshold', '1'])
    assert result.exit_code == 0 and 'training on' not in result.output, result.output
    assert 'direct: cas_filtered_taxon not measured: ' in result.output and 'pass the filter' in result.output
    table = (tmp_path / 'exp' / 'table.md').read_text()
    assert 'Not measured: cas_filtered_taxon of direct (' in table and 'Not measured: cas_filtered_taxon of descending (' in table
    assert '| Gamma | 18 / 6 |' in table and 'CAS direct filtered' not in table
    records = utility.read_utility_records(tmp_path / 'exp' / utility.UTILITY_FILE)
    assert len(records) == 6 and sum('error' in r for r in records) == 2
    # Without --utility-filter, a filtered measure is refused in one line before anything runs.
    result = runner.invoke(train_hier.main, filtered_args)
    assert result.exit_code == 1 and 'the filtered measures need --utility-filter' in result.output
    # Without a split, the utility metrics are refused in one line before anything is trained.
    result = runner.invoke(train_hier.main, NET + ['--datasets', str(tmp_path / 'ds'), '--outdir', str(tmp_path / 'exp2'),
                                                   '--metrics', 'cas_taxon'])
    assert result.exit_code == 1 and 'no held-out real images' in result.output and result.output.count('\n') == 1
    assert not (tmp_path / 'exp2' / 'Alpha').exists()
