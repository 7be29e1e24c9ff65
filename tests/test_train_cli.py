"""train.py as a user runs it: options, dry run, bad data, LeCam and whitelist plumbing."""

import dataclasses
import json
import os
import types

import click
import pytest
from click.testing import CliRunner

import generate
import train
import train_hier
from stylegan2ada.dataset import DatasetError
from stylegan2ada.pickles import load_network_pkl
from taxogan_ext import training
from training_helpers import write_zip

TINY = ['--zdim', '8', '--cbase', '64', '--cmax', '8', '--map', '2', '--gamma', '0.01', '--batch', '4', '--device', 'cpu']


def _run(args):
    return CliRunner().invoke(train.main, args, catch_exceptions=False)


def test_dry_run_prints_options_and_writes_nothing(tmp_path):
    data = write_zip(tmp_path / 'd.zip')
    result = _run(['--outdir', str(tmp_path / 'runs'), '--data', data, '--dry-run', '--aug-allow', 'leakfree-geom', *TINY])
    assert result.exit_code == 0, result.output
    assert 'Dry run' in result.output and '"batch_size": 4' in result.output
    assert 'Augmentations:       xflip, rotate90, rotate' in result.output
    assert not (tmp_path / 'runs').exists()


def test_cfg_auto_matches_nvidia_formulas():
    spec = training.cfg_spec('auto', resolution=256, gpus=1)
    assert spec['mb'] == 16 and spec['mbstd'] == 4 and spec['fmaps'] == 0.5 and spec['lrate'] == 0.0025
    assert spec['gamma'] == pytest.approx(0.0002 * 256 ** 2 / 16) and spec['ema'] == pytest.approx(16 * 10 / 32)
    assert training.cfg_spec('auto', resolution=1024, gpus=8)['mb'] == 32


def test_options_are_declared_once_with_the_values_click_gives():
    # The defaults built without click equal those train.py's command line yields, types included (--tick's default 4
    # is 4.0 either way), so that training_options.json reads the same whether a run comes from train.py or a stage.
    parsed = train.main.make_context('train.py', ['--data', 'd.zip']).params
    built = dataclasses.asdict(training.TrainingOptions(data='d.zip'))
    assert [param.name for param in train.main.params] == training.option_names() and parsed == built
    assert {name: type(value) for name, value in parsed.items()} == {name: type(value) for name, value in built.items()}
    assert type(built['tick']) is float and type(built['lecam_weight']) is float and type(built['seed']) is int
    # train_hier.py offers every other option under the same name, type and default, after its own.
    hier = {param.name: param for param in train_hier.main.params}
    for param in train.main.params:
        if param.name in train_hier.PLAN_OWNED:
            continue
        other = hier[param.name]
        assert (other.opts, other.help, repr(other.type), other.metavar, other.default, other.show_default) == \
               (param.opts, param.help, repr(param.type), param.metavar, param.default, param.show_default)
    names = [param.name for param in train_hier.main.params]
    assert names[-len(train_hier.passthrough_names()):] == train_hier.passthrough_names()
    # Values are checked as on the command line.
    with pytest.raises(click.BadParameter):
        training.TrainingOptions(gpus=0)


def test_click_options_add_the_fields_to_any_command():
    @click.command()
    @click.option('--own', type=int, default=1)
    @training.click_options(exclude=('data', 'outdir', 'run_dir'))
    def command(**kwargs):
        pass

    names = [param.name for param in command.params]
    assert names[0] == 'own' and names[1:] == [n for n in training.option_names() if n not in ('data', 'outdir', 'run_dir')]
    ctx = command.make_context('command', ['--lecam-weight', '0.5', '--aug-allow', 'xflip'])
    assert ctx.params['lecam_weight'] == 0.5 and ctx.params['aug_allow'] == 'xflip' and ctx.params['tick'] == 4.0


