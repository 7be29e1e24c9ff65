"""A plan's independent stages at once: locally, one process per stage (train_hier.py --parallel), or as Slurm jobs.

Both run the same driver restricted to one stage (`train_hier.py ... --stage KEY`), so that skipping a finished stage,
resuming an interrupted one and retraining one whose inputs changed work exactly as in the serial driver. A stage
starts once the stage it starts from (`hierarchy.stage_dependencies`) has finished.

Locally (`run_stages`) the driver holds the experiment lock and passes it to its stage processes (an inherited file
descriptor, `hierarchy.LOCK_FD_ENV`), each on its own devices (`device_slots`). Each stage process appends its records
to results.jsonl with single writes; the driver writes the report afterwards. A stop signal to the driver is passed to
every running stage, which writes a snapshot; a failing stage stops the others the same way.

On Slurm (`write_slurm`), one sbatch script per stage, submitted by submit.sh with `--dependency=afterok` on the job
of the stage it starts from, and a last job (the whole plan: nothing left to train) for the plan's measures and report.
"""

import collections
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import threading
import time

import click
import tqdm

from stylegan2ada import cli
from stylegan2ada.util import atomic_write, current_umask
from taxogan_ext import hierarchy, training

POLL_SECONDS    = 0.2           # how often the driver looks at its stage processes
PROGRESS_SECONDS = 1.0          # how often it reads their progress (stats.jsonl)
OUTPUT_LINES    = 20            # lines of each stage process's output kept for an error message
SUBMIT_FILE     = 'submit.sh'
REPORT_JOB      = 'report'      # the last Slurm job: the whole plan (all trained), its measures and report
# sbatch settings of every job (the cluster recipe of slurm/train_plan.sbatch); --slurm-* options add to or replace them.
SLURM_DEFAULTS  = (('signal', 'B:TERM@300'), ('requeue', None), ('open-mode', 'append'), ('kill-on-invalid-dep', 'yes'))

#----------------------------------------------------------------------------
# The command line again, for a stage process or job.

def given_arguments(
    ctx,                # click.Context of the command
    exclude = (),       # parameter names left out
) -> list[str]:
    """The options given on the command line (not their defaults), as arguments that parse to the same values."""
    args = []
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or param.name in exclude:
            continue
        if ctx.get_parameter_source(param.name) in (None, click.core.ParameterSource.DEFAULT):
            continue
        value = ctx.params[param.name]
        if param.is_flag and param.secondary_opts:
            args.append(param.opts[0] if value else param.secondary_opts[0])
        elif param.is_flag:
            args += [param.opts[0]] if value else []
        elif param.multiple:
            for item in value:
                args += [param.opts[0], str(item)]
        elif value is not None:
            args += [param.opts[0], str(value)]
    return args

#----------------------------------------------------------------------------
# Local: stage processes on their own devices.

def device_slots(
    parallel:   int,        # stages at once
    gpus:       int,        # devices of each stage (--gpus)
    cuda:       bool,       # the stages train on CUDA
    cuda_count: int = 0,    # CUDA devices this process sees
) -> list[dict]:
    """Environment variables of each of the `parallel` stage slots: its CUDA devices, or its share of the CPU threads."""
    if cuda:
        visible = [d.strip() for d in os.environ.get('CUDA_VISIBLE_DEVICES', '').split(',') if d.strip()]
        visible = visible[:cuda_count] if visible else [str(i) for i in range(cuda_count)]
        if len(visible) < parallel * gpus:
            raise hierarchy.PlanError(f'--parallel {parallel} x --gpus {gpus} needs {parallel * gpus} GPUs; '
                                      f'{len(visible)} visible')
        return [dict(CUDA_VISIBLE_DEVICES=','.join(visible[i * gpus:(i + 1) * gpus])) for i in range(parallel)]
    # On the CPU each process gets its share of the cores, unless OMP_NUM_THREADS says otherwise.
    threads = os.environ.get('OMP_NUM_THREADS') or str(max(1, (os.cpu_count() or 1) // (parallel * gpus)))
    return [dict(OMP_NUM_THREADS=threads) for _ in range(parallel)]


def critical_kimg(plan: hierarchy.Plan, states: dict) -> dict[str, float]:
    """{stage key: kimg still to train on the longest chain from it down (itself and the stages starting from it)}."""
    below = {}
    for stage in reversed(plan.stages):             # every stage after the one it starts from
        own = max(stage.kimg - states[stage.key].done_kimg, 0) if states[stage.key].status not in ('done', 'evaluate') else 0
        below[stage.key] = own + max((below[s.key] for s in plan.stages if s.start_kind == 'stage' and s.start == stage.key),
                                     default=0)
    return below


def _stage_kimg(folder) -> float | None:
    """Progress of a training stage: Progress/kimg of the last line of its stats.jsonl; None before the first tick."""
    try:
        with open(os.path.join(folder, 'stats.jsonl'), 'rb') as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 8192))
            lines = f.read().decode('utf-8', 'replace').splitlines()
        return float(json.loads(lines[-1])['Progress/kimg'])
    except (OSError, IndexError, ValueError, KeyError, TypeError):
        return None


