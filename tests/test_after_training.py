"""After training: projector.py (and generate.py --projected-w), style_mixing.py and morph.py on tiny networks."""

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import dataset_tool_ext
import generate
import morph
import projector
import style_mixing
from stylegan2ada.image_utils import generate_images, to_uint8
from stylegan2ada.metrics.detectors import jit_load
from stylegan2ada.networks import Discriminator, Generator
from stylegan2ada.pickles import save_network_pkl
from stylegan2ada.util import write_json_atomic
from taxogan_ext import hierarchy, taxonomy
from taxogan_ext.taxon_detector import DETECTOR_FORMAT, TaxonClassifier, save_taxon_detector
from test_report import check_figure_files

RES = 16
TINY = dict(z_dim=8, w_dim=8, img_resolution=RES, img_channels=3, mapping_kwargs=dict(num_layers=2),
            synthesis_kwargs=dict(channel_base=64, channel_max=8))
TAXA = ('Calanoida', 'Cyclopoida')

#----------------------------------------------------------------------------
# Helpers.

def _generator(seed, c_dim=0, **overrides):
    torch.manual_seed(seed)
    return Generator(c_dim=c_dim, **dict(TINY, **overrides)).eval().requires_grad_(False)


def _pkl(path, G):
    save_network_pkl(path, dict(G=G, G_ema=G))
    return str(path)


def _classifier(path, class_names=TAXA, seed=3):
    """A randomly initialised taxon classifier file: a fixed random conv net with the detector's interface."""
    torch.manual_seed(seed)
    model = TaxonClassifier(list(class_names), resolution=RES, channels=(8, 16)).eval()
    save_taxon_detector(model, dict(format=DETECTOR_FORMAT, class_names=list(class_names), resolution=RES), str(path))
    return str(path)


