"""Generator and Discriminator against NVIDIA's golden outputs, plus structural invariants."""

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stylegan2ada.networks import Discriminator, Generator
from stylegan2ada.ops import default_impl
from conftest import load_golden_case, rel_error

TOL = 1e-4
REPO = Path(__file__).resolve().parent.parent
CASES = ['g32_uncond', 'g32_cond4', 'g64_uncond']


def build_golden_networks(golden_spec, case):
    """G and D with the golden case's kwargs and state dicts loaded (strict)."""
    g_state, d_state, io = load_golden_case(case)
    spec = golden_spec['cases'][case]
    G = Generator(**copy.deepcopy(spec['G_kwargs'])).eval()
    D = Discriminator(**copy.deepcopy(spec['D_kwargs'])).eval()
    G.load_state_dict(g_state, strict=True)
    D.load_state_dict(d_state, strict=True)
    return G, D, io


def golden_errors(G, D, io):
    """Relative error of every golden output; a dict name -> error."""
    z, c = io['z'], io['c']
    errors = {
        'ws_psi1': rel_error(G.mapping(z, c), io['ws_psi1']),
        'ws_psi07': rel_error(G.mapping(z, c, truncation_psi=0.7), io['ws_psi07']),
        'img_psi1': rel_error(G(z, c, noise_mode='const'), io['img_psi1']),
        'img_psi07': rel_error(G(z, c, truncation_psi=0.7, noise_mode='const'), io['img_psi07']),
        'img_noise_none': rel_error(G(z, c, noise_mode='none'), io['img_noise_none']),
        'd_logits': rel_error(D(io['d_in'], c), io['d_logits']),
    }
    ws = io['ws_psi1'].clone().requires_grad_(True)
    grad_ws, = torch.autograd.grad((G.synthesis(ws, noise_mode='const') * io['g_probe']).sum(), ws)
    errors['g_grad_ws'] = rel_error(grad_ws, io['g_grad_ws'])
    x = io['d_in'].clone().requires_grad_(True)
    grad_x, = torch.autograd.grad(D(x, c).sum(), x, create_graph=True)
    r1 = grad_x.square().sum()
    errors['d_r1'] = rel_error(r1, io['d_r1'])
    grad_w, = torch.autograd.grad(r1, D.b4.out.weight)                 # double backward through all of D
    errors['d_r1_grad_b4_out_weight'] = rel_error(grad_w, io['d_r1_grad_b4_out_weight'])
    return errors


@pytest.mark.parametrize('case', CASES)
def test_state_dict_names_match_nvidia(golden_spec, case):
    g_state, d_state, _ = load_golden_case(case)
    spec = golden_spec['cases'][case]
    assert set(Generator(**copy.deepcopy(spec['G_kwargs'])).state_dict()) == set(g_state)
    assert set(Discriminator(**copy.deepcopy(spec['D_kwargs'])).state_dict()) == set(d_state)


@pytest.mark.parametrize('impl', ['fast', 'ref'])
@pytest.mark.parametrize('case', CASES)
def test_golden_outputs(golden_spec, case, impl):
    # The networks call every op with impl=None: 'fast' is their default, default_impl('ref') the reference path.
    G, D, io = build_golden_networks(golden_spec, case)
    with default_impl(impl):
        errors = golden_errors(G, D, io)
    bad = {k: v for k, v in errors.items() if not v < TOL}
    assert not bad, f'outputs differ from NVIDIA reference: {bad}'


@pytest.mark.parametrize('which', ['G.synthesis.b8.conv0.weight', 'D.b16.conv1.weight'])
def test_golden_detects_a_single_perturbed_weight(golden_spec, which):
    # The comparison must be sensitive: nudging one weight element breaks it.
    G, D, io = build_golden_networks(golden_spec, 'g32_uncond')
    net, name = (G, which[2:]) if which.startswith('G.') else (D, which[2:])
    with torch.no_grad():
        dict(net.named_parameters())[name].view(-1)[0] += 0.05
    errors = golden_errors(G, D, io)
    assert max(errors.values()) > TOL