def test_programming_error_in_a_run_keeps_its_traceback(tmp_path, monkeypatch):
    # Only user errors (stylegan2ada.util.UserError) become one line; a bug inside the run is not hidden as "Error: ...".
    def broken_loop(**kwargs):
        raise ValueError('a bug in the loop')

    monkeypatch.setattr(training, 'training_loop', broken_loop)
    data = write_zip(tmp_path / 'd.zip')
    result = CliRunner().invoke(train.main, ['--run-dir', str(tmp_path / 'run'), '--data', data, *TINY])
    assert isinstance(result.exception, ValueError) and str(result.exception) == 'a bug in the loop'
    assert 'Error:' not in result.output

    # train_hier.py's stages likewise: a bug propagates, a user error is one line naming the stage.
    stage = types.SimpleNamespace(key='Calanoida', data=data, kimg=0.004, cond=False, overrides={},
                                  train_options=dict(zdim=8, cbase=64, cmax=8, map=2, gamma=0.01, batch=4, device='cpu'))
    with pytest.raises(ValueError, match='^a bug in the loop$'):
        train_hier.train_stage(stage, str(tmp_path / 'stage'), None, None, None)

    def unreadable(**kwargs):
        raise DatasetError(f'{data}: unreadable image')

    monkeypatch.setattr(training, 'training_loop', unreadable)
    with pytest.raises(train_hier.UserError, match=f'^stage Calanoida: {data}: unreadable image$'):
        train_hier.train_stage(stage, str(tmp_path / 'stage2'), None, None, None)


def test_too_small_images_are_one_line_error(tmp_path):
    data = write_zip(tmp_path / 'd.zip', resolution=4)
    result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path / 'runs'), '--data', data, *TINY])
    assert result.exit_code == 1 and result.output.count('\n') == 1, result.output
    assert "4 px images; StyleGAN2's discriminator needs at least 8 px" in result.output
    assert not (tmp_path / 'runs').exists()


@pytest.mark.parametrize('case,match', [
    ('missing', 'no such file'),
    ('nonsquare', 'square'),
    ('mixed', 'size'),
])
def test_bad_data_is_one_line_error(tmp_path, case, match):
    if case == 'missing':
        data = str(tmp_path / 'nope.zip')
    elif case == 'nonsquare':
        data = write_zip(tmp_path / 'd.zip', num_images=3, size=(16, 12))
    else:
        data = write_zip(tmp_path / 'd.zip', num_images=3, size=(32, 32))
    result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path / 'runs'), '--data', data, *TINY])
    assert result.exit_code == 1
    assert result.output.startswith('Error: ') and result.output.count('\n') == 1, result.output
    assert match in result.output.lower() and 'Traceback' not in result.output


def test_bad_options_fail_early(tmp_path):
    data = write_zip(tmp_path / 'd.zip')
    result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path), '--data', data, '--aug-allow', 'xflip,warp', *TINY])
    assert result.exit_code == 1 and 'warp' in result.output and 'xflip' in result.output
    result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path), '--data', data, '--cond', *TINY])
    assert result.exit_code == 1 and 'labels' in result.output
    result = CliRunner().invoke(train.main, ['--data', data, *TINY])
    assert result.exit_code == 1 and '--outdir' in result.output
    result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path), '--data', data, '--cuda-graphs', *TINY])
    assert result.exit_code == 1 and result.output == 'Error: --cuda-graphs needs one CUDA GPU (here --gpus 1 on cpu)\n'
    assert sorted(os.listdir(tmp_path)) == ['d.zip']                 # refused before any run folder is made


def test_lecam_and_whitelist_reach_the_run(tmp_path):
    data = write_zip(tmp_path / 'd.zip')
    result = _run(['--outdir', str(tmp_path / 'runs'), '--data', data, '--kimg', '0.008', '--snap', '1', '--tick', '0.004',
                   '--lecam-weight', '0.5', '--aug-allow', 'xflip,rotate90', '--aug', 'fixed', '--p', '0.5', '--mbstd-group', '2', *TINY])
    assert result.exit_code == 0, result.output
    (run_dir,) = [os.path.join(tmp_path, 'runs', d) for d in os.listdir(tmp_path / 'runs')]
    assert os.path.basename(run_dir).startswith('00000-d-auto-kimg0.008-batch4-gamma0.01-fixed-allow-lecam0.5')
    options = json.load(open(os.path.join(run_dir, 'training_options.json')))
    assert options['augment_names'] == ['xflip', 'rotate90'] and options['lecam_kwargs']['weight'] == 0.5
    assert 'Augmentations: xflip, rotate90 (p 0.5, fixed)' in open(os.path.join(run_dir, 'log.txt')).read()
    stats = [json.loads(line) for line in open(os.path.join(run_dir, 'stats.jsonl'))]
    assert all(key in stats[-1] for key in ('Loss/D/lecam', 'LeCam/ema_real', 'LeCam/ema_fake'))


