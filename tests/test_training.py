"""Training loop end to end on CPU: snapshots, exact resume, SIGKILL recovery, ADA, Freeze-D, 2-process gloo."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest
import torch

from stylegan2ada.pickles import load_network_pkl
from stylegan2ada.training_loop import TrainingDivergedError, latest_snapshot, training_loop
from training_helpers import tiny_loop_kwargs, write_zip

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stats(run_dir):
    with open(os.path.join(run_dir, 'stats.jsonl')) as f:
        return [json.loads(line) for line in f]


def test_run_writes_snapshot_grids_logs(tmp_path):
    data = write_zip(tmp_path / 'd.zip')
    final = training_loop(**tiny_loop_kwargs(data, tmp_path / 'run'))
    names = sorted(os.listdir(tmp_path / 'run'))
    assert final == str(tmp_path / 'run' / 'network-snapshot-000000.pkl')
    assert {'reals.png', 'fakes_init.png', 'log.txt', 'stats.jsonl'} <= set(names)
    assert any(n.startswith('fakes0') for n in names)
    assert PIL.Image.open(tmp_path / 'run' / 'reals.png').size == (4 * 16, 2 * 16)
    snap = load_network_pkl(final)
    assert snap['progress']['cur_nimg'] == 32                            # 0.032 kimg in batches of 4
    assert snap['G_ema'].img_resolution == 16 and snap['training_set_kwargs']['path'] == data
    stats = _stats(tmp_path / 'run')
    assert [s['Progress/kimg'] for s in stats] == [0.004, 0.02, 0.032]  # ticks: first step, +16 images, end
    for key in ('Loss/G/loss', 'Loss/D/loss', 'Loss/r1_penalty', 'Loss/pl_penalty', 'Timing/sec_per_kimg'):
        assert any(key in s for s in stats), key                       # R1 runs every 16 steps: only in tick 0 here
    log = (tmp_path / 'run' / 'log.txt').read_text()
    assert 'sec/kimg' in log and 'eta' in log and 'augment' in log


def test_g_ema_follows_closed_form(tmp_path):
    # With ema_rampup None and ema_kimg tiny, beta = 0.5 ** (batch / ema_nimg) is ~0: G_ema equals G.
    data = write_zip(tmp_path / 'd.zip')
    final = training_loop(**tiny_loop_kwargs(data, tmp_path / 'run', ema_kimg=1e-9, ema_rampup=None, total_kimg=0.008))
    snap = load_network_pkl(final)
    for (name, p), p_ema in zip(snap['G'].named_parameters(), snap['G_ema'].parameters()):
        assert torch.allclose(p, p_ema), name


def test_resume_continues_exactly(tmp_path):
    data = write_zip(tmp_path / 'd.zip')
    # Uninterrupted: 0.032 kimg. Interrupted: 0.016 kimg, then resume to 0.032 in the same folder.
    full = training_loop(**tiny_loop_kwargs(data, tmp_path / 'full', augment_p=0.3, ada_target=None))
    half = training_loop(**tiny_loop_kwargs(data, tmp_path / 'half', augment_p=0.3, ada_target=None, total_kimg=0.016))
    half_snap = load_network_pkl(half)
    assert half_snap['progress']['cur_nimg'] == 16
    resumed = training_loop(**tiny_loop_kwargs(data, tmp_path / 'half', augment_p=0.0, ada_target=None, resume_pkl=half))
    a, b = load_network_pkl(full), load_network_pkl(resumed)
    assert b['progress']['cur_nimg'] == 32 and b['progress']['cur_tick'] == 3   # ticks 0, 1 before; 2 after resuming
    assert b['augment_pipe'].p.item() == pytest.approx(0.3)             # restored, not the new run's 0.0
    # Same data order, RNG streams, optimizer moments and p: the resumed run equals the uninterrupted one.
    for key in ('G', 'D', 'G_ema'):
        for (name, x), y in zip(a[key].state_dict().items(), b[key].state_dict().values()):
            assert torch.equal(x, y), f'{key}.{name}'
    assert torch.equal(a['progress']['loss']['pl_mean'], b['progress']['loss']['pl_mean'])
    # Optimizer moments were restored: Adam's step count continues.
    steps = [s['step'] for s in b['progress']['optimizers']['D']['state'].values()]
    assert all(float(s) == float(steps[0]) for s in steps) and float(steps[0]) > 4


def test_resume_mode_weights_restarts_progress(tmp_path):
    data = write_zip(tmp_path / 'd.zip')
    first = training_loop(**tiny_loop_kwargs(data, tmp_path / 'a', total_kimg=0.016))
    second = training_loop(**tiny_loop_kwargs(data, tmp_path / 'b', total_kimg=0.008, resume_pkl=first, resume_mode='weights'))
    assert load_network_pkl(second)['progress']['cur_nimg'] == 8
    assert 'fine-tuning' in (tmp_path / 'b' / 'log.txt').read_text()


def test_ada_p_rises_when_d_overfits(tmp_path):
    data = write_zip(tmp_path / 'd.zip', num_images=4)
    final = training_loop(**tiny_loop_kwargs(data, tmp_path / 'run', augment_p=0.0, ada_target=0.6, ada_kimg=0.5,
                                             D_opt_kwargs=dict(lr=0.01, betas=[0, 0.99], eps=1e-8), total_kimg=0.2,
                                             kimg_per_tick=0.05, network_snapshot_ticks=100, image_snapshot_ticks=None))
    stats = _stats(tmp_path / 'run')
    ps = [s['Progress/augment'] for s in stats]
    rt = [s['Progress/ada_rt']['mean'] for s in stats if 'Progress/ada_rt' in s]
    assert max(rt) > 0.6                                                  # D grows confident on the 4 reals
    assert ps[0] == 0 and ps[-1] >= 0.05 and all(0 <= p <= 1 for p in ps)  # each adjustment is 16/500 = 0.032
    assert load_network_pkl(final)['augment_pipe'].p.item() == pytest.approx(ps[-1])


def test_ada_step_is_batch_times_interval_over_ada_kimg(tmp_path):
    # A target of -1, which r_t = E[sign(D(real))] always exceeds: p rises one step at every adjustment, and NVIDIA's
    # step lets p go from 0 to 1 in ada_kimg: batch 4 x interval 2 / 100 images = 0.08, 4 adjustments in 8 iterations.
    data = write_zip(tmp_path / 'd.zip')
    final = training_loop(**tiny_loop_kwargs(data, tmp_path / 'run', augment_p=0.0, ada_target=-1, ada_interval=2,
                                             ada_kimg=0.1, total_kimg=0.032, image_snapshot_ticks=None))
    assert load_network_pkl(final)['augment_pipe'].p.item() == pytest.approx(4 * 0.08, abs=1e-6)


def test_freeze_d_weights_do_not_change(tmp_path):
    data = write_zip(tmp_path / 'd.zip')
    start = training_loop(**tiny_loop_kwargs(data, tmp_path / 'a', total_kimg=0.008))
    d_kwargs = dict(tiny_loop_kwargs(data, '.')['D_kwargs'], block_kwargs=dict(freeze_layers=3))
    final = training_loop(**tiny_loop_kwargs(data, tmp_path / 'b', D_kwargs=d_kwargs, resume_pkl=start, resume_mode='weights'))
    before, after = load_network_pkl(start)['D'].state_dict(), load_network_pkl(final)['D'].state_dict()
    frozen = ['b16.fromrgb.weight', 'b16.fromrgb.bias', 'b16.conv0.weight', 'b16.conv1.weight']
    for name in frozen:
        assert torch.equal(before[name], after[name]), name
    assert not torch.equal(before['b8.conv0.weight'], after['b8.conv0.weight'])


def test_non_finite_loss_stops_with_tick_and_term(tmp_path):
    data = write_zip(tmp_path / 'd.zip')
    with pytest.raises(TrainingDivergedError, match=r'non-finite Loss/.* at tick 0'):
        training_loop(**tiny_loop_kwargs(data, tmp_path / 'run', G_opt_kwargs=dict(lr=float('inf'), betas=[0, 0.99], eps=1e-8)))


def test_two_process_gloo_keeps_replicas_identical(tmp_path):
    data = write_zip(tmp_path / 'd.zip')
    cmd = [sys.executable, os.path.join(REPO, 'train.py'), '--run-dir', str(tmp_path / 'run'), '--data', data, '--gpus', '2',
           '--batch', '4', '--kimg', '0.016', '--tick', '0.008', '--snap', '1', '--zdim', '8', '--cbase', '64', '--cmax', '8',
           '--map', '2', '--gamma', '0.01', '--device', 'cpu']
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stdout[-1000:] + result.stderr[-3000:]
    log = (tmp_path / 'run' / 'log.txt').read_text()
    assert 'replicas in sync' in log and 'replicas NOT in sync' not in log, log[-2000:]
    assert load_network_pkl(latest_snapshot(tmp_path / 'run'))['progress']['cur_nimg'] == 16


def test_sigkill_then_resume_from_run_dir(tmp_path):
    data = write_zip(tmp_path / 'd.zip')
    run_dir = tmp_path / 'run'
    cmd = [sys.executable, os.path.join(REPO, 'train.py'), '--run-dir', str(run_dir), '--data', data, '--batch', '4',
           '--kimg', '1000', '--tick', '0.008', '--snap', '1', '--zdim', '8', '--cbase', '64', '--cmax', '8', '--map', '2',
           '--gamma', '0.01', '--device', 'cpu', '--mbstd-group', '2']
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            snaps = [n for n in os.listdir(run_dir) if n.startswith('network-snapshot')] if run_dir.exists() else []
            stats = (run_dir / 'stats.jsonl').read_text().splitlines() if (run_dir / 'stats.jsonl').exists() else []
            if snaps and len(stats) >= 3:
                break
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    # Atomic writes: a kill during a snapshot can leave a temporary file, never a partial snapshot.
    for name in os.listdir(run_dir):
        if name.startswith('network-snapshot-'):
            load_network_pkl(run_dir / name)
    killed_at = load_network_pkl(latest_snapshot(run_dir))['progress']['cur_nimg']
    assert killed_at > 0
    cmd[cmd.index('--kimg') + 1] = str((killed_at + 8) / 1000)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f'continuing at kimg {killed_at / 1000:.3f}' in (run_dir / 'log.txt').read_text()
    assert load_network_pkl(latest_snapshot(run_dir))['progress']['cur_nimg'] == killed_at + 8
    assert not [n for n in os.listdir(run_dir) if n.startswith('.tmp-')]  # the resumed run removed any leftover


def _sync_check_worker(rank, init_file, out_dir, perturb):
    from stylegan2ada import distributed
    from stylegan2ada.training_loop import _any_process, _replicas_in_sync
    distributed.init_process_group(rank, 2, 'cpu', init_file)
    try:
        torch.manual_seed(0)
        module = torch.nn.Linear(4, 3)
        if perturb and rank == 1:
            with torch.no_grad():
                module.weight.view(-1)[5] = torch.nextafter(module.weight.view(-1)[5], torch.tensor(1.0))  # one ulp
        in_sync = _replicas_in_sync([module], 2)
        any_flag = _any_process(rank == 1, 2)
        with open(os.path.join(out_dir, f'rank{rank}.json'), 'w') as f:
            json.dump(dict(in_sync=in_sync, any_flag=any_flag), f)
    finally:
        distributed.destroy_process_group()


def _teardown_worker(rank, init_file, out_dir):
    from stylegan2ada import distributed
    distributed.init_process_group(rank, 2, 'cpu', init_file)
    module = torch.nn.Linear(4, 3)
    optimizer = torch.optim.Adam(module.parameters())     # imports torch._dynamo and, through it, torch.distributed.nn
    module(torch.ones(2, 4)).sum().backward()
    distributed.all_reduce_sum_(module.weight.grad)
    optimizer.step()
    distributed.destroy_process_group()
    threads = sorted(open(f'/proc/self/task/{t}/comm').read().strip() for t in os.listdir('/proc/self/task'))
    with open(os.path.join(out_dir, f'rank{rank}.json'), 'w') as f:
        json.dump(threads, f)


@pytest.mark.skipif(not os.path.isdir('/proc/self/task'), reason='thread names from /proc (Linux)')
def test_destroy_process_group_stops_gloo_threads(tmp_path):
    # If anything still holds the process group after destroy_process_group, gloo's worker threads outlive it and
    # race the interpreter's exit: an occasional SIGABRT at the end of a finished multi-process run.
    from stylegan2ada import distributed
    distributed.spawn(_teardown_worker, 2, args=(str(tmp_path),))
    for rank in range(2):
        threads = json.loads((tmp_path / f'rank{rank}.json').read_text())
        assert not [t for t in threads if 'gloo' in t], threads


@pytest.mark.parametrize('perturb', [False, True])
def test_replica_check_detects_one_ulp_and_flags_reach_every_process(tmp_path, perturb):
    # The 2-process test above relies on this check: it must see a single differing bit in one replica.
    from stylegan2ada import distributed
    distributed.spawn(_sync_check_worker, 2, args=(str(tmp_path), perturb))
    results = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in range(2)]
    assert [r['in_sync'] for r in results] == [not perturb] * 2
    assert [r['any_flag'] for r in results] == [True, True]              # rank 1's flag, seen by rank 0 too


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_writes_a_final_snapshot(tmp_path, sig):
    data = write_zip(tmp_path / 'd.zip')
    run_dir = tmp_path / 'run'
    cmd = [sys.executable, os.path.join(REPO, 'train.py'), '--run-dir', str(run_dir), '--data', data, '--batch', '4',
           '--kimg', '1000', '--tick', '0.008', '--snap', '1000', '--zdim', '8', '--cbase', '64', '--cmax', '8', '--map', '2',
           '--gamma', '0.01', '--device', 'cpu', '--mbstd-group', '2']
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not ((run_dir / 'stats.jsonl').exists() and
                                              len((run_dir / 'stats.jsonl').read_text().splitlines()) >= 3):
            time.sleep(0.2)
        proc.send_signal(sig)
        _out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    assert 'interrupted' in err and f'continue with: python train.py --run-dir {run_dir}' in err and 'Traceback' not in err
    snaps = [n for n in os.listdir(run_dir) if n.startswith('network-snapshot')]
    assert snaps == ['network-snapshot-000000.pkl']                     # --snap 1000 ticks: only the interrupt wrote one
    stopped_at = load_network_pkl(run_dir / snaps[0])['progress']['cur_nimg']
    assert stopped_at >= 16 and f'Interrupted at kimg {stopped_at / 1000:.3f}' in (run_dir / 'log.txt').read_text()


def test_stale_snapshot_temporaries_are_removed_and_nothing_else(tmp_path):
    # A process killed inside atomic_write leaves its temporary file; the next run's clean-up must recognise exactly
    # those (of snapshots), whatever atomic_write names them, and keep every other file.
    code = ('import os, sys; from stylegan2ada.util import atomic_write\n'
            'open_writes = [atomic_write(os.path.join(%r, name), "wb") for name in sys.argv[1:]]\n'
            'for w in open_writes:\n'
            '    f = w.__enter__(); f.write(b"partial"); f.flush()\n'
            'os._exit(1)\n' % str(tmp_path))
    subprocess.run([sys.executable, '-c', code, 'network-snapshot-000004.pkl', 'fakes000004.png'], cwd=REPO, check=False)
    (tmp_path / 'network-snapshot-000003.pkl').write_bytes(b'complete')
    (tmp_path / 'log.txt').write_text('kept')
    leftovers = sorted(os.listdir(tmp_path))
    assert len(leftovers) == 4 and sum(n.startswith('.tmp-network-snapshot-000004.pkl') for n in leftovers) == 1
    from stylegan2ada.util import remove_stale_temp_files
    remove_stale_temp_files(tmp_path, 'network-snapshot-')
    assert sorted(os.listdir(tmp_path)) == [n for n in leftovers if not n.startswith('.tmp-network-snapshot-')]
    remove_stale_temp_files(tmp_path, '')          # what the training loop does: every temporary of its run folder
    assert sorted(os.listdir(tmp_path)) == ['log.txt', 'network-snapshot-000003.pkl']
    assert (tmp_path / 'network-snapshot-000003.pkl').read_bytes() == b'complete'
