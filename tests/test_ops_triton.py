"""The Triton path of upfirdn2d and bias_act against the reference path, on the CPU through Triton's interpreter.

Outputs, first- and second-order gradients must match the reference to 1e-5 relative in float32 (1e-10 in
float64), float16/bfloat16 inputs the float32 reference to their round-off; gradcheck/gradgradcheck run in
float64 (the interpreter computes in numpy, float64 included) in fast mode, since every kernel launch costs the
interpreter tens of milliseconds. TRITON_INTERPRET=1 is set only while this module runs (a module fixture), and
the ops' Triton state (built kernels, recorded failures) is reset after every test. A RuntimeWarning fails a
test: it is how a Triton failure announces the silent switch to the fast path, which would make these tests
compare the fast path with the reference instead.
"""

import importlib
import itertools
import subprocess
import sys
import warnings

import pytest
import torch

from stylegan2ada import ops
from stylegan2ada.ops import impl as impl_module
from stylegan2ada.ops.impl import choose_impl, default_impl
from conftest import load_golden_ops, rel_error
from test_ops_fast import outputs_and_grads, rel

triton = pytest.importorskip('triton', reason="Triton is not installed (pip install triton): impl='triton' is not tested")

upfirdn2d_module = importlib.import_module('stylegan2ada.ops.upfirdn2d')
bias_act_module = importlib.import_module('stylegan2ada.ops.bias_act')

pytestmark = pytest.mark.filterwarnings('error::RuntimeWarning')

F1331 = ops.setup_filter([1, 3, 3, 1])                                  # [4, 4]
SYM6 = ops.setup_filter([                                               # [12], separable: the augment pipe's filter
    0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
    0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
    -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148])