def _run(main, args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def _one_line_error(main, args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 1, result.output + repr(result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('Error: '), result.output
    return lines[0]


def _png(path):
    return np.array(PIL.Image.open(path)).transpose(2, 0, 1)            # [C, H, W]


@pytest.fixture
def bad_pickles(tmp_path):
    """A pickle with only a discriminator, and a file that is no pickle."""
    torch.manual_seed(0)
    d_only = tmp_path / 'd.pkl'
    save_network_pkl(d_only, dict(D=Discriminator(c_dim=0, img_resolution=RES, img_channels=3, channel_base=64, channel_max=8)))
    notes = tmp_path / 'notes.pkl'
    notes.write_text('not a pickle')
    return str(d_only), str(notes)

#----------------------------------------------------------------------------
# Projection.

def _in_range_generator():
    """A tiny generator whose images lie within [-1, 1], as a trained network's do.

    A random one's exceed it (a third of the pixels): the target is then clamped while the optimised image is not,
    and the known w is no longer the minimum of the distance.
    """
    G = _generator(0)
    for name, param in G.synthesis.named_parameters():
        if 'torgb.weight' in name:
            param.mul_(0.3)
    return G


def _random_conv_features():
    """Stand-in for VGG16: a fixed random 3x3 conv + ReLU at full resolution, its activations as the features."""
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(3, 16, 3, padding=1).requires_grad_(False)
    return lambda img: torch.relu(conv(img / 127.5 - 1)).flatten(1) / 16


@pytest.mark.parametrize('seed', [5, 11])
def test_projection_recovers_a_known_latent(seed):
    G = _in_range_generator()
    z = torch.from_numpy(np.random.RandomState(seed).randn(1, 8)).float()
    w_true = G.mapping(z, None)[0, 0]                                   # [w_dim]
    target = to_uint8(G.synthesis(w_true[None, None].repeat(1, G.num_ws, 1), noise_mode='const'))[0]
    w_start, _w_std = projector.mean_w(G)
    steps = projector.project(G, target, _random_conv_features(), num_steps=300)
    assert steps.shape == (300, G.w_dim)
    image = projector.render_w(G, steps[-1]).to(torch.float32)
    # Measured (seeds 5, 11): start 23.4 and 19.5 mean abs error (uint8 units), w distance 2.2 and 2.0 from the truth;
    # after 300 steps 0.012 and 0.018 mean (max 1: one rounding step), w distance 0.0006 and 0.0027.
    assert (image - target).abs().mean() < 0.2
    assert (image - target).abs().max() <= 2
    assert (w_start[0, 0] - w_true).norm() > 1.5
    assert (steps[-1] - w_true).norm() < 0.03


def test_learning_rate_ramp_and_noise_regularization():
    assert projector.learning_rate(0.0, 0.1, 0.25, 0.05) == 0
    assert projector.learning_rate(0.025, 0.1, 0.25, 0.05) == pytest.approx(0.05)
    assert projector.learning_rate(0.5, 0.1, 0.25, 0.05) == pytest.approx(0.1)
    assert projector.learning_rate(0.875, 0.1, 0.25, 0.05) == pytest.approx(0.05)
    smooth = torch.ones([16, 16])
    assert float(projector.noise_regularization([smooth])) == pytest.approx(2 * 2)      # 16 and 8 px, x and y
    white = torch.from_numpy(np.random.RandomState(0).randn(64, 64)).float()
    assert float(projector.noise_regularization([white])) < 1e-2


def test_projector_writes_files_that_generate_reproduces(tmp_path):
    G = _in_range_generator()
    pkl = _pkl(tmp_path / 'net.pkl', G)
    target = to_uint8(G(torch.from_numpy(np.random.RandomState(7).randn(1, 8)).float(), None, noise_mode='const'))[0]
    PIL.Image.fromarray(np.kron(target.numpy().transpose(1, 2, 0), np.ones([2, 2, 1], np.uint8))).save(tmp_path / 'target.png')
    out = tmp_path / 'out'
    _run(projector.main, ['--network', pkl, '--target', tmp_path / 'target.png', '--outdir', out, '--num-steps', 30,
                          '--distance', f'taxon:{_classifier(tmp_path / "taxon.pt")}', '--device', 'cpu', '--save-video'])
    assert sorted(p.name for p in out.iterdir()) == ['proj.gif', 'proj.png', 'projected_w.npz', 'target.png']
    with np.load(out / 'projected_w.npz') as npz:
        assert list(npz.files) == ['w'] and npz['w'].shape == (1, G.num_ws, G.w_dim) and npz['w'].dtype == np.float32
        assert np.array_equal(npz['w'][0], np.repeat(npz['w'][0, :1], G.num_ws, axis=0))
    assert np.array_equal(_png(out / 'target.png'), projector.load_target(tmp_path / 'target.png', RES, 3).numpy())
    with PIL.Image.open(out / 'proj.gif') as gif:
        assert gif.n_frames == 3 and gif.size == (2 * RES, RES)         # every 10th of 30 steps; target | projection
    _run(generate.main, ['--network', pkl, '--projected-w', out / 'projected_w.npz', '--outdir', tmp_path / 'gen',
                         '--device', 'cpu'])
    assert (tmp_path / 'gen' / 'proj00.png').read_bytes() == (out / 'proj.png').read_bytes()


def test_projector_bad_input_is_one_line(tmp_path, bad_pickles, monkeypatch):
    d_only, notes = bad_pickles
    pkl = _pkl(tmp_path / 'net.pkl', _generator(0))
    cond = _pkl(tmp_path / 'cond.pkl', _generator(0, c_dim=3))
    PIL.Image.new('RGB', (20, 24), 'gray').save(tmp_path / 'ok.png')
    (tmp_path / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n garbage')
    base = ['--outdir', tmp_path / 'out', '--num-steps', 2, '--device', 'cpu']
    taxon = ['--distance', f'taxon:{_classifier(tmp_path / "taxon.pt")}']
    line = _one_line_error(projector.main, ['--network', d_only, '--target', tmp_path / 'ok.png', *taxon, *base])
    assert 'd.pkl: the pickle holds no generator' in line
    line = _one_line_error(projector.main, ['--network', notes, '--target', tmp_path / 'ok.png', *taxon, *base])
    assert 'notes.pkl: not a valid network pickle' in line
    line = _one_line_error(projector.main, ['--network', cond, '--target', tmp_path / 'ok.png', *taxon, *base])
    assert 'conditional (3 classes); choose one with --class' in line
    for target in ('broken.png', 'missing.png'):
        line = _one_line_error(projector.main, ['--network', pkl, '--target', tmp_path / target, *taxon, *base])
        assert f'{target}: cannot read the target image' in line
    line = _one_line_error(projector.main, ['--network', pkl, '--target', tmp_path / 'ok.png', '--distance', 'inception', *base])
    assert 'expected vgg16 or taxon:PATH' in line
    line = _one_line_error(projector.main, ['--network', pkl, '--target', tmp_path / 'ok.png', '--distance', 'taxon:nope.pt', *base])
    assert 'nope.pt: no such taxon detector file' in line
    # NVIDIA's VGG16 file, as the metrics find it: offline and not in the cache, one line saying where to put it.
    monkeypatch.setenv('TAXOGAN_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setenv('TAXOGAN_OFFLINE', '1')
    line = _one_line_error(projector.main, ['--network', pkl, '--target', tmp_path / 'ok.png', *base])
    assert 'VGG16 detector not found' in line and 'vgg16.pt' in line
    # generate.py --projected-w: a file that is no projection, or one of another network.
    (tmp_path / 'w.npz').write_bytes(b'nonsense')
    line = _one_line_error(generate.main, ['--network', pkl, '--projected-w', tmp_path / 'w.npz', '--outdir', tmp_path / 'g'])
    assert '--projected-w' in line and 'w.npz' in line
    np.savez(tmp_path / 'other.npz', w=np.zeros([1, 3, 8], np.float32))
    line = _one_line_error(generate.main, ['--network', pkl, '--projected-w', tmp_path / 'other.npz', '--outdir', tmp_path / 'g'])
    assert 'do not fit the network' in line

#----------------------------------------------------------------------------
# Style mixing.

@pytest.mark.parametrize('c_dim', [0, 3])
def test_style_mixing_empty_range_is_the_row_and_full_range_the_column(c_dim):
    G = _generator(0, c_dim=c_dim)
    label = np.eye(3, dtype=np.float32)[1] if c_dim else None
    kwargs = dict(G=G, row_seeds=[1, 2, 3], col_seeds=[10, 11], label=label)
    rows, cols, cells = style_mixing.style_mixing_images(styles=[], **kwargs)
    assert cells.shape == (3, 2, 3, RES, RES)
    assert all(torch.equal(cells[r, k], rows[r]) for r in range(3) for k in range(2))
    rows2, cols2, cells = style_mixing.style_mixing_images(styles=list(range(G.num_ws)), **kwargs)
    assert torch.equal(rows2, rows) and torch.equal(cols2, cols)
    assert all(torch.equal(cells[r, k], cols[k]) for r in range(3) for k in range(2))
    _, _, cells = style_mixing.style_mixing_images(styles=[0, 1], **kwargs)
    assert not torch.equal(cells[0, 0], rows[0]) and not torch.equal(cells[0, 0], cols[0])
    # The seeds' images are generate.py's (same z, same label), up to batching.
    direct = generate_images(G, [1, 2, 3], label=label).to(torch.int16)
    assert (rows.to(torch.int16) - direct).abs().max() <= 1


def test_style_mixing_cli_grid_layout(tmp_path):
    G = _generator(0, c_dim=3)
    pkl = _pkl(tmp_path / 'cond.pkl', G)
    out = tmp_path / 'out'
    _run(style_mixing.main, ['--network', pkl, '--rows', '1-3', '--cols', '10,11', '--styles', '0-2', '--class', 2,
                             '--outdir', out, '--device', 'cpu'])
    rows, cols, cells = style_mixing.style_mixing_images(G, [1, 2, 3], [10, 11], [0, 1, 2], label=np.eye(3)[2])
    grid = _png(out / 'grid.png')
    assert grid.shape == (3, 4 * RES, 3 * RES)
    assert not grid[:, :RES, :RES].any()                                # blank corner
    assert np.array_equal(grid[:, :RES, RES:2 * RES], cols[0].numpy())  # column images along the top
    assert np.array_equal(grid[:, 3 * RES:, :RES], rows[2].numpy())     # row images down the left
    assert np.array_equal(grid[:, 2 * RES:3 * RES, 2 * RES:], cells[1, 1].numpy())
    assert np.array_equal(_png(out / '2-11.png'), cells[1, 1].numpy())
    assert len(list(out.glob('*-*.png'))) == 6


def test_style_mixing_bad_input_is_one_line(tmp_path, bad_pickles):
    d_only, notes = bad_pickles
    pkl = _pkl(tmp_path / 'net.pkl', _generator(0))
    cond = _pkl(tmp_path / 'cond.pkl', _generator(0, c_dim=3))
    base = ['--rows', '1,2', '--cols', '3', '--styles', '0-1', '--outdir', tmp_path / 'out', '--device', 'cpu']
    assert 'd.pkl: the pickle holds no generator' in _one_line_error(style_mixing.main, ['--network', d_only, *base])
    assert 'not a valid network pickle' in _one_line_error(style_mixing.main, ['--network', notes, *base])
    assert 'choose one with --class' in _one_line_error(style_mixing.main, ['--network', cond, *base])
    assert 'out of range' in _one_line_error(style_mixing.main, ['--network', cond, *base, '--class', 3])
    line = _one_line_error(style_mixing.main, ['--network', pkl, *base[:4], '--styles', '0-6', *base[6:]])
    assert '--styles: layer 6 out of range: the network has 6 ws (layers 0-5)' in line
    assert "--rows x: cannot parse 'x'" in _one_line_error(style_mixing.main, ['--network', pkl, '--rows', 'x', *base[2:]])

#----------------------------------------------------------------------------
# Morph.

def _predicted(classifier_path, images):
    """The classifier's class of each uint8 image, as acc_taxon takes it (argmax of its logits)."""
    module = jit_load(classifier_path).eval()
    with torch.no_grad():
        return module.logits(images).argmax(dim=1).numpy()


def test_morph_ends_are_the_generators_and_chart_ends_their_accuracy(tmp_path, monkeypatch):
    charts = []                         # what the chart drew, kept as the command runs
    draw = morph.write_chart
    monkeypatch.setattr(morph, 'write_chart', lambda *args, **kwargs: charts.append(draw(*args, **kwargs)) or charts[-1])
    G_a, G_b = _generator(1), _generator(2)
    pkl_a, pkl_b = _pkl(tmp_path / 'a.pkl', G_a), _pkl(tmp_path / 'b.pkl', G_b)
    # Seed 25: a random classifier that assigns some of each generator's images to each taxon (not all to one).
    classifier = _classifier(tmp_path / 'taxon.pt', class_names=('Harpacticoida',) + TAXA, seed=25)
    seeds = list(range(12))
    out = tmp_path / 'out'
    _run(morph.main, ['--from', pkl_a, '--to', pkl_b, '--from-taxon', 'Calanoida', '--to-taxon', 'Cyclopoida',
                      '--classifier', f'taxon:{classifier}', '--seeds', '0-11', '--steps', 5, '--outdir', out,
                      '--save-video', '--device', 'cpu'])
    images_a, images_b = generate_images(G_a, seeds), generate_images(G_b, seeds)
    for n, seed in enumerate(seeds):
        strip = torch.from_numpy(_png(out / f'strip-seed{seed:04d}.png'))
        assert strip.shape == (3, RES, 5 * RES)
        assert torch.equal(strip[:, :, :RES], images_a[n]) and torch.equal(strip[:, :, 4 * RES:], images_b[n])
        assert not torch.equal(strip[:, :, 2 * RES:3 * RES], images_a[n])
    record = json.loads((out / 'morph.json').read_text())
    assert record['steps'] == [0, 0.25, 0.5, 0.75, 1] and record['seeds'] == seeds
    # acc_taxon of each generator on these latents, computed here from the classifier file itself.
    acc_a = float((_predicted(classifier, images_a) == 1).mean())
    acc_b = float((_predicted(classifier, images_b) == 2).mean())
    assert 0 < acc_a < 1 and 0 < acc_b < 1 and acc_a != acc_b
    shares = record['classifier']
    assert shares['classes'] == [1, 2]
    assert shares['share_a'][0] == acc_a and shares['share_b'][-1] == acc_b
    assert shares['share_b'][0] == float((_predicted(classifier, images_a) == 2).mean())
    assert (out / 'grid.png').is_file()
    # The chart plots morph.json's shares over its steps, and is written as PNG, PDF and SVG.
    (chart,) = charts
    check_figure_files(chart, out / 'chart.png')
    assert [(s['label'], s['x'], s['y']) for s in chart.series] == [
        ('classified as Calanoida', record['steps'], shares['share_a']), ('classified as Cyclopoida', record['steps'], shares['share_b'])]
    with PIL.Image.open(out / 'morph.gif') as gif:
        assert gif.n_frames == 5


def test_morph_of_a_conditional_networks_classes(tmp_path):
    G = _generator(4, c_dim=3)
    pkl = _pkl(tmp_path / 'cond.pkl', G)
    out = tmp_path / 'out'
    _run(morph.main, ['--from', pkl, '--from-class', 0, '--to-class', 2, '--seeds', '3', '--steps', 3, '--outdir', out])
    strip = torch.from_numpy(_png(out / 'strip-seed0003.png'))
    assert torch.equal(strip[:, :, :RES], generate_images(G, [3], label=np.eye(3)[0])[0])
    assert torch.equal(strip[:, :, 2 * RES:], generate_images(G, [3], label=np.eye(3)[2])[0])
    half = generate_images(G, [3], label=np.array([0.5, 0, 0.5]))[0]
    assert torch.equal(strip[:, :, RES:2 * RES], half)


def test_blend_is_every_tensor_linearly():
    G_a, G_b = _generator(1), _generator(2)
    state = morph.blend_state(G_a.state_dict(), G_b.state_dict(), 0.25)
    for key, a in G_a.state_dict().items():
        torch.testing.assert_close(state[key], 0.75 * a + 0.25 * G_b.state_dict()[key])
    assert morph.blend_steps(5) == [0.0, 0.25, 0.5, 0.75, 1.0]


def _fake_trained_plan(tmp_path, pkls):
    """A descending plan (Copepoda > Calanoida, Cyclopoida) whose stages are 'trained', as train_hier.py leaves it."""
    for k, order in enumerate(TAXA):
        folder = tmp_path / 'photos' / 'Copepoda' / order
        folder.mkdir(parents=True)
        for i in range(3):
            rng = np.random.default_rng(10 * k + i)
            PIL.Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f'{order[:3]}{i}.png')
    _run(dataset_tool_ext.cmdline, ['build', '--source', tmp_path / 'photos', '--dest', tmp_path / 'datasets',
                                    '--resolution', RES, '--min-size', 0, '--near-dup-threshold', -1, '--workers', 1])
    outdir = tmp_path / 'plan'
    plan = hierarchy.build_plan(taxonomy.load_manifest(tmp_path / 'datasets'), str(outdir), ['descending'],
                                targets=list(TAXA), parent='Copepoda')
    for k, stage in enumerate(plan.stages):
        folder = outdir / stage.key
        folder.mkdir(parents=True)
        final = folder / 'network-snapshot-000001.pkl'
        final.write_bytes(Path(pkls.get(stage.taxon) or _pkl(folder / 'g.pkl', _generator(100 + k))).read_bytes())
        write_json_atomic(folder / hierarchy.STAGE_FILE, dict(state='trained', final_pkl=final.name))
    write_json_atomic(outdir / hierarchy.PLAN_FILE, plan.to_dict())
    return outdir


def test_morph_between_two_taxa_of_a_plan(tmp_path):
    G_a, G_b = _generator(1), _generator(2)
    plan_dir = _fake_trained_plan(tmp_path, {'Calanoida': _pkl(tmp_path / 'a.pkl', G_a),
                                             'Cyclopoida': _pkl(tmp_path / 'b.pkl', G_b)})
    out = tmp_path / 'out'
    _run(morph.main, ['--plan', plan_dir, '--method', 'descending', '--from-taxon', 'Calanoida', '--to-taxon', 'Cyclopoida',
                      '--seeds', '0,1', '--steps', 3, '--outdir', out])
    strip = torch.from_numpy(_png(out / 'strip-seed0001.png'))
    assert torch.equal(strip[:, :, :RES], generate_images(G_a, [1])[0])
    assert torch.equal(strip[:, :, 2 * RES:], generate_images(G_b, [1])[0])
    record = json.loads((out / 'morph.json').read_text())
    assert [e['taxon'] for e in record['ends']] == list(TAXA) and record['method'] == 'descending'
    line = _one_line_error(morph.main, ['--plan', plan_dir, '--from-taxon', 'Calanoida', '--to-taxon', 'Harpacticoida',
                                        '--outdir', out])
    assert "--to-taxon Harpacticoida: not a target of the plan" in line
    line = _one_line_error(morph.main, ['--plan', plan_dir, '--method', 'lateral', '--from-taxon', 'Calanoida',
                                        '--to-taxon', 'Cyclopoida', '--outdir', out])
    assert '--method lateral: not a method of the plan' in line


def test_morph_bad_input_is_one_line(tmp_path, bad_pickles):
    d_only, notes = bad_pickles
    pkl = _pkl(tmp_path / 'a.pkl', _generator(1))
    wider = _pkl(tmp_path / 'wide.pkl', _generator(2, synthesis_kwargs=dict(channel_base=64, channel_max=16)))
    other_arch = _pkl(tmp_path / 'orig.pkl', _generator(2, synthesis_kwargs=dict(channel_base=64, channel_max=8,
                                                                                  architecture='orig')))
    cond = _pkl(tmp_path / 'cond.pkl', _generator(3, c_dim=3))
    out = ['--outdir', tmp_path / 'out', '--device', 'cpu']
    line = _one_line_error(morph.main, ['--from', pkl, '--to', wider, *out])
    assert 'different architectures' in line and 'synthesis.b4.const is [8, 4, 4] in one, [16, 4, 4]' in line
    line = _one_line_error(morph.main, ['--from', pkl, '--to', other_arch, *out])
    assert 'different architectures' in line and 'only in' in line
    line = _one_line_error(morph.main, ['--from', pkl, '--to', cond, '--to-class', 1, *out])
    assert 'different architectures' in line
    assert 'd.pkl: the pickle holds no generator' in _one_line_error(morph.main, ['--from', pkl, '--to', d_only, *out])
    assert 'not a valid network pickle' in _one_line_error(morph.main, ['--from', notes, '--to', pkl, *out])
    line = _one_line_error(morph.main, ['--from', cond, '--from-class', 0, *out])
    assert 'conditional (3 classes); choose one with --to-class' in line
    line = _one_line_error(morph.main, ['--from', cond, '--from-class', 1, '--to-class', 1, *out])
    assert 'same network and class' in line
    line = _one_line_error(morph.main, ['--from', pkl, '--to', pkl, '--classifier', 'taxon:x.pt', *out])
    assert 'same network' in line
    line = _one_line_error(morph.main, ['--from', pkl, '--to', _pkl(tmp_path / 'b.pkl', _generator(2)),
                                        '--classifier', f'taxon:{_classifier(tmp_path / "t.pt")}', *out])
    assert '--from-taxon NAME and --to-taxon NAME' in line
    line = _one_line_error(morph.main, ['--from', pkl, '--to', tmp_path / 'b.pkl', '--from-taxon', 'Calanoida',
                                        '--to-taxon', 'Ostracoda', '--classifier', f'taxon:{tmp_path / "t.pt"}', *out])
    assert "taxon 'Ostracoda' is neither a class of the classifier" in line
    assert 'give the two networks' in _one_line_error(morph.main, out)
