"""How much disk a run or a plan will write, estimated before it starts, and the pre-flight check against the free space.

A snapshot holds G, G_ema, D, the augmentation pipe and both Adam optimisers (two moments per parameter), so its size
follows from the networks' parameter and buffer counts (built on the meta device: no memory, no time). The run's
schedule (kimg, tick, snap) gives the number of snapshot files (one per distinct kimg) and of image grids; --keep-snaps
caps the snapshots kept. Plans add their stages, held-out split, derived datasets and report.
"""

import dataclasses
import math
import os

import numpy as np
import torch

from stylegan2ada.augment import AugmentPipe
from stylegan2ada.dataset import ImageFolderDataset
from stylegan2ada.image_utils import grid_size_for
from stylegan2ada.pickles import MODULE_CLASSES
from stylegan2ada.util import UserError, existing_folder, format_bytes, free_space

# What a snapshot holds besides the tensors (pickle framing per tensor, the training options, RNG states), and what a
# tick adds to stats.jsonl, log.txt and the TensorBoard events (about 1000, 150 and 930 bytes); measured on our
# snapshots and logs (tests/test_disk.py checks the estimate).
SNAPSHOT_OVERHEAD_BYTES = 22 << 10
SNAPSHOT_BYTES_PER_TENSOR = 250
TICK_LOG_BYTES = 2560
RUN_FIXED_BYTES = 4 << 10       # training_options.json
# A PNG grid of generated or real images, as a share of its raw pixel bytes (PNG compresses such images little).
PNG_RATIO = 0.7
# A plan's report (taxogan_ext.report): images per row of a taxon's grid and of its overview block (RGB cells of at
# least 64 px; enlarged images compress to about a third), plus the tables and curves.
REPORT_GRID_IMAGES = 8
REPORT_OVERVIEW_IMAGES = 4
REPORT_ENLARGED_PNG_RATIO = 0.33
REPORT_FIXED_BYTES = 32 << 10
# A chart (curves, gain) as PNG, PDF and SVG: about 40 + 20 + 60 KB measured on a tiny plan's curves.
REPORT_CHART_BYTES = 120 << 10


class InsufficientSpaceError(UserError):
    """The destination has less free space than the run or plan is estimated to write."""


@dataclasses.dataclass
class DiskEstimate:
    """Bytes a run or a plan will add to its destination, and how they add up."""
    total:      int = 0             # bytes at the peak: what stays, plus the largest transient
    snapshot:   int = 0             # bytes of one snapshot (the largest, for a plan)
    snapshots:  int = 0             # snapshot files that stay (summed over stages)
    parts:      dict = dataclasses.field(default_factory=dict)     # what stays -> bytes
    transient:  int = 0             # bytes present only while a run trains: snapshots that --keep-snaps deletes later

    def add(self, other):
        """Add another estimate (a stage) to this one (the plan): stages run one at a time, so their transients do not add."""
        self.total += other.total - other.transient + max(other.transient - self.transient, 0)
        self.transient = max(self.transient, other.transient)
        self.snapshot = max(self.snapshot, other.snapshot)
        self.snapshots += other.snapshots
        for key, value in other.parts.items():
            self.parts[key] = self.parts.get(key, 0) + value

    def add_part(self, name, num_bytes):
        """Add bytes of one kind (datasets, report, ...)."""
        self.total += int(num_bytes)
        self.parts[name] = self.parts.get(name, 0) + int(num_bytes)

    def describe(self):
        """'1.2 GiB (3 snapshots of 400 MiB, grids and logs 20 MiB, ...)'."""
        parts = [f'{name} {format_bytes(value)}' for name, value in self.parts.items() if value]
        if self.transient:
            parts.append(f'{format_bytes(self.transient)} more while a stage writes a snapshot before deleting older ones')
        return f'{format_bytes(self.total)} ({", ".join(parts)})'


def _module_bytes(module, with_adam):
    """(bytes, tensor count) of a module's state dict, plus its two Adam moments and step per parameter."""
    tensors = list(module.state_dict().values())
    num_bytes = sum(t.numel() * t.element_size() for t in tensors)
    count = len(tensors)
    if with_adam:
        params = [p for p in module.parameters()]
        num_bytes += sum(2 * p.numel() * p.element_size() + 4 for p in params)
        count += 3 * len(params)
    return num_bytes, count


def snapshot_bytes(
    config,             # training.build_config's dict (G_class, G_kwargs, D_class, D_kwargs, augment_kwargs)
    training_set,       # the run's ImageFolderDataset (labels, resolution, channels)
):
    """Estimated bytes of one network-snapshot-*.pkl of this run: G, G_ema, D, the augment pipe, both optimisers."""
    common = dict(c_dim=training_set.label_dim, img_resolution=training_set.resolution,
                  img_channels=training_set.num_channels)
    with torch.device('meta'):
        G = MODULE_CLASSES[config['G_class']](**dict(config['G_kwargs']), **common)
        D = MODULE_CLASSES[config['D_class']](**dict(config['D_kwargs']), **common)
        pipe = AugmentPipe(**config['augment_kwargs']) if config.get('augment_kwargs') else None
    g_bytes, g_count = _module_bytes(G, with_adam=False)
    g_adam_bytes, g_adam_count = _module_bytes(G, with_adam=True)
    d_bytes, d_count = _module_bytes(D, with_adam=True)
    pipe_bytes, pipe_count = _module_bytes(pipe, with_adam=False) if pipe is not None else (0, 0)
    # G twice: G (with its optimiser) and G_ema (without).
    tensor_bytes = g_bytes + g_adam_bytes + d_bytes + pipe_bytes
    count = g_count + g_adam_count + d_count + pipe_count
    return tensor_bytes + count * SNAPSHOT_BYTES_PER_TENSOR + SNAPSHOT_OVERHEAD_BYTES


