"""Time full StyleGAN2-ADA training iterations with the training loop's own iteration code.

An iteration is what `stylegan2ada/training_loop.py` runs: every due phase (Gmain, Greg every 4, Dmain, Dreg every 16)
through `run_phases` (forward, backward, gradient reduction, Adam step, the device-side loss watch and stats), then the
G_ema update; only the data loader is replaced by random images made on the device. One warm-up iteration (batch_idx 0,
all phases; cuDNN autotuning on CUDA) runs untimed; the timed iterations are batch_idx 1..iters, so with iters a
multiple of 16 every phase runs at exactly its long-run rate.

Presets: `small` (the CPU benchmark of docs/benchmarks.md; --res 32 / 64), `auto256` (NVIDIA's --cfg auto at 256 px on
one GPU: z/w 512, 2 mapping layers, channel_base 16384, channel_max 512, fp16 on the 4 highest resolutions, conv_clamp
256, r1_gamma 0.8192, pl_weight 2, batch 16, mbstd group 4), `tiny` (16 px, a few channels: CI checks the script).
Options given on the command line override the preset.

--p takes one probability or a list (0,0.2,0.6): each is timed on the same networks. --graphs takes one way of running
the phases or a list: off (eagerly), cuda (each phase replayed as a CUDA graph, as `train.py --cuda-graphs`), oplog
(their CPU model: a check of the code path, not a speed-up); each gets its own networks, built from the same seed, and
its phases are captured in untimed warm-up iterations (batch_idx 0..16, so that Dreg is captured too). --profile N adds a torch.profiler
table of N iterations (sorted by self device time on CUDA, self CPU time on CPU) at the first p > 0. --doc FILE writes
the results into FILE between `<!-- bench-train-step:<device type>:begin/end -->` markers (what `make bench-gpu` does).
The last line printed is `images/s <number>` (median over --repeats, of the last p of the last --graphs mode).

Examples:
    python bench/train_step.py --res 64 --threads 1 --repeats 3
    python bench/train_step.py --preset auto256 --device cuda --p 0,0.2,0.6 --profile 4 --doc docs/benchmarks.md
"""

import contextlib
import copy
import datetime
import os
import platform
import re
import resource
import statistics
import sys
import time
import warnings

import click
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from stylegan2ada.augment import PRESETS as AUGMENT_PRESETS, AugmentPipe  # noqa: E402
from stylegan2ada.loss import StyleGAN2Loss  # noqa: E402
from stylegan2ada.networks import Discriminator, Generator  # noqa: E402
from stylegan2ada.ops import default_impl  # noqa: E402
from stylegan2ada.training_loop import LossWatch, PhaseGraphs, build_phases, graph_key_text, run_phases, update_ema_  # noqa: E402
from stylegan2ada.training_stats import StatsCollector  # noqa: E402

PRESETS = {
    'small':   dict(res=32,  zdim=128, cbase=4096,  cmax=128, fp16_res=0, conv_clamp=None, batch=8,  gamma=0.01),
    'auto256': dict(res=256, zdim=512, cbase=16384, cmax=512, fp16_res=4, conv_clamp=256,  batch=16, gamma=0.0002 * 256 ** 2 / 16),
    'tiny':    dict(res=16,  zdim=32,  cbase=256,   cmax=16,  fp16_res=0, conv_clamp=None, batch=8,  gamma=0.01),
}
COMMON = dict(map=2, pl_weight=2, lr=0.0025, mbstd=4, augpipe='bgc')
EMA_BETA = 0.999                                                    # a fixed G_ema decay: its value does not change the cost
DOC_MARKER = 'bench-train-step'
GRAPH_MODES = ('off', 'cuda', 'oplog')
GRAPH_WARMUP_ITERS = 17                                             # batch_idx 0..16: every phase eager once, then captured