@dataclasses.dataclass
class _StageProcess:
    """One running stage process of the parallel driver."""
    stage:      hierarchy.Stage
    slot:       int                     # index of its device set
    proc:       subprocess.Popen
    output:     collections.deque       # its last lines
    reader:     threading.Thread        # relays its output
    bar:        object                  # tqdm bar, or None
    stopped:    bool = False            # the driver sent it the stop signal

    def error(self) -> str:
        """What it said when it failed: its one-line error, else its last line."""
        lines = [line for line in self.output if line.strip()]
        errors = [line[len('Error: '):] for line in lines if line.startswith('Error: ')]
        if errors:
            return errors[-1]
        return f'stage {self.stage.key} exited with status {self.proc.returncode}' + (f' ({lines[-1]})' if lines else '')


class _Output:
    """Where the driver's lines go: plain echo, or above the stage bars."""

    def __init__(self, bars: bool):
        self.bars = bars
        self.lock = threading.Lock()    # reader threads write side by side

    def __call__(self, line: str):
        with self.lock:
            if self.bars:
                tqdm.tqdm.write(line)
            else:
                click.echo(line)


def _relay(proc, key, output, echo):
    """Pass a stage process's lines on, prefixed with its key, keeping the last ones."""
    for line in proc.stdout:
        line = line.rstrip('\n')
        output.append(line)
        echo(f'{key} | {line}')


