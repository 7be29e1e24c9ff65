"""The StyleGAN2-ADA training loop: phases with lazy regularization, G_ema, ADA, ticks, snapshots, exact resume.

Semantics follow NVIDIA's stylegan2-ada-pytorch; differences are deliberate and documented:
- snapshots carry the whole training state (`progress`), so resuming one of our snapshots continues
  cur_nimg, augment p, optimizer moments, loss and extra-term state and RNG states;
- a snapshot is also written when the run is interrupted (Ctrl-C / SIGTERM);
- non-finite losses stop the run with a message naming the tick and the term;
- `keep_snapshots` keeps only the newest snapshots (and the best by the first snapshot metric), deleting older ones
  only once a new one is complete; a full disk stops the run with one line (DiskFullError), the workers ended;
- TensorBoard events (when tensorboard is installed) carry each tick's end time as walltime, not the seconds since
  the process started, so that the curves of a resumed run continue those of the run before it.
"""

import copy
import itertools
import json
import os
import re
import time
import traceback

import numpy as np
import psutil
import torch

from . import graphs as graph_backends
from . import pickles
from .augment import TRANSFORMS as AUGMENT_TRANSFORMS
from .augment import AugmentPipe
from .dataset import ImageFolderDataset, InfiniteSampler
from .distributed import all_reduce_sum_, collective_device
from .image_utils import grid_size_for, save_image_grid, to_uint8
from .loss import StyleGAN2Loss
from .metrics import metric_main
from .metrics.detectors import resolve_detector
from .training_stats import StatsCollector
from .util import UserError, disk_full_as_user_error, format_duration, remove_stale_temp_files, worker_init_ignoring_stop_signals

SNAPSHOT_RE = re.compile(r'^network-snapshot-(\d+)\.pkl$')
STOP_CHECK_INTERVAL = 8     # iterations between the processes' agreements on a requested stop (several processes)


class TrainingDivergedError(UserError):
    """A loss became NaN or infinite; the message names the tick and the term."""


class TrainingInterrupted(Exception):
    """Training stopped by Ctrl-C or SIGTERM after writing a snapshot."""

    def __init__(self, snapshot_pkl):
        super().__init__(f'interrupted; snapshot written to {snapshot_pkl}')
        self.snapshot_pkl = snapshot_pkl


def latest_snapshot(run_dir):
    """Path of the newest network-snapshot-*.pkl in run_dir, or None."""
    if not os.path.isdir(run_dir):
        return None
    found = [(int(m.group(1)), name) for name in os.listdir(run_dir) if (m := SNAPSHOT_RE.match(name))]
    return os.path.join(run_dir, max(found)[1]) if found else None


def snapshot_names(run_dir):
    """File names of the network-snapshot-*.pkl in run_dir, oldest (fewest kimg) first."""
    found = [(int(m.group(1)), name) for name in os.listdir(run_dir) if (m := SNAPSHOT_RE.match(name))]
    return [name for _, name in sorted(found)]


def best_snapshot(
    run_dir,            # run folder with metric-<metric>.jsonl
    metric,             # metric name (its family says whether higher or lower is better)
):
    """(file name, value) of the existing snapshot with the best value of `metric` in its log; (None, None) if none."""
    path = os.path.join(run_dir, f'metric-{metric}.jsonl')
    if not os.path.isfile(path):
        return None, None
    values = {}                 # file name -> value of its newest line (a file name may be written again)
    with open(path, encoding='utf-8') as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue        # a line cut short by a kill
            value = (record.get('results') or {}).get(metric)
            name = record.get('snapshot_pkl')
            if name and isinstance(value, (int, float)) and value == value:
                values[name] = value
    values = {name: value for name, value in values.items() if os.path.isfile(os.path.join(run_dir, name))}
    if not values:
        return None, None
    name = (max if metric_main.higher_is_better(metric) else min)(values, key=values.get)
    return name, values[name]


def snapshots_to_remove(
    run_dir,                # run folder
    keep,                   # number of newest snapshots to keep (the newest is the final one at the end of a run)
    best_metric = None,     # the best snapshot by this metric's log is kept too; None = no metric
):
    """(file names to delete, file name of the best snapshot or None): all snapshots but the newest `keep` and the best."""
    names = snapshot_names(run_dir)
    best = best_snapshot(run_dir, best_metric)[0] if best_metric else None
    kept = set(names[-keep:]) | ({best} if best else set())
    return [name for name in names if name not in kept], best


def _remove_snapshot(path):
    os.remove(path)


def prune_snapshots(
    run_dir,                # run folder; called only after its newest snapshot is complete
    keep,                   # number of newest snapshots to keep
    best_metric = None,     # the best snapshot by this metric is kept too; None = no metric
):
    """Delete the snapshots snapshots_to_remove() names; returns (removed file names, best file name or None)."""
    # Deleting only after the new snapshot has been renamed into place: a kill at any moment leaves every snapshot that
    # is not yet superseded, and the next call removes what this one did not.
    removed, best = snapshots_to_remove(run_dir, keep, best_metric)
    for name in removed:
        _remove_snapshot(os.path.join(run_dir, name))
    return removed, best


def copy_params_and_buffers(
    src,                    # module to copy from (e.g. a pickle's network)
    dst,                    # module to copy into
    require_all = False,    # raise NetworkPickleError, copying nothing, unless every tensor of both has its counterpart
    source      = 'the source network',     # how messages name src
):
    """Copy tensors with matching names and shapes from src to dst; returns the names of dst's tensors not copied."""
    if require_all:
        # Checked before copying: a partial copy followed by an error would leave dst half-transferred.
        unfilled, unused = pickles.tensor_mismatches(src, dst)
        if unfilled or unused:
            raise pickles.NetworkPickleError(f'{source}: {len(unfilled)} tensor(s) would keep their random initialisation and {len(unused)} '
                                             f'of the pickle would go unused: {"; ".join((unfilled + unused)[:4])}'
                                             f'{"; ..." if len(unfilled) + len(unused) > 4 else ""}')
    src_tensors = pickles.module_tensors(src)
    skipped = []
    with torch.no_grad():
        for name, tensor in pickles.module_tensors(dst).items():
            if name in src_tensors and src_tensors[name].shape == tensor.shape:
                tensor.copy_(src_tensors[name].to(tensor.device, tensor.dtype))
            else:
                skipped.append(name)
    return skipped


