"""The training iteration's pieces (run_phases, LossWatch, gradient finishing, G_ema, ADA) and the speed benchmark.

A training iteration must never read a device value on the host (each read makes the CPU wait for the GPU and empties
its queue). On the `meta` device tensors have shapes but no data, so any such read (`.item()`, `bool()`, `.tolist()`,
`nonzero`, a data-dependent shape) raises: an iteration that completes there reads nothing.
"""

import copy
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from stylegan2ada.augment import PRESETS, AugmentPipe
from stylegan2ada.loss import StyleGAN2Loss
from stylegan2ada.networks import Discriminator, Generator
from stylegan2ada.training_loop import LossWatch, _finish_gradients, ada_adjust_, build_phases, run_phases, update_ema_
from stylegan2ada.training_stats import StatsCollector
from taxogan_ext.lecam import LeCamRegularizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_state(device, augment_p=0.5, extra_d_terms=()):
    """A 16 px G and D with bgc augmentation, stats and the loop's phases, on `device`."""
    torch.manual_seed(0)
    common = dict(c_dim=0, img_resolution=16, img_channels=3)
    sizes = dict(channel_base=128, channel_max=16)
    G = Generator(z_dim=16, w_dim=16, mapping_kwargs=dict(num_layers=2), synthesis_kwargs=sizes, **common)
    D = Discriminator(epilogue_kwargs=dict(mbstd_group_size=4), **sizes, **common)
    G, D = G.train().requires_grad_(False).to(device), D.train().requires_grad_(False).to(device)
    augment_pipe = AugmentPipe(**PRESETS['bgc']).train().requires_grad_(False).to(device)
    augment_pipe.p.fill_(augment_p)
    stats = StatsCollector()
    loss = StyleGAN2Loss(G=G, D=D, augment_pipe=augment_pipe, r1_gamma=0.01, pl_weight=2, extra_d_terms=extra_d_terms, stats=stats)
    adam = dict(lr=0.002, betas=[0, 0.99], eps=1e-8)
    phases = build_phases(G, D, adam, adam, G_reg_interval=4, D_reg_interval=16, device=torch.device(device))
    return dict(G=G, D=D, G_ema=copy.deepcopy(G).eval(), augment_pipe=augment_pipe, loss=loss, stats=stats, phases=phases,
                watch=LossWatch())


def iterate(state, batch_idx, device, batch=8):
    """One iteration as the training loop runs it (data made on the device)."""
    G, phases = state['G'], state['phases']
    real_img = [torch.rand([batch, 3, 16, 16], device=device) * 2 - 1]
    real_c = [torch.zeros([batch, 0], device=device)]
    gen_z = torch.randn([len(phases), 1, batch, G.z_dim], device=device)
    gen_c = torch.zeros([len(phases), 1, batch, 0], device=device)
    run_phases(phases, state['loss'], batch_idx, real_img, real_c, gen_z, gen_c, cur_nimg=batch_idx * batch, num_gpus=1,
               watch=state['watch'])
    update_ema_(state['G_ema'], G, beta=0.99)


def test_training_iteration_reads_no_device_value_on_the_host():
    # Every phase (Gmain, Greg, Dmain, Dreg with R1 and path length through the augment pipe at p = 0.5), LeCam, the
    # stats, the loss watch, Adam, G_ema and an ADA step, on the meta device: any host read of device data raises.
    state = tiny_state('meta', extra_d_terms=[LeCamRegularizer(weight=0.1)])
    for batch_idx in range(17):
        iterate(state, batch_idx, 'meta')
        if batch_idx % 4 == 3:
            sign_sum, count = state['watch'].take_real_signs()
            assert count == 8 * 4 and sign_sum.device.type == 'meta'
            r_t = ada_adjust_(state['augment_pipe'], sign_sum, count, target=0.6, step=0.01)
            state['stats'].report('Progress/ada_rt', r_t)
    assert set(state['stats'].names()) >= {'Loss/G/loss', 'Loss/D/loss', 'Loss/r1_penalty', 'Loss/pl_penalty', 'LeCam/penalty'}


def test_same_iteration_on_cpu_trains_and_reports():
    state = tiny_state('cpu')
    before = [p.clone() for p in state['D'].parameters()]
    for batch_idx in range(2):
        iterate(state, batch_idx, 'cpu')
    assert state['watch'].non_finite(num_gpus=1) == []
    assert any(not torch.equal(a, b) for a, b in zip(before, state['D'].parameters()))
    collected = state['stats'].collect(all_reduce=False)
    assert collected['Loss/signs/real']['num'] == 16                # 2 Dmain rounds of 8 real logits


def test_loss_watch_names_the_term_and_phase_and_resets():
    watch = LossWatch()
    finite = {'Loss/G/loss': torch.ones([4, 1]), 'Loss/scores/fake': torch.zeros([4, 1])}
    watch.observe('Gmain', finite)
    watch.observe('Dmain', {'Loss/D/loss': torch.tensor([[1.0], [float('nan')]]), 'Loss/signs/real': torch.tensor([[1.], [-1.], [1.]])})
    watch.observe('Gmain', {'Loss/G/loss': torch.tensor([float('inf')]), 'Loss/scores/fake': torch.zeros([1])})
    assert watch.non_finite(num_gpus=1) == ['Loss/G/loss in phase Gmain', 'Loss/D/loss in phase Dmain']
    assert watch.non_finite(num_gpus=1) == []                        # reset
    watch.observe('Dmain', {'Loss/D/loss': torch.full([3], 1e300, dtype=torch.float64)})   # large but finite
    assert watch.non_finite(num_gpus=1) == []
    total, count = watch.take_real_signs()
    assert float(total) == 1.0 and count == 3
    assert watch.take_real_signs() == (None, 0)


