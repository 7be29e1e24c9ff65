"""train.py as a user runs it: options, dry run, bad data, LeCam and whitelist plumbing."""

import json
import os

import pytest
from click.testing import CliRunner

import train
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
