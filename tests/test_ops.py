"""Ops against NVIDIA's golden outputs, float64 gradchecks (first and second order) and invariants."""

import numpy as np
import pytest
import torch

from stylegan2ada import ops
from conftest import load_golden_ops, rel_error

TOL = 1e-4


@pytest.fixture(scope='module')
def gold():
    return load_golden_ops()


@pytest.mark.parametrize('case', ['up2', 'down2', 'pad_flip', 'updown', 'sep'])
def test_upfirdn2d_golden(gold, golden_spec, case):
    kwargs = {k: v for k, v in golden_spec['ops']['upfirdn2d']['cases'][case].items() if k != 'filter'}
    f = gold['f_sep5'] if case == 'sep' else gold['f_1331']
    y = ops.upfirdn2d(gold['x'], f, **kwargs)
    assert y.shape == gold[f'upfirdn2d_{case}'].shape
    assert rel_error(y, gold[f'upfirdn2d_{case}']) < TOL


@pytest.mark.parametrize('act', sorted(ops.ACTIVATIONS))
def test_bias_act_golden(gold, act):
    y = ops.bias_act(gold['x'], gold['b'], act=act)
    assert rel_error(y, gold[f'bias_act_{act}']) < TOL


def test_bias_act_clamp_golden(gold):
    y = ops.bias_act(gold['x'], gold['b'], act='lrelu', clamp=0.5)
    assert rel_error(y, gold['bias_act_lrelu_clamp']) < TOL
    assert float(y.abs().max()) <= 0.5


@pytest.mark.parametrize('case', ['up', 'down', 'plain'])
def test_conv2d_resample_golden(gold, golden_spec, case):
    kwargs = golden_spec['ops']['conv2d_resample']['cases'][case]
    y = ops.conv2d_resample(gold['x'], gold['w'], f=gold['f_1331'], **kwargs)
    assert rel_error(y, gold[f'conv2d_resample_{case}']) < TOL


def test_setup_filter_matches_golden(gold):
    assert rel_error(ops.setup_filter([1, 3, 3, 1]), gold['f_1331']) == 0


def test_upfirdn2d_against_float64_direct_formula():
    # Independent reference: explicit loops over the definition (zero-insert, pad, convolve, decimate).
    torch.manual_seed(0)
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64)
    f = torch.randn(3, 2, dtype=torch.float64)
    up, down, (px0, px1, py0, py1) = 2, 3, (2, 1, 1, 3)
    y = ops.upfirdn2d(x, f, up=up, down=down, padding=[px0, px1, py0, py1])
    H, W = x.shape[2] * up + py0 + py1, x.shape[3] * up + px0 + px1
    big = torch.zeros(1, 2, H, W, dtype=torch.float64)
    big[:, :, py0:py0 + x.shape[2] * up:up, px0:px0 + x.shape[3] * up:up] = x
    fh, fw = f.shape
    out = torch.zeros(1, 2, H - fh + 1, W - fw + 1, dtype=torch.float64)
    for i in range(out.shape[2]):
        for j in range(out.shape[3]):
            # True convolution: the filter is mirrored.
            out[:, :, i, j] = (big[:, :, i:i + fh, j:j + fw] * f.flip([0, 1])).sum(dim=[2, 3])
    ref = out[:, :, ::down, ::down]
    assert y.shape == ref.shape
    assert torch.allclose(y, ref, atol=1e-12)


def test_up_then_down_preserves_constant_and_dc_gain():
    f = ops.setup_filter([1, 3, 3, 1])
    x = torch.full([1, 1, 8, 8], 3.0, dtype=torch.float64)
    up = ops.upsample2d(x, f.double())
    assert up.shape[-1] == 16
    assert torch.allclose(up[:, :, 2:-2, 2:-2], torch.full_like(up[:, :, 2:-2, 2:-2], 3.0))
    down = ops.downsample2d(x, f.double())
    assert torch.allclose(down[:, :, 1:-1, 1:-1], torch.full_like(down[:, :, 1:-1, 1:-1], 3.0))