def _module_tensors(module):
    return [t for t in list(module.parameters()) + list(module.buffers()) if t.numel() > 0]


def _broadcast_module(module):
    for tensor in _module_tensors(module):
        torch.distributed.broadcast(tensor.data, src=0)


def _finish_gradients(params, num_gpus):
    """Average gradients over processes and replace NaN/inf, on one flat buffer (a few kernels, not a few per tensor)."""
    grads = [p.grad for p in params if p.numel() > 0 and p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])
    if num_gpus > 1:
        torch.distributed.all_reduce(flat)
        flat /= num_gpus
    torch.nan_to_num(flat, nan=0, posinf=1e5, neginf=-1e5, out=flat)
    torch._foreach_copy_(grads, [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads)])


def build_phases(
    G,                      # generator module
    D,                      # discriminator module
    G_opt_kwargs,           # Adam arguments for G (lr, betas, eps); None = Adam's defaults
    D_opt_kwargs,           # Adam arguments for D; None = Adam's defaults
    G_reg_interval,         # lazy regularization interval of G; None = one phase Gboth every step
    D_reg_interval,         # lazy regularization interval of D; None = one phase Dboth every step
    device,                 # torch.device of the networks (CUDA gets the fused Adam)
    capturable  = False,    # Adam steps that may be captured in a CUDA graph
):
    """The training phases in order (Gmain, Greg, Dmain, Dreg or Gboth, Dboth), one Adam per network."""
    phases = []
    for name, module, opt_kwargs, reg_interval in [('G', G, G_opt_kwargs, G_reg_interval), ('D', D, D_opt_kwargs, D_reg_interval)]:
        opt_kwargs = dict(opt_kwargs or {})
        opt_kwargs['betas'] = [float(beta) for beta in opt_kwargs.get('betas', (0.9, 0.999))]  # Adam rejects int betas
        if reg_interval is not None:
            # Lazy regularization scales lr and betas so that the effective schedule is unchanged.
            mb_ratio = reg_interval / (reg_interval + 1)
            opt_kwargs['lr'] = opt_kwargs['lr'] * mb_ratio
            opt_kwargs['betas'] = [beta ** mb_ratio for beta in opt_kwargs['betas']]
        # One fused kernel updates every tensor (4x faster than the per-tensor loop on the CPU, one launch on CUDA).
        opt = torch.optim.Adam(module.parameters(), fused=(device.type in ('cuda', 'cpu')) or None, capturable=capturable,
                               **opt_kwargs)
        if reg_interval is None:
            phases.append(dict(name=name + 'both', module=module, opt=opt, interval=1))
        else:
            phases.append(dict(name=name + 'main', module=module, opt=opt, interval=1))
            phases.append(dict(name=name + 'reg', module=module, opt=opt, interval=reg_interval))
    return phases


class LossWatch:
    """What a tick's losses need checked, kept on the device: which were ever non-finite, and D's real signs for ADA.

    Checking a loss on the host every phase (`if not isfinite(loss)`) would make the CPU wait for the GPU several times
    per iteration; here each check is a device op, and the host reads the flags once per tick.
    """

    def __init__(self):
        self._finite = {}                       # (phase, loss names) -> bool tensor [len(names)] on the device
        self.real_sign_sum = None               # sum of sign(D(real logits)) since take_real_signs(): 0-dim float64
        self.real_sign_count = 0                # number of logits in real_sign_sum

    def observe(self, phase, losses):
        """Record one round's reported losses (name -> detached tensor) of `phase`."""
        if not losses:
            return
        key = (phase, tuple(losses))
        # A sum is finite exactly when every element is (float64: no overflow of large finite losses).
        finite = torch.isfinite(torch.stack([value.to(torch.float64).sum() for value in losses.values()]))
        self._finite[key] = finite & self._finite[key] if key in self._finite else finite
        signs = losses.get('Loss/signs/real')
        if signs is not None:
            total = signs.to(torch.float64).sum()
            self.real_sign_sum = total if self.real_sign_sum is None else self.real_sign_sum + total
            self.real_sign_count += signs.numel()

    def take_real_signs(self):
        """(sum of signs as a 0-dim device tensor or None, count) since the last call; resets them."""
        taken = (self.real_sign_sum, self.real_sign_count)
        self.real_sign_sum, self.real_sign_count = None, 0
        return taken

    def non_finite(self, num_gpus):
        """'term in phase P' strings for the losses that were non-finite since the last call, on any process; resets.

        Reads the device once (the tick's one synchronisation for this check); with several processes every one
        learns whether any process saw a non-finite loss, so that all stop together.
        """
        found = []
        if self._finite:
            flags = torch.cat(list(self._finite.values())).cpu().tolist()
            labels = [f'{name} in phase {phase}' for phase, names in self._finite for name in names]
            found = [label for label, ok in zip(labels, flags) if not ok]
        self._finite.clear()
        if _any_process(bool(found), num_gpus) and not found:
            found = ['loss on another process']
        return found