@pytest.fixture(autouse=True, scope='module')
def triton_interpreter():
    """TRITON_INTERPRET=1 for this module only; kernels built before or after it are forgotten."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv('TRITON_INTERPRET', '1')
        ops.reset_triton()
        yield
    ops.reset_triton()


@pytest.fixture(autouse=True)
def fresh_triton_state():
    """Every test starts without built kernels or recorded failures, and leaves none behind."""
    ops.reset_triton()
    yield
    ops.reset_triton()


def assert_triton_matches_ref(fn, inputs, tol=1e-5):
    """fn(impl, *inputs): outputs and first/second-order gradients of 'triton' equal those of 'ref' to tol."""
    ref = outputs_and_grads(lambda *a: fn('ref', *a), inputs)
    tri = outputs_and_grads(lambda *a: fn('triton', *a), inputs)
    names = ['output'] + [f'grad{i}' for i in range(len(inputs))] + [f'grad2_{i}' for i in range(len(inputs))]
    for name, a, b in zip(names, tri, ref):
        assert a.shape == b.shape, f'{name}: shape {list(a.shape)} != {list(b.shape)}'
        assert rel(a, b) < tol, f'{name}: relative error {rel(a, b):.3g}'


def leaf(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)


def fast_gradchecks(fn, inputs):
    # Fast mode checks a random projection of the Jacobian: a few launches instead of two per input element.
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-6, fast_mode=True)


# ----------------------------------------------------------------------------
# upfirdn2d

# test_ops_fast's grid of up/down and padding, each pair with a 2-D and a separable filter; flip and gain take
# all four combinations along the way (the full product costs the interpreter minutes).
UPFIRDN_CASES = [
    dict(up=up, down=down, padding=padding, flip_filter=(i % 2 == 1), gain=(2.5 if i % 4 >= 2 else 1), sep=sep)
    for i, ((up, down), padding, sep) in enumerate(itertools.product(
        [(1, 1), (2, 1), (1, 2), (2, 2), ((2, 1), (1, 3)), (3, 1)],
        [0, 2, [3, 1, 0, 2], [-1, 2, 1, -2]],
        [False, True]))
]


@pytest.mark.parametrize('case', UPFIRDN_CASES, ids=lambda c: '-'.join(f'{k}{v}' for k, v in c.items()).replace(' ', ''))
def test_upfirdn2d_triton_matches_ref(case):
    seed = len(str(case))
    x = leaf(2, 2, 6, 7, seed=seed)
    f = torch.randn(5 if case['sep'] else (4, 3), generator=torch.Generator().manual_seed(seed + 100))
    kw = {k: v for k, v in case.items() if k != 'sep'}
    assert_triton_matches_ref(lambda impl, x: ops.upfirdn2d(x, f, impl=impl, **kw), [x])


@pytest.mark.parametrize('wrapper,kw', [(ops.upsample2d, dict(up=2)), (ops.downsample2d, dict(down=2, padding=-2, flip_filter=True)),
                                        (ops.filter2d, dict(padding=1))])
@pytest.mark.parametrize('f', [F1331, SYM6], ids=['1331', 'sym6'])
def test_resampling_wrappers_triton_matches_ref(wrapper, kw, f):
    # sym6 with these arguments is what the augment pipe runs (12 separable taps, down with negative padding).
    x = leaf(1, 2, 7, 6, seed=1)
    assert_triton_matches_ref(lambda impl, x: wrapper(x, f, impl=impl, **kw), [x])


def test_upfirdn2d_float64_matches_ref_to_round_off():
    x = leaf(1, 2, 5, 6, seed=2, dtype=torch.float64)
    f2, f1 = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    assert_triton_matches_ref(lambda impl, x: ops.upfirdn2d(x, f2, up=2, down=(1, 2), padding=[2, 1, -1, 3], gain=1.7, impl=impl),
                              [x], tol=1e-10)
    assert_triton_matches_ref(lambda impl, x: ops.upfirdn2d(x, f1, up=(1, 3), padding=[0, 2, 4, 1], gain=0.3, impl=impl),
                              [x], tol=1e-10)


@pytest.mark.parametrize('kw', [dict(up=2, padding=[2, 1, 2, 1]), dict(up=(1, 2), down=(2, 1), padding=1),
                                dict(padding=[3, 2, 1, -1], flip_filter=True, gain=2)])
def test_upfirdn2d_triton_gradcheck(kw):
    x = leaf(1, 1, 5, 4, seed=4, dtype=torch.float64)
    fast_gradchecks(lambda x: ops.upfirdn2d(x, F1331.double(), impl='triton', **kw), [x])


def test_upfirdn2d_triton_separable_gradcheck():
    x, f = leaf(1, 1, 6, 5, seed=5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    fast_gradchecks(lambda x: ops.upfirdn2d(x, f, up=2, down=(1, 2), padding=[2, 1, 3, 0], impl='triton'), [x])


def test_adjoint_padding_gives_the_reference_vjp():
    # The backward's upfirdn2d (swapped up/down, mirrored filter, _adjoint_padding) run on the reference path
    # equals autograd's vector-Jacobian product of the reference path, for every case of the grid.
    for case in UPFIRDN_CASES:
        x = torch.randn(2, 1, 6, 7, dtype=torch.float64, requires_grad=True)
        f = torch.randn(5 if case['sep'] else (4, 3), dtype=torch.float64)
        up = upfirdn2d_module._parse_scaling(case['up'])
        down = upfirdn2d_module._parse_scaling(case['down'])
        px0, px1, py0, py1 = upfirdn2d_module._parse_padding(case['padding'])
        y = ops.upfirdn2d(x, f, up=up, down=down, padding=[px0, px1, py0, py1], flip_filter=case['flip_filter'],
                          gain=case['gain'], impl='ref')
        dy = torch.randn_like(y)
        vjp, = torch.autograd.grad(y, x, dy)
        fw, fh = upfirdn2d_module.get_filter_size(f)
        qx = upfirdn2d_module._adjoint_padding(7, y.shape[3], up[0], down[0], px0, fw)
        qy = upfirdn2d_module._adjoint_padding(6, y.shape[2], up[1], down[1], py0, fh)
        adjoint = ops.upfirdn2d(dy, f, up=down, down=up, padding=[*qx, *qy], flip_filter=not case['flip_filter'],
                                gain=case['gain'], impl='ref')
        assert adjoint.shape == x.shape, case
        assert rel(adjoint, vjp) < 1e-12, case


@pytest.mark.parametrize('dtype,tol', [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_upfirdn2d_half_precision_against_float32_ref(dtype, tol):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 8, 8, generator=gen).to(dtype).requires_grad_(True)
    for f, kw in [(F1331, dict(up=2, padding=[2, 1, 2, 1])), (SYM6, dict(down=2, padding=[5, 5, 4, 6])),
                  (F1331, dict(padding=[1, 2, -1, 2], gain=3))]:
        y = ops.upfirdn2d(x, f, impl='triton', **kw)
        assert y.dtype == dtype
        dy = torch.randn(y.shape, generator=gen).to(dtype)
        dx, = torch.autograd.grad(y, x, dy)
        assert dx.dtype == dtype
        x32 = x.detach().float().requires_grad_(True)
        y32 = ops.upfirdn2d(x32, f, impl='ref', **kw)
        dx32, = torch.autograd.grad(y32, x32, dy.float())
        assert rel(y.detach().float(), y32.detach()) < tol, kw
        assert rel(dx.float(), dx32) < tol, kw


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_upfirdn2d_channels_last_and_strided_inputs(dtype):
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(2, 4, 6, 10, generator=gen).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    inputs = {
        'channels_last': base.to(memory_format=torch.channels_last),
        'strided view': base[:, 1:, :, ::2],                             # non-contiguous, read in place
        'expanded': base[:1, :1].expand(2, 3, 6, 10),                   # stride 0 along N and C
    }
    for name, x in inputs.items():
        for f, kw in [(F1331, dict(up=2, padding=[2, 1, 2, 1])), (SYM6, dict(down=2, padding=5))]:
            y = ops.upfirdn2d(x, f, impl='triton', **kw)
            ref = ops.upfirdn2d(x.float().contiguous(), f, impl='ref', **kw)
            assert rel(y.float(), ref) < tol, (name, kw)
            if name == 'channels_last':
                assert y.is_contiguous(memory_format=torch.channels_last), kw


def test_upfirdn2d_triton_gradient_of_a_sum():
    # y.sum() hands the backward an expanded (stride 0) gradient: read in place, with no copy needed.
    x = leaf(1, 2, 5, 6, seed=8)
    for impl in ('triton', 'ref'):
        x.grad = None
        ops.upfirdn2d(x, F1331, up=2, down=(1, 2), padding=[1, 2, 0, 1], impl=impl).sum().backward()
        if impl == 'triton':
            g = x.grad.clone()
    assert rel(g, x.grad) < 1e-5


def test_triton_many_programs(monkeypatch):
    # The interpreter runs tiny tensors in one program; small blocks exercise the multi-program index arithmetic.
    monkeypatch.setattr(upfirdn2d_module, '_TRITON_BLOCK_INTERPRETED', 64)
    monkeypatch.setattr(bias_act_module, '_TRITON_BLOCK_INTERPRETED', 64)
    x = leaf(2, 3, 5, 6, seed=9)
    assert_triton_matches_ref(lambda impl, x: ops.upfirdn2d(x, F1331, up=2, padding=[2, 1, 2, 1], impl=impl), [x])
    assert_triton_matches_ref(lambda impl, x: ops.downsample2d(x, SYM6, impl=impl), [x])
    b = leaf(3, seed=10)
    assert_triton_matches_ref(lambda impl, x, b: ops.bias_act(x, b, act='lrelu', clamp=1.0, impl=impl), [x, b])


def test_upfirdn2d_empty_output_is_a_clear_error():
    with pytest.raises(ValueError, match='leaves no output pixels'):
        ops.upfirdn2d(torch.zeros(1, 1, 4, 4), F1331, padding=-2, impl='triton')


# ----------------------------------------------------------------------------
# bias_act

BIAS_ACT_CASES = [
    dict(act=act, bias=bias, gain=gain, clamp=clamp, alpha=alpha, dim=dim)
    for act, bias, gain, clamp, alpha, dim in itertools.product(
        ['linear', 'relu', 'lrelu'], [True, False], [None, 2.0, 0.5], [None, 1.5], [None, 0.1], [1, 2, -1])
    if not (alpha is not None and act != 'lrelu')
]


def _kink_free(*shape, seed, dtype=torch.float32):
    """Inputs kept away from 0, where relu/lrelu have kinks."""
    x = torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    return (x + 0.3 * x.sign()).requires_grad_(True)


@pytest.mark.parametrize('case', BIAS_ACT_CASES, ids=lambda c: '-'.join(f'{k}{v}' for k, v in c.items()))
def test_bias_act_triton_matches_ref(case):
    x = _kink_free(2, 3, 4, 5, seed=11)
    b = leaf(x.shape[case['dim']], seed=12) if case['bias'] else None
    kw = dict(act=case['act'], gain=case['gain'], clamp=case['clamp'], alpha=case['alpha'], dim=case['dim'])
    inputs = [x] + ([b] if b is not None else [])
    assert_triton_matches_ref(lambda impl, x, *b: ops.bias_act(x, b[0] if b else None, impl=impl, **kw), inputs)


def test_bias_act_float64_matches_ref_to_round_off():
    # Triton passes float scalars as float32: alpha, gain and clamp here are exact in float32.
    x, b = _kink_free(2, 3, 4, seed=13, dtype=torch.float64), leaf(3, seed=14, dtype=torch.float64)
    for kw in [dict(act='lrelu', alpha=0.25, gain=2.0, clamp=1.5), dict(act='relu', gain=0.5), dict(act='linear', clamp=0.75)]:
        assert_triton_matches_ref(lambda impl, x, b: ops.bias_act(x, b, impl=impl, **kw), [x, b], tol=1e-10)


@pytest.mark.parametrize('kw', [dict(act='lrelu', clamp=1.0), dict(act='relu', gain=0.7), dict(act='linear', gain=3.0, clamp=2.0)])
def test_bias_act_triton_gradcheck(kw):
    x, b = _kink_free(2, 3, 4, seed=15, dtype=torch.float64), leaf(3, seed=16, dtype=torch.float64)
    fast_gradchecks(lambda x, b: ops.bias_act(x, b * 0.1, impl='triton', **kw), [x, b])


@pytest.mark.parametrize('dtype,tol', [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_bias_act_half_precision_against_float32_ref(dtype, tol):
    gen = torch.Generator().manual_seed(17)
    x = (torch.randn(2, 5, 3, 3, generator=gen) * 3).to(dtype).requires_grad_(True)
    b = torch.randn(5, generator=gen).to(dtype).requires_grad_(True)
    kw = dict(act='lrelu', clamp=2.5)
    y = ops.bias_act(x, b, impl='triton', **kw)
    assert y.dtype == dtype
    dy = torch.randn(y.shape, generator=gen).to(dtype)
    dx, db = torch.autograd.grad(y, [x, b], dy)
    x32, b32 = x.detach().float().requires_grad_(True), b.detach().float().requires_grad_(True)
    y32 = ops.bias_act(x32, b32, impl='ref', **kw)
    dx32, db32 = torch.autograd.grad(y32, [x32, b32], dy.float())
    # Where the float32 output is within round-off of the clamp, the two may clamp differently: leave those out.
    keep = ((y32.abs() - 2.5).abs() > 0.05).float()
    assert rel(y.detach().float(), y32.detach()) < tol
    assert rel(dx.float() * keep, dx32 * keep) < tol
    assert rel(db.float(), db32) < 4 * tol                           # a sum of 18 rounded terms


def test_bias_act_channels_last():
    gen = torch.Generator().manual_seed(18)
    x = torch.randn(2, 4, 3, 5, generator=gen).to(memory_format=torch.channels_last).requires_grad_(True)
    b = torch.randn(4, generator=gen).requires_grad_(True)
    y = ops.bias_act(x, b, act='lrelu', impl='triton')
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert rel(y.detach(), ops.bias_act(x, b, act='lrelu', impl='ref').detach()) < 1e-6
    assert_triton_matches_ref(lambda impl, x, b: ops.bias_act(x, b, act='relu', clamp=1.0, impl=impl), [x, b])


def test_bias_act_leaves_its_input_untouched():
    x = torch.randn(2, 3, 4)
    before = x.clone()
    ops.bias_act(x, torch.randn(3), act='lrelu', impl='triton')
    assert torch.equal(x, before)


# ----------------------------------------------------------------------------
# Golden data through the Triton path

@pytest.fixture(scope='module')
def gold():
    return load_golden_ops()


@pytest.mark.parametrize('case', ['up2', 'down2', 'pad_flip', 'updown', 'sep'])
def test_upfirdn2d_golden_triton(gold, golden_spec, case):
    kwargs = {k: v for k, v in golden_spec['ops']['upfirdn2d']['cases'][case].items() if k != 'filter'}
    f = gold['f_sep5'] if case == 'sep' else gold['f_1331']
    y = ops.upfirdn2d(gold['x'], f, impl='triton', **kwargs)
    assert y.shape == gold[f'upfirdn2d_{case}'].shape
    assert rel_error(y, gold[f'upfirdn2d_{case}']) < 1e-4


@pytest.mark.parametrize('act,clamp', [('linear', None), ('relu', None), ('lrelu', None), ('lrelu', 0.5)])
def test_bias_act_golden_triton(gold, act, clamp):
    y = ops.bias_act(gold['x'], gold['b'], act=act, clamp=clamp, impl='triton')
    assert rel_error(y, gold[f'bias_act_{act}' if clamp is None else 'bias_act_lrelu_clamp']) < 1e-4


@pytest.mark.parametrize('case', ['up', 'down', 'plain'])
def test_conv2d_resample_golden_triton(gold, golden_spec, case):
    kwargs = golden_spec['ops']['conv2d_resample']['cases'][case]
    y = ops.conv2d_resample(gold['x'], gold['w'], f=gold['f_1331'], impl='triton', **kwargs)
    assert rel_error(y, gold[f'conv2d_resample_{case}']) < 1e-4


# ----------------------------------------------------------------------------
# conv2d_resample / modulated_conv2d through the Triton upfirdn2d, and a whole network

@pytest.mark.parametrize('kw', [dict(up=2, padding=1, flip_weight=False), dict(down=2, padding=1), dict(up=2, padding=1, groups=2),
                                dict(down=2, padding=0, k=1), dict(padding=[1, 0, 2, 1])])
def test_conv2d_resample_triton_matches_ref(kw):
    kw = dict(kw)
    k = kw.pop('k', 3)
    x, w = leaf(1, 4, 5, 5, seed=19), leaf(4, 4 // kw.get('groups', 1), k, k, seed=20)
    assert_triton_matches_ref(lambda impl, x, w: ops.conv2d_resample(x, w, f=F1331, impl=impl, **kw), [x, w])


def test_modulated_conv2d_triton_matches_ref():
    x, w, s = leaf(2, 3, 4, 4, seed=21), leaf(5, 3, 3, 3, seed=22), leaf(2, 3, seed=23)
    kw = dict(up=2, padding=1, resample_filter=F1331, flip_weight=False)
    assert_triton_matches_ref(lambda impl, x, w, s: ops.modulated_conv2d(x, w, s, impl=impl, **kw), [x, w, s])


@pytest.mark.parametrize('phase', ['Dreg', 'Greg'])
def test_training_phase_gradients_triton_equal_ref(phase):
    # R1 (Dreg) and path-length (Greg) double backwards through every op of D or G's synthesis, with
    # default_impl('triton') sending upfirdn2d, bias_act, conv2d_resample and modulated_conv2d to the Triton path.
    from test_ops_fast import assert_phase_gradients_close, phase_gradients
    ref = phase_gradients(phase, 'ref', batch=2, seed=24)
    triton = phase_gradients(phase, 'triton', batch=2, seed=24)
    built = upfirdn2d_module._triton_kernels(True), bias_act_module._triton_kernels(True)
    assert all(k.kernels is not None and k.failure is None for k in built)  # the Triton path ran, and did not fail
    assert_phase_gradients_close(triton, ref)


# ----------------------------------------------------------------------------
# Choice logic

def test_impl_none_picks_triton_on_cuda_only():
    # There is no CUDA here: the decision function is tested on device types directly.
    assert choose_impl('upfirdn2d', None, triton_ok=True, device_type='cuda') == 'triton'
    assert choose_impl('upfirdn2d', None, triton_ok=True, device_type='cpu') == 'fast'      # even with TRITON_INTERPRET=1
    assert choose_impl('upfirdn2d', None, triton_ok=False, device_type='cuda') == 'fast'
    assert choose_impl('bias_act', None, fast_ok=False, triton_ok=False, device_type='cuda') == 'ref'
    with default_impl('fast'):
        assert choose_impl('upfirdn2d', None, triton_ok=True, device_type='cuda') == 'fast'
    with default_impl('ref'):
        assert choose_impl('upfirdn2d', None, triton_ok=True, device_type='cuda') == 'ref'
    with default_impl('triton'):
        assert choose_impl('upfirdn2d', None, triton_ok=True, device_type='cpu') == 'triton'  # the interpreter
        assert choose_impl('bias_act', None, triton_ok=False, device_type='cpu') == 'fast'
        assert choose_impl('bias_act', None, fast_ok=False, device_type='cpu') == 'ref'
    # The ops report what they support.
    x = torch.zeros(1, 2, 4, 4)
    assert upfirdn2d_module.triton_supported(x, F1331) and not upfirdn2d_module.triton_supported(x.long(), F1331)
    assert not upfirdn2d_module.triton_supported(x, F1331.clone().requires_grad_(True))
    assert bias_act_module._triton_supported(x, None, 'lrelu', 0.2, 1.0)
    assert not bias_act_module._triton_supported(x, None, 'lrelu', -0.1, 1.0)                # y no longer has x's sign
    assert not bias_act_module._triton_supported(x, None, 'tanh', 0.0, 1.0)
    assert not bias_act_module._triton_supported(x, None, 'relu', 0.0, -1.0)
    assert not bias_act_module._triton_supported(x.half(), torch.zeros(2), 'relu', 0.0, 1.0)       # x + b would promote


def test_impl_none_without_triton_keeps_todays_choice(monkeypatch):
    monkeypatch.setattr(impl_module, 'triton_importable', lambda: False)
    assert choose_impl('upfirdn2d', None, triton_ok=True, device_type='cuda') == 'fast'
    with pytest.raises(ValueError, match='Triton is not installed'):
        choose_impl('upfirdn2d', 'triton', triton_ok=True, device_type='cuda')


def test_asking_for_triton_where_it_cannot_run_is_a_clear_error(monkeypatch):
    x = torch.zeros(1, 2, 4, 4)
    for fn, match in [(lambda: ops.bias_act(x, act='tanh', impl='triton'), "impl='triton' does not support"),
                      (lambda: ops.bias_act(x, act='lrelu', alpha=-0.1, impl='triton'), "impl='triton' does not support"),
                      (lambda: ops.upfirdn2d(x, F1331.clone().requires_grad_(True), impl='triton'), "impl='triton' does not support")]:
        with pytest.raises(ValueError, match=match) as error:
            fn()
        assert '\n' not in str(error.value)
    monkeypatch.delenv('TRITON_INTERPRET')
    for fn in (lambda: ops.upfirdn2d(x, F1331, impl='triton'), lambda: ops.bias_act(x, impl='triton')):
        with pytest.raises(ValueError, match=r"impl='triton' cannot run here: .*TRITON_INTERPRET=1") as error:
            fn()
        assert '\n' not in str(error.value)
    with default_impl('triton'):
        with pytest.raises(ValueError, match='cannot run here'):
            ops.conv2d_resample(x, torch.zeros(2, 2, 3, 3), f=F1331, up=2, padding=1)
    assert choose_impl('upfirdn2d', None, triton_ok=True, device_type='cpu') == 'fast'
    with pytest.raises(ValueError, match="not on 'mps'"):
        choose_impl('upfirdn2d', 'triton', triton_ok=True, device_type='mps')


def test_default_impl_triton_routes_every_supported_call():
    x = torch.randn(1, 2, 6, 6)
    with default_impl('triton'):
        y = ops.upsample2d(x, F1331)
        z = ops.bias_act(x, act='tanh')                                 # not a Triton activation: the reference path
        assert torch.equal(z, ops.bias_act(x, act='tanh', impl='ref'))
    assert upfirdn2d_module._triton_kernels(True).kernels is not None
    assert bias_act_module._triton_kernels(True).kernels is None
    assert rel(y, ops.upsample2d(x, F1331, impl='ref')) < 1e-6


def test_import_does_not_import_triton():
    code = "import sys, stylegan2ada, stylegan2ada.ops, stylegan2ada.networks; sys.exit('triton' in sys.modules)"
    assert subprocess.run([sys.executable, '-c', code], timeout=120).returncode == 0


# ----------------------------------------------------------------------------
# Fallback when Triton cannot build or launch

def _failing_build():
    raise RuntimeError('PTX .version 9.9 does not support .target sm_999\nsecond line of details')


def test_build_failure_falls_back_to_fast_with_one_warning(monkeypatch):
    calls = []

    def build():
        calls.append(1)
        _failing_build()
    monkeypatch.setattr(upfirdn2d_module, '_build_triton_kernel', build)
    x = leaf(1, 2, 5, 6, seed=25)
    with pytest.warns(RuntimeWarning) as record:
        y = ops.upfirdn2d(x, F1331, up=2, padding=[2, 1, 2, 1], impl='triton')
    assert len(record) == 1
    message = str(record[0].message)
    assert message.startswith('upfirdn2d: Triton kernel failed') and 'sm_999' in message and '\n' not in message
    assert torch.equal(y, ops.upfirdn2d(x, F1331, up=2, padding=[2, 1, 2, 1], impl='fast'))
    with warnings.catch_warnings():
        warnings.simplefilter('error')                                  # later calls: silent, no retry
        with default_impl('triton'):
            y2 = ops.upfirdn2d(x, F1331, up=2, padding=[2, 1, 2, 1])
        dx, = torch.autograd.grad(y2.square().sum(), x)
    assert torch.equal(y2, y)
    x_ref = x.detach().requires_grad_(True)
    dx_ref, = torch.autograd.grad(ops.upfirdn2d(x_ref, F1331, up=2, padding=[2, 1, 2, 1], impl='fast').square().sum(), x_ref)
    assert torch.equal(dx, dx_ref)
    assert len(calls) == 1
    ops.reset_triton()                                                  # the memo is forgotten: the next call tries again
    with pytest.warns(RuntimeWarning):
        ops.upfirdn2d(x, F1331, impl='triton')
    assert len(calls) == 2


def test_out_of_memory_is_raised_not_memoized(monkeypatch):
    def build():
        raise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')
    monkeypatch.setattr(upfirdn2d_module, '_build_triton_kernel', build)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        ops.upfirdn2d(torch.zeros(1, 1, 4, 4), F1331, padding=2, impl='triton')
    assert upfirdn2d_module._triton_kernels(True).failure is None


def test_failure_while_a_cuda_graph_is_captured_is_raised_not_memoized(monkeypatch):
    # A launch that fails inside a CUDA graph capture fails the capture (the phase then runs eagerly); it must not switch
    # the op to the slow path for the rest of the run.
    monkeypatch.setattr(upfirdn2d_module, '_build_triton_kernel', _failing_build)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'is_current_stream_capturing', lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        with pytest.raises(RuntimeError, match='sm_999'):
            ops.upfirdn2d(torch.zeros(1, 1, 4, 4), F1331, padding=2, impl='triton')
    assert upfirdn2d_module._triton_kernels(True).failure is None


def test_launch_failure_falls_back_to_fast(monkeypatch):
    class Unlaunchable:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise ValueError('Cannot find a working triton backend')   # as a Triton without a GPU driver says
            return launch
    monkeypatch.setattr(bias_act_module, '_build_triton_kernels', lambda: (Unlaunchable(), Unlaunchable()))
    x, b = _kink_free(2, 3, 4, seed=26), leaf(3, seed=27)
    with pytest.warns(RuntimeWarning, match=r'^bias_act: Triton kernel failed \(ValueError: Cannot find a working triton backend\)'):
        tri = outputs_and_grads(lambda x, b: ops.bias_act(x, b, act='lrelu', clamp=1.0, impl='triton'), [x, b])
    fast = outputs_and_grads(lambda x, b: ops.bias_act(x, b, act='lrelu', clamp=1.0, impl='fast'), [x, b])
    for a, c in zip(tri, fast):
        assert torch.equal(a, c)


def test_gradient_kernel_failure_falls_back_in_the_backward(monkeypatch):
    # The forward kernel works, the gradient kernel cannot launch: the backward warns once and uses torch.
    forward_kernel, _ = bias_act_module._build_triton_kernels()

    class Unlaunchable:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError('out of resources: shared memory')
            return launch
    monkeypatch.setattr(bias_act_module, '_build_triton_kernels', lambda: (forward_kernel, Unlaunchable()))
    x, b = _kink_free(2, 3, 4, seed=28), leaf(3, seed=29)
    with pytest.warns(RuntimeWarning, match='out of resources') as record:
        tri = outputs_and_grads(lambda x, b: ops.bias_act(x, b, act='lrelu', gain=1.5, clamp=1.0, impl='triton'), [x, b])
    assert len(record) == 1
    ref = outputs_and_grads(lambda x, b: ops.bias_act(x, b, act='lrelu', gain=1.5, clamp=1.0, impl='ref'), [x, b])
    for a, c in zip(tri, ref):
        assert rel(a, c) < 1e-6


# ----------------------------------------------------------------------------
# The kernels compile for a GPU (no GPU needed: Triton's compiler and its bundled ptxas run on the CPU)

def _aot_compile(kernel, pointer_types, constexprs):
    """Compile `kernel` for sm_90 with these pointer dtypes and constexprs; skip if this Triton has another API."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        signature = {name: ('constexpr' if name in constexprs else pointer_types.get(name, 'i32'))
                     for name in kernel.arg_names}
        for name in ('gain', 'alpha', 'clamp'):
            if name in signature:
                signature[name] = 'fp32'
        source = ASTSource(kernel, signature, constexprs=constexprs)
    except (ImportError, TypeError, AttributeError, KeyError, AssertionError) as error:
        pytest.skip(f'ahead-of-time compile API of Triton {triton.__version__} differs: {error!r}')
    return triton.compile(source, target=GPUTarget('cuda', 90, 32), options=dict(num_warps=4))


