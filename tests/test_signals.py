"""A stop signal to the whole process group (timeout, scancel, Ctrl-C): final snapshot, continue command, no worker left.

The runs use DataLoader worker processes (--workers 2), which receive the signal too; they must leave it to the main
process, which writes its snapshot, ends them and prints the command that continues the run.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from stylegan2ada.pickles import load_network_pkl
from training_helpers import process_group, write_zip

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--batch', '4', '--zdim', '8', '--cbase', '64', '--cmax', '8', '--map', '2', '--gamma', '0.01', '--mbstd-group', '2',
        '--device', 'cpu', '--workers', '2']


# One intra-op thread: with the two cores shared, a second OpenMP thread waiting for a busy core stalls every step.
ENV = dict(os.environ, OMP_NUM_THREADS='1')


def _group_pids(pgid):
    """Processes of a process group (from /proc)."""
    pids = []
    for name in os.listdir('/proc'):
        try:
            with open(f'/proc/{name}/stat') as f:
                fields = f.read().rsplit(')', 1)[1].split()
        except (OSError, IndexError):
            continue
        if name.isdigit() and int(fields[2]) == pgid and fields[0] != 'Z':
            pids.append(int(name))
    return pids


def _wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f'timed out waiting for {what}')


def _lines(path):
    return path.read_text().splitlines() if path.exists() else []


def _stop_group(cmd, stats_file, sig, tmp_path):
    """Start cmd in its own process group, signal the group after two ticks; (returncode, stdout, stderr)."""
    with process_group(cmd, tmp_path, cwd=REPO, env=ENV) as proc:
        _wait_for(lambda: len(_lines(stats_file)) >= 2 or proc.poll() is not None, 240, 'two ticks')
        assert proc.poll() is None, (tmp_path / 'err.txt').read_text()[-3000:]
        # A few steps into the third tick (step time from the second tick: 4 images per step).
        step_seconds = json.loads(_lines(stats_file)[1])['Timing/sec_per_kimg'] * 4 / 1000
        time.sleep(max(0.3, 4 * step_seconds))
        assert len(_group_pids(proc.pid)) >= 3              # the main process and its two DataLoader workers
        os.killpg(proc.pid, sig)
        proc.wait(timeout=120)
        # The main process ended its workers: nothing of the group survives it.
        _wait_for(lambda: not _group_pids(proc.pid), 30, 'the DataLoader workers to end')
    return proc.returncode, (tmp_path / 'out.txt').read_text(), (tmp_path / 'err.txt').read_text()


def _continue_command(stderr, script):
    """The command the one-line message prints, as an argument list run with this interpreter."""
    line = stderr.strip().splitlines()[-1]
    assert 'Traceback' not in stderr and 'DataLoader worker' not in stderr, stderr[-3000:]
    assert line.startswith('Error: ') and 'interrupted; snapshot written to ' in line, stderr[-3000:]
    args = shlex.split(line.split('continue with: ', 1)[1])
    assert args[0] == 'python' and os.path.basename(args[1]) == script, line
    return [sys.executable] + args[1:]


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_train_stopped_by_a_group_signal_writes_snapshot_and_continues(tmp_path, sig):
    data = write_zip(tmp_path / 'd.zip', num_images=32)
    run_dir = tmp_path / 'run'
    # Ticks of 50 steps after the first (one step); --snap 1000: a snapshot at tick 0 only, then the interrupt's.
    cmd = [sys.executable, 'train.py', '--run-dir', str(run_dir), '--data', data, '--kimg', '1000', '--tick', '0.2',
           '--snap', '1000', *TINY]
    code, _out, err = _stop_group(cmd, run_dir / 'stats.jsonl', sig, tmp_path)
    assert code == 1, err[-3000:]
    again = _continue_command(err, 'train.py')
    assert again[1:] == ['train.py', '--run-dir', str(run_dir), '--data', data]
    snaps = [n for n in os.listdir(run_dir) if n.startswith('network-snapshot')]
    assert snaps == ['network-snapshot-000000.pkl'] and not [n for n in os.listdir(run_dir) if n.startswith('.tmp-')]
    stopped = load_network_pkl(run_dir / snaps[0])['progress']['cur_nimg']
    assert stopped > 204 and (stopped - 4) % 200 != 0        # after tick 1 (kimg 0.204), inside a tick
    assert f'Interrupted at kimg {stopped / 1000:.3f}' in (run_dir / 'log.txt').read_text()
    # The printed command continues the run from the snapshot (given a length, so that it ends).
    result = subprocess.run(again + ['--kimg', str((stopped + 8) / 1000)], capture_output=True, text=True, timeout=300, cwd=REPO,
                            env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f'continuing at kimg {stopped / 1000:.3f}' in (run_dir / 'log.txt').read_text()
    assert load_network_pkl(run_dir / 'network-snapshot-000000.pkl')['progress']['cur_nimg'] == stopped + 8


def test_train_hier_stage_stopped_by_a_group_signal_continues(tmp_path):
    from test_hierarchy import _write_datasets
    _write_datasets(tmp_path / 'ds')
    out = tmp_path / 'exp'
    cmd = [sys.executable, os.path.join(REPO, 'train_hier.py'), '--datasets', str(tmp_path / 'ds'), '--outdir', str(out),
           '--method', 'direct', '--targets', 'Calanoida', '--kimg-parent', '0.8', '--tick', '0.2', '--snap', '1000',
           '--aug', 'noaug', '--metrics', 'none', '--no-report', '--quiet', *TINY]
    code, _out, err = _stop_group(cmd, out / 'Calanoida' / 'stats.jsonl', signal.SIGTERM, tmp_path)
    assert code == 1, err[-3000:]
    assert 'stage Calanoida: interrupted; snapshot written to ' in err
    again = _continue_command(err, 'train_hier.py')
    assert again[2:] == cmd[2:]
    stopped = load_network_pkl(out / 'Calanoida' / 'network-snapshot-000000.pkl')['progress']['cur_nimg']
    assert 204 < stopped < 800 and (stopped - 4) % 200 != 0
    stage = json.loads((out / 'Calanoida' / 'stage.json').read_text())
    assert stage['state'] == 'training'
    result = subprocess.run(again, capture_output=True, text=True, timeout=300, cwd=REPO, env=ENV)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert 'resuming from network-snapshot-000000.pkl' in result.stdout
    assert f'continuing at kimg {stopped / 1000:.3f}' in (out / 'Calanoida' / 'log.txt').read_text()
    assert load_network_pkl(out / 'Calanoida' / 'network-snapshot-000000.pkl')['progress']['cur_nimg'] == 800
    assert json.loads((out / 'Calanoida' / 'stage.json').read_text())['state'] == 'trained'


def _worker_body(queue):
    from stylegan2ada.util import worker_init_ignoring_stop_signals
    init = worker_init_ignoring_stop_signals(lambda worker_id: queue.put(('own init', worker_id)))
    init(3)
    queue.put(('ready', signal.getsignal(signal.SIGINT) == signal.SIG_IGN,
               signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])))
    time.sleep(60)


def test_worker_ignores_group_signals_but_not_its_parents_sigterm():
    import multiprocessing
    ctx = multiprocessing.get_context('fork')            # as DataLoader workers start on Linux
    queue = ctx.Queue()
    worker = ctx.Process(target=_worker_body, args=(queue,), daemon=True)
    worker.start()
    try:
        assert queue.get(timeout=30) == ('own init', 3)   # the DataLoader's own worker_init_fn still runs
        assert queue.get(timeout=30) == ('ready', True, True)
        os.kill(worker.pid, signal.SIGINT)
        subprocess.run(['kill', '-TERM', str(worker.pid)], check=True)   # sent by another process, as killpg's would be
        time.sleep(1)
        assert worker.is_alive()
        os.kill(worker.pid, signal.SIGTERM)               # sent by the parent, as multiprocessing's terminate() does
        worker.join(timeout=10)
        assert worker.exitcode == 0
    finally:
        if worker.is_alive():
            worker.kill()
            worker.join()


def test_two_process_run_stopped_by_a_group_signal_stops_together_and_continues(tmp_path):
    # --gpus 2 (gloo): every process gets the signal; they must stop at the same iteration (one stopping alone would
    # leave the other waiting in an all-reduce), rank 0 writes the snapshot, and the launcher prints the command.
    data = write_zip(tmp_path / 'd.zip', num_images=32)
    run_dir = tmp_path / 'run'
    tiny = TINY[:-2] + ['--workers', '0']                  # no DataLoader workers: three processes are enough here
    cmd = [sys.executable, 'train.py', '--run-dir', str(run_dir), '--data', data, '--gpus', '2', '--kimg', '1000',
           '--tick', '0.2', '--snap', '1000', *tiny]
    code, _out, err = _stop_group(cmd, run_dir / 'stats.jsonl', signal.SIGTERM, tmp_path)
    assert code == 1, err[-3000:]
    again = _continue_command(err, 'train.py')
    stopped = load_network_pkl(run_dir / 'network-snapshot-000000.pkl')['progress']['cur_nimg']
    assert stopped > 204 and stopped % (4 * 8) == 0        # after tick 1, at an agreed check (every 8 steps of 4 images)
    assert f'Interrupted at kimg {stopped / 1000:.3f}' in (run_dir / 'log.txt').read_text()
    result = subprocess.run(again + ['--kimg', str((stopped + 8) / 1000)], capture_output=True, text=True, timeout=300,
                            cwd=REPO, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f'continuing at kimg {stopped / 1000:.3f}' in (run_dir / 'log.txt').read_text()