def test_dcgan_model_trains_and_generates(tmp_path):
    data = write_zip(tmp_path / 'd.zip', resolution=32)
    result = _run(['--run-dir', str(tmp_path / 'run'), '--data', data, '--model', 'dcgan', '--kimg', '0.008', '--batch', '4',
                   '--cbase', '256', '--device', 'cpu'])
    assert result.exit_code == 0, result.output
    out = tmp_path / 'gen'
    result = CliRunner().invoke(generate.main, ['--network', str(tmp_path / 'run' / 'network-snapshot-000000.pkl'),
                                                '--seeds', '0-3', '--outdir', str(out), '--device', 'cpu'])
    assert result.exit_code == 0, result.output
    assert len(list(out.glob('seed*.png'))) == 4


def test_continued_run_keeps_its_settings(tmp_path):
    # A killed LeCam run continued with only the run folder and the data (as the interrupt message says) must
    # keep LeCam, the whitelist and its ADA settings, and continue the LeCam EMAs.
    data = write_zip(tmp_path / 'd.zip')
    first = tmp_path / 'first'
    start = ['--data', data, '--snap', '1', '--tick', '0.004', '--mbstd-group', '2', *TINY]
    result = _run(['--run-dir', str(first), '--kimg', '0.008', '--lecam-weight', '0.5', '--aug-allow', 'xflip,rotate90', *start])
    assert result.exit_code == 0, result.output
    original = json.load(open(first / 'training_options.json'))

    # --resume FOLDER into a new run folder (auto mode: one of our snapshots, so the run continues).
    second = tmp_path / 'second'
    result = _run(['--run-dir', str(second), '--data', data, '--resume', str(first), '--kimg', '0.016', '--device', 'cpu'])
    assert result.exit_code == 0, result.output
    options = json.load(open(second / 'training_options.json'))
    for key in ('lecam_kwargs', 'augment_kwargs', 'augment_names', 'ada_kimg', 'ema_rampup', 'G_kwargs', 'D_kwargs', 'loss_kwargs', 'batch_size'):
        assert options[key] == original[key], key
    assert options['resume_mode'] == 'full' and options['fine_tuning'] is False and options['total_kimg'] == 0.016
    assert options['kimg_per_tick'] == 0.004 and options['network_snapshot_ticks'] == 1   # not given: as the run had them
    assert 'continuing at kimg 0.008' in (second / 'log.txt').read_text()
    stats = [json.loads(line) for line in open(second / 'stats.jsonl')]
    assert all('LeCam/ema_real' in s for s in stats)
    saved_ema = load_network_pkl(first / 'network-snapshot-000000.pkl')['progress']['loss']['extra_d_terms']['lecam']
    resumed = load_network_pkl(second / 'network-snapshot-000000.pkl')['progress']['loss']['extra_d_terms']['lecam']
    assert int(resumed['num_updates']) == int(saved_ema['num_updates']) + 2    # 8 more images in batches of 4

    # --cuda-graphs belongs to the machine running the command: a run started with it continues on a CPU without it.
    saved = dict(original['options'], cuda_graphs=True, device='cuda')
    continued = training.continued_options(training.TrainingOptions(device='cpu'), saved, given={'device'}, source='snap.pkl')
    assert continued.cuda_graphs is False and continued.device == 'cpu' and continued.lecam_weight == 0.5

    # Another value for a setting that shapes the training is refused in one line; a longer --kimg is fine.
    result = CliRunner().invoke(train.main, ['--run-dir', str(first), '--lecam-weight', '0.1', '--kimg', '0.016', *start])
    assert result.exit_code == 1 and result.output.count('\n') == 1, result.output
    assert '--lecam-weight 0.5, not 0.1' in result.output