def run_phase(
    phase,                  # one entry of build_phases()
    loss,                   # StyleGAN2Loss
    real_img,               # per round: real images [batch_gpu, C, H, W] in [-1, 1], on the device
    real_c,                 # per round: their labels [batch_gpu, c_dim]
    gen_z,                  # per round: latents [batch_gpu, z_dim]
    gen_c,                  # per round: labels of the generated images [batch_gpu, c_dim]
    cur_nimg,               # images shown so far (extra loss terms may schedule on it)
    num_gpus,               # number of processes: gradients are averaged over them
):
    """One phase: forward and backward of every round, gradient reduction, Adam step; returns each round's losses.

    Nothing here reads device values on the host and every shape is fixed by the batch, so a GPU keeps its queue full
    and the whole phase can be captured as one CUDA graph (stylegan2ada/graphs.py).
    """
    rounds = len(real_img)
    phase['module'].requires_grad_(True)
    phase['opt'].zero_grad(set_to_none=True)
    reported = []
    for round_real_img, round_real_c, round_gen_z, round_gen_c in zip(real_img, real_c, gen_z, gen_c):
        # The gain keeps lazy regularization's long-term strength. 1/rounds averages the rounds, so that
        # --batch-gpu (gradient accumulation) changes memory use, not the gradient (NVIDIA sums them).
        loss.last_losses.clear()
        loss.accumulate_gradients(phase=phase['name'], real_img=round_real_img, real_c=round_real_c,
                                  gen_z=round_gen_z, gen_c=round_gen_c, gain=phase['interval'] / rounds, cur_nimg=cur_nimg)
        reported.append(dict(loss.last_losses))
    phase['module'].requires_grad_(False)
    _finish_gradients(list(phase['module'].parameters()), num_gpus)
    phase['opt'].step()
    return reported


def run_phases(
    phases,                 # from build_phases()
    loss,                   # StyleGAN2Loss
    batch_idx,              # iteration number: a phase runs when batch_idx % its interval == 0
    real_img,               # per round: real images [batch_gpu, C, H, W] in [-1, 1], on the device
    real_c,                 # per round: their labels [batch_gpu, c_dim]
    gen_z,                  # latents [num_phases, rounds, batch_gpu, z_dim]
    gen_c,                  # labels of the generated images [num_phases, rounds, batch_gpu, c_dim]
    cur_nimg,               # images shown so far (extra loss terms may schedule on it)
    num_gpus,               # number of processes: gradients are averaged over them
    watch,                  # LossWatch recording the reported losses
    graphs  = None,         # PhaseGraphs replaying captured phases; None = every phase eagerly
):
    """One iteration's due phases, eagerly or through their CUDA graphs."""
    for phase, phase_gen_z, phase_gen_c in zip(phases, gen_z, gen_c):
        if batch_idx % phase['interval'] != 0:
            continue
        if graphs is not None:
            reported = graphs.run(phase, real_img, real_c, list(phase_gen_z), list(phase_gen_c), cur_nimg)
        else:
            reported = run_phase(phase, loss, real_img, real_c, list(phase_gen_z), list(phase_gen_c), cur_nimg, num_gpus)
        for losses in reported:
            watch.observe(phase['name'], losses)


class PhaseGraphs:
    """Runs each training phase through a graph (stylegan2ada/graphs.py): eagerly first, captured the next time, then
    replayed, one graph per (phase, loss.graph_key(cur_nimg)).

    What must happen on the host for every run stays here: the inputs are copied into the tensors the capture read,
    and the reported losses are copied out (one fused op) and handed to the stats, before the next replay overwrites
    them. One process only (the gradient all-reduce is not captured). A phase whose capture fails runs eagerly from
    then on, after one warning line.
    """

    def __init__(self,
        loss,               # StyleGAN2Loss of the phases (its stats receive the reported losses)
        backend,            # 'cuda' (CUDA graphs) or 'oplog' (their model on any device; tests)
        warmup  = 1,        # eager runs of each phase before its capture (CUDA: cuDNN autotuning, Triton compiles)
        log     = print,    # receives the one-line notices (capture, fallback)
    ):
        self.loss = loss
        self.backend = backend
        self.warmup = warmup
        self.log = log
        self._pool = None                   # CUDA: one memory pool for all phases (they replay one at a time)
        self._graphs = {}                   # (phase name, graph key) -> (graph, static inputs)
        self._eager_runs = {}               # (phase name, graph key) -> eager runs so far
        self.failures = {}                  # (phase name, graph key) -> traceback of its failed capture: eager for good
        if loss.augment_pipe is not None:
            loss.augment_pipe.skip_at_p0 = False    # p must be read from its tensor inside a graph, never as a float

    def run(self, phase, real_img, real_c, gen_z, gen_c, cur_nimg):
        """Run one due phase (inputs as run_phase takes them); returns each round's reported losses."""
        key = (phase['name'], self.loss.graph_key(phase['name'], cur_nimg))
        inputs = [*real_img, *real_c, *gen_z, *gen_c]
        entry = self._graphs.get(key)
        if entry is not None:
            graph, static = entry
            torch._foreach_copy_(static, inputs)
            return self._hand_out(graph.replay())
        if key in self.failures or self._eager_runs.get(key, 0) < self.warmup:
            self._eager_runs[key] = self._eager_runs.get(key, 0) + 1
            return run_phase(phase, self.loss, real_img, real_c, gen_z, gen_c, cur_nimg, num_gpus=1)
        static = [t.clone() for t in inputs]
        rounds = len(real_img)
        groups = [static[i * rounds:(i + 1) * rounds] for i in range(4)]
        if self.backend == 'cuda' and self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = graph_backends.make_graph(self.backend, self._pool)
        stats, recorded = self.loss.stats, _ReportRecorder()
        self.loss.stats = recorded          # reports are recorded as graph outputs and handed on after every run
        try:
            result = graph.capture(lambda: (run_phase(phase, self.loss, *groups, cur_nimg, num_gpus=1), recorded.items))
        except Exception as err:            # pylint: disable=broad-except  (any capture failure: run the phase eagerly)
            if self.backend != 'cuda':
                raise                       # the model backend exists to find such failures
            self.failures[key] = traceback.format_exc()
            reason = str(err).splitlines()[0] if str(err) else ''
            self.log(f'CUDA graph of phase {phase["name"]} failed ({type(err).__name__}: {reason}); running it eagerly')
        finally:
            self.loss.stats = stats
        if key in self.failures:
            return run_phase(phase, self.loss, real_img, real_c, gen_z, gen_c, cur_nimg, num_gpus=1)
        self._graphs[key] = (graph, static)
        self.log(f'{"CUDA" if self.backend == "cuda" else "Op-log"} graph of phase {phase["name"]} captured'
                 + graph_key_text(key[1]))
        return self._hand_out(result)

    def _hand_out(self, result):
        """Copy a run's reported losses out of the graph's memory, report them to the stats; returns the rounds'."""
        rounds, reports = result
        tensors = {id(v): v for v in [v for _, v in reports] + [v for losses in rounds for v in losses.values()]
                   if isinstance(v, torch.Tensor)}
        copies = dict(zip(tensors, torch._foreach_mul(list(tensors.values()), 1))) if tensors else {}
        if self.loss.stats is not None:
            for name, value in reports:
                self.loss.stats.report(name, copies.get(id(value), value))
        return [{name: copies[id(value)] for name, value in losses.items()} for losses in rounds]