def test_finish_gradients_equals_per_tensor_nan_to_num():
    torch.manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in ([3, 4], [5], [2, 3, 3, 3], [0])]
    params[2] = torch.nn.Parameter(params[2].detach().to(memory_format=torch.channels_last))
    for p in params:
        p.grad = torch.randn(p.shape).to(memory_format=torch.channels_last if p.ndim == 4 else torch.contiguous_format)
    params[0].grad[0, 0], params[0].grad[1, 1], params[1].grad[2] = float('nan'), float('inf'), float('-inf')
    expected = [torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5) for p in params]
    grads_before = [p.grad for p in params]
    _finish_gradients(params, num_gpus=1)
    for p, g, e in zip(params, grads_before, expected):
        assert p.grad is g                                          # updated in place: the optimizer's tensors
        assert torch.equal(p.grad, e)


def test_update_ema_is_the_moving_average_and_copies_buffers():
    torch.manual_seed(2)
    G = Generator(z_dim=8, w_dim=8, c_dim=0, img_resolution=8, img_channels=3, mapping_kwargs=dict(num_layers=1),
                  synthesis_kwargs=dict(channel_base=64, channel_max=8))
    G_ema = copy.deepcopy(G)
    with torch.no_grad():
        for p in G.parameters():
            p.add_(torch.randn_like(p))
        G.mapping.w_avg.add_(1)
    expected = {name: (0.9 * e.double() + 0.1 * p.double()) for (name, e), p in zip(G_ema.named_parameters(), G.parameters())}
    update_ema_(G_ema, G, beta=0.9)
    for name, e in G_ema.named_parameters():
        assert torch.allclose(e.double(), expected[name], rtol=1e-6, atol=1e-6), name
    assert torch.equal(G_ema.mapping.w_avg, G.mapping.w_avg)


@pytest.mark.parametrize('sign_sum, target, expected_p', [(4.0, 0.6, 0.31), (-4.0, 0.6, 0.29), (2.0, 1.0, 0.29), (2.0, 0.5, 0.3)])
def test_ada_adjust_moves_p_one_step_towards_the_target(sign_sum, target, expected_p):
    pipe = AugmentPipe(xflip=1)
    pipe.p.fill_(0.3)
    r_t = ada_adjust_(pipe, torch.tensor(sign_sum, dtype=torch.float64), 4, target, step=0.01)
    assert float(r_t) == sign_sum / 4
    assert float(pipe.p) == pytest.approx(expected_p, abs=1e-7)
    pipe.p.fill_(0.995)
    ada_adjust_(pipe, torch.tensor(4.0, dtype=torch.float64), 4, 0.6, step=0.01)
    assert float(pipe.p) == 1.0                                     # a probability: clamped to [0, 1]


def test_bench_script_runs_and_writes_its_doc_section(tmp_path):
    # `make bench-gpu DEVICE=cpu` in small: the tiny preset, two probabilities, eager and the graphs' CPU model, a
    # profile; the section is replaced in place.
    doc = tmp_path / 'benchmarks.md'
    doc.write_text('# Benchmarks\n\nintro\n')
    cmd = [sys.executable, os.path.join(REPO, 'bench', 'train_step.py'), '--preset', 'tiny', '--p', '0,0.5', '--iters', '2',
           '--graphs', 'off,oplog', '--check-graphs', '17', '--profile', '1', '--profile-rows', '5', '--doc', str(doc), '--threads', '1']
    for _ in range(2):
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith('images/s ') and float(lines[-1].split()[1]) > 0
    text = doc.read_text()
    assert text.startswith('# Benchmarks\n\nintro\n')
    assert text.count('<!-- bench-train-step:cpu:begin -->') == 1 and text.count('<!-- bench-train-step:cpu:end -->') == 1
    assert all(f'| {mode} | {p} |' in text for mode in ('off', 'oplog') for p in ('0', '0.5'))
    assert 'Augmentation overhead against p = 0 (time per image), graphs off: p = 0.5:' in text
    assert 'Graphs against eager (images/s ratio): oplog at p = 0: x' in text
    assert 'Profile at p = 0.5, graphs off (1 iterations' in text
    assert result.stdout.count('Op-log graph of phase ') == 4 + 4     # every phase captured: warm-up, then the check
    # The graphs' model trains exactly as eager training does, through the benchmark's own iteration too.
    assert ('Graphs oplog against eager after 17 iterations from the same seed at p = 0.5, largest relative difference of '
            'any tensor: G 0.00e+00, D 0.00e+00, G_ema 0.00e+00.') in text


def test_bench_table_names_the_phases_whose_capture_failed():
    # A graphs row whose phases partly ran eagerly must not pass for a graphs measurement.
    spec = importlib.util.spec_from_file_location('bench_train_step', os.path.join(REPO, 'bench', 'train_step.py'))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    c = dict(bench.PRESETS['tiny'], **bench.COMMON, preset='tiny', nhwc=False, impl='auto', repeats=1, iters=2,
             check_graphs=0, profile=0)
    row = dict(p=0.2, rate=100.0, cpu=0.1, allocated=1.0, reserved=None)
    rows = [dict(row, graphs='off', failed=[]), dict(row, graphs='cuda', failed=['Dreg', 'Gmain'])]
    text = bench.format_doc_section(c, torch.device('cpu'), rows, syncs=None, profile=None, parity=None)
    assert '| off | 0.2 | 100.00 | 10.00 |' in text
    assert '| cuda (Dreg, Gmain eager: capture failed) | 0.2 | 100.00 | 10.00 |' in text