def test_fine_tuning_run_continued_keeps_fine_tuning_settings(tmp_path):
    data = write_zip(tmp_path / 'd.zip')
    common = ['--data', data, '--snap', '1', '--tick', '0.004', '--mbstd-group', '2', *TINY]
    assert _run(['--run-dir', str(tmp_path / 'parent'), '--kimg', '0.008', *common]).exit_code == 0
    child = tmp_path / 'child'
    parent_pkl = str(tmp_path / 'parent' / 'network-snapshot-000000.pkl')
    result = _run(['--run-dir', str(child), '--kimg', '0.008', '--resume', parent_pkl, '--resume-mode', 'weights', *common])
    assert result.exit_code == 0, result.output
    assert json.load(open(child / 'training_options.json'))['ada_kimg'] == 100
    result = _run(['--run-dir', str(child), '--kimg', '0.012', *common])       # continue the fine-tuning run
    assert result.exit_code == 0, result.output
    options = json.load(open(child / 'training_options.json'))
    assert options['fine_tuning'] is True and options['ada_kimg'] == 100 and options['ema_rampup'] is None
    assert 'continuing at kimg 0.008' in (child / 'log.txt').read_text()


def test_options_for_other_models_and_modes_are_refused(tmp_path):
    data = write_zip(tmp_path / 'd.zip', resolution=32)
    for extra, match in [(['--model', 'dcgan', '--lecam-weight', '0.1'], '--lecam-weight applies to StyleGAN2 only'),
                         (['--model', 'dcgan', '--aug-allow', 'xflip'], '--aug-allow applies to StyleGAN2 only'),
                         (['--aug-deny', 'noise,cutout'], 'nothing to remove'),
                         (['--aug', 'fixed'], '--aug fixed needs --p')]:
        result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path / 'runs'), '--data', data, '--dry-run', *TINY, *extra])
        assert result.exit_code == 1 and result.output.count('\n') == 1 and match in result.output, (extra, result.output)
    assert not (tmp_path / 'runs').exists()


def test_two_kimg_run_as_a_new_user_then_longer(tmp_path):
    # python train.py --data ZIP --kimg 2 (tiny 16 px network), then the same folder continued to 3 kimg.
    data = write_zip(tmp_path / 'd.zip', num_images=32)
    run_dir = tmp_path / 'run'
    args = ['--run-dir', str(run_dir), '--data', data, '--zdim', '8', '--cbase', '64', '--cmax', '8', '--map', '2',
            '--batch', '32', '--tick', '1', '--snap', '1', '--device', 'cpu']
    result = _run([*args, '--kimg', '2'])
    assert result.exit_code == 0, result.output
    names = set(os.listdir(run_dir))
    assert {f'network-snapshot-00000{k}.pkl' for k in range(3)} <= names
    assert {'fakes_init.png', 'fakes000001.png', 'fakes000002.png', 'reals.png'} <= names
    snap = load_network_pkl(run_dir / 'network-snapshot-000002.pkl')
    assert snap['progress']['cur_nimg'] == 2016                             # 63 steps of 32: the first past 2000
    log_lines = [line for line in (run_dir / 'log.txt').read_text().splitlines() if line.startswith('tick ')]
    assert len(log_lines) == 3 and all(w in log_lines[-1] for w in ('kimg 2.016', 'sec/kimg', 'eta', 'augment', 'cpumem'))
    p_saved = float(snap['augment_pipe'].p)
    stats = [json.loads(line) for line in open(run_dir / 'stats.jsonl')]
    assert stats[-1]['Progress/augment'] == pytest.approx(p_saved)
    result = _run([*args, '--kimg', '3'])
    assert result.exit_code == 0, result.output
    log = (run_dir / 'log.txt').read_text()
    assert f'continuing at kimg 2.016 (tick 3), augment p {p_saved:.3f}' in log
    assert load_network_pkl(run_dir / 'network-snapshot-000003.pkl')['progress']['cur_nimg'] == 3008


