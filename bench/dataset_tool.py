"""Speed of `dataset_tool_ext.py build` on generated images of mixed sizes.

Writes a folder tree Copepoda/<order>/*.jpg of --num images (sides drawn from --min-side..--max-side,
a tenth grayscale, some below 256 px so the size filter has work to do) into a temporary folder, builds
256x256 datasets from it with all cores, and prints the build's throughput as its last line:
    images/s <number>
Usage: python bench/dataset_tool.py [--num 2000] [--workers N]
"""

import concurrent.futures
import os
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from taxogan_ext import collection  # noqa: E402

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

def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system

@click.command()
@click.option('--num',      help='Images to generate', metavar='INT', type=click.IntRange(min=10), default=2000, show_default=True)
@click.option('--min-side', help='Smallest side (pixels)', metavar='INT', type=click.IntRange(min=16), default=200, show_default=True)
@click.option('--max-side', help='Largest side (pixels)', metavar='INT', type=click.IntRange(min=16), default=1000, show_default=True)
@click.option('--workers',  help='Processes  [default: all cores]', metavar='INT', type=click.IntRange(min=1), default=None)
def main(num, min_side, max_side, workers):
    """Generate a collection, build it, print images/s."""
    workers = workers or collection.default_workers()
    with tempfile.TemporaryDirectory(prefix='bench-dataset-tool-') as tmp:
        src, dest = Path(tmp) / 'photos', Path(tmp) / 'datasets'
        t0 = time.perf_counter()
        make_collection(src, num, min_side, max_side, workers)
        print(f'generated {num} images ({min_side}-{max_side} px) in {time.perf_counter() - t0:.1f} s')
        t0, cpu0 = time.perf_counter(), _cpu_seconds()
        # The command line's defaults (--ranks class,order --resolution 256 --min-size 256 --square pad ...).
        manifest = collection.build_datasets(collection.BuildOptions(source=str(src), dest=str(dest), workers=workers))
        seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
        size = sum(f.stat().st_size for f in dest.glob('*.zip'))
        print(f'built {len(manifest.taxa)} datasets ({manifest.num_images("Copepoda")} images kept, '
              f'{sum(manifest.dropped_counts.values())} dropped, {size / 2**20:.0f} MiB of zips) '
              f'in {seconds:.1f} s with {workers} workers on {os.cpu_count()} cores')
        # CPU time is what other jobs on a shared machine cannot inflate; wall time is what a user waits.
        print(f'cpu {cpu:.1f} s ({1000 * cpu / num:.1f} ms per image, {num / cpu:.1f} images per cpu-second); '
              f'load average {os.getloadavg()[0]:.2f}')
    print(f'images/s {num / seconds:.1f}')

if __name__ == '__main__':
    main()