def run_stages(
    plan:       hierarchy.Plan,
    states:     dict,           # hierarchy.plan_states() before the run
    command:    list,           # the driver's command line; ['--stage', KEY] is added per stage
    slots:      list,           # device_slots(): environment of each slot (as many stages at once)
    lock_file,                  # open file of the experiment lock the driver holds (passed to the stage processes)
    hint:       str,            # how to continue after a stop, for the error message
    progress:   bool = True,    # a bar per running stage
    log         = click.echo,   # where status lines go
):
    """Train and evaluate every stage that is not done, up to len(slots) at once, each after the stage it starts from.

    A SIGINT or SIGTERM to the driver, or a stage that fails, stops every running stage (each writes its snapshot);
    then a RunStopped or PlanError (one line) saying what happened and how to continue.
    """
    depends = hierarchy.stage_dependencies(plan)
    trained = {key for key, state in states.items() if state.status in ('done', 'evaluate')}
    # Longest chain first (Copepoda before a direct stage of the same length: four stages wait for it), then plan order.
    chain = critical_kimg(plan, states)
    waiting = sorted((s for s in plan.stages if states[s.key].status != 'done'), key=lambda s: -chain[s.key])
    echo = _Output(bars=progress)
    running, free, failed = [], list(range(len(slots))), []
    stop = threading.Event()
    last_progress = 0.0
    log(hierarchy.format_plan(plan, states))
    log(f'{len(waiting)} stage(s) to run, up to {len(slots)} at once')

    def start(stage):
        slot = free.pop(0)
        env = dict(os.environ, **slots[slot], PYTHONUNBUFFERED='1')
        env[hierarchy.LOCK_FD_ENV] = str(lock_file.fileno())
        # Its own session: a signal to the driver's group reaches the driver alone, which passes it on once.
        proc = subprocess.Popen(command + ['--stage', stage.key], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1, env=env, pass_fds=(lock_file.fileno(),), start_new_session=True)
        output = collections.deque(maxlen=OUTPUT_LINES)
        reader = threading.Thread(target=_relay, args=(proc, stage.key, output, echo), daemon=True)
        reader.start()
        bar = None
        if progress:
            bar = tqdm.tqdm(total=round(stage.kimg, 3), position=slot, leave=False, dynamic_ncols=True, desc=stage.key,
                            bar_format='{desc} {percentage:3.0f}%|{bar}| {n:.3f}/{total:.3f} kimg [{elapsed}<{remaining}]')
        echo(f'{stage.key}: started (process {proc.pid}, {" ".join(f"{k}={v}" for k, v in slots[slot].items())})')
        running.append(_StageProcess(stage, slot, proc, output, reader, bar))

    def stop_running(why):
        for job in running:
            if not job.stopped and job.proc.poll() is None:
                echo(f'{job.stage.key}: stopping ({why}); it writes a snapshot')
                job.proc.send_signal(signal.SIGTERM)
                job.stopped = True

    with cli.stop_signals(stop):
        while waiting or running:
            if not stop.is_set() and not failed:
                for stage in [s for s in waiting if all(d in trained for d in depends[s.key])]:
                    if not free:
                        break
                    waiting.remove(stage)
                    start(stage)
            for job in [j for j in running if j.proc.poll() is not None]:
                job.reader.join()
                running.remove(job)
                free.append(job.slot)
                free.sort()
                if job.bar is not None:
                    job.bar.close()
                if job.proc.returncode == 0:
                    trained.add(job.stage.key)
                    echo(f'{job.stage.key}: finished')
                elif not job.stopped:
                    failed.append(job)
                    echo(f'{job.stage.key}: failed: {job.error()}')
                    stop_running(f'{job.stage.key} failed')
            if stop.is_set():
                stop_running('stop signal')
            if not running and (stop.is_set() or failed):
                break
            if progress and time.time() - last_progress >= PROGRESS_SECONDS:
                last_progress = time.time()
                for job in running:
                    kimg = _stage_kimg(os.path.join(plan.outdir, job.stage.key))
                    if kimg is not None:
                        job.bar.n = round(min(kimg, job.stage.kimg), 3)
                        job.bar.refresh()
            time.sleep(POLL_SECONDS)
    if failed:
        first = failed[0]
        raise hierarchy.PlanError(f'{first.error()}; the other running stages were stopped with a snapshot; once '
                                  f'fixed, {hint}')
    if stop.is_set():
        raise training.RunStopped(f'interrupted: the running stages wrote a snapshot; {hint}')

#----------------------------------------------------------------------------
# Slurm: one job per stage, chained by afterok.

def slurm_settings(
    gres,               # e.g. 'gpu:1'; None = no GPUs
    options,            # KEY=VALUE strings (--slurm-option) and the --slurm-* values, later ones replacing earlier ones
) -> dict:
    """{sbatch long option: value or None (a flag)} of every job; PlanError for an option that does not parse."""
    settings = dict(SLURM_DEFAULTS)
    if gres:
        settings['gres'] = gres
    for text in options:
        key, sep, value = str(text).partition('=')
        key = key.strip().lstrip('-')
        if not key or not all(c.isalnum() or c in '-_' for c in key):
            raise hierarchy.PlanError(f'--slurm-option {text}: expected KEY=VALUE (an sbatch long option, e.g. qos=long)')
        if key in ('dependency', 'job-name', 'output', 'parsable'):
            raise hierarchy.PlanError(f'--slurm-option {text}: train_hier.py sets --{key} itself')
        settings[key] = value.strip() if sep else None
    return settings


def _sbatch_lines(settings, job_name, output) -> list[str]:
    lines = [f'#SBATCH --job-name={job_name}', f'#SBATCH --output={output}']
    for key, value in settings.items():
        lines.append(f'#SBATCH --{key}' if value is None else f'#SBATCH --{key}={value}')
    return lines