def graph_key_text(graph_key):
    """' (lecam on)' for a loss.graph_key() value, '' for the empty one: what tells a phase's graphs apart."""
    return f' ({", ".join(map(str, graph_key))})' if graph_key else ''


class _ReportRecorder:
    """Stands in for the stats during a capture: keeps (name, value) in report order."""

    def __init__(self):
        self.items = []

    def report(self, name, value):
        """Record one report."""
        self.items.append((name, value.detach() if isinstance(value, torch.Tensor) else value))


def update_ema_(
    G_ema,                  # the moving-average copy of G, updated in place
    G,                      # the trained generator
    beta,                   # decay per iteration: G_ema <- beta * G_ema + (1 - beta) * G
):
    """Move G_ema's parameters towards G's (one fused call for all tensors) and copy G's buffers."""
    with torch.no_grad():
        torch._foreach_lerp_(list(G_ema.parameters()), list(G.parameters()), 1 - beta)
        torch._foreach_copy_(list(G_ema.buffers()), list(G.buffers()))


def ada_adjust_(
    augment_pipe,           # AugmentPipe whose p is moved in place
    real_sign_sum,          # sum of sign(D(real)) over the interval, 0-dim tensor on p's device
    real_sign_count,        # number of logits in that sum
    target,                 # ADA target for r_t = E[sign(D(real))]
    step,                   # how far p moves per adjustment
):
    """Move p one step towards the target overfitting heuristic, on the device; returns r_t (0-dim tensor)."""
    r_t = real_sign_sum / real_sign_count
    direction = torch.sign(r_t - target).to(augment_pipe.p.dtype)
    # p is a probability: kept in [0, 1] (NVIDIA only bounds it below).
    augment_pipe.p.copy_((augment_pipe.p + direction * step).clamp(0, 1))
    return r_t


class _SkipSampler:
    """Iterates a sampler from position `skip` on (indices only: no images are loaded to skip)."""

    def __init__(self, sampler, skip):
        self.sampler = sampler
        self.skip = skip

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)


def _numpy_rng_state(rnd):
    """RandomState state as tensors and numbers (pickles may hold no numpy arrays)."""
    name, key, pos, has_gauss, cached = rnd.get_state()
    return dict(name=name, key=torch.from_numpy(key.astype(np.int64)), pos=int(pos), has_gauss=int(has_gauss), cached=float(cached))


def _numpy_rng_tuple(state):
    """Inverse of _numpy_rng_state."""
    return (state['name'], state['key'].numpy().astype(np.uint32), state['pos'], state['has_gauss'], state['cached'])


def _any_process(flag, num_gpus):
    """True when `flag` is true on any process (an all-reduce with several)."""
    if num_gpus <= 1:
        return bool(flag)
    return bool(all_reduce_sum_(torch.tensor([1.0 if flag else 0.0])).item() > 0)


def _replicas_in_sync(modules, num_gpus):
    """True when every process holds bit-identical parameters and buffers (w_avg excepted)."""
    # w_avg tracks each process's own batches, as in NVIDIA's code; rank 0's copy is the one saved.
    tensors = [t for m in modules for name, t in list(m.named_parameters()) + list(m.named_buffers())
               if t.numel() > 0 and not name.endswith('w_avg')]
    flat = torch.cat([t.detach().flatten().to(torch.float64).cpu() for t in tensors])
    digest = torch.stack([flat.sum(), (flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64).sin()).sum()])
    digest = digest.to(collective_device())
    gathered = [torch.zeros_like(digest) for _ in range(num_gpus)]
    torch.distributed.all_gather(gathered, digest)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def setup_snapshot_image_grid(training_set, grid_size, random_seed=0):
    """Indices of real images for the snapshot grid: random, or grouped by label when conditional."""
    rnd = np.random.RandomState(random_seed)
    gw, gh = grid_size
    if not training_set.has_labels:
        order = rnd.permutation(len(training_set)) if len(training_set) >= gw * gh else rnd.randint(len(training_set), size=gw * gh)
        return [int(i) for i in order[:gw * gh]]
    # One row per label (cycling), as many images per row as fit.
    by_label = {}
    for idx in range(len(training_set)):
        by_label.setdefault(int(np.argmax(training_set.get_label(idx))), []).append(idx)
    keys = sorted(by_label)
    indices = []
    for row in range(gh):
        members = by_label[keys[row % len(keys)]]
        rnd.shuffle(members)
        indices += [members[i % len(members)] for i in range(gw)]
    return indices


