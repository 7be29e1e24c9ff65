"""A plan's independent stages at once: train_hier.py --parallel K (stage processes) and --slurm DIR (sbatch jobs).

The same tiny descending plan (Copepoda, then three orders from it) is trained serially once; the parallel driver and
the Slurm jobs must give the same networks and figures: every final snapshot file has the same SHA-256 (network pickles
carry no memory address, stylegan2ada.pickles) and every results.jsonl value is the same.
"""

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

import train_hier
from stylegan2ada.pickles import load_network_pkl
from stylegan2ada.training_loop import latest_snapshot
from stylegan2ada.util import sha256_file
from taxogan_ext import hierarchy
from test_hierarchy import _script_detector, _write_datasets
from training_helpers import process_group

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILDREN = ('Calanoida', 'Cyclopoida', 'Harpacticoida')
TINY = ['--cbase', '64', '--cmax', '8', '--zdim', '8', '--map', '2', '--batch', '4', '--gamma', '0.01', '--aug', 'noaug',
        '--device', 'cpu', '--quiet']
# One intra-op thread per process: the two cores are shared (and the serial and parallel runs must compute the same).
ENV = dict(os.environ, OMP_NUM_THREADS='1')


def _plan_args(base, outdir):
    """The tiny plan: Copepoda from scratch (0.016 kimg), then each child from it (0.12 kimg), FID against a small detector."""
    return ['--datasets', str(base / 'ds'), '--outdir', str(outdir), '--method', 'descending', '--parent', 'Copepoda',
            '--targets', ','.join(CHILDREN), '--kimg-parent', '0.016', '--kimg-child', '0.12', '--tick', '0.04', '--snap', '1',
            '--metrics', 'fid20_full', '--detector', str(base / 'det.pt'), '--cache', str(base / 'cache'), '--no-report',
            *TINY]