def test_fused_and_nonfused_synthesis_agree(golden_spec):
    G, _, io = build_golden_networks(golden_spec, 'g32_uncond')
    ws = io['ws_psi1']
    a = G.synthesis(ws, noise_mode='const', fused_modconv=True)
    b = G.synthesis(ws, noise_mode='const', fused_modconv=False)
    assert rel_error(a, b) < 1e-5


def test_truncation_cutoff_only_truncates_first_ws(golden_spec):
    G, _, io = build_golden_networks(golden_spec, 'g32_uncond')
    full = G.mapping(io['z'], io['c'])
    cut = G.mapping(io['z'], io['c'], truncation_psi=0.5, truncation_cutoff=3)
    expected = G.mapping.w_avg.lerp(full[:, :3], 0.5)
    assert torch.allclose(cut[:, :3], expected, atol=1e-6)
    assert torch.equal(cut[:, 3:], full[:, 3:])


def test_w_avg_tracks_in_training_mode_only():
    torch.manual_seed(0)
    G = Generator(z_dim=8, c_dim=0, w_dim=8, img_resolution=8, img_channels=1,
                  mapping_kwargs=dict(num_layers=2), synthesis_kwargs=dict(channel_base=64, channel_max=8))
    z = torch.randn(16, 8)
    G.eval()
    G.mapping(z, None)
    assert torch.count_nonzero(G.mapping.w_avg) == 0
    G.train()
    w = G.mapping(z, None)[:, 0]
    expected = w.mean(dim=0) * (1 - 0.995)                             # lerp from zeros with beta 0.995
    assert torch.allclose(G.mapping.w_avg, expected, atol=1e-7)