def _gradchecks(fn, *inputs):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize('kwargs', [dict(up=2, padding=[2, 1, 2, 1]), dict(down=2, padding=1), dict(up=2, down=2, padding=1),
                                    dict(padding=[3, 2, 1, 0], flip_filter=True, gain=2)])
def test_upfirdn2d_gradcheck(kwargs):
    torch.manual_seed(1)
    x = torch.randn(1, 1, 4, 5, dtype=torch.float64, requires_grad=True)
    f = ops.setup_filter([1, 3, 3, 1]).double()
    _gradchecks(lambda x: ops.upfirdn2d(x, f, **kwargs), x)


def test_upfirdn2d_separable_gradcheck():
    torch.manual_seed(2)
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    f = torch.randn(5, dtype=torch.float64)
    _gradchecks(lambda x: ops.upfirdn2d(x, f, padding=2), x)


@pytest.mark.parametrize('act', sorted(ops.ACTIVATIONS))
def test_bias_act_gradcheck(act):
    torch.manual_seed(3)
    # Keep inputs away from the kinks of relu/lrelu where finite differences are ill-defined.
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    x = (x + 0.2 * x.sign()).requires_grad_(True)
    b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    _gradchecks(lambda x, b: ops.bias_act(x, b, act=act, clamp=2.5 if act == 'lrelu' else None), x, b)


@pytest.mark.parametrize('kwargs', [dict(up=2, padding=1), dict(down=2, padding=1), dict(padding=1), dict(up=2, padding=1, groups=2)])
def test_conv2d_resample_gradcheck(kwargs):
    torch.manual_seed(4)
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 2 // kwargs.get('groups', 1), 3, 3, dtype=torch.float64, requires_grad=True)
    f = ops.setup_filter([1, 3, 3, 1]).double()
    _gradchecks(lambda x, w: ops.conv2d_resample(x, w, f=f, **kwargs), x, w)


@pytest.mark.parametrize('up', [1, 2])
@pytest.mark.parametrize('demodulate', [True, False])
def test_modulated_conv2d_fused_equals_nonfused_and_gradcheck(up, demodulate):
    torch.manual_seed(5)
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    s = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(2, 1, 3 * up, 3 * up, dtype=torch.float64)
    f = ops.setup_filter([1, 3, 3, 1]).double()
    kw = dict(up=up, padding=1, resample_filter=f, demodulate=demodulate, flip_weight=(up == 1))
    fused = ops.modulated_conv2d(x, w, s, noise=noise, fused_modconv=True, **kw)
    plain = ops.modulated_conv2d(x, w, s, noise=noise, fused_modconv=False, **kw)
    assert torch.allclose(fused, plain, atol=1e-10)
    _gradchecks(lambda x, w, s: ops.modulated_conv2d(x, w, s, fused_modconv=False, **kw), x, w, s)


def test_modulated_conv2d_demodulation_normalises_output_variance():
    # With unit-variance i.i.d. input, demodulated outputs have ~unit second moment whatever the styles.
    torch.manual_seed(6)
    x = torch.randn(4, 64, 32, 32, dtype=torch.float64)
    w = torch.randn(8, 64, 3, 3, dtype=torch.float64)
    s = torch.rand(4, 64, dtype=torch.float64) * 10
    y = ops.modulated_conv2d(x, w, s, padding=1)
    second_moment = y[:, :, 1:-1, 1:-1].square().mean().item()
    assert abs(second_moment - 1) < 0.05


def test_fma_broadcasts():
    a, b, c = torch.randn(2, 3, 1), torch.randn(1, 3, 4), torch.randn(2, 1, 4)
    assert torch.allclose(ops.fma(a, b, c), a * b + c)


def test_bad_arguments_raise_clear_errors():
    x = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match='unknown activation'):
        ops.bias_act(x, act='gelu2')
    with pytest.raises(ValueError, match='4-D'):
        ops.upfirdn2d(x[0], None)
    with pytest.raises(ValueError, match='unknown upfirdn2d impl'):
        ops.upfirdn2d(x, None, impl='cuda9')