def _job_script(comment, settings, job_name, output, workdir, command) -> str:
    """An sbatch script that runs `command` and, at the time-limit signal, stops it (a snapshot) and requeues itself."""
    return '\n'.join(['#!/bin/bash', *[f'# {line}' for line in comment], *_sbatch_lines(settings, job_name, output), '',
                      'set -u',
                      f'cd {shlex.quote(workdir)}',
                      'export TAXOGAN_OFFLINE=${TAXOGAN_OFFLINE:-1}       # detectors from the cache, never the network',
                      '',
                      'on_time_limit() {',
                      '    echo "$(date -Is) time limit near: stopping the stage (it writes a snapshot), then requeueing"',
                      '    kill -TERM "$child" 2>/dev/null',
                      '    wait "$child"                               # the snapshot is complete when the driver exits',
                      '    scontrol requeue "$SLURM_JOB_ID"',
                      '    exit 0',
                      '}',
                      'trap on_time_limit TERM',
                      '# In the background, so that this shell runs its trap as soon as the signal comes.',
                      f'{shlex.join(command)} &',
                      'child=$!',
                      'wait "$child"', ''])


def write_slurm(
    plan:       hierarchy.Plan,
    folder,                     # where the scripts go
    command:    list,           # the driver's command line (absolute interpreter and script); + --stage KEY per stage
    workdir,                    # folder the jobs run in (relative paths of the command are from there)
    settings:   dict,           # slurm_settings()
) -> list[str]:
    """Write <n>-<stage>.sbatch per stage, <n>-report.sbatch and submit.sh; returns their paths, submit.sh last."""
    os.makedirs(folder, exist_ok=True)
    folder = os.path.abspath(folder)
    depends = hierarchy.stage_dependencies(plan)
    base = os.path.basename(os.path.normpath(plan.outdir))
    jobs = {}                   # stage key -> (shell variable of its job id, script name)
    submit = ['#!/bin/bash',
              f'# Submits the stages of {plan.outdir} in plan order, each after the job of the stage it starts from,',
              '# then the report job after all of them. Written by train_hier.py --slurm; run it again only after',
              '# cancelling the jobs of an earlier submission. SBATCH=... replaces the sbatch command.',
              'set -euo pipefail',
              'cd "$(dirname "$0")"',
              'SBATCH=${SBATCH:-sbatch}',
              'submit() {      # submit [sbatch options] SCRIPT: prints the job id (sbatch --parsable: "id" or "id;cluster")',
              '    local id',
              '    id=$($SBATCH --parsable "$@")',
              '    echo "${id%%;*}"',
              '}']
    paths = []
    entries = [(stage.key, depends[stage.key], ['--stage', stage.key]) for stage in plan.stages]
    entries.append((REPORT_JOB, tuple(s.key for s in plan.stages), []))
    for index, (key, after, extra) in enumerate(entries, 1):
        name = f'{index:02d}-{key}.sbatch'
        variable = f'job{index}'
        if key == REPORT_JOB:
            comment = [f'The plan of {plan.outdir} once every stage is trained: its measures and report.']
        else:
            stage = plan.stage(key)
            start = f'the final network of stage {stage.start}' if stage.start_kind == 'stage' else \
                ('scratch' if stage.start_kind == 'scratch' else stage.start)
            comment = [f'Stage {key} ({stage.label}, {stage.kimg:g} kimg) of {plan.outdir}, from {start}.']
        comment += ['Written by train_hier.py --slurm; submit.sh submits it after: ' + (', '.join(after) or 'nothing') + '.']
        script = _job_script(comment, settings, f'taxogan-{base}-{key}', os.path.join(folder, f'{index:02d}-{key}-%j.out'),
                             workdir, command + extra)
        path = os.path.join(folder, name)
        _write_script(path, script)
        paths.append(path)
        dependency = f'--dependency=afterok:{":".join("$" + jobs[k][0] for k in after)} ' if after else ''
        submit.append(f'{variable}=$(submit {dependency}{shlex.quote(name)})')
        submit.append(f'echo "{key}: job ${variable}"')
        jobs[key] = (variable, name)
    path = os.path.join(folder, SUBMIT_FILE)
    _write_script(path, '\n'.join(submit) + '\n')
    paths.append(path)
    return paths


def _write_script(path, text):
    """Write an executable script (as a new executable file would be: 0777 minus the umask)."""
    with atomic_write(path) as f:
        f.write(text)
    os.chmod(path, 0o777 & ~current_umask())