class _TickLog:
    """Writes log lines to stdout and log.txt, stats to stats.jsonl, and (when tensorboard is installed) the stats and
    metric results as TensorBoard events in the run folder; rank 0 only."""

    def __init__(self, run_dir, rank):
        self.run_dir = run_dir
        self.rank = rank
        self._events = None             # torch.utils.tensorboard.SummaryWriter while open

    def line(self, text):
        if self.rank != 0:
            return
        print(text, flush=True)
        self._append('log.txt', text + '\n')

    def open_events(self):
        """Start a TensorBoard events file in the run folder, or say in one line that tensorboard is not installed."""
        if self.rank != 0 or self._events is not None:
            return
        try:
            # Imported here: tensorboard is optional (pip install tensorboard), and pulls in protobuf when present.
            from torch.utils.tensorboard import SummaryWriter  # pylint: disable=import-outside-toplevel
        except ImportError as exc:
            # ImportError covers a missing package and an unusable one (torch refuses tensorboard < 1.15).
            self.line(f'TensorBoard events not written: tensorboard cannot be imported ({exc}); pip install tensorboard')
            return
        self._events = SummaryWriter(log_dir=self.run_dir)

    def stats(self, record, global_step):
        """Append a tick's record to stats.jsonl and its scalars (a statistic's mean) as events at global_step."""
        if self.rank != 0:
            return
        self._append('stats.jsonl', json.dumps(record) + '\n')
        if self._events is not None:
            for name, value in record.items():
                if name != 'timestamp':
                    value = value['mean'] if isinstance(value, dict) else value
                    self._events.add_scalar(name, value, global_step=global_step, walltime=record['timestamp'])
            self._events.flush()

    def metric(self, results, global_step):
        """Write a metric's results ({name: value}) as events Metrics/<name> at global_step."""
        if self.rank != 0 or self._events is None:
            return
        walltime = time.time()
        for name, value in results.items():
            self._events.add_scalar(f'Metrics/{name}', value, global_step=global_step, walltime=walltime)
        self._events.flush()

    def close(self):
        """Flush and close the events file (its writer thread ends)."""
        if self._events is not None:
            self._events.close()
            self._events = None

    def _append(self, name, text):
        path = os.path.join(self.run_dir, name)
        with disk_full_as_user_error(path, needed=len(text.encode())), open(path, 'a') as f:
            f.write(text)