def build_training_state(c, device, graphs='off'):
    """Networks, loss (with stats), augment pipe, phases, loss watch and graph runner as training_loop.py builds them."""
    torch.manual_seed(c['seed'])
    common = dict(c_dim=0, img_resolution=c['res'], img_channels=3)
    sizes = dict(channel_base=c['cbase'], channel_max=c['cmax'], num_fp16_res=c['fp16_res'], conv_clamp=c['conv_clamp'])
    nhwc = dict(fp16_channels_last=True) if c['nhwc'] else {}       # train.py --nhwc
    G = Generator(z_dim=c['zdim'], w_dim=c['zdim'], mapping_kwargs=dict(num_layers=c['map']), synthesis_kwargs=dict(sizes, **nhwc),
                  **common).train().requires_grad_(False).to(device)
    D = Discriminator(architecture='resnet', epilogue_kwargs=dict(mbstd_group_size=min(c['mbstd'], c['batch'])), block_kwargs=nhwc,
                      **sizes, **common).train().requires_grad_(False).to(device)
    G_ema = copy.deepcopy(G).eval()
    augment_pipe = AugmentPipe(**AUGMENT_PRESETS[c['augpipe']]).train().requires_grad_(False).to(device)
    stats = StatsCollector()
    loss = StyleGAN2Loss(G=G, D=D, augment_pipe=augment_pipe, r1_gamma=c['gamma'], pl_weight=c['pl_weight'], stats=stats)
    adam = dict(lr=c['lr'], betas=[0, 0.99], eps=1e-8)
    phases = build_phases(G, D, adam, adam, G_reg_interval=4, D_reg_interval=16, device=device, capturable=graphs == 'cuda')
    runner = PhaseGraphs(loss, backend=graphs, log=lambda line: print('  ' + line, flush=True)) if graphs != 'off' else None
    return dict(G=G, D=D, G_ema=G_ema, augment_pipe=augment_pipe, loss=loss, stats=stats, phases=phases, watch=LossWatch(),
                graphs=runner)


def train_iteration(state, batch_idx, batch, device):
    """One training iteration: every due phase through the loop's run_phases, then the G_ema update."""
    G, phases = state['G'], state['phases']
    real_img = [torch.rand([batch, G.img_channels, G.img_resolution, G.img_resolution], device=device) * 2 - 1]
    real_c = [torch.zeros([batch, 0], device=device)]
    gen_z = torch.randn([len(phases), 1, batch, G.z_dim], device=device)
    gen_c = torch.zeros([len(phases), 1, batch, 0], device=device)
    run_phases(phases, state['loss'], batch_idx, real_img, real_c, gen_z, gen_c, cur_nimg=batch_idx * batch, num_gpus=1,
               watch=state['watch'], graphs=state['graphs'])
    update_ema_(state['G_ema'], G, EMA_BETA)


def _end_of_tick(state):
    """What the loop does once per tick: read the loss flags and collect the stats (one synchronisation)."""
    bad = state['watch'].non_finite(num_gpus=1)
    if bad:
        raise click.ClickException(f'non-finite {bad[0]} during the benchmark')
    state['watch'].take_real_signs()
    state['stats'].collect(all_reduce=False)


def _synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _peak_memory(device):
    """(allocated GiB, reserved GiB) peaks on CUDA since the last reset; (process peak RSS GiB, None) on CPU."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 30, torch.cuda.max_memory_reserved(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, None


def time_iterations(state, c, device, batch_idx):
    """Time c['repeats'] blocks of c['iters'] iterations; returns ([(images/s, CPU s/iteration)], next batch_idx)."""
    results = []
    for _ in range(c['repeats']):
        _synchronize(device)
        t0, cpu0 = time.perf_counter(), time.process_time()
        for _ in range(c['iters']):
            train_iteration(state, batch_idx, c['batch'], device)
            batch_idx += 1
        _synchronize(device)
        # Process CPU time sums all threads; on a shared machine it is steadier than the wall clock.
        results.append((c['batch'] * c['iters'] / (time.perf_counter() - t0), (time.process_time() - cpu0) / c['iters']))
        _end_of_tick(state)
    return results, batch_idx


def count_host_syncs(state, c, device, batch_idx, iters=2):
    """Host synchronisations per iteration reported by CUDA's sync debug mode (None off CUDA)."""
    if device.type != 'cuda':
        return None, []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        try:
            for i in range(iters):
                train_iteration(state, batch_idx + i, c['batch'], device)
        finally:
            torch.cuda.set_sync_debug_mode('default')
    _synchronize(device)
    # Each synchronising call warns 'called a synchronizing CUDA operation'; the mode's own notice does not count.
    syncs = [str(w.message) for w in caught if 'called a synchronizing' in str(w.message)]
    return len(syncs) / iters, sorted(set(syncs))[:5]