# ----------------------------------------------------------------------------
# Fine-tuning an NVIDIA-format pickle of non-default sizes: the networks take the pickle's sizes and every tensor.

from test_pickles import _write_nvidia_pickle, nvidia_modules  # noqa: E402,F401  (the fixture is used by name)

NV_G = dict(z_dim=8, w_dim=16, c_dim=0, img_resolution=16, img_channels=3, mapping_kwargs=dict(num_layers=3),
            synthesis_kwargs=dict(channel_base=128, channel_max=16, num_fp16_res=2, conv_clamp=256))
NV_D = dict(c_dim=0, img_resolution=16, img_channels=3, architecture='orig', channel_base=128, channel_max=16, num_fp16_res=2,
            conv_clamp=256, block_kwargs={}, mapping_kwargs={}, epilogue_kwargs=dict(mbstd_group_size=4, mbstd_num_channels=2))
NV_LINE = ('networks from nv.pkl: z_dim 8, w_dim 16, mapping 3 layers, channel_base 128, channel_max 16, fp16 resolutions 2, '
           'conv_clamp 256, c_dim {c_dim}, D architecture orig')
FT = ['--kimg', '0.004', '--batch', '4', '--tick', '0.004', '--snap', '1', '--gamma', '0.01', '--glr', '1e-12', '--dlr', '1e-12',
      '--aug', 'noaug', '--device', 'cpu']


def _nvidia_pickle(path, c_dim=0, seed=0):
    """An NVIDIA-format pickle of NV_G/NV_D's sizes, every parameter and buffer random (not any initialisation)."""
    import torch
    from stylegan2ada.networks import Discriminator, Generator
    g_kwargs, d_kwargs = dict(NV_G, c_dim=c_dim), dict(NV_D, c_dim=c_dim)
    torch.manual_seed(seed)
    G, D = Generator(**g_kwargs), Discriminator(**d_kwargs)
    with torch.no_grad():
        for module in (G, D):
            for tensor in list(module.parameters()) + list(module.buffers()):
                if tensor.is_floating_point():
                    tensor.copy_(torch.randn_like(tensor))
    _write_nvidia_pickle(path, G.requires_grad_(False), D.requires_grad_(False), G, dict(G_kwargs=g_kwargs, D_kwargs=d_kwargs))
    return G, D


def _assert_transferred(snapshot, G, D):
    """Every tensor of the run's networks equals the pickle's (lr 1e-12: training moved the parameters by ~1e-12)."""
    import torch
    for key, src in (('G', G), ('G_ema', G), ('D', D)):
        got = snapshot[key].state_dict()
        assert set(got) == set(src.state_dict()), key
        for name, tensor in src.state_dict().items():
            if not name.endswith('w_avg'):          # tracked by training: moves by design
                assert torch.allclose(got[name], tensor, atol=1e-6, rtol=0), f'{key}.{name}'


def test_fine_tuning_takes_the_pickles_sizes_and_every_tensor(tmp_path, nvidia_modules):
    data = write_zip(tmp_path / 'd.zip')
    G, D = _nvidia_pickle(tmp_path / 'nv.pkl')
    # No size option: --cfg auto would build 512-wide 16384-channel networks; the pickle's sizes are taken instead.
    result = _run(['--run-dir', str(tmp_path / 'run'), '--data', data, '--resume', str(tmp_path / 'nv.pkl'), *FT])
    assert result.exit_code == 0, result.output
    assert NV_LINE.format(c_dim=0) in result.output.splitlines()
    options = json.load(open(tmp_path / 'run' / 'training_options.json'))
    assert options['G_kwargs']['synthesis_kwargs'] == dict(channel_base=128, channel_max=16, num_fp16_res=2, conv_clamp=256)
    assert options['D_kwargs']['epilogue_kwargs'] == dict(mbstd_group_size=4, mbstd_num_channels=2)    # group: this run's batch
    assert options['networks_from'] == NV_LINE.format(c_dim=0)
    snapshot = load_network_pkl(tmp_path / 'run' / 'network-snapshot-000000.pkl')
    assert snapshot['G'].init_kwargs == NV_G and snapshot['D'].init_kwargs['architecture'] == 'orig'
    _assert_transferred(snapshot, G, D)
    assert 'kept as initialised' not in (tmp_path / 'run' / 'log.txt').read_text()
    # The run continues from its own snapshot with the same networks.
    result = _run(['--run-dir', str(tmp_path / 'run'), '--data', data, '--kimg', '0.008', '--device', 'cpu'])
    assert result.exit_code == 0, result.output
    assert load_network_pkl(tmp_path / 'run' / 'network-snapshot-000000.pkl')['G'].init_kwargs == NV_G