def test_kernels_compile_for_sm90(monkeypatch, tmp_path):
    if 'nvidia' not in getattr(importlib.import_module('triton.backends'), 'backends', {}):
        pytest.skip("this Triton has no 'nvidia' backend")
    monkeypatch.delenv('TRITON_INTERPRET')                              # build real JIT functions, not interpreted ones
    monkeypatch.setenv('TRITON_CACHE_DIR', str(tmp_path))
    monkeypatch.setenv('TRITON_DEFAULT_FP_FUSION', '1')                  # Triton 3.9 warns unless the (default) choice is explicit
    upfirdn2d_kernel = upfirdn2d_module._build_triton_kernel()
    for dtype, up, down, fh, fw, flags in [('fp16', 2, 1, 4, 4, dict(CHANNELS_LAST=True)), ('fp32', 1, 2, 4, 4, {}),
                                           ('fp64', 1, 2, 1, 12, dict(ACC_FP64=True, INDEX_64=True)),
                                           ('bf16', 3, 1, 12, 1, dict(FLIP_FILTER=True))]:
        constexprs = dict(UP_X=up, UP_Y=up, DOWN_X=down, DOWN_Y=down, FILTER_W=fw, FILTER_H=fh, FLIP_FILTER=False,
                          CHANNELS_LAST=False, INDEX_64=False, ACC_FP64=False, BLOCK=upfirdn2d_module._TRITON_BLOCK)
        constexprs.update(flags)
        compiled = _aot_compile(upfirdn2d_kernel, {'x_ptr': '*' + dtype, 'f_ptr': '*fp32', 'y_ptr': '*' + dtype}, constexprs)
        assert compiled.asm['cubin']
    forward_kernel, grad_kernel = bias_act_module._build_triton_kernels()
    for dtype, act, flags in [('fp16', 2, dict(HAS_BIAS=True, HAS_CLAMP=True)), ('fp32', 1, dict(INDEX_64=True)), ('fp64', 0, dict(ACC_FP64=True))]:
        pointers = {'x_ptr': '*' + dtype, 'b_ptr': '*' + dtype, 'y_ptr': '*' + dtype}
        constexprs = dict(ACT=act, HAS_BIAS=False, HAS_CLAMP=False, INDEX_64=False, ACC_FP64=False, BLOCK=bias_act_module._TRITON_BLOCK)
        constexprs.update(flags)
        assert _aot_compile(forward_kernel, pointers, constexprs).asm['cubin']
        pointers = {'dy_ptr': '*' + dtype, 'y_ptr': '*' + dtype, 'dx_ptr': '*' + dtype}
        constexprs.pop('HAS_BIAS')
        assert _aot_compile(grad_kernel, pointers, constexprs).asm['cubin']