@pytest.mark.parametrize('g_arch', ['orig', 'skip', 'resnet'])
@pytest.mark.parametrize('d_arch', ['orig', 'skip', 'resnet'])
def test_architectures_shapes_and_gradients(g_arch, d_arch):
    torch.manual_seed(0)
    G = Generator(z_dim=8, c_dim=3, w_dim=8, img_resolution=16, img_channels=1, mapping_kwargs=dict(num_layers=2),
                  synthesis_kwargs=dict(channel_base=128, channel_max=8, architecture=g_arch, conv_clamp=256))
    D = Discriminator(c_dim=3, img_resolution=16, img_channels=1, architecture=d_arch, channel_base=128, channel_max=8,
                      epilogue_kwargs=dict(mbstd_group_size=2))
    z = torch.randn(4, 8)
    c = torch.eye(3)[[0, 1, 2, 0]]
    img = G(z, c)
    assert img.shape == (4, 1, 16, 16)
    logits = D(img, c)
    assert logits.shape == (4, 1)
    logits.sum().backward()
    for name, p in list(G.named_parameters()) + list(D.named_parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_minibatch_std_against_direct_computation():
    from stylegan2ada.networks import MinibatchStdLayer
    torch.manual_seed(0)
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    y = MinibatchStdLayer(group_size=3, num_channels=2)(x)
    assert y.shape == (6, 6, 3, 3)
    for i in range(6):
        members = [j for j in range(6) if j % 2 == i % 2]               # group = same index mod N/G
        for f in range(2):
            chans = x[members][:, f * 2:(f + 1) * 2]
            expected = (chans.var(dim=0, unbiased=False) + 1e-8).sqrt().mean()
            assert torch.allclose(y[i, 4 + f], expected.expand(3, 3))


def test_freeze_d_stores_first_layers_as_buffers():
    D = Discriminator(c_dim=0, img_resolution=16, img_channels=3, channel_base=128, channel_max=8,
                      block_kwargs=dict(freeze_layers=2))
    params = dict(D.named_parameters())
    buffers = dict(D.named_buffers())
    # Layer order from the top: b16.fromrgb (0), b16.conv0 (1), b16.conv1 (2), b16.skip (3), ...
    assert 'b16.fromrgb.weight' in buffers and 'b16.conv0.weight' in buffers
    assert 'b16.conv1.weight' in params and 'b8.conv0.weight' in params
    # Same state-dict names as an unfrozen D, so pickles interchange.
    assert set(D.state_dict()) == set(Discriminator(c_dim=0, img_resolution=16, img_channels=3, channel_base=128, channel_max=8).state_dict())


def test_fp16_channels_last_blocks_run_in_fp32_on_cpu_and_match_golden(golden_spec):
    spec = copy.deepcopy(golden_spec['cases']['g32_uncond'])
    g_state, _, io = load_golden_case('g32_uncond')
    spec['G_kwargs']['synthesis_kwargs']['fp16_channels_last'] = True
    spec['G_kwargs']['synthesis_kwargs']['num_fp16_res'] = 2
    G = Generator(**spec['G_kwargs']).eval()
    G.load_state_dict(g_state)
    # The two fp16 blocks hold channels_last weights; on CPU they run in fp32, so the output equals the golden image.
    last = G.synthesis.b32.conv1.weight
    assert last.is_contiguous(memory_format=torch.channels_last) and not last.is_contiguous()
    assert rel_error(G(io['z'], io['c'], noise_mode='const'), io['img_psi1']) < TOL


def test_cpu_training_runs_channels_last_and_matches_nchw(golden_spec, monkeypatch):
    # On the CPU the blocks run channels_last (oneDNN's layout; the training speed-up of docs/benchmarks.md) except
    # around fused modulated convolutions; outputs and gradients must be those of the same network in NCHW.
    from stylegan2ada import networks
    G, D, io = build_golden_networks(golden_spec, 'g32_uncond')
    G.train(), D.train()
    layouts = []
    hook = lambda module, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last))
    handles = [G.synthesis.b32.conv1.register_forward_pre_hook(hook), D.b32.conv0.register_forward_pre_hook(hook)]

    def run():
        ws = io['ws_psi1'].clone().requires_grad_(True)
        img = G.synthesis(ws, noise_mode='const')
        logits = D(img, io['c'])
        grad_ws, grad_w = torch.autograd.grad(logits.sum(), [ws, D.b32.conv0.weight])
        return img, logits, grad_ws, grad_w

    fast = run()
    assert layouts == [True, True]
    G.eval()
    G.synthesis(io['ws_psi1'], noise_mode='const')                       # fused: the batch folds into the channels
    assert layouts[2] is False
    G.train()
    for handle in handles:
        handle.remove()
    monkeypatch.setattr(networks, '_memory_format', lambda *args, **kwargs: torch.contiguous_format)
    for name, a, b in zip(['img', 'logits', 'grad_ws', 'grad_w'], fast, run()):
        assert rel_error(a, b) < 1e-5, name


def test_gpu_parity_script_passes_on_cpu_and_fails_above_its_tolerance():
    # bench/cuda_parity.py is the first step of `make gpu-check`; on the CPU it must give what the tests above give.
    script = [sys.executable, str(REPO / 'bench' / 'cuda_parity.py'), '--device', 'cpu', '--impls', 'ref,fast']
    passed = subprocess.run(script, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert passed.returncode == 0, passed.stderr
    lines = passed.stdout.splitlines()
    assert len(lines) == 7 and lines[-1].endswith(': ok')
    errors = [float(value) for line in lines[:-1] for value in line.split()[-7::2]]
    assert len(errors) == 24 and max(errors) < TOL
    failed = subprocess.run(script + ['--tol', '1e-9'], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert failed.returncode == 1 and failed.stdout.splitlines()[-1].endswith(': FAILED')
    refused = subprocess.run(script[:2] + ['--device', 'nonsense'], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert refused.returncode == 1 and refused.stderr.startswith('Error: --device nonsense')