def _driver(args, timeout=300):
    """Run train_hier.py with these arguments; (CompletedProcess, wall seconds)."""
    t0 = time.time()
    result = subprocess.run([sys.executable, os.path.join(REPO, 'train_hier.py'), *args], capture_output=True, text=True,
                            cwd=REPO, env=ENV, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result, time.time() - t0


def _outcome(outdir):
    """({stage: SHA-256 of its final snapshot file}, {(stage, taxon): metrics}) of a finished experiment."""
    snapshots = {}
    for stage in ('Copepoda',) + tuple(f'Copepoda__{c}' for c in CHILDREN):
        record = json.loads((outdir / stage / hierarchy.STAGE_FILE).read_text())
        assert record['state'] == 'trained', stage
        snapshots[stage] = sha256_file(outdir / stage / record['final_pkl'])
    metrics = {(r['stage'], r['taxon']): r['metrics'] for r in hierarchy.read_results(outdir / hierarchy.RESULTS_FILE)}
    assert len(metrics) == 4 and all(m['fid20_full'] > 0 for m in metrics.values()), metrics
    return snapshots, metrics


def _keep(base, name):
    """Move base/exp (where every run trains, so that the options stored in the snapshots are the same) to base/name."""
    shutil.move(str(base / 'exp'), str(base / name))
    return base / name


@pytest.fixture(scope='module')
def serial(tmp_path_factory):
    """The tiny plan trained by the serial driver: (base folder, outcome, wall seconds)."""
    base = tmp_path_factory.mktemp('plan')
    _write_datasets(base / 'ds')
    _script_detector(base / 'det.pt')
    _, seconds = _driver(_plan_args(base, base / 'exp'))
    return base, _outcome(_keep(base, 'serial')), seconds

#----------------------------------------------------------------------------
# Local parallel stages.

def test_parallel_stages_give_the_serial_results(serial):
    base, expected, serial_seconds = serial
    result, seconds = _driver(_plan_args(base, base / 'exp') + ['--parallel', '3'])
    print(f'\ntiny plan (1 + 3 stages) on {os.cpu_count()} cores: serial {serial_seconds:.1f} s, --parallel 3 {seconds:.1f} s')
    out = result.stdout
    assert '4 stage(s) to run, up to 3 at once' in out
    started = [line.split(':')[0] for line in out.splitlines() if ': started (process ' in line]
    assert started[0] == 'Copepoda' and sorted(started[1:]) == [f'Copepoda__{c}' for c in CHILDREN]
    # Each child after Copepoda finished, all three side by side (each started before any of them finished).
    lines = out.splitlines()
    first_child = min(lines.index(line) for line in lines if ': started' in line and line.startswith('Copepoda__'))
    assert lines.index('Copepoda: finished') < first_child
    assert max(lines.index(line) for line in lines if ': started' in line) < \
        min(lines.index(line) for line in lines if line.startswith('Copepoda__') and line.endswith(': finished'))
    assert 'Copepoda__Harpacticoida | [4/4] Copepoda > Harpacticoida: evaluating fid20_full' in out
    assert _outcome(_keep(base, 'parallel')) == expected


def _group_signal_after_ticks(cmd, outdir, base):
    """Start the driver in its own process group; check a second driver is refused; SIGTERM once every child trains."""
    with process_group(cmd, base, cwd=REPO, env=ENV) as proc:
        deadline = time.time() + 180
        ticks = lambda c: len((outdir / f'Copepoda__{c}' / 'stats.jsonl').read_text().splitlines()) \
            if (outdir / f'Copepoda__{c}' / 'stats.jsonl').exists() else 0

        def wait_for(count):
            while not all(ticks(c) >= count for c in CHILDREN):
                assert proc.poll() is None and time.time() < deadline, (base / 'err.txt').read_text()[-3000:]
                time.sleep(0.1)
        wait_for(1)
        # Two drivers on one experiment: the second (the whole plan, or one of its stages) is refused in one line.
        for extra in ([], ['--stage', 'Copepoda__Calanoida']):
            refused = CliRunner().invoke(train_hier.main, cmd[2:-2] + extra)
            assert refused.exit_code == 1 and refused.output.count('\n') == 1, refused.output
            assert f'{outdir}: another train_hier.py is running on this folder' in refused.output
        wait_for(2)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
    return proc.returncode, (base / 'out.txt').read_text(), (base / 'err.txt').read_text()


def test_group_signal_stops_every_stage_with_a_snapshot_and_the_same_command_continues(tmp_path):
    _write_datasets(tmp_path / 'ds')
    outdir = tmp_path / 'exp'
    args = ['--datasets', str(tmp_path / 'ds'), '--outdir', str(outdir), '--method', 'descending', '--parent', 'Copepoda',
            '--targets', ','.join(CHILDREN), '--kimg-parent', '0.016', '--kimg-child', '1.2', '--tick', '0.02',
            '--snap', '1000', '--metrics', 'none', '--no-report', *TINY]
    cmd = [sys.executable, os.path.join(REPO, 'train_hier.py'), *args, '--parallel', '3']
    code, out, err = _group_signal_after_ticks(cmd, outdir, tmp_path)
    assert code == 1, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith('Error: interrupted: the running stages wrote a snapshot; continue with: python '), err[-3000:]
    assert shlex.split(last.split('continue with: ', 1)[1])[1:] == cmd[1:]
    pids = [int(m) for m in re.findall(r': started \(process (\d+)', out)]
    assert len(pids) == 4 and not any(os.path.exists(f'/proc/{pid}') for pid in pids)     # no stage process left
    parent_record = (outdir / 'Copepoda' / hierarchy.STAGE_FILE).read_text()
    assert json.loads(parent_record)['state'] == 'trained'
    stopped = {}
    for child in CHILDREN:
        folder = outdir / f'Copepoda__{child}'
        assert f'Copepoda__{child}: stopping (stop signal); it writes a snapshot' in out
        assert json.loads((folder / hierarchy.STAGE_FILE).read_text())['state'] == 'training'
        stopped[child] = load_network_pkl(latest_snapshot(str(folder)))['progress']['cur_nimg']
        assert 40 <= stopped[child] < 1200, stopped
        assert f'Interrupted at kimg {stopped[child] / 1000:.3f}' in (folder / 'log.txt').read_text()

    # The same command finishes the plan: each child continues from its snapshot, Copepoda is not trained again.
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert '3 stage(s) to run' in result.stdout and 'Copepoda: started' not in result.stdout
    assert (outdir / 'Copepoda' / hierarchy.STAGE_FILE).read_text() == parent_record
    for child in CHILDREN:
        folder = outdir / f'Copepoda__{child}'
        assert f'Copepoda__{child} | [' in result.stdout and 'resuming from network-snapshot-000000.pkl' in result.stdout
        log = (folder / 'log.txt').read_text()
        assert f'continuing at kimg {stopped[child] / 1000:.3f}' in log and log.count('continuing at kimg') == 1
        final = json.loads((folder / hierarchy.STAGE_FILE).read_text())['final_pkl']
        assert load_network_pkl(str(folder / final))['progress']['cur_nimg'] == 1200
        # Ticks were logged once each: none trained twice (the resumed run starts after the stopped one's last tick).
        kimgs = [json.loads(line)['Progress/kimg'] for line in (folder / 'stats.jsonl').read_text().splitlines()]
        assert kimgs == sorted(kimgs) and len(set(kimgs)) == len(kimgs), kimgs
    assert [r['stage'] for r in hierarchy.read_results(outdir / hierarchy.RESULTS_FILE)].count('Copepoda') == 1


def test_stage_locks(tmp_path):
    # The whole plan excludes everything; drivers of single stages share the experiment but not a stage; a stage process
    # of the parallel driver (the inherited lock) is let in while that driver holds the lock.
    with hierarchy.experiment_lock(tmp_path):
        with pytest.raises(hierarchy.PlanError, match='another train_hier.py is running on this folder'):
            with hierarchy.experiment_lock(tmp_path, stage='A'):
                pass
    with hierarchy.experiment_lock(tmp_path, stage='A'), hierarchy.experiment_lock(tmp_path, stage='B'):
        with pytest.raises(hierarchy.PlanError, match='another train_hier.py is training stage A'):
            with hierarchy.experiment_lock(tmp_path, stage='A'):
                pass
        with pytest.raises(hierarchy.PlanError, match='another train_hier.py is running on this folder'):
            with hierarchy.experiment_lock(tmp_path):
                pass
    code = ('import os, sys; from taxogan_ext import hierarchy\n'
            'with hierarchy.experiment_lock(sys.argv[1], stage="A"): print("in")')
    with hierarchy.experiment_lock(tmp_path) as lock:
        env = dict(ENV, **{hierarchy.LOCK_FD_ENV: str(lock.fileno())})
        inherited = subprocess.run([sys.executable, '-c', code, str(tmp_path)], capture_output=True, text=True, cwd=REPO,
                                   env=env, pass_fds=(lock.fileno(),))
        assert inherited.stdout == 'in\n', inherited.stderr
        foreign = subprocess.run([sys.executable, '-c', code, str(tmp_path)], capture_output=True, text=True, cwd=REPO, env=env)
        assert foreign.returncode != 0 and 'another train_hier.py is running on this folder' in foreign.stderr
        with pytest.raises(hierarchy.PlanError):
            with hierarchy.experiment_lock(tmp_path):
                pass
    with hierarchy.experiment_lock(tmp_path):           # released by all of them
        pass

#----------------------------------------------------------------------------
# Slurm: the generated jobs.

SUBMIT_LINE = re.compile(r'^(job\d+)=\$\(submit (?:--dependency=afterok:(\S+) )?(\S+)\)$')


def _parse_jobs(folder):
    """[(stage key or 'report', [keys it waits for], script text)] in submission order, from submit.sh and the scripts."""
    jobs, keys = [], {}
    for line in (folder / 'submit.sh').read_text().splitlines():
        match = SUBMIT_LINE.match(line)
        if not match:
            continue
        variable, after, name = match.groups()
        script = (folder / shlex.split(name)[0]).read_text()
        (run_line,) = [line for line in script.splitlines() if line.endswith(' &')]
        argv = shlex.split(run_line[:-2])
        key = argv[argv.index('--stage') + 1] if '--stage' in argv else 'report'
        keys[variable] = key
        jobs.append((key, [keys[v.lstrip('$')] for v in after.split(':')] if after else [], script, argv))
    return jobs


def test_slurm_jobs_follow_the_plans_dependencies(tmp_path):
    manifest = _write_datasets(tmp_path / 'ds')
    outdir, folder = tmp_path / 'exp', tmp_path / 'jobs'
    args = ['--datasets', str(tmp_path / 'ds'), '--outdir', str(outdir), '--method', 'descending,lateral', '--parent',
            'Copepoda', '--targets', ','.join(CHILDREN), '--metrics', 'none', '--kimg-child', '0.5', *TINY]
    result = CliRunner().invoke(train_hier.main, args + ['--slurm', str(folder), '--slurm-partition', 'gpu',
                                                         '--slurm-time', '1-00:00:00', '--slurm-option', 'qos=long',
                                                         '--slurm-option', 'time=12:00:00'])
    assert result.exit_code == 0, result.output
    assert f'submit them with: bash {folder / "submit.sh"}' in result.output
    plan = hierarchy.build_plan(manifest, outdir, 'descending,lateral', parent='Copepoda', targets=','.join(CHILDREN))
    jobs = _parse_jobs(folder)
    # One job per stage in plan order, each waiting for exactly the stage it starts from; the report job for all.
    assert [key for key, *_ in jobs] == [s.key for s in plan.stages] + ['report']
    expected = {s.key: [s.start] if s.start_kind == 'stage' else [] for s in plan.stages}
    assert {key: after for key, after, *_ in jobs[:-1]} == expected
    assert expected['Copepoda'] == expected['Calanoida'] == [] and expected['Calanoida__Cyclopoida'] == ['Calanoida']
    assert jobs[-1][1] == [s.key for s in plan.stages]
    for key, _after, script, argv in jobs:
        # The same driver and options, restricted to the stage (the report job: the whole plan, nothing left to train).
        assert argv[:2] == [sys.executable, os.path.join(REPO, 'train_hier.py')]
        rest = argv[2:]
        if key != 'report':
            i = rest.index('--stage')
            rest = rest[:i] + rest[i + 2:]
        assert sorted(rest) == sorted(args), (key, rest)
        for setting in ('--signal=B:TERM@300', '--requeue', '--open-mode=append', '--kill-on-invalid-dep=yes',
                        '--partition=gpu', '--time=12:00:00', '--qos=long'):
            assert f'#SBATCH {setting}\n' in script, (key, setting)
        assert '--time=1-00:00:00' not in script and '--gres' not in script          # --device cpu: no GPUs asked for
        assert 'trap on_time_limit TERM' in script and 'scontrol requeue "$SLURM_JOB_ID"' in script
        assert f'cd {shlex.quote(os.getcwd())}\n' in script
    # submit.sh submits in order and passes each job id on (a stand-in sbatch answering "id;cluster").
    fake = tmp_path / 'sbatch'
    fake.write_text('#!/bin/bash\nn=$(( $(wc -l < "$LOG" 2>/dev/null || echo 0) + 101 ))\necho "$*" >> "$LOG"\necho "$n;c"\n')
    fake.chmod(0o755)
    ran = subprocess.run(['bash', str(folder / 'submit.sh')], capture_output=True, text=True,
                         env=dict(ENV, SBATCH=str(fake), LOG=str(tmp_path / 'log')))
    assert ran.returncode == 0, ran.stderr
    calls = (tmp_path / 'log').read_text().splitlines()
    ids = {key: str(101 + i) for i, (key, *_) in enumerate(jobs)}
    for call, (key, after, *_) in zip(calls, jobs):
        dependency = f'--dependency=afterok:{":".join(ids[k] for k in after)} ' if after else ''
        assert call.startswith(f'--parsable {dependency}') and call.endswith(f'-{key}.sbatch'), call
    assert ran.stdout.splitlines() == [f'{key}: job {ids[key]}' for key, *_ in jobs]
    # Bad settings: one line.
    result = CliRunner().invoke(train_hier.main, args + ['--slurm', str(folder), '--slurm-option', 'dependency=x'])
    assert result.exit_code == 1 and 'train_hier.py sets --dependency itself' in result.output
    result = CliRunner().invoke(train_hier.main, args + ['--slurm', str(folder), '--parallel', '2'])
    assert result.exit_code == 1 and result.output.count('\n') == 1, result.output

#----------------------------------------------------------------------------
# A real Slurm: a one-node cluster started here (Debian's slurm-wlm and munge; `.ci/run` installs them when it can).

def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


SLURM_CONF = """ClusterName=taxotest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
AuthInfo=socket={root}/munge.sock
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
NodeName=localhost CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture
def slurm_cluster(tmp_path):
    """A one-node Slurm cluster (munged, slurmctld, slurmd) in a temporary folder; yields the environment to reach it."""
    missing = [name for name in ('munged', 'slurmctld', 'slurmd', 'sbatch', 'squeue') if shutil.which(name) is None]
    if missing:
        pytest.skip(f'no Slurm here ({", ".join(missing)} not installed; apt-get install slurm-wlm munge)')
    if os.geteuid() != 0:
        pytest.skip('the test cluster runs its daemons as root (SlurmUser=root)')
    root = tmp_path / 'slurm'
    (root / 'state').mkdir(parents=True)
    (root / 'spool').mkdir()
    (root / 'munge.key').write_bytes(os.urandom(1024))
    (root / 'munge.key').chmod(0o600)
    conf = root / 'slurm.conf'
    conf.write_text(SLURM_CONF.format(root=root, ctld_port=_free_port(), d_port=_free_port(), cpus=os.cpu_count()))
    env = dict(ENV, SLURM_CONF=str(conf))
    daemons = []
    try:
        subprocess.run(['munged', f'--key-file={root}/munge.key', f'--socket={root}/munge.sock',
                        f'--pid-file={root}/munged.pid', f'--log-file={root}/munged.log', f'--seed-file={root}/munged.seed',
                        '--force'], check=True, capture_output=True, timeout=30)
        for cmd in (['slurmctld', '-D', '-i', '-f', str(conf)], ['slurmd', '-D', '-N', 'localhost', '-f', str(conf)]):
            daemons.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
        deadline = time.time() + 60
        while True:
            info = subprocess.run(['sinfo', '-h', '-o', '%T'], capture_output=True, text=True, env=env)
            if info.stdout.strip() == 'idle':
                break
            if time.time() > deadline or any(d.poll() is not None for d in daemons):
                pytest.skip(f'the test cluster did not start: {info.stdout.strip()} {info.stderr.strip()}')
            time.sleep(0.5)
        yield env
    finally:
        for daemon in daemons:
            daemon.terminate()
            daemon.wait(timeout=30)
        pid_file = root / 'munged.pid'
        if pid_file.exists():
            os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)


def test_real_slurm_trains_the_plan_as_the_serial_driver(serial, slurm_cluster):
    base, expected, _ = serial
    folder = base / 'jobs'
    result = CliRunner().invoke(train_hier.main, _plan_args(base, base / 'exp') + ['--slurm', str(folder)])
    assert result.exit_code == 0, result.output
    submitted = subprocess.run(['bash', str(folder / 'submit.sh')], capture_output=True, text=True, env=slurm_cluster,
                               timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    ids = [line.rsplit(' ', 1)[1] for line in submitted.stdout.splitlines()]
    assert len(ids) == 5
    t0, deadline = time.time(), time.time() + 240
    while subprocess.run(['squeue', '-h', '-j', ','.join(ids)], capture_output=True, text=True,
                         env=slurm_cluster).stdout.strip():
        assert time.time() < deadline, 'the jobs did not finish in 4 minutes'
        time.sleep(1)
    outputs = {p.name: p.read_text() for p in folder.glob('*.out')}
    print(f'\ntiny plan through Slurm: {time.time() - t0:.1f} s after submission')
    assert len(outputs) == 5, outputs
    assert all('Error' not in text and 'Traceback' not in text for text in outputs.values()), outputs
    assert _outcome(_keep(base, 'slurm')) == expected
