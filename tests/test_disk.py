"""Long campaigns on small disks: a full disk gives one line and loses nothing, --keep-snaps, the pre-flight estimate."""

import collections
import errno
import json
import os
import re
import shlex
import subprocess
import zipfile

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

import train
import train_hier
from stylegan2ada import training_loop as loop_mod
from stylegan2ada import util
from stylegan2ada.pickles import load_network_pkl
from stylegan2ada.training_loop import latest_snapshot, snapshots_to_remove, training_loop
from stylegan2ada.util import TEMP_PREFIX, DiskFullError
from taxogan_ext import collection, report
from test_hierarchy import _script_detector, _write_datasets
from training_helpers import tiny_loop_kwargs, write_zip

TINY = ['--zdim', '8', '--cbase', '64', '--cmax', '8', '--map', '2', '--gamma', '0.01', '--batch', '4', '--device', 'cpu',
        '--aug', 'noaug']
UNITS = {'B': 1, 'KiB': 1 << 10, 'MiB': 1 << 20, 'GiB': 1 << 30}
DiskUsage = collections.namedtuple('DiskUsage', ['total', 'used', 'free'])

#----------------------------------------------------------------------------
# A small file system: a tmpfs mount where the platform allows it, else writes through atomic_write that fail with
# ENOSPC once a byte budget is spent (with shutil.disk_usage reporting that budget).

class SmallDisk:
    """A folder on a file system whose free space the test sets."""

    def __init__(self, root, kind, monkeypatch, size=4 << 20):
        self.root, self.kind, self.monkeypatch = root, kind, monkeypatch
        self.root.mkdir(parents=True, exist_ok=True)
        self.budget = None              # patched: bytes that may still be written under root; None = no limit
        if kind == 'tmpfs':
            result = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(root)], capture_output=True)
            if result.returncode != 0:
                pytest.skip(f'cannot mount a tmpfs here ({result.stderr.decode().strip() or "not permitted"}); '
                            f'the patched variant covers the same paths')
        else:
            real_fdopen, real_usage = os.fdopen, util.shutil.disk_usage
            monkeypatch.setattr(util.os, 'fdopen', lambda fd, *a, **k: self._wrap(fd, real_fdopen(fd, *a, **k)))
            monkeypatch.setattr(util.shutil, 'disk_usage', lambda path: self._usage(path, real_usage))

    def _inside(self, path):
        return os.path.abspath(path).startswith(str(self.root) + os.sep)

    def _wrap(self, fd, f):
        if self.budget is None or not self._inside(os.readlink(f'/proc/self/fd/{fd}')):
            return f
        disk, write = self, f.write

        def limited_write(data):
            size = len(data.encode() if isinstance(data, str) else data)
            if size > disk.budget:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            disk.budget -= size
            return write(data)
        f.write = limited_write
        return f

    def _usage(self, path, real_usage):
        usage = real_usage(path)
        if self.budget is not None and self._inside(os.path.join(path, 'x')):
            return DiskUsage(usage.total, usage.used, self.budget)
        return usage

    def set_free(self, num_bytes):
        """Leave about num_bytes free (a ballast file on tmpfs; a write budget when patched)."""
        self.release()
        if self.kind == 'tmpfs':
            ballast = util.shutil.disk_usage(self.root).free - num_bytes
            with open(self.root / 'ballast', 'wb') as f:
                f.write(b'\0' * max(ballast, 0))
        else:
            self.budget = num_bytes

    def release(self):
        """Free the space again."""
        if self.kind == 'tmpfs' and (self.root / 'ballast').exists():
            (self.root / 'ballast').unlink()
        self.budget = None

    def close(self):
        if self.kind == 'tmpfs':
            subprocess.run(['umount', str(self.root)], check=True)


@pytest.fixture(params=['tmpfs', 'patched'])
def small_disk(request, tmp_path, monkeypatch):
    disk = SmallDisk(tmp_path / 'small', request.param, monkeypatch)
    try:
        yield disk
    finally:
        disk.close()


def _temporaries(folder):
    return [os.path.join(d, n) for d, _, names in os.walk(folder) for n in names if n.startswith(TEMP_PREFIX)]


def _error_line(output):
    lines = [line for line in output.splitlines() if line.startswith('Error: ')]
    assert len(lines) == 1, output
    return lines[0]

#----------------------------------------------------------------------------
# Disk full.

