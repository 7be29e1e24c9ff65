"""Mutation check: plant known one-line bugs, one at a time, and make sure the tests that cover the code catch each.

    python tests/mutants.py                 # every mutant (make mutants)
    python tests/mutants.py --list          # the mutants and the tests that must catch them
    python tests/mutants.py --only lecam-anchor,kid-biased --jobs 1

Each mutant replaces one exact piece of text (found exactly once: a list out of step with the code is an error, not a
silent skip) in a copy of the tree, then runs its tests there. A mutant is caught when those tests fail; it is missed
when they pass, and the run then exits 1. The unmutated copy must pass the same tests first (else a "catch" would mean
nothing). Bytecode is never written, so a mutated file can never be shadowed by a cached .pyc of the original.

The mutants are the places where a wrong number would go unnoticed: the utility measures (CAS, gain, held-out split),
graph replay, FID/KID, the loss terms (R1, path length, LeCam), ADA, the augment pipe, the taxon classifier's metrics,
the dataset tool's de-duplication, resume of the training state, and file permissions under other umasks.
"""

import argparse
import concurrent.futures
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Mutant:
    """One planted bug: `find` (exactly once in `path`) replaced by `replace`; `tests` (pytest arguments) must fail."""
    name:       str
    path:       str                 # relative to the repository root
    find:       str
    replace:    str
    tests:      tuple               # pytest arguments: files, node ids, -k expressions
    why:        str                 # what the bug would do to the numbers