def snapshot_schedule(
    total_nimg,         # images the run trains to
    batch,              # images per iteration
    tick_nimg,          # images per tick (--tick in images)
    snap_ticks,         # a snapshot every this many ticks; None = only the final one
    start_nimg  = 0,    # images already trained (a continued run)
    start_tick  = 0,    # the tick a continued run starts with
):
    """(images at each snapshot, number of ticks) as the training loop writes them (the final one included)."""
    nimg, tick, tick_start = start_nimg, start_tick, start_nimg
    snaps, ticks = [], 0
    while True:
        # The loop ends a tick after its first iteration, then every tick_nimg images, and when the run is done.
        steps = 1 if tick == 0 else max(1, math.ceil(min(tick_start + tick_nimg - nimg, total_nimg - nimg) / batch))
        nimg += steps * batch
        done = nimg >= total_nimg
        if (snap_ticks is not None and tick % snap_ticks == 0) or done:
            snaps.append(nimg)
        tick, ticks, tick_start = tick + 1, ticks + 1, nimg
        if done:
            return snaps, ticks


def run_estimate(
    config,             # training.build_config's dict of the run (total_kimg, batch_size, kimg_per_tick, ...)
    training_set,       # the run's ImageFolderDataset
    keep_snaps  = None, # --keep-snaps; None = every snapshot is kept
    start_nimg  = 0,    # images already trained (a continued run: its newest snapshot's)
    start_tick  = 0,    # tick of that snapshot
):
    """DiskEstimate of one training run: its snapshots at the peak, image grids and logs."""
    snap_ticks = config['network_snapshot_ticks']
    snaps, ticks = snapshot_schedule(int(config['total_kimg'] * 1000), config['batch_size'], config['kimg_per_tick'] * 1000,
                                     snap_ticks, start_nimg, start_tick)
    files = len({nimg // 1000 for nimg in snaps})       # one file per kimg: later ones of the same kimg replace it
    with_best = bool(config.get('metrics'))
    kept = files if keep_snaps is None else min(files, keep_snaps + with_best)
    # At the peak a new snapshot is complete and the older ones are not deleted yet: one more than what stays.
    peak = files if keep_snaps is None else min(files, keep_snaps + 1 + with_best)
    size = snapshot_bytes(config, training_set)
    estimate = DiskEstimate(snapshot=size, snapshots=kept, transient=(peak - kept) * size)
    estimate.total += estimate.transient
    estimate.add_part('snapshots', kept * size)
    # Grids: reals.png and fakes_init.png of a fresh run, then one fakes*.png per snapshot tick (never deleted).
    num_grid = min(64, max(len(training_set), 16))
    gw, gh = grid_size_for(num_grid, max_width=8)
    grid = gw * gh * training_set.resolution ** 2 * training_set.num_channels * PNG_RATIO
    image_ticks = config.get('image_snapshot_ticks')
    grids = len({nimg // 1000 for nimg in snaps}) if image_ticks is not None else 1
    estimate.add_part('grids and logs', grid * (grids + (2 if start_nimg == 0 else 0)) + ticks * TICK_LOG_BYTES
                      + RUN_FIXED_BYTES)
    return estimate


def open_run_dataset(config):
    """The ImageFolderDataset of a config (its sizes decide the networks')."""
    kwargs = config['training_set_kwargs']
    return ImageFolderDataset(path=kwargs['path'], use_labels=kwargs.get('use_labels', False),
                              max_size=kwargs.get('max_size'), xflip=kwargs.get('xflip', False))


def report_bytes(
    rows_per_taxon,     # [rows of each taxon's grid]: the real images and one row per network evaluated on it
    resolution,         # image side in pixels
):
    """Estimated bytes of a plan's report: per taxon a grid and an overview block; the tables and curves."""
    total = REPORT_FIXED_BYTES + REPORT_CHART_BYTES         # the training curves (a gain chart only with --holdout)
    for cells, side in ((REPORT_GRID_IMAGES, min(max(resolution, 64), 256)), (REPORT_OVERVIEW_IMAGES, min(max(resolution, 64), 128))):
        # Images enlarged to the cell compress well; at their own size, as the training grids do.
        ratio = REPORT_ENLARGED_PNG_RATIO if side > resolution else PNG_RATIO
        total += sum(rows_per_taxon) * cells * side * side * 3 * ratio
    return int(total)


def check_free_space(
    estimate,           # DiskEstimate of what will be written
    dest,               # the destination folder (may not exist yet)
    override    = '--no-space-check',  # the option that skips the check (named in the message)
):
    """InsufficientSpaceError (one line, both numbers) when dest's file system has less free space than the estimate."""
    free = free_space(dest)
    if free is not None and free < estimate.total:
        raise InsufficientSpaceError(f'{existing_folder(dest)}: {format_bytes(free)} free, but this needs about '
                                     f'{estimate.describe()}; free space, lower --keep-snaps, or give {override}')
    return free


def describe_check(estimate, dest):
    """'Disk: about X in DEST (...); Y free' for --dry-run."""
    return f'Disk: about {estimate.describe()} in {dest}; {format_bytes(free_space(dest))} free there'


def zip_bytes(paths):
    """Total bytes of the files that exist among `paths`."""
    return int(np.sum([os.path.getsize(p) for p in paths if os.path.isfile(p)] or [0]))