def profile_iterations(state, c, device, batch_idx, iters):
    """torch.profiler table of `iters` iterations, sorted by self device time (CUDA) or self CPU time."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == 'cuda':
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for i in range(iters):
            train_iteration(state, batch_idx + i, c['batch'], device)
        _synchronize(device)
    averages = prof.key_averages()
    if device.type == 'cuda':
        key = 'self_device_time_total' if averages and hasattr(averages[0], 'self_device_time_total') else 'self_cuda_time_total'
    else:
        key = 'self_cpu_time_total'
    return key, averages.table(sort_by=key, row_limit=c['profile_rows'], max_name_column_width=60)


def check_graphs(c, device, mode):
    """Largest relative difference of G, D and G_ema after c['check_graphs'] iterations through `mode` graphs and eagerly.

    Both runs start from the same seed (same networks, images and latents) at the last p. The model backend gives 0
    exactly; on CUDA nondeterministic kernels (atomic adds in backward passes) leave differences of float rounding.
    """
    final = {}
    for run_mode in ('off', mode):
        state = build_training_state(c, device, graphs=run_mode)
        state['augment_pipe'].skip_at_p0 = False                    # as under graphs, so that both runs do the same work
        state['augment_pipe'].p.fill_(c['p'][-1])
        for batch_idx in range(c['check_graphs']):
            train_iteration(state, batch_idx, c['batch'], device)
        _end_of_tick(state)
        final[run_mode] = {name: [t.detach().float().clone() for t in state[name].state_dict().values()]
                           for name in ('G', 'D', 'G_ema')}
        del state
    return {name: max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)) for a, b in zip(final[mode][name], final['off'][name])
                      if b.numel() > 0)
            for name in final['off']}


def device_description(device):
    """Device, torch, CUDA, Triton and Python versions in one line."""
    parts = [torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU ({platform.processor() or platform.machine()}, '
             f'{os.cpu_count()} cores, {torch.get_num_threads()} threads)', f'torch {torch.__version__}']
    if device.type == 'cuda':
        parts.append(f'CUDA {torch.version.cuda}')
        with contextlib.suppress(ImportError):
            import triton  # pylint: disable=import-outside-toplevel  (optional: only its version is reported)
            parts.append(f'triton {triton.__version__}')
    parts.append(f'Python {platform.python_version()}')
    return ', '.join(parts)


def format_doc_section(c, device, rows, syncs, profile, parity):
    """Markdown of one make bench-gpu run: settings, the table per p, syncs and the top of the profile."""
    lines = [
        f'Measured {datetime.date.today().isoformat()} by `make bench-gpu` on {device_description(device)}: preset '
        f'`{c["preset"]}` ({c["res"]} px, batch {c["batch"]}, channel_base {c["cbase"]}, channel_max {c["cmax"]}, '
        f'fp16 on {c["fp16_res"]} resolutions{" (channels_last)" if c["nhwc"] else ""}, conv_clamp {c["conv_clamp"]}, r1_gamma {c["gamma"]:g}, pl_weight '
        f'{c["pl_weight"]:g}, {c["augpipe"]} pipe, ops impl {c["impl"]}), {c["repeats"]} x {c["iters"]} timed iterations '
        f'after one warm-up ({GRAPH_WARMUP_ITERS} with graphs: until every phase is captured), median.',
        '',
        '| graphs | augment p | images/s | s/kimg | CPU s per iteration | peak memory allocated (GiB) | peak reserved (GiB) |',
        '|---|---|---|---|---|---|---|',
    ]
    for row in rows:
        reserved = f'{row["reserved"]:.2f}' if row['reserved'] is not None else '-'
        graphs = row['graphs'] + (f' ({", ".join(row["failed"])} eager: capture failed)' if row.get('failed') else '')
        lines.append(f'| {graphs} | {row["p"]:g} | {row["rate"]:.2f} | {1000 / row["rate"]:.2f} | {row["cpu"]:.3f} | '
                     f'{row["allocated"]:.2f} | {reserved} |')
    for mode in dict.fromkeys(row['graphs'] for row in rows):
        mode_rows = [row for row in rows if row['graphs'] == mode]
        base = next((row for row in mode_rows if row['p'] == 0), None)
        if base is not None and len(mode_rows) > 1:
            overheads = ', '.join(f'p = {row["p"]:g}: {100 * (base["rate"] / row["rate"] - 1):+.1f} %' for row in mode_rows if row['p'] > 0)
            lines += ['', f'Augmentation overhead against p = 0 (time per image), graphs {mode}: {overheads}.']
    eager = {row['p']: row for row in rows if row['graphs'] == 'off'}
    speedups = [f'{row["graphs"]} at p = {row["p"]:g}: x{row["rate"] / eager[row["p"]]["rate"]:.2f}' for row in rows
                if row['graphs'] != 'off' and row['p'] in eager]
    if speedups:
        lines += ['', f'Graphs against eager (images/s ratio): {", ".join(speedups)}.']
    if device.type != 'cuda':
        lines += ['', 'On CPU the memory column is the process\'s peak resident set size.']
    if syncs is not None:
        lines += ['', f'Host synchronisations per iteration (CUDA sync debug mode): {syncs[0]:g}.']
    if parity is not None:
        mode, diffs = parity
        lines += ['', f'Graphs {mode} against eager after {c["check_graphs"]} iterations from the same seed at p = {c["p"][-1]:g}, '
                  'largest relative difference of any tensor: ' + ', '.join(f'{name} {d:.2e}' for name, d in diffs.items()) + '.']
    if profile is not None:
        key, table, p, mode = profile
        lines += ['', f'Profile at p = {p:g}, graphs {mode} ({c["profile"]} iterations, sorted by {key}):', '', '```',
                  *table.strip('\n').splitlines(), '```']
    return '\n'.join(lines)


def write_doc_section(path, device_type, body):
    """Replace (or append) the section between this device type's markers in `path`."""
    begin, end = f'<!-- {DOC_MARKER}:{device_type}:begin -->', f'<!-- {DOC_MARKER}:{device_type}:end -->'
    text = open(path, encoding='utf-8').read() if os.path.exists(path) else ''
    section = f'{begin}\n{body}\n{end}'
    pattern = re.compile(re.escape(begin) + r'.*?' + re.escape(end), re.DOTALL)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip('\n') + f'\n\n{section}\n'
    tmp = f'{path}.tmp-{os.getpid()}'
    with open(tmp, 'w', encoding='utf-8') as f:
        f.write(text)
    os.replace(tmp, path)