MUTANTS = (
    # The four of issue 23.
    Mutant('gain-never-adds', 'taxogan_ext/utility.py',
           'x, y = torch.cat([self.real_x, x]), torch.cat([self.real_y, y])', 'x, y = self.real_x, self.real_y',
           ('tests/test_utility.py::test_gain_of_more_real_images_is_positive_and_cas_beats_the_few_real_ones',),
           'the augmented classifier never sees a generated image: every gain is 0'),
    Mutant('utility-scores-training-set', 'taxogan_ext/utility.py',
           'return per_class_accuracy(model, self.test_x, self.test_y, len(self.targets))',
           'return per_class_accuracy(model, self.real_x, self.real_y, len(self.targets))',
           ('tests/test_utility.py::test_accuracies_are_measured_on_the_heldout_images',),
           'accuracies measured on the training images instead of the held-out ones'),
    Mutant('graphs-never-replay', 'stylegan2ada/training_loop.py',
           'return self._hand_out(graph.replay())',
           'return run_phase(phase, self.loss, real_img, real_c, gen_z, gen_c, cur_nimg, num_gpus=1)',
           ('tests/test_graphs.py::test_training_through_oplog_graphs_equals_eager_training_exactly',),
           'captured phases run eagerly: CUDA graphs claimed, never used'),
    Mutant('mode-hard-coded', 'stylegan2ada/util.py',
           'os.fchmod(fd, new_file_mode())', 'os.fchmod(fd, 0o644)',
           ('tests/test_file_modes.py', '-k', 'datasets or downloads or plan'),
           'files get 0644 whatever the umask: a private (077) collection becomes readable by everyone'),
    # FID and KID.
    Mutant('fid-trace-factor', 'stylegan2ada/metrics/distances.py',
           '- 2 * trace_sqrt_product(cov_a, cov_b))', '- trace_sqrt_product(cov_a, cov_b))',
           ('tests/test_metrics.py', '-k', 'frechet or fid'), 'FID without the factor 2 of the cross term'),
    Mutant('fid-unbiased-covariance', 'stylegan2ada/metrics/distances.py',
           'return mean, cov / n', 'return mean, cov / (n - 1)',
           ('tests/test_metrics.py', '-k', 'frechet or fid'), 'covariance divided by N - 1 (NVIDIA divides by N)'),
    Mutant('kid-biased', 'stylegan2ada/metrics/distances.py',
           '/ (m * (m - 1))', '/ (m * m)',
           ('tests/test_metrics.py', '-k', 'kid'), 'KID keeps the diagonal: a biased estimate'),
    Mutant('kid-kernel-degree', 'stylegan2ada/metrics/distances.py',
           'k_xy = (x @ y.T / dim + 1) ** 3', 'k_xy = (x @ y.T / dim + 1) ** 2',
           ('tests/test_metrics.py', '-k', 'kid'), 'the cross term with a quadratic kernel'),
    # Loss terms.
    Mutant('r1-mean', 'stylegan2ada/loss.py',
           'return grads.square().sum(dim=[1, 2, 3])', 'return grads.square().mean(dim=[1, 2, 3])',
           ('tests/test_loss.py',), 'R1 averaged over pixels: gamma off by a factor C*H*W'),
    Mutant('r1-weight', 'stylegan2ada/loss.py',
           'loss_Dr1 = penalty * (self.r1_gamma / 2)', 'loss_Dr1 = penalty * self.r1_gamma',
           ('tests/test_loss.py',), 'R1 weighted by gamma instead of gamma / 2'),
    Mutant('pl-decay', 'stylegan2ada/loss.py',
           'lerp(pl_lengths.mean(), self.pl_decay)', 'lerp(pl_lengths.mean(), 1 - self.pl_decay)',
           ('tests/test_loss.py',), 'the path-length mean jumps to each batch instead of moving slowly'),
    Mutant('pl-length', 'stylegan2ada/loss.py',
           'pl_lengths = pl_grads.square().sum(dim=2).mean(dim=1).sqrt()',
           'pl_lengths = pl_grads.square().sum(dim=2).sum(dim=1).sqrt()',
           ('tests/test_loss.py',), 'path length summed over the ws instead of averaged'),
    Mutant('lecam-anchor', 'taxogan_ext/lecam.py',
           'F.relu(real_logits - ema_fake)', 'F.relu(real_logits - ema_real)',
           ('tests/test_lecam.py',), 'real logits anchored to the real EMA instead of the fake one'),
    Mutant('lecam-ema-decay', 'taxogan_ext/lecam.py',
           'self.ema_real.lerp_(means[0], 1 - self.decay)', 'self.ema_real.lerp_(means[0], self.decay)',
           ('tests/test_lecam.py',), 'the real EMA follows the last batch instead of averaging'),
    # ADA and the augment pipe.
    Mutant('ada-direction', 'stylegan2ada/training_loop.py',
           'direction = torch.sign(r_t - target)', 'direction = torch.sign(target - r_t)',
           ('tests/test_training_iteration.py', 'tests/test_training.py', '-k', 'ada'),
           'p falls when D overfits'),
    Mutant('ada-step', 'stylegan2ada/training_loop.py',
           'step=(batch_size * ada_interval) / (ada_kimg * 1000)', 'step=batch_size / (ada_kimg * 1000)',
           ('tests/test_training.py', '-k', 'ada'), 'p moves ada_interval times slower than --ada-kimg says'),
    Mutant('augment-rotate-split', 'stylegan2ada/augment.py',
           'p_rot = 1 - (1 - p_any).clamp(0, 1).sqrt()', 'p_rot = p_any.clamp(0, 1)',
           ('tests/test_augment.py',), 'both rotations at probability p: rotation far more often than asked'),
    Mutant('augment-contrast-base', 'stylegan2ada/augment.py',
           'c = self._gate(ctx, self.contrast, torch.exp2(self._randn(ctx) * self.contrast_std), 1)',
           'c = self._gate(ctx, self.contrast, torch.exp(self._randn(ctx) * self.contrast_std), 1)',
           ('tests/test_augment.py',), 'contrast drawn log-normal in base e, not base 2'),
    # The held-out split, the utility summaries, the taxon classifier's metrics.
    Mutant('holdout-parent-keeps-heldout', 'taxogan_ext/utility.py',
           'kept, dropped = _copy_without(source.dataset_path(name), dest / taxon.dataset, drop)',
           'kept, dropped = _copy_without(source.dataset_path(name), dest / taxon.dataset, set() if taxon.children else drop)',
           ('tests/test_utility.py', '-k', 'holdout'), 'the parent trains on the held-out images'),
    Mutant('holdout-not-random', 'taxogan_ext/taxon_detector.py',
           'heldout_mask[rnd.permutation(members)[:n_held]] = True', 'heldout_mask[members[:n_held]] = True',
           ('tests/test_utility.py', '-k', 'holdout'), 'the first images of each taxon are always held out'),
    Mutant('gain-sign', 'taxogan_ext/utility.py',
           "value, low, high = mean_interval([np.nanmean(run['arm']) - np.nanmean(run['real']) for run in runs])",
           "value, low, high = mean_interval([np.nanmean(run['real']) - np.nanmean(run['arm']) for run in runs])",
           ('tests/test_utility.py',), 'a helpful generator reported as harmful'),
    Mutant('interval-normal', 'taxogan_ext/utility.py',
           'scipy.stats.t.ppf(0.5 + confidence / 2, len(values) - 1)', 'scipy.stats.norm.ppf(0.5 + confidence / 2)',
           ('tests/test_utility.py',), 'a normal interval over 3 seeds: far too narrow'),
    Mutant('acc-per-taxon', 'taxogan_ext/taxon_metrics.py',
           'per_taxon[name] = float((predicted[mask] == target[mask]).mean())',
           'per_taxon[name] = float((predicted[valid] == target[valid]).mean())',
           ('tests/test_metrics.py', '-k', 'acc'), "every taxon's acc_taxon is the overall one"),
    Mutant('class-weights-uniform', 'taxogan_ext/taxon_detector.py',
           'counts = torch.bincount(train_labels, minlength=len(class_names)).to(torch.float32)',
           'counts = torch.ones(len(class_names)) + 0 * torch.bincount(train_labels, minlength=len(class_names))',
           ('tests/test_metrics.py', '-k', 'class_weights'),
           'a 900-image order outweighs a 150-image one in every classifier'),
    # The dataset tool.
    Mutant('dedup-threshold', 'taxogan_ext/collection.py',
           'if distances[nearest] <= threshold:', 'if distances[nearest] < threshold:',
           ('tests/test_dataset_tool.py',), 'near duplicates at exactly the threshold kept'),
    Mutant('dedup-exact', 'taxogan_ext/collection.py',
           "first_by_content[facts['content']] = record.source", 'pass',
           ('tests/test_dataset_tool.py',), 'exact copies reported as near duplicates, or kept without a near check'),
    Mutant('tall-columns-short', 'taxogan_ext/collection.py',
           'return max(first - 1, 0), min(last + 2, out_size)', 'return max(first + 1, 0), min(last + 2, out_size)',
           ('tests/test_dataset_tool.py',), 'a tall image\'s first column next to the padding taken as padding'),
    Mutant('tall-upscale-support', 'taxogan_ext/collection.py',
           'support = 3.0 * max(scale, 1.0)', 'support = 3.0 * scale',
           ('tests/test_dataset_tool.py',), 'a small tall image\'s window taken as narrow as a downscale\'s'),
    Mutant('cpu-layout-nchw', 'stylegan2ada/networks.py',
           "if device.type == 'cpu' and not fused_modconv:", 'if False:',
           ('tests/test_networks.py',), 'CPU training back on NCHW, the slower layout'),
    # Resume and G_ema.
    Mutant('resume-drops-augment-p', 'stylegan2ada/training_loop.py',
           "if augment_pipe is not None and progress.get('augment_p') is not None:",
           "if augment_pipe is not None and progress.get('augment_p') is None:",
           ('tests/test_training.py', '-k', 'resume'), 'a resumed run restarts ADA from the initial p'),
    Mutant('resume-drops-loss-state', 'stylegan2ada/training_loop.py',
           "loss.load_state_dict(progress['loss'])", 'pass',
           ('tests/test_training.py', 'tests/test_lecam.py', '-k', 'resume'),
           'a resumed run forgets pl_mean and the LeCam EMAs'),
    # The checks of synthetic images (issue 19) and of long campaigns (issue 20).
    Mutant('pr-boundary', 'stylegan2ada/metrics/distances.py',
           'out[start:stop] = (block <= sq_radii[None, :]).sum(dim=1)',
           'out[start:stop] = (block < sq_radii[None, :]).sum(dim=1)',
           ('tests/test_prdc.py',), 'a point on a k-NN ball\'s boundary counted outside: a set against itself has precision < 1'),
    Mutant('mem-threshold-from-generated', 'stylegan2ada/metrics/distances.py',
           'threshold = float(np.quantile(ref_d, quantile))', 'threshold = float(np.quantile(gen_d, quantile))',
           ('tests/test_prdc.py',), 'the copy threshold taken from the generated images: every set looks 5 % copied'),
    Mutant('filter-ignores-top-class', 'taxogan_ext/taxon_metrics.py',
           'keep = (probs.argmax(dim=1) == k) & (probs[:, k] >= self.threshold)',
           'keep = probs[:, k] >= self.threshold',
           ('tests/test_synthesize.py', '-k', 'filter'), 'images the classifier assigns to another taxon kept'),
    Mutant('synth-seed-shift', 'taxogan_ext/synthesize.py',
           'return (first + index) % SEED_RANGE', 'return (first + index + 1) % SEED_RANGE',
           ('tests/test_synthesize.py', '-k', 'read_back'), 'the recorded seeds do not make the exported images'),
    Mutant('keep-snaps-one-short', 'stylegan2ada/training_loop.py',
           'kept = set(names[-keep:]) | ({best} if best else set())',
           'kept = set(names[-keep + 1:]) | ({best} if best else set())',
           ('tests/test_disk.py', '-k', 'keep'), '--keep-snaps N keeps N - 1'),
    Mutant('disk-estimate-no-ema', 'taxogan_ext/disk.py',
           'tensor_bytes = g_bytes + g_adam_bytes + d_bytes + pipe_bytes',
           'tensor_bytes = g_adam_bytes + d_bytes + pipe_bytes',
           ('tests/test_disk.py', '-k', 'estimate'), 'the pre-flight estimate forgets G_ema: too small'),
    Mutant('utility-filter-ignored', 'taxogan_ext/utility.py',
           'accept=accept[t] if flag else None, what=t)', 'accept=None, what=t)',
           ('tests/test_utility.py::test_filtered_measures_keep_the_images_the_classifier_assigns_to_their_taxon',),
           'the *_filtered measures use unfiltered images'),
    # The report's copy check, the plan across processes, the tools after training, TensorBoard.
    Mutant('closest-pairs-farthest', 'taxogan_ext/report.py',
           'order = torch.argsort(nearest)[:pairs].tolist()', 'order = torch.argsort(nearest, descending=True)[:pairs].tolist()',
           ('tests/test_report.py', '-k', 'closest'), 'the grid shows the least similar images: copies go unseen'),
    Mutant('parallel-ignores-dependencies', 'taxogan_ext/hierarchy.py',
           "return {s.key: (s.start,) if s.start_kind == 'stage' else () for s in plan.stages}",
           'return {s.key: () for s in plan.stages}',
           ('tests/test_parallel.py', '-k', 'slurm_jobs_follow'), 'children start before the stage they fine-tune from'),
    Mutant('style-mixing-columns-ignored', 'style_mixing.py',
           'mixed[:, :, index] = col_ws[None][:, :, index].expand(R, -1, -1, -1)', 'pass',
           ('tests/test_after_training.py', '-k', 'style_mixing_empty'), 'every cell is its row image'),
    Mutant('morph-blend-reversed', 'morph.py',
           'out[key] = torch.lerp(a, b, float(t)) if a.is_floating_point() else (a if t < 0.5 else b)',
           'out[key] = torch.lerp(a, b, 1 - float(t)) if a.is_floating_point() else (a if t < 0.5 else b)',
           ('tests/test_after_training.py', '-k', 'blend'), 'the morph runs from B to A'),
    Mutant('tensorboard-step-in-images', 'stylegan2ada/training_loop.py',
           'global_step = int(cur_nimg / 1e3)', 'global_step = int(cur_nimg)',
           ('tests/test_tensorboard.py', '-k', 'every_scalar'), 'events at image counts, not kimg as NVIDIA\'s'),
    Mutant('ema-beta', 'stylegan2ada/training_loop.py',
           'torch._foreach_lerp_(list(G_ema.parameters()), list(G.parameters()), 1 - beta)',
           'torch._foreach_lerp_(list(G_ema.parameters()), list(G.parameters()), beta)',
           ('tests/test_training.py', '-k', 'ema'), 'G_ema follows G almost without averaging'),
)


