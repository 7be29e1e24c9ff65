"""train.py as a user runs it: options, dry run, bad data, LeCam and whitelist plumbing."""

import json
import os

import pytest
from click.testing import CliRunner

import train
from stylegan2ada.pickles import load_network_pkl
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
    spec = train.cfg_spec('auto', resolution=256, gpus=1)
    assert spec['mb'] == 16 and spec['mbstd'] == 4 and spec['fmaps'] == 0.5 and spec['lrate'] == 0.0025
    assert spec['gamma'] == pytest.approx(0.0002 * 256 ** 2 / 16) and spec['ema'] == pytest.approx(16 * 10 / 32)
    assert train.cfg_spec('auto', resolution=1024, gpus=8)['mb'] == 32


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
    import generate
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