def training_loop(
    run_dir                 = '.',          # output folder (log, stats, snapshots, grids)
    training_set_kwargs     = None,         # ImageFolderDataset arguments
    data_loader_kwargs      = None,         # torch DataLoader arguments (num_workers, pin_memory, ...)
    G_class                 = 'stylegan2ada.networks.Generator',     # registered generator class name
    D_class                 = 'stylegan2ada.networks.Discriminator', # registered discriminator class name
    G_kwargs                = None,         # generator arguments (img_resolution etc. filled from the dataset)
    D_kwargs                = None,         # discriminator arguments
    G_opt_kwargs            = None,         # Adam arguments for G: lr, betas, eps
    D_opt_kwargs            = None,         # Adam arguments for D
    augment_kwargs          = None,         # AugmentPipe arguments; None = no augmentation
    loss_kwargs             = None,         # StyleGAN2Loss arguments
    extra_d_terms           = (),           # DiscriminatorTerm objects (LeCam, ...)
    metrics                 = (),           # metric names evaluated at each network snapshot
    detector                = 'inception',  # feature detector for the metrics
    random_seed             = 0,            # global seed
    num_gpus                = 1,            # number of processes
    rank                    = 0,            # rank of this process
    batch_size              = 4,            # total minibatch over all processes
    batch_gpu               = 4,            # minibatch per process and round
    ema_kimg                = 10,           # half-life of G_ema in kimg
    ema_rampup              = 0.05,         # G_ema half-life ramp-up ratio; None = none
    G_reg_interval          = 4,            # lazy regularization interval of G; None = every step (Gboth)
    D_reg_interval          = 16,           # lazy regularization interval of D; None = every step (Dboth)
    augment_p               = 0,            # initial augmentation probability
    ada_target              = None,         # ADA target for r_t; None = fixed p
    ada_interval            = 4,            # steps between ADA adjustments
    ada_kimg                = 500,          # kimg for p to go from 0 to 1 at most
    total_kimg              = 25000,        # training length in kimg
    kimg_per_tick           = 4,            # progress report interval in kimg
    image_snapshot_ticks    = 50,           # fakes grid every N ticks; None = never
    network_snapshot_ticks  = 50,           # network pickle every N ticks; None = only at the end
    keep_snapshots          = None,         # keep the newest N network pickles (and the best by metrics[0]); None = all
    image_grid_size         = None,         # (columns, rows) of the fakes grid; None = fit ~64 images
    resume_pkl              = None,         # pickle to start from; None = from scratch
    resume_mode             = 'auto',       # 'full' = restore progress, 'weights' = fine-tune, 'auto' = full if the pickle has progress
    resume_partial          = False,        # copy only the tensors whose names and shapes match; False = every tensor or an error
    phase_graphs            = None,         # 'cuda' = replay each phase as a CUDA graph (one GPU); 'oplog' = their model (tests); None = eager
    cudnn_benchmark         = True,         # torch.backends.cudnn.benchmark
    allow_tf32              = False,        # TF32 matmul/conv on Ampere+
    device                  = 'cpu',        # torch device
    progress_callback       = None,         # called as f(cur_nimg, total_nimg) each tick; None = nothing
    stop_requested          = None,         # () -> bool: stop with a final snapshot (checked by every process); None = never
    training_options        = None,         # plain dict saved in every snapshot (the run's settings); None = none
):
    """Train a GAN and write snapshots into run_dir; returns the path of the final snapshot."""
    start_time = time.time()
    device = torch.device(device)
    if phase_graphs not in (None, *graph_backends.BACKENDS):
        raise ValueError(f'phase_graphs must be None or one of {graph_backends.BACKENDS}, got {phase_graphs!r}')
    if phase_graphs == 'cuda' and (device.type != 'cuda' or num_gpus != 1):
        raise UserError(f'CUDA graphs need one CUDA device (here: {num_gpus} process(es) on {device.type})')
    np.random.seed(random_seed * num_gpus + rank)
    torch.manual_seed(random_seed * num_gpus + rank)
    label_rnd = np.random.RandomState(random_seed * num_gpus + rank)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = cudnn_benchmark
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        torch.backends.cudnn.allow_tf32 = allow_tf32
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        # Left by a run killed while writing a snapshot, a grid or a report: one run writes here at a time.
        remove_stale_temp_files(run_dir, '')
    log = _TickLog(run_dir, rank)

    # Data.
    training_set = ImageFolderDataset(**training_set_kwargs)
    rounds = batch_size // (batch_gpu * num_gpus)
    log.line(f'Dataset: {training_set.name}: {len(training_set)} images, shape {list(training_set.image_shape)}, '
             f'label dim {training_set.label_dim}')

    # Networks.
    common = dict(c_dim=training_set.label_dim, img_resolution=training_set.resolution, img_channels=training_set.num_channels)
    G = pickles.MODULE_CLASSES[G_class](**dict(G_kwargs or {}), **common).train().requires_grad_(False).to(device)
    D = pickles.MODULE_CLASSES[D_class](**dict(D_kwargs or {}), **common).train().requires_grad_(False).to(device)
    G_ema = copy.deepcopy(G).eval()

    augment_pipe = None
    if augment_kwargs is not None:
        augment_pipe = AugmentPipe(**augment_kwargs).train().requires_grad_(False).to(device)
        augment_pipe.p.copy_(torch.as_tensor(augment_p))
        enabled = [name for name, value in augment_kwargs.items() if name in AUGMENT_TRANSFORMS and value]
        log.line(f'Augmentations: {", ".join(enabled)} (p {augment_p:g}{", ADA target " + format(ada_target, "g") if ada_target is not None else ", fixed"})')

    stats = StatsCollector()
    loss = StyleGAN2Loss(G=G, D=D, augment_pipe=augment_pipe, extra_d_terms=extra_d_terms, stats=stats, **(loss_kwargs or {}))

    phases = build_phases(G, D, G_opt_kwargs, D_opt_kwargs, G_reg_interval, D_reg_interval, device,
                          capturable=phase_graphs == 'cuda')
    graphs = PhaseGraphs(loss, backend=phase_graphs, log=log.line) if phase_graphs is not None else None
    optimizers = {'G': phases[0]['opt'], 'D': phases[-1]['opt']}

    # Resume.
    cur_nimg, cur_tick, batch_idx = 0, 0, 0
    resume_rng = None
    if resume_pkl is not None:
        log.line(f'Resuming from "{resume_pkl}"')
        resume_data = pickles.load_network_pkl(resume_pkl)
        for name, module in [('G', G), ('D', D), ('G_ema', G_ema)]:
            if resume_data.get(name) is None:
                raise pickles.NetworkPickleError(f'{resume_pkl}: the pickle has no {name}')
            skipped = copy_params_and_buffers(resume_data[name], module, require_all=not resume_partial,
                                              source=f'{resume_pkl}: {name}')
            if skipped:
                log.line(f'  {name}: {len(skipped)} tensors not in the pickle or of another shape, kept as initialised '
                         f'(partial transfer): {skipped[:4]}{"..." if len(skipped) > 4 else ""}')
        progress = resume_data.get('progress')
        if resume_mode == 'full' and progress is None:
            raise pickles.NetworkPickleError(f'{resume_pkl}: --resume-mode full needs one of our snapshots (this pickle has no training progress)')
        if progress is not None and resume_mode in ('auto', 'full'):
            cur_nimg, cur_tick, batch_idx = progress['cur_nimg'], progress['cur_tick'], progress['batch_idx']
            for key, opt in optimizers.items():
                if progress['optimizers'].get(key) is not None:
                    opt.load_state_dict(progress['optimizers'][key])
            loss.load_state_dict(progress['loss'])
            if augment_pipe is not None and progress.get('augment_p') is not None:
                augment_pipe.p.copy_(torch.as_tensor(progress['augment_p']))
            resume_rng = progress.get('rng', {}).get(rank)
            log.line(f'  continuing at kimg {cur_nimg / 1000:.3f} (tick {cur_tick}), augment p {float(augment_pipe.p) if augment_pipe is not None else 0:.3f}')
        else:
            log.line('  fine-tuning: weights copied, progress starts at 0')
        del resume_data

    if num_gpus > 1:
        for module in [G, D, G_ema, augment_pipe]:
            if module is not None:
                _broadcast_module(module)

    # Data order continues where a resumed run stopped: the sampler skips the images already drawn.
    sampler = InfiniteSampler(training_set, rank=rank, num_replicas=num_gpus, seed=random_seed)
    loader_kwargs = dict(data_loader_kwargs or {})
    loader_kwargs['worker_init_fn'] = worker_init_ignoring_stop_signals(loader_kwargs.get('worker_init_fn'))  # see util
    loader = torch.utils.data.DataLoader(training_set, sampler=_SkipSampler(sampler, batch_idx * rounds * batch_gpu),
                                         batch_size=batch_gpu, **loader_kwargs)
    training_set_iterator = iter(loader)
    if resume_rng is not None:
        # Restored after the loader is built, because building it draws from the torch RNG.
        torch.set_rng_state(resume_rng['torch'])
        label_rnd.set_state(_numpy_rng_tuple(resume_rng['label']))

    # Snapshot grids.
    grid_size = tuple(image_grid_size) if image_grid_size else grid_size_for(min(64, max(len(training_set), 16)), max_width=8)
    grid_indices = setup_snapshot_image_grid(training_set, grid_size, random_seed)
    grid_z = torch.randn([len(grid_indices), G.z_dim], generator=torch.Generator().manual_seed(random_seed)).to(device)
    grid_c = torch.from_numpy(np.stack([training_set.get_label(i) for i in grid_indices])).to(device)

    def save_fakes(name):
        if rank != 0:
            return
        with torch.no_grad():
            images = torch.cat([to_uint8(G_ema(z, c, noise_mode='const')).cpu()
                                for z, c in zip(grid_z.split(batch_gpu), grid_c.split(batch_gpu))])
        save_image_grid(images, os.path.join(run_dir, name), grid_size)

    if rank == 0 and cur_nimg == 0:
        reals = np.stack([training_set[i][0] for i in grid_indices])
        save_image_grid(reals, os.path.join(run_dir, 'reals.png'), grid_size)
        save_fakes('fakes_init.png')

    def snapshot_data(next_tick):
        return dict(
            G=G, D=D, G_ema=G_ema, augment_pipe=augment_pipe,
            training_set_kwargs=dict(training_set_kwargs),
            progress=dict(
                cur_nimg=cur_nimg, cur_tick=next_tick, batch_idx=batch_idx,
                augment_p=float(augment_pipe.p) if augment_pipe is not None else None,
                optimizers={k: opt.state_dict() for k, opt in optimizers.items()},
                loss=loss.state_dict(),
                rng={rank: dict(torch=torch.get_rng_state(), label=_numpy_rng_state(label_rnd))},
                G_class=G_class, D_class=D_class,
                training_options=training_options,
            ),
        )

    def save_snapshot(next_tick):
        # next_tick: the tick a resumed run starts with (cur_tick + 1 at the end of a tick).
        path = os.path.join(run_dir, f'network-snapshot-{cur_nimg // 1000:06d}.pkl')
        if rank == 0:
            pickles.save_network_pkl(path, snapshot_data(next_tick))
        return path

    # The metrics' detector is loaded once (and fails now, not at the first snapshot, if it is missing).
    if metrics:
        detector = resolve_detector(detector, progress=(rank == 0))

    # Non-finite losses and ADA's sign statistics, watched on the device and read once per tick / ADA interval.
    watch = LossWatch()

    total_nimg = int(total_kimg * 1000)
    tick_start_nimg = cur_nimg
    tick_start_time = time.time()
    maintenance_time = tick_start_time - start_time
    log.line(f'Training for {total_kimg} kimg on {num_gpus} process(es), device {device}, batch {batch_size} ({batch_gpu} per process and round)...')
    snapshot_pkl = None
    log.open_events()   # closed in the finally below, whatever ends the run

    try:
        while True:
            # Fetch data for every phase: reals shared, fresh latents per phase. Copies are asynchronous (the loader
            # pins its batches on CUDA), so the host does not wait for the GPU here.
            phase_real_img, phase_real_c = [], []
            for _ in range(rounds):
                img, c = next(training_set_iterator)
                phase_real_img.append(img.to(device, non_blocking=True).to(torch.float32) / 127.5 - 1)
                phase_real_c.append(c.to(device, non_blocking=True))
            all_gen_z = torch.randn([len(phases), rounds, batch_gpu, G.z_dim], device=device)
            labels = [training_set.get_label(label_rnd.randint(len(training_set))) for _ in range(len(phases) * rounds * batch_gpu)]
            all_gen_c = torch.from_numpy(np.stack(labels)).to(device, non_blocking=True).reshape(len(phases), rounds, batch_gpu, -1)

            run_phases(phases, loss, batch_idx, phase_real_img, phase_real_c, all_gen_z, all_gen_c, cur_nimg, num_gpus, watch,
                       graphs=graphs)

            # G_ema: exponential moving average with a half-life in images, ramped up early on.
            ema_nimg = ema_kimg * 1000
            if ema_rampup is not None:
                ema_nimg = min(ema_nimg, cur_nimg * ema_rampup)
            update_ema_(G_ema, G, beta=0.5 ** (batch_size / max(ema_nimg, 1e-8)))

            cur_nimg += batch_size
            batch_idx += 1

            # ADA: move p towards the target overfitting heuristic r_t = E[sign(D(real))], without leaving the device.
            if ada_target is not None and augment_pipe is not None and batch_idx % ada_interval == 0:
                sign_sum, sign_count = watch.take_real_signs()
                if sign_count > 0:
                    if num_gpus > 1:
                        all_reduce_sum_(sign_sum)
                        sign_count *= num_gpus                      # every process sees the same number of logits
                    r_t = ada_adjust_(augment_pipe, sign_sum, sign_count, ada_target,
                                      step=(batch_size * ada_interval) / (ada_kimg * 1000))
                    stats.report('Progress/ada_rt', r_t)

            # A stop asked for by a signal: every process must agree, or some would wait in a collective for ever.
            # One process checks its flag each iteration; several combine theirs every STOP_CHECK_INTERVAL iterations
            # (an all-reduce the host reads: kept rare, the one host synchronisation outside the tick).
            if stop_requested is not None and (num_gpus == 1 or batch_idx % STOP_CHECK_INTERVAL == 0):
                if _any_process(stop_requested(), num_gpus):
                    raise KeyboardInterrupt

            done = cur_nimg >= total_nimg
            if not done and cur_tick != 0 and cur_nimg < tick_start_nimg + kimg_per_tick * 1000:
                continue

            # Tick: check, report, snapshot, evaluate. Reading the loss flags waits for the GPU: once per tick.
            non_finite = watch.non_finite(num_gpus)
            if non_finite:
                # Every process stops together: one raising alone would leave the others waiting in all-reduce.
                raise TrainingDivergedError(f'non-finite {non_finite[0]} at tick {cur_tick} (kimg {cur_nimg / 1000:.3f})'
                                            f'{f" and {len(non_finite) - 1} more" if len(non_finite) > 1 else ""}; '
                                            f'lower the learning rate or gamma, or check the data')
            tick_end_time = time.time()
            global_step = int(cur_nimg / 1e3)      # TensorBoard's step: whole kimg, as NVIDIA's events count it
            tick_time = tick_end_time - tick_start_time
            sec_per_kimg = tick_time / max(cur_nimg - tick_start_nimg, 1) * 1000
            eta = (total_nimg - cur_nimg) / 1000 * sec_per_kimg if cur_tick > 0 or done else float('nan')
            cpu_mem = psutil.Process(os.getpid()).memory_info().rss / 2 ** 30
            # Peaks of this tick: memory held by tensors (allocated) and by PyTorch's caching allocator (reserved,
            # about what nvidia-smi shows).
            gpu_mem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == 'cuda' else 0.0
            gpu_reserved = torch.cuda.max_memory_reserved(device) / 2 ** 30 if device.type == 'cuda' else 0.0
            if device.type == 'cuda':
                torch.cuda.reset_peak_memory_stats(device)
            p_now = float(augment_pipe.p) if augment_pipe is not None else 0.0
            stats.report('Progress/augment', p_now)
            fields = [
                f'tick {cur_tick:<5d}', f'kimg {cur_nimg / 1000:<8.3f}', f'time {format_duration(tick_end_time - start_time):<10s}',
                f'sec/tick {tick_time:<7.1f}', f'sec/kimg {sec_per_kimg:<7.2f}', f'eta {format_duration(eta):<10s}',
                f'augment {p_now:.3f}', f'cpumem {cpu_mem:.2f}',
            ] + ([f'gpumem {gpu_mem:.2f}', f'reserved {gpu_reserved:.2f}'] if device.type == 'cuda' else [])
            log.line(' '.join(fields))

            if image_snapshot_ticks is not None and (done or cur_tick % image_snapshot_ticks == 0):
                save_fakes(f'fakes{cur_nimg // 1000:06d}.png')
            if (network_snapshot_ticks is not None and cur_tick % network_snapshot_ticks == 0) or done:
                if num_gpus > 1:
                    in_sync = _replicas_in_sync([G, D, G_ema], num_gpus)
                    log.line('  replicas in sync' if in_sync else '  replicas NOT in sync')
                    if not in_sync:
                        raise RuntimeError(f'the {num_gpus} training processes hold different weights at tick {cur_tick}')
                snapshot_pkl = save_snapshot(cur_tick + 1)
                if metrics:
                    _evaluate(metrics, G_ema, training_set_kwargs, detector, num_gpus, rank, device, run_dir, snapshot_pkl, log,
                              global_step)
                if keep_snapshots is not None and rank == 0:
                    # After the metrics: the new snapshot's value decides which one is the best.
                    removed, best = prune_snapshots(run_dir, keep_snapshots, metrics[0] if metrics else None)
                    if removed:
                        log.line(f'  removed {", ".join(removed)} (keeping the newest {keep_snapshots}'
                                 f'{f" and the best by {metrics[0]}, {best}" if best else ""})')

            collected = stats.collect(all_reduce=num_gpus > 1)
            record = {name: value for name, value in collected.items()}
            record.update({
                'Progress/tick': cur_tick, 'Progress/kimg': cur_nimg / 1000, 'Progress/augment': p_now,
                'Timing/total_sec': tick_end_time - start_time, 'Timing/sec_per_tick': tick_time,
                'Timing/sec_per_kimg': sec_per_kimg, 'Timing/maintenance_sec': maintenance_time,
                'Resources/cpu_mem_gb': cpu_mem, 'Resources/gpu_mem_gb': gpu_mem, 'Resources/gpu_reserved_gb': gpu_reserved,
                'timestamp': time.time(),
            })
            log.stats(record, global_step)
            if progress_callback is not None:
                progress_callback(cur_nimg, total_nimg)

            cur_tick += 1
            tick_start_nimg = cur_nimg
            tick_start_time = time.time()
            maintenance_time = tick_start_time - tick_end_time
            if done:
                break
    except KeyboardInterrupt:
        snapshot_pkl = save_snapshot(cur_tick)
        log.line(f'Interrupted at kimg {cur_nimg / 1000:.3f}; snapshot written to {snapshot_pkl}')
        raise TrainingInterrupted(snapshot_pkl) from None
    finally:
        # Ends the DataLoader workers now, whatever stopped the run (a full disk, a bug): the exception's traceback
        # would otherwise keep this frame, and with it the iterator and its workers, alive until the process exits.
        training_set_iterator = None
        log.close()

    log.line('Exiting...')
    return snapshot_pkl


def _evaluate(metrics, G_ema, training_set_kwargs, detector, num_gpus, rank, device, run_dir, snapshot_pkl, log, global_step):
    """Run each metric on the snapshot's G_ema, append it to metric-<name>.jsonl and write it as TensorBoard events."""
    for metric in metrics:
        result = metric_main.calc_metric(metric=metric, G=G_ema, dataset_kwargs=training_set_kwargs, detector=detector,
                                         num_gpus=num_gpus, rank=rank, device=device)
        if rank == 0:
            metric_main.report_metric(result, run_dir=run_dir, snapshot_pkl=snapshot_pkl)
            log.metric(result['results'], global_step)
            log.line(f'  {metric}: ' + ', '.join(f'{k} {v:.4f}' for k, v in result['results'].items()))