def parse_graph_modes(ctx, param, value):
    """'off,cuda' -> ['off', 'cuda'], each one of GRAPH_MODES."""
    modes = [v.strip() for v in value.split(',') if v.strip()]
    if not modes or any(m not in GRAPH_MODES for m in modes):
        raise click.BadParameter(f'{value!r}: expected a comma-separated list of {", ".join(GRAPH_MODES)}')
    return modes


def parse_probabilities(ctx, param, value):
    """'0,0.2,0.6' -> [0.0, 0.2, 0.6], each in [0, 1]."""
    try:
        values = [float(v) for v in value.split(',') if v.strip()]
    except ValueError:
        raise click.BadParameter(f'{value!r}: expected comma-separated numbers in [0, 1]') from None
    if not values or any(not 0 <= v <= 1 for v in values):
        raise click.BadParameter(f'{value!r}: expected comma-separated numbers in [0, 1]')
    return values


def run_benchmark(c):
    """Warm up, time each p, optionally count syncs and profile; returns (rows, syncs, profile)."""
    device = torch.device(c['device'])
    if device.type == 'cuda':
        # The training loop's settings: cuDNN autotuning on, TF32 off.
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    rows, syncs, profile = [], None, None
    for mode in c['graphs']:
        state = build_training_state(c, device, graphs=mode)
        batch_idx = 0
        for p in c['p']:
            state['augment_pipe'].p.fill_(p)
            # Warm-up, untimed: every phase (batch_idx 0; cuDNN autotuning), with graphs until every phase is captured.
            for _ in range(GRAPH_WARMUP_ITERS if mode != 'off' and batch_idx == 0 else 1):
                train_iteration(state, batch_idx, c['batch'], device)
                batch_idx += 1
            _end_of_tick(state)
            if device.type == 'cuda':
                torch.cuda.reset_peak_memory_stats(device)
            results, batch_idx = time_iterations(state, c, device, batch_idx=batch_idx)
            allocated, reserved = _peak_memory(device)
            rate = statistics.median(r for r, _ in results)
            cpu = statistics.median(t for _, t in results)
            failed = sorted({name for name, _ in state['graphs'].failures}) if state['graphs'] is not None else []
            rows.append(dict(graphs=mode, p=p, rate=rate, cpu=cpu, allocated=allocated, reserved=reserved,
                             repeats=[r for r, _ in results], failed=failed))
            print(f'graphs={mode} p={p:g}: ' + ', '.join(f'{r:.3f}' for r, _ in results) + f' images/s (median {rate:.3f}, '
                  f'{1000 / rate:.2f} s/kimg, {cpu:.3f} CPU s/iteration), peak memory {allocated:.2f} GiB'
                  + (f' allocated, {reserved:.2f} GiB reserved' if reserved is not None else ' (process RSS)'), flush=True)
        # Host synchronisations and the profile: of the first mode (eager in make bench-gpu: the kernels by name).
        if mode == c['graphs'][0] and c['sync_check'] and device.type == 'cuda':
            syncs = count_host_syncs(state, c, device, batch_idx)
            print(f'host synchronisations per iteration: {syncs[0]:g}' + ''.join(f'\n  {s}' for s in syncs[1]), flush=True)
        if mode == c['graphs'][0] and c['profile'] > 0:
            p = next((p for p in c['p'] if p > 0), c['p'][-1])
            state['augment_pipe'].p.fill_(p)
            key, table = profile_iterations(state, c, device, batch_idx, c['profile'])
            profile = (key, table, p, mode)
            print(f'profile at p={p:g}, graphs {mode}, {c["profile"]} iterations, sorted by {key}:\n{table}', flush=True)
        for (name, graph_key), trace in (state['graphs'].failures.items() if state['graphs'] is not None else ()):
            # The whole traceback, here only: what made a capture fail is rarely in its first line.
            print(f'capture of phase {name}{graph_key_text(graph_key)} failed, graphs {mode}:\n{trace}', file=sys.stderr, flush=True)
        del state                                                   # the next mode's memory is measured alone
        if device.type == 'cuda':
            torch.cuda.empty_cache()
    return rows, syncs, profile