def test_disk_full_writing_a_snapshot_stops_the_run_and_its_command_continues_it(tmp_path, small_disk):
    data = write_zip(tmp_path / 'd.zip')
    run_dir = small_disk.root / 'run'
    args = ['--run-dir', str(run_dir), '--data', data, '--kimg', '0.04', '--tick', '0.008', '--snap', '2', *TINY]
    # Room for the first snapshot (about 200 KiB) and the grids, not for its replacement beside it.
    small_disk.set_free(330 << 10)
    result = CliRunner().invoke(train.main, args + ['--no-space-check'], catch_exceptions=False)
    assert result.exit_code == 1, result.output
    line = _error_line(result.output)
    first = run_dir / 'network-snapshot-000000.pkl'
    assert re.match(rf'Error: disk full writing {re.escape(str(first))}: it needs about [\d.]+ KiB \([\d.]+ KiB written, '
                    rf'[\d.]+ KiB to go\), [\d.]+ (B|KiB) free on ', line), line
    assert 'continue from network-snapshot-000000.pkl with: python train.py --run-dir' in line
    kept = load_network_pkl(first)['progress']['cur_nimg']
    assert kept > 0 and _temporaries(small_disk.root) == []

    small_disk.release()
    command = shlex.split(line.split(' with: ', 1)[1])
    assert command[:2] == ['python', 'train.py']
    result = CliRunner().invoke(train.main, command[2:], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f'continuing at kimg {kept / 1000:.3f}' in result.output
    assert load_network_pkl(first)['progress']['cur_nimg'] == 40


def _staged_pngs(folder, count, size=48, seed=0):
    """Noise PNGs (incompressible: their bytes are what the zip needs)."""
    folder.mkdir(parents=True, exist_ok=True)
    rnd = np.random.RandomState(seed)
    paths = []
    for i in range(count):
        path = folder / f'{i:04d}.png'
        PIL.Image.fromarray(rnd.randint(0, 256, [size, size, 3], dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_disk_full_writing_a_dataset_zip_keeps_the_previous_zips(tmp_path, small_disk):
    taxa = {'Copepoda': dict(dataset='Copepoda.zip', labels=None), 'Calanoida': dict(dataset='Calanoida.zip', labels=None)}
    staged = _staged_pngs(tmp_path / 'stage', 40)
    files = lambda n: [(f'img{i:04d}.png', ('Copepoda', 'Calanoida'), staged[i]) for i in range(n)]
    before = collection.write_zips(small_disk.root, taxa, files(10))
    small_disk.set_free(400 << 10)
    with pytest.raises(DiskFullError) as info:
        collection.write_zips(small_disk.root, taxa, files(40))
    message = str(info.value)
    assert '\n' not in message and re.match(rf'disk full writing {re.escape(str(small_disk.root))}/(Copepoda|Calanoida)\.zip: '
                                            rf'it needs more than the [\d.]+ KiB written before the disk filled, ', message)
    assert {name: util.sha256_file(small_disk.root / e['dataset']) for name, e in taxa.items()} == before
    assert _temporaries(small_disk.root) == []
    with zipfile.ZipFile(small_disk.root / 'Copepoda.zip') as z:
        assert len(z.namelist()) == 11


def _tiny_plan_args(tmp_path, outdir, method='descending'):
    _write_datasets(tmp_path / 'ds')
    detector = _script_detector(tmp_path / 'det.pt')
    return ['--datasets', str(tmp_path / 'ds'), '--outdir', str(outdir), '--method', method, '--parent', 'Copepoda',
            '--targets', 'Calanoida,Cyclopoida', '--kimg-parent', '0.024', '--kimg-child', '0.016', '--ema-kimg', '0.002',
            '--metrics', 'fid20_full', '--detector', detector, '--cache', str(tmp_path / 'cache'), '--quiet',
            '--tick', '0.008', '--snap', '1', *TINY]


def test_disk_full_writing_a_report_keeps_the_previous_one(tmp_path, small_disk):
    outdir = small_disk.root / 'exp'
    result = CliRunner().invoke(train_hier.main, _tiny_plan_args(tmp_path, outdir), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    table = (outdir / 'table.md').read_text()
    (outdir / 'overview.png').unlink()                  # so that the report has a new file to write
    small_disk.set_free(2 << 10)
    with pytest.raises(DiskFullError) as info:
        report.write_report(outdir)
    assert str(info.value).startswith(f'disk full writing {outdir}/') and '\n' not in str(info.value)
    assert (outdir / 'table.md').read_text() == table and _temporaries(small_disk.root) == []

#----------------------------------------------------------------------------
# Retention.

def _fast_kwargs(data, run_dir, **overrides):
    """tiny_loop_kwargs with batch 32 and ticks of 1 kimg: one snapshot file per kimg, in seconds."""
    return tiny_loop_kwargs(data, run_dir, **dict(dict(batch_size=32, batch_gpu=32, kimg_per_tick=1.0, augment_kwargs=None,
                                                       ada_target=None, loss_kwargs=dict(r1_gamma=0.01, pl_weight=0),
                                                       image_snapshot_ticks=None), **overrides))


def test_keep_snaps_keeps_the_newest_the_best_and_the_final(tmp_path):
    data = write_zip(tmp_path / 'd.zip')
    detector = _script_detector(tmp_path / 'det.pt')
    run_dir = tmp_path / 'run'
    final = training_loop(**_fast_kwargs(data, run_dir, total_kimg=4.0, keep_snapshots=2, metrics=['fid20_full'],
                                         detector=detector))
    names = sorted(n for n in os.listdir(run_dir) if n.startswith('network-snapshot-'))
    with open(run_dir / 'metric-fid20_full.jsonl') as f:
        values = {r['snapshot_pkl']: r['results']['fid20_full'] for r in map(json.loads, f)}
    assert sorted(values) == [f'network-snapshot-{k:06d}.pkl' for k in range(5)]       # five written
    best = min(values, key=values.get)
    assert os.path.basename(final) == 'network-snapshot-000004.pkl'
    assert set(names) == {'network-snapshot-000003.pkl', 'network-snapshot-000004.pkl', best}
    log = (run_dir / 'log.txt').read_text()
    removed = [n for line in log.splitlines() if line.strip().startswith('removed ')
               for n in re.findall(r'network-snapshot-\d+\.pkl', line.split('(')[0])]
    assert sorted(removed) == sorted(set(values) - set(names))


def test_the_best_is_kept_by_the_metric_direction(tmp_path):
    for k, (fid, acc) in enumerate([(3.0, 0.5), (1.0, 0.2), (4.0, 0.9), (5.0, 0.1), (9.0, 0.3)]):
        (tmp_path / f'network-snapshot-{k:06d}.pkl').write_bytes(b'x')
        for name, value in (('fid20_full', fid), ('acc20_taxon', acc)):
            with open(tmp_path / f'metric-{name}.jsonl', 'a') as f:
                f.write(json.dumps(dict(results={name: value}, snapshot_pkl=f'network-snapshot-{k:06d}.pkl')) + '\n')
    assert snapshots_to_remove(tmp_path, 2, 'fid20_full') == (
        ['network-snapshot-000000.pkl', 'network-snapshot-000002.pkl'], 'network-snapshot-000001.pkl')
    assert snapshots_to_remove(tmp_path, 2, 'acc20_taxon') == (
        ['network-snapshot-000000.pkl', 'network-snapshot-000001.pkl'], 'network-snapshot-000002.pkl')
    assert snapshots_to_remove(tmp_path, 1, None) == ([f'network-snapshot-{k:06d}.pkl' for k in range(4)], None)


def test_a_kill_between_writing_and_deleting_loses_nothing(tmp_path, monkeypatch):
    data = write_zip(tmp_path / 'd.zip')
    run_dir = tmp_path / 'run'

    def killed(path):
        raise SystemExit('killed after writing the new snapshot, before deleting the old one')
    monkeypatch.setattr(loop_mod, '_remove_snapshot', killed)
    with pytest.raises(SystemExit):
        training_loop(**_fast_kwargs(data, run_dir, total_kimg=3.0, keep_snapshots=1))
    names = sorted(n for n in os.listdir(run_dir) if n.startswith('network-snapshot-'))
    assert names == ['network-snapshot-000000.pkl', 'network-snapshot-000001.pkl'] and _temporaries(run_dir) == []
    assert load_network_pkl(run_dir / names[-1])['progress']['cur_nimg'] == 1056     # complete

    monkeypatch.undo()
    training_loop(**_fast_kwargs(data, run_dir, total_kimg=3.0, keep_snapshots=1, resume_pkl=latest_snapshot(run_dir),
                                 resume_mode='full'))
    assert sorted(n for n in os.listdir(run_dir) if n.startswith('network-snapshot-')) == ['network-snapshot-000003.pkl']
    assert 'removed network-snapshot-000000.pkl, network-snapshot-000001.pkl' in (run_dir / 'log.txt').read_text()

#----------------------------------------------------------------------------
# Pre-flight.

def _estimate(output):
    match = re.search(r'Disk: about ([\d.]+) (B|KiB|MiB|GiB) ', output)
    assert match, output
    return float(match.group(1)) * UNITS[match.group(2)]


def _bytes_under(folder):
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(folder) for n in names)


def test_estimate_is_within_25_percent_of_a_tiny_plans_use(tmp_path):
    args = _tiny_plan_args(tmp_path, tmp_path / 'exp')
    result = CliRunner().invoke(train_hier.main, args + ['--dry-run'], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    estimate = _estimate(result.output)
    result = CliRunner().invoke(train_hier.main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    used = _bytes_under(tmp_path / 'exp')
    print(f'tiny plan: estimate {estimate:.0f} B, used {used} B ({estimate / used - 1:+.1%})')
    assert abs(estimate - used) <= 0.25 * used


def test_a_plan_larger_than_the_free_space_is_refused_before_training(tmp_path, small_disk):
    outdir = small_disk.root / 'exp'
    small_disk.set_free(64 << 10)
    result = CliRunner().invoke(train_hier.main, _tiny_plan_args(tmp_path, outdir), catch_exceptions=False)
    assert result.exit_code == 1, result.output
    line = _error_line(result.output)
    assert re.match(r'Error: .*: [\d.]+ (B|KiB) free, but this needs about [\d.]+ (KiB|MiB) \(snapshots .*\); free space, '
                    r'lower --keep-snaps, or give --no-space-check$', line), line
    assert not outdir.exists() or not any(p.is_dir() for p in outdir.iterdir())       # no stage started

#----------------------------------------------------------------------------
# Offline nodes.

def test_fetch_detectors_verifies_the_cache_and_offline_runs_name_it(tmp_path, monkeypatch):
    import warnings

    import torch

    import calc_metrics
    from stylegan2ada.metrics.detectors import INCEPTION_FILENAME
    from test_metrics import Inception2048
    cache = tmp_path / 'cache'
    cache.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)
        torch.jit.script(Inception2048()).save(str(cache / INCEPTION_FILENAME))    # as a machine with internet left it
    monkeypatch.setenv('TAXOGAN_OFFLINE', '1')
    result = CliRunner().invoke(calc_metrics.main, ['fetch-detectors', '--cache', str(cache), '--detectors', 'inception'])
    assert result.exit_code == 0, result.output
    assert f'Inception: {cache / INCEPTION_FILENAME} (SHA-256 ' in result.output and 'verified' in result.output

    monkeypatch.setenv('TAXOGAN_CACHE', str(tmp_path / 'empty'))
    data = write_zip(tmp_path / 'd.zip')
    result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path / 'runs'), '--data', data, '--metrics', 'fid10_full',
                                             '--kimg', '0.008', *TINY], catch_exceptions=False)
    assert result.exit_code == 1
    line = _error_line(result.output)
    assert str(tmp_path / 'empty' / INCEPTION_FILENAME) in line and 'TAXOGAN_OFFLINE' in line
    assert 'python calc_metrics.py fetch-detectors' in line


def test_snapshot_estimate_of_a_wider_network_is_within_5_percent(tmp_path):
    # Tensors dominate a snapshot once the network is not tiny: G, G_ema, D, both optimisers' moments must all be
    # counted (forgetting G_ema alone would be some 20 % short here).
    from stylegan2ada.dataset import ImageFolderDataset
    from taxogan_ext import disk
    data = write_zip(tmp_path / 'd.zip', num_images=8, resolution=32)
    result = CliRunner().invoke(train.main, ['--data', data, '--outdir', str(tmp_path / 'runs'), '--cfg', 'auto', '--cbase', '8192',
                                             '--cmax', '128', '--zdim', '64', '--map', '2', '--batch', '4', '--kimg', '0.004',
                                             '--tick', '0.004', '--snap', '1', '--aug', 'noaug', '--device', 'cpu', '--no-space-check'],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run_dir = next((tmp_path / 'runs').iterdir())
    config = json.loads((run_dir / 'training_options.json').read_text())
    estimate = disk.snapshot_bytes(config, ImageFolderDataset(data))
    size = os.path.getsize(latest_snapshot(str(run_dir)))
    assert size > 4 << 20 and abs(estimate - size) <= 0.05 * size, (estimate, size)