def test_untransferred_tensors_are_an_error_unless_partial(tmp_path, nvidia_modules):
    data = write_zip(tmp_path / 'd.zip')
    pkl = str(tmp_path / 'nv.pkl')
    _nvidia_pickle(pkl)
    for extra, expect in [(['--cbase', '64'], ['--cbase 64 (pickle: 128)', 'left at random initialisation']),
                          (['--map', '2'], ['--map 2 (pickle: 3)', "G 0 left at random initialisation and 2 of the pickle's unused",
                                            'G.mapping.fc2.weight [16, 16] (pickle only)'])]:
        result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path / 'runs'), '--data', data, '--resume', pkl, *FT, *extra])
        assert result.exit_code == 1 and result.output.count('\n') == 1, result.output
        assert 'not every tensor would transfer' in result.output and '--resume-partial' in result.output
        assert all(text in result.output for text in expect), result.output
    assert not (tmp_path / 'runs').exists()
    # --resume-partial: NVIDIA's behaviour, said in the networks line and the log.
    result = _run(['--run-dir', str(tmp_path / 'partial'), '--data', data, '--resume', pkl, '--cbase', '64', '--resume-partial', *FT])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.startswith('networks from nv.pkl'))
    assert 'channel_base 64' in line and '(given: --cbase)' in line and 'partial transfer: G ' in line
    assert 'kept as initialised (partial transfer)' in (tmp_path / 'partial' / 'log.txt').read_text()


def test_fine_tuning_checks_resolution_channels_and_labels(tmp_path, nvidia_modules):
    pkl = str(tmp_path / 'nv.pkl')
    _nvidia_pickle(pkl)
    for data, expect in [(write_zip(tmp_path / 'big.zip', resolution=32), 'make 16 px images with 3 channel(s), but '),
                         (write_zip(tmp_path / 'gray.zip', channels=1), 'holds 16 px images with 1 channel(s)')]:
        result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path / 'runs'), '--data', data, '--resume', pkl, *FT])
        assert result.exit_code == 1 and result.output.count('\n') == 1, result.output
        assert expect in result.output and os.path.basename(data) in result.output and 'nv.pkl' in result.output
    # A conditional pickle stays conditional on a dataset with labels for its classes; without labels it is refused.
    cond_pkl = str(tmp_path / 'nv-cond.pkl')
    G, D = _nvidia_pickle(cond_pkl, c_dim=4)
    labelled = write_zip(tmp_path / 'labelled.zip', labels=[i % 4 for i in range(16)])
    result = _run(['--run-dir', str(tmp_path / 'cond'), '--data', labelled, '--resume', cond_pkl, *FT])
    assert result.exit_code == 0, result.output
    assert NV_LINE.replace('nv.pkl', 'nv-cond.pkl').format(c_dim=4) in result.output.splitlines()
    assert json.load(open(tmp_path / 'cond' / 'training_options.json'))['training_set_kwargs']['use_labels'] is True
    _assert_transferred(load_network_pkl(tmp_path / 'cond' / 'network-snapshot-000000.pkl'), G, D)
    result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path / 'runs'), '--data', write_zip(tmp_path / 'plain.zip'),
                                             '--resume', cond_pkl, *FT])
    assert result.exit_code == 1 and result.output.count('\n') == 1, result.output
    assert 'the pickle is conditional with 4 classes, this run has 0 (it needs --cond and 4 classes' in result.output