@click.command()
# Main options.
@click.option('--preset',       help='Network and batch sizes (see the module docstring)', type=click.Choice(sorted(PRESETS)), default='small', show_default=True)
@click.option('--p',            help='Augmentation probability, or a comma-separated list', metavar='LIST', type=str, callback=parse_probabilities, default='0.2', show_default=True)
@click.option('--res',          help='Image resolution [default: the preset\'s]', metavar='INT', type=click.IntRange(min=8))
@click.option('--batch',        help='Images per iteration [default: the preset\'s]', metavar='INT', type=click.IntRange(min=1))
@click.option('--iters',        help='Timed iterations per repeat (16 = every phase at its exact rate)', metavar='INT', type=click.IntRange(min=1), default=16, show_default=True)
@click.option('--graphs',       help='Run the phases: off, cuda (CUDA graphs), oplog (their CPU model), or a list', metavar='LIST', type=str, callback=parse_graph_modes, default='off', show_default=True)
@click.option('--repeats',      help='Timed blocks; the median is reported', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True)
# Hyperparameters.
@click.option('--cbase',        help='Capacity multiplier (channel_base) [default: the preset\'s]', metavar='INT', type=click.IntRange(min=1))
@click.option('--cmax',         help='Max. feature maps [default: the preset\'s]', metavar='INT', type=click.IntRange(min=1))
@click.option('--zdim',         help='z and w dimensionality [default: the preset\'s]', metavar='INT', type=click.IntRange(min=1))
@click.option('--gamma',        help='R1 regularization weight [default: the preset\'s]', metavar='FLOAT', type=click.FloatRange(min=0))
@click.option('--pl-weight',    help='Path-length regularization weight', metavar='FLOAT', type=click.FloatRange(min=0), default=COMMON['pl_weight'], show_default=True)
@click.option('--lr',           help='Adam learning rate (before the lazy-reg adjustment)', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=COMMON['lr'], show_default=True)
@click.option('--augpipe',      help='Augmentation preset', type=click.Choice(sorted(AUGMENT_PRESETS)), default=COMMON['augpipe'], show_default=True)
# Performance-related.
@click.option('--impl',         help="Ops: 'auto' = each op's default for the device, or one path for every op", type=click.Choice(['auto', 'ref', 'fast', 'triton']), default='auto', show_default=True)
@click.option('--nhwc/--no-nhwc', help='channels_last for the fp16 layers (train.py --nhwc)', default=False, show_default=True)
@click.option('--device',       help='Torch device', metavar='STR', type=str, default='cpu', show_default=True)
@click.option('--threads',      help='torch.set_num_threads [default: torch default]', metavar='INT', type=click.IntRange(min=1))
@click.option('--seed',         help='Random seed', metavar='INT', type=int, default=0, show_default=True)
# Output.
@click.option('--profile',      help='Profile this many iterations at the first p > 0 (0 = none)', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--profile-rows', help='Rows of the profile table', metavar='INT', type=click.IntRange(min=1), default=25, show_default=True)
@click.option('--sync-check/--no-sync-check', help='Count host synchronisations per iteration (CUDA only)', default=True, show_default=True)
@click.option('--check-graphs', help='Also train this many iterations through the graphs and eagerly and compare (0 = no)', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--doc',          help='Write the results into this Markdown file (between markers)', metavar='FILE', type=click.Path(dir_okay=False))
def main(**kwargs):
    """Print the training throughput (images/s) of the engine for one configuration."""
    c = dict(COMMON, **PRESETS[kwargs['preset']])
    c.update({k: v for k, v in kwargs.items() if v is not None or k not in c})    # None = the preset's value
    c['mbstd'] = min(c['mbstd'], c['batch'])
    if c['res'] & (c['res'] - 1) != 0:
        raise click.ClickException(f'--res {c["res"]}: must be a power of two >= 8')
    if c['batch'] % c['mbstd'] != 0:
        raise click.ClickException(f'--batch {c["batch"]}: must be a multiple of the minibatch-std group size {c["mbstd"]}')
    try:
        device = torch.device(c['device'])
        torch.empty([], device=device)
    except (RuntimeError, AssertionError) as err:
        raise click.ClickException(f'--device {c["device"]}: {err}')
    if 'cuda' in c['graphs'] and device.type != 'cuda':
        raise click.ClickException(f'--graphs cuda needs --device cuda (here {device}); oplog is their CPU model')
    if c['threads'] is not None:
        torch.set_num_threads(c['threads'])
    np.random.seed(c['seed'])
    print(f'preset={c["preset"]} res={c["res"]} batch={c["batch"]} iters={c["iters"]} repeats={c["repeats"]} cbase={c["cbase"]} '
          f'cmax={c["cmax"]} fp16_res={c["fp16_res"]} nhwc={c["nhwc"]} conv_clamp={c["conv_clamp"]} p={",".join(f"{p:g}" for p in c["p"])} '
          f'impl={c["impl"]} graphs={",".join(c["graphs"])} device={device} threads={torch.get_num_threads()} torch={torch.__version__}', flush=True)
    with default_impl(None if c['impl'] == 'auto' else c['impl']):
        rows, syncs, profile = run_benchmark(c)
        parity = None
        graph_mode = next((m for m in c['graphs'] if m != 'off'), None)
        if c['check_graphs'] > 0 and graph_mode is not None:
            parity = (graph_mode, check_graphs(c, device, graph_mode))
            print(f'graphs {graph_mode} against eager after {c["check_graphs"]} iterations, largest relative difference: '
                  + ', '.join(f'{name} {d:.2e}' for name, d in parity[1].items()), flush=True)
    if c['doc'] is not None:
        write_doc_section(c['doc'], device.type, format_doc_section(c, device, rows, syncs, profile, parity))
        print(f'results written to {c["doc"]}')
    print(f'images/s {rows[-1]["rate"]:.3f}')


if __name__ == '__main__':
    main()
