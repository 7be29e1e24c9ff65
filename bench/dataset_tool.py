"""Speed of `dataset_tool_ext.py build` on generated images of mixed sizes, optionally against another checkout.

Writes a folder tree Copepoda/<order>/*.jpg of --num images (sides drawn from --min-side..--max-side, a tenth
grayscale, some below 256 px when --min-side is below it, so the size filter has work to do) into a temporary folder,
then runs `python dataset_tool_ext.py build` on it as a user would (a new process: start-up and imports count) with the
command's defaults (256x256, --ranks class,order: the class's zip and one per order). With --baseline ROOT it also
runs ROOT's dataset_tool_ext.py (PYTHONPATH=ROOT) on the same images, alternating ours and ROOT's --repeats times,
because other jobs on a shared machine change the wall time from one minute to the next. --num takes a list
(600,6000): one collection each. The last line printed is the median throughput of ours for the last --num:
    images/s <number>
Usage: python bench/dataset_tool.py [--num 600,6000] [--min-side 300 --max-side 900] [--baseline /tmp/base --repeats 5]
"""

import concurrent.futures
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
ORDERS = ('Calanoida', 'Cyclopoida', 'Harpacticoida', 'Siphonostomatoida')
ORDER_SHARE = (902, 766, 150, 151)   # the paper's counts, as proportions

def make_image(task: tuple) -> None:
    """One smooth random JPEG: a flat background with a blurred blob pattern, like a specimen on a slide."""
    path, seed, w, h, gray = task
    rng = np.random.default_rng(seed)
    c = 1 if gray else 3
    coarse = rng.integers(0, 256, (12, 12, c), dtype=np.uint8)
    img = Image.fromarray(coarse.squeeze(-1) if gray else coarse).resize((w, h), Image.BICUBIC)
    img.save(path, format='JPEG', quality=90)

def make_collection(
    root:       Path,
    num:        int,                    # images
    min_side:   int,                    # pixels
    max_side:   int,                    # pixels
    workers:    int,                    # processes
) -> None:
    """Write the generated folder tree."""
    rng = np.random.default_rng(2024)
    share = np.array(ORDER_SHARE, dtype=np.float64) / sum(ORDER_SHARE)
    orders = rng.choice(len(ORDERS), size=num, p=share)
    tasks = []
    for i in range(num):
        folder = root / 'Copepoda' / ORDERS[orders[i]]
        folder.mkdir(parents=True, exist_ok=True)
        w, h = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
        tasks.append((str(folder / f'{i:05d}.jpg'), i, w, h, bool(rng.random() < 0.1)))
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(make_image, tasks, chunksize=16))

def _children_cpu() -> float:
    """User + system CPU time of the finished child processes (a build and its workers)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime

def run_build(
    root:       Path,                   # checkout whose dataset_tool_ext.py runs
    src:        Path,                   # the generated folder tree
    dest:       Path,                   # output folder (emptied first)
    workers:    int | None,             # --workers; None: the tool's default
) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one `dataset_tool_ext.py build` in a new process."""
    shutil.rmtree(dest, ignore_errors=True)
    cmd = [sys.executable, str(root / 'dataset_tool_ext.py'), 'build', '--source', str(src), '--dest', str(dest)]
    if workers is not None:
        cmd += ['--workers', str(workers)]
    env = dict(os.environ, PYTHONPATH=str(root))
    t0, cpu0 = time.perf_counter(), _children_cpu()
    done = subprocess.run(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    seconds, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    if done.returncode != 0:
        raise click.ClickException(f'{root}: build failed:\n{done.stdout}')
    return seconds, cpu

def _summary(values: list[float]) -> str:
    return f'median {statistics.median(values):.2f} (range {min(values):.2f}-{max(values):.2f}, n={len(values)})'

@click.command()
@click.option('--num',      help='Images to generate, or a comma-separated list', metavar='LIST', type=str, default='600', show_default=True)
@click.option('--min-side', help='Smallest side (pixels)', metavar='INT', type=click.IntRange(min=16), default=300, show_default=True)
@click.option('--max-side', help='Largest side (pixels)', metavar='INT', type=click.IntRange(min=16), default=900, show_default=True)
@click.option('--workers',  help='--workers of the builds  [default: the tool\'s]', metavar='INT', type=click.IntRange(min=1), default=None)
@click.option('--baseline', help='Another checkout to time on the same images, alternating with ours', metavar='DIR', type=click.Path(file_okay=False, exists=True), default=None)
@click.option('--repeats',  help='Builds per checkout and --num (ours first, then alternating)', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True)
def main(num, min_side, max_side, workers, baseline, repeats):
    """Generate collections, build them (alternating with --baseline), print images/s."""
    sizes = [int(n) for n in num.split(',') if n.strip()]
    tools = [('ours', ROOT)] + ([('baseline', Path(baseline).resolve())] if baseline else [])
    rate = None
    with tempfile.TemporaryDirectory(prefix='bench-dataset-tool-') as tmp:
        for n in sizes:
            src, dest = Path(tmp) / f'photos{n}', Path(tmp) / 'datasets'
            t0 = time.perf_counter()
            make_collection(src, n, min_side, max_side, len(os.sched_getaffinity(0)))
            print(f'generated {n} JPEGs ({min_side}-{max_side} px) in {time.perf_counter() - t0:.1f} s', flush=True)
            walls, cpus = {name: [] for name, _ in tools}, {name: [] for name, _ in tools}
            for r in range(repeats):
                for name, root in (tools if r % 2 == 0 else tools[::-1]):     # ABBA: neither side always goes first
                    seconds, cpu = run_build(root, src, dest, workers)
                    walls[name].append(seconds)
                    cpus[name].append(cpu)
                    print(f'  {n} images, {name}: {seconds:.2f} s wall, {cpu:.2f} s CPU ({n / seconds:.1f} images/s); '
                          f'load average {os.getloadavg()[0]:.2f}', flush=True)
            for name, _ in tools:
                print(f'{n} images, {name}: wall s {_summary(walls[name])}; CPU s {_summary(cpus[name])}; '
                      f'images/s {n / statistics.median(walls[name]):.1f}')
            if baseline:
                # Per pair (one build each, back to back), so that a slow minute slows both sides of a ratio.
                ratios = [b / a for a, b in zip(walls['ours'], walls['baseline'])]
                cpu_ratios = [b / a for a, b in zip(cpus['ours'], cpus['baseline'])]
                print(f'{n} images, speed-up over the baseline (its wall time / ours): {_summary(ratios)}; '
                      f'CPU time ratio {_summary(cpu_ratios)}')
            rate = n / statistics.median(walls['ours'])
            shutil.rmtree(src, ignore_errors=True)
    print(f'images/s {rate:.1f}')

if __name__ == '__main__':
    main()