def tree_files(root: Path) -> list[str]:
    """The files a clone would have: tracked and untracked-but-not-ignored, that exist."""
    out = subprocess.run(['git', 'ls-files', '-co', '--exclude-standard', '-z'], cwd=root, check=True,
                         capture_output=True).stdout.decode()
    return [name for name in out.split('\0') if name and (root / name).is_file()]


def copy_tree(root: Path, files: list[str], dest: Path) -> None:
    """Copy the listed files of `root` into `dest`."""
    for name in files:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, dest / name)


def check_mutants(root: Path, mutants) -> None:
    """Every mutant's text occurs exactly once in its file, and its test files exist; SystemExit naming the first that does not."""
    for m in mutants:
        text = (root / m.path).read_text(encoding='utf-8')
        count = text.count(m.find)
        if count != 1:
            sys.exit(f'tests/mutants.py: mutant {m.name}: its text occurs {count} times in {m.path} (expected once); '
                     f'update the mutant to today\'s code')
        for arg in m.tests:
            if arg.startswith('tests/') and not (root / arg.split('::')[0]).is_file():
                sys.exit(f'tests/mutants.py: mutant {m.name}: no test file {arg}')


def run_tests(workdir: Path, tests, timeout) -> tuple[int | None, str]:
    """(pytest exit status or None on timeout, output) of `tests` run in `workdir`, stopping at the first failure."""
    env = dict(os.environ, PYTHONPATH=str(workdir), PYTHONDONTWRITEBYTECODE='1', OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider', '-o', 'addopts=-rf', *tests]
    try:
        proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, ''
    return proc.returncode, proc.stdout + proc.stderr


def first_failure(output: str) -> str:
    """The first 'FAILED tests/...::name' of a pytest summary, shortened; '' when there is none."""
    match = re.search(r'^(?:FAILED|ERROR) (\S+)', output, flags=re.MULTILINE)
    return match.group(1) if match else ''


def run_mutant(mutant: Mutant, workdir: Path, timeout) -> dict:
    """Plant one mutant in `workdir`, run its tests, restore the file; the outcome as a dict."""
    path = workdir / mutant.path
    original = path.read_text(encoding='utf-8')
    path.write_text(original.replace(mutant.find, mutant.replace, 1), encoding='utf-8')
    t0 = time.time()
    try:
        status, output = run_tests(workdir, mutant.tests, timeout)
    finally:
        path.write_text(original, encoding='utf-8')
    if status is None:
        outcome, detail = 'caught', f'timeout after {timeout} s'
    elif status == 1:
        outcome, detail = 'caught', first_failure(output)
    elif status == 0:
        outcome, detail = 'MISSED', ''
    else:
        outcome, detail = 'ERROR', f'pytest exit status {status}: ' + (output.strip().splitlines() or [''])[-1]
    return dict(name=mutant.name, outcome=outcome, detail=detail, seconds=time.time() - t0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--only', metavar='NAMES', help='comma-separated mutant names (default: all)')
    parser.add_argument('--jobs', type=int, default=os.cpu_count() or 1, metavar='N', help='mutants run at once')
    parser.add_argument('--timeout', type=float, default=600, metavar='S', help='seconds per test run')
    parser.add_argument('--list', action='store_true', help='print the mutants and their tests, run nothing')
    args = parser.parse_args()
    mutants = list(MUTANTS)
    if args.only:
        names = args.only.split(',')
        unknown = [n for n in names if n not in {m.name for m in MUTANTS}]
        if unknown:
            sys.exit(f'tests/mutants.py: unknown mutant {unknown[0]!r}; --list shows them')
        mutants = [m for m in MUTANTS if m.name in names]
    check_mutants(ROOT, mutants)
    if args.list:
        for m in mutants:
            print(f'{m.name:30s} {m.path}: {m.why}\n{"":30s} pytest {" ".join(m.tests)}')
        return
    t_start = time.time()
    files = tree_files(ROOT)
    with tempfile.TemporaryDirectory(prefix='taxogan-mutants-') as tmp:
        jobs = max(1, min(args.jobs, len(mutants)))
        workdirs = [Path(tmp) / f'w{i}' for i in range(jobs)]
        for workdir in workdirs:
            copy_tree(ROOT, files, workdir)
        # The unmutated tree must pass every selection: a failure there would be counted as a catch.
        selections = sorted({m.tests for m in mutants})
        print(f'baseline: {len(selections)} test selections on the unmutated tree ({jobs} at once)', flush=True)
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            free = list(workdirs)
            def baseline(tests):
                workdir = free.pop()
                try:
                    return tests, run_tests(workdir, tests, args.timeout)
                finally:
                    free.append(workdir)
            for tests, (status, output) in pool.map(baseline, selections):
                if status != 0:
                    sys.exit(f'baseline: pytest {" ".join(tests)} does not pass on the unmutated tree '
                             f'({first_failure(output) or status}); fix that first')
            print(f'baseline passed ({time.time() - t_start:.0f} s)', flush=True)
            results = []
            def one(mutant):
                workdir = free.pop()
                try:
                    return run_mutant(mutant, workdir, args.timeout)
                finally:
                    free.append(workdir)
            for result in pool.map(one, mutants):
                results.append(result)
                print(f'{result["outcome"]:7s} {result["name"]:30s} {result["seconds"]:6.1f} s  {result["detail"]}', flush=True)
    caught = sum(r['outcome'] == 'caught' for r in results)
    print(f'{caught} caught, {len(results) - caught} missed of {len(results)} mutants in {time.time() - t_start:.0f} s')
    if caught != len(results):
        sys.exit(1)


if __name__ == '__main__':
    main()
