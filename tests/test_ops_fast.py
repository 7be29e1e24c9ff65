"""The ops' fast paths against their reference paths: outputs, first- and second-order gradients, gradchecks.

In float64 the fast path must give the reference's outputs and gradients to round-off (1e-10
relative); in float32 its outputs must agree to 1e-5 relative. Second-order gradients are taken
through a squared loss so the adjoint of each op is differentiated too (what R1 and path-length
regularization need). gradcheck/gradgradcheck run on the fast path against finite differences.
"""

import contextlib
import importlib
import itertools
from unittest import mock

import pytest
import torch

from stylegan2ada import ops
from stylegan2ada.loss import StyleGAN2Loss
from stylegan2ada.networks import Discriminator, Generator
from stylegan2ada.ops.impl import choose_impl

OP_MODULES = [importlib.import_module(f'stylegan2ada.ops.{name}') for name in ('upfirdn2d', 'bias_act', 'conv2d_resample', 'modulated_conv2d')]
F1331 = ops.setup_filter([1, 3, 3, 1])


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    # Tiny tensors gain nothing from threads, and on a shared machine thread start-up and spinning dominate.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel(a, b):
    """max |a - b| / max |b| (0 when both are zero)."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def outputs_and_grads(fn, inputs, seed=0):
    """fn's output, first-order grads of sum(y^2 * p) w.r.t. inputs, and second-order grads of sum(g * q)."""
    y = fn(*inputs)
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(y.shape, generator=gen, dtype=y.dtype)
    grads = torch.autograd.grad((y.square() * p).sum(), inputs, create_graph=True)
    qs = [torch.randn(g.shape, generator=gen, dtype=g.dtype) for g in grads]
    second = torch.autograd.grad(sum((g * q).sum() for g, q in zip(grads, qs)), inputs, allow_unused=True)
    second = [torch.zeros_like(i) if s is None else s for s, i in zip(second, inputs)]
    return [y.detach()] + [g.detach() for g in grads] + second


def assert_fast_matches_ref(fn, inputs, tol=1e-10):
    """fn(impl, *inputs): outputs and first/second-order gradients of 'fast' equal those of 'ref'."""
    ref = outputs_and_grads(lambda *a: fn('ref', *a), inputs)
    fast = outputs_and_grads(lambda *a: fn('fast', *a), inputs)
    names = ['output'] + [f'grad{i}' for i in range(len(inputs))] + [f'grad2_{i}' for i in range(len(inputs))]
    for name, a, b in zip(names, fast, ref):
        assert a.shape == b.shape, f'{name}: shape {list(a.shape)} != {list(b.shape)}'
        assert rel(a, b) < tol, f'{name}: relative error {rel(a, b):.3g}'


def gradchecks(fn, inputs):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def leaf(*shape, seed=0):
    """A float64 leaf tensor with requires_grad."""
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)


# ----------------------------------------------------------------------------
# upfirdn2d

UPFIRDN_CASES = [
    dict(up=up, down=down, padding=padding, flip_filter=flip, gain=gain, sep=sep)
    for (up, down), padding, flip, gain, sep in itertools.product(
        [(1, 1), (2, 1), (1, 2), (2, 2), ((2, 1), (1, 3)), (3, 1)],
        [0, 2, [3, 1, 0, 2], [-1, 2, 1, -2]],
        [False, True], [1, 2.5], [False, True])
    if not (flip and gain != 1)                                         # keep the grid small: 240 cases
]


def _upfirdn_inputs(case, seed):
    f = torch.randn(5 if case['sep'] else (4, 3), dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 100))
    return leaf(2, 3, 6, 7, seed=seed), f


@pytest.mark.parametrize('case', UPFIRDN_CASES, ids=lambda c: '-'.join(f'{k}{v}' for k, v in c.items()).replace(' ', ''))
def test_upfirdn2d_fast_matches_ref(case):
    x, f = _upfirdn_inputs(case, seed=len(str(case)))
    kw = {k: v for k, v in case.items() if k != 'sep'}
    assert_fast_matches_ref(lambda impl, x: ops.upfirdn2d(x, f, impl=impl, **kw), [x])


@pytest.mark.parametrize('wrapper,kw', [(ops.upsample2d, dict(up=2)), (ops.downsample2d, dict(down=2)),
                                        (ops.filter2d, dict(padding=1)), (ops.upsample2d, dict(up=(2, 1), padding=[1, 0, 0, 2]))])
def test_resampling_wrappers_fast_matches_ref(wrapper, kw):
    x = leaf(2, 2, 5, 6, seed=1)
    assert_fast_matches_ref(lambda impl, x: wrapper(x, F1331.double(), impl=impl, **kw), [x])


def test_upfirdn2d_gradient_wrt_filter_matches_ref():
    x, f = leaf(1, 2, 5, 5, seed=2), leaf(3, 4, seed=3)
    assert_fast_matches_ref(lambda impl, x, f: ops.upfirdn2d(x, f, up=2, down=1, padding=[2, 1, 1, 2], impl=impl), [x, f])


@pytest.mark.parametrize('kw', [dict(up=2, padding=[-3, 2, 1, -2]), dict(down=2, padding=1, flip_filter=True),
                                dict(up=(1, 2), down=(2, 1), gain=2.5)])
def test_upfirdn2d_fast_with_the_batch_folded_into_channels_matches_ref(kw):
    # Few large channels on the CPU take the folded branch (the augment pipe's images at its 2x grid).
    x = leaf(2, 3, 66, 64, seed=3)
    fold = OP_MODULES[0]._fold_batch
    assert fold(x) and not fold(x[:, :1, :8, :8]) and not fold(leaf(2, 64, 66, 64))
    sym6 = torch.tensor([0.0154, 0.0035, -0.118, -0.0483, 0.491, 0.788, 0.338, -0.0726, -0.0211, 0.0447, 0.0018, -0.0078],
                        dtype=torch.float64)
    for f in (sym6, torch.outer(sym6[3:7], sym6[3:7])):
        assert_fast_matches_ref(lambda impl, x: ops.upfirdn2d(x, f, impl=impl, **kw), [x])


def test_upfirdn2d_identity_filter_pads_and_crops_exactly():
    x = torch.randn(2, 3, 5, 6)
    for padding in ([1, 2, 0, 3], [-1, 1, 2, -2], [-2, -1, 0, -1]):
        a = ops.upfirdn2d(x, None, padding=padding, impl='ref')
        b = ops.upfirdn2d(x, None, padding=padding, impl='fast')
        assert torch.equal(a, b)


@pytest.mark.parametrize('kw', [dict(up=2, padding=[2, 1, 2, 1]), dict(down=2, padding=1), dict(up=2, down=2, padding=[1, 2, 0, 1]),
                                dict(padding=[3, 2, 1, -1], flip_filter=True, gain=2), dict(up=(1, 2), down=(2, 1), padding=1)])
def test_upfirdn2d_fast_gradcheck(kw):
    x = leaf(1, 2, 5, 4, seed=4)
    gradchecks(lambda x: ops.upfirdn2d(x, F1331.double(), impl='fast', **kw), [x])


def test_upfirdn2d_fast_separable_gradcheck():
    x, f = leaf(1, 2, 6, 5, seed=5), torch.randn(5, dtype=torch.float64)
    gradchecks(lambda x: ops.upfirdn2d(x, f, up=2, padding=[2, 1, 3, 0], impl='fast'), [x])


# ----------------------------------------------------------------------------
# bias_act

BIAS_ACT_CASES = [
    dict(act=act, bias=bias, gain=gain, clamp=clamp, alpha=alpha, dim=dim)
    for act, bias, gain, clamp, alpha, dim in itertools.product(
        ['linear', 'relu', 'lrelu'], [True, False], [None, 2.0, 0.5], [None, 1.5], [None, -0.1], [1, 2])
    if not (alpha is not None and act != 'lrelu')
]


def _kink_free(*shape, seed):
    """Inputs kept away from 0, where relu/lrelu have kinks that break finite differences."""
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return (x + 0.3 * x.sign()).requires_grad_(True)


@pytest.mark.parametrize('case', BIAS_ACT_CASES, ids=lambda c: '-'.join(f'{k}{v}' for k, v in c.items()))
def test_bias_act_fast_matches_ref(case):
    x = _kink_free(2, 3, 4, 5, seed=6)
    b = leaf(x.shape[case['dim']], seed=7) if case['bias'] else None
    kw = dict(act=case['act'], gain=case['gain'], clamp=case['clamp'], alpha=case['alpha'], dim=case['dim'])
    inputs = [x] + ([b] if b is not None else [])
    assert_fast_matches_ref(lambda impl, x, *b: ops.bias_act(x, b[0] if b else None, impl=impl, **kw), inputs)


@pytest.mark.parametrize('kw', [dict(act='lrelu', clamp=1.0), dict(act='relu', gain=0.7), dict(act='linear', gain=3.0),
                                dict(act='lrelu', alpha=-0.1)])
def test_bias_act_fast_gradcheck(kw):
    x, b = _kink_free(2, 3, 4, seed=8), leaf(3, seed=9)
    gradchecks(lambda x, b: ops.bias_act(x, b * 0.1, impl='fast', **kw), [x, b])


def test_bias_act_fast_leaves_its_input_untouched():
    for kw in [dict(act='lrelu'), dict(act='lrelu', gain=1), dict(act='relu', gain=1), dict(act='lrelu', gain=2)]:
        x = torch.randn(2, 3, 4)
        before = x.clone()
        ops.bias_act(x, None, impl='fast', **kw)
        assert torch.equal(x, before)


def test_bias_act_choice_logic():
    # Activations that are not positively homogeneous, or a gain <= 0, fall back to 'ref'.
    assert choose_impl('bias_act', None, fast_ok=False) == 'ref'
    with pytest.raises(ValueError, match="impl='fast' does not support"):
        ops.bias_act(torch.zeros(2, 3), act='tanh', impl='fast')
    with pytest.raises(ValueError, match="impl='fast' does not support"):
        ops.bias_act(torch.zeros(2, 3), act='lrelu', gain=-1, impl='fast')
    x = torch.randn(2, 3)
    assert torch.equal(ops.bias_act(x, act='tanh'), ops.bias_act(x, act='tanh', impl='ref'))
    assert torch.equal(ops.bias_act(x, act='lrelu', gain=-2), ops.bias_act(x, act='lrelu', gain=-2, impl='ref'))


# ----------------------------------------------------------------------------
# conv2d_resample

CONV_CASES = [
    dict(up=up, down=down, k=k, groups=groups, flip_weight=flip_weight, flip_filter=flip_filter, padding=padding)
    for (up, down), k, groups, flip_weight, flip_filter, padding in itertools.product(
        [(1, 1), (2, 1), (1, 2), (2, 2)], [1, 3], [1, 2], [True, False], [False, True], [0, 1, [1, 0, 2, 1]])
    if not (flip_filter and (up, down) == (1, 1))
]


@pytest.mark.parametrize('case', CONV_CASES, ids=lambda c: '-'.join(f'{k}{v}' for k, v in c.items()).replace(' ', ''))
def test_conv2d_resample_fast_matches_ref(case):
    x = leaf(2, 4, 5, 6, seed=10)
    w = leaf(6, 4 // case['groups'], case['k'], case['k'], seed=11)
    kw = {k: v for k, v in case.items() if k != 'k'}
    assert_fast_matches_ref(lambda impl, x, w: ops.conv2d_resample(x, w, f=F1331.double(), impl=impl, **kw), [x, w])


@pytest.mark.parametrize('kw', [dict(up=2, padding=1, flip_weight=False), dict(down=2, padding=1), dict(down=2, padding=0),
                                dict(up=2, padding=1, groups=2)])
def test_conv2d_resample_fast_gradcheck(kw):
    x = leaf(1, 4, 4, 4, seed=12)
    k = 1 if kw.get('padding') == 0 else 3
    w = leaf(4, 4 // kw.get('groups', 1), k, k, seed=13)
    gradchecks(lambda x, w: ops.conv2d_resample(x, w, f=F1331.double(), impl='fast', **kw), [x, w])


# ----------------------------------------------------------------------------
# modulated_conv2d and fma

MODCONV_CASES = [
    dict(up=up, down=down, demodulate=demod, fused_modconv=fused, k=k, noise=noise)
    for (up, down), demod, fused, k, noise in itertools.product(
        [(1, 1), (2, 1), (1, 2)], [True, False], [True, False], [1, 3], [True, False])
]


@pytest.mark.parametrize('case', MODCONV_CASES, ids=lambda c: '-'.join(f'{k}{v}' for k, v in c.items()))
def test_modulated_conv2d_fast_matches_ref(case):
    x, w, s = leaf(2, 3, 4, 4, seed=14), leaf(5, 3, case['k'], case['k'], seed=15), leaf(2, 3, seed=16)
    res = 4 * case['up'] // case['down']
    noise = torch.randn(2, 1, res, res, dtype=torch.float64) if case['noise'] else None
    kw = dict(up=case['up'], down=case['down'], padding=case['k'] // 2, resample_filter=F1331.double(), demodulate=case['demodulate'],
              flip_weight=(case['up'] == 1), fused_modconv=case['fused_modconv'], noise=noise)
    assert_fast_matches_ref(lambda impl, x, w, s: ops.modulated_conv2d(x, w, s, impl=impl, **kw), [x, w, s])


@pytest.mark.parametrize('fused', [True, False])
@pytest.mark.parametrize('up', [1, 2])
def test_modulated_conv2d_fast_gradcheck(fused, up):
    x, w, s = leaf(2, 3, 3, 3, seed=17), leaf(4, 3, 3, 3, seed=18), leaf(2, 3, seed=19)
    kw = dict(up=up, padding=1, resample_filter=F1331.double(), flip_weight=(up == 1), fused_modconv=fused)
    gradchecks(lambda x, w, s: ops.modulated_conv2d(x, w, s, impl='fast', **kw), [x, w, s])


def test_fma_paths_agree():
    a, b, c = torch.randn(2, 3, 1), torch.randn(1, 3, 4), torch.randn(2, 1, 4)
    assert torch.equal(ops.fma(a, b, c, impl='fast'), ops.fma(a, b, c, impl='ref'))
    assert torch.allclose(ops.fma(a, b, c), a * b + c)


# ----------------------------------------------------------------------------
# float32, choice logic, and the networks

def test_float32_outputs_agree_to_1e_5():
    torch.manual_seed(20)
    x, w, s = torch.randn(4, 16, 16, 16), torch.randn(16, 16, 3, 3), torch.randn(4, 16)
    f12 = ops.setup_filter(torch.rand(12) + 0.1)
    pairs = {
        'upsample2d': lambda impl: ops.upsample2d(x, F1331, impl=impl),
        'downsample2d_sep12': lambda impl: ops.downsample2d(x, f12, impl=impl),
        'upfirdn2d_updown': lambda impl: ops.upfirdn2d(x, F1331, up=2, down=2, padding=[1, 2, 2, 1], impl=impl),
        'conv_up': lambda impl: ops.conv2d_resample(x, w, f=F1331, up=2, padding=1, flip_weight=False, impl=impl),
        'conv_down': lambda impl: ops.conv2d_resample(x, w, f=F1331, down=2, padding=1, impl=impl),
        'modconv_up': lambda impl: ops.modulated_conv2d(x, w, s, up=2, padding=1, resample_filter=F1331, flip_weight=False,
                                                        fused_modconv=False, impl=impl),
        'modconv_fused': lambda impl: ops.modulated_conv2d(x, w, s, padding=1, impl=impl),
        'bias_act': lambda impl: ops.bias_act(x, s[0], act='lrelu', gain=1.3, clamp=2.0, impl=impl),
    }
    for name, fn in pairs.items():
        assert rel(fn('fast'), fn('ref')) < 1e-5, name


def test_choose_impl():
    assert choose_impl('op', None) == 'fast'
    assert choose_impl('op', None, fast_ok=False) == 'ref'
    assert choose_impl('op', 'ref', fast_ok=False) == 'ref'
    with pytest.raises(ValueError, match="unknown op impl 'cuda'"):
        choose_impl('op', 'cuda')
    for fn in (lambda: ops.upfirdn2d(torch.zeros(1, 1, 4, 4), None, impl='x'),
               lambda: ops.conv2d_resample(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 1, 1), impl='x'),
               lambda: ops.modulated_conv2d(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 1, 1), torch.ones(1, 1), impl='x'),
               lambda: ops.fma(torch.zeros(1), torch.zeros(1), torch.zeros(1), impl='x')):
        with pytest.raises(ValueError, match='unknown .* impl'):
            fn()


def tiny_networks():
    torch.manual_seed(21)
    G = Generator(z_dim=8, c_dim=0, w_dim=8, img_resolution=16, img_channels=3, mapping_kwargs=dict(num_layers=2),
                  synthesis_kwargs=dict(channel_base=128, channel_max=8))
    D = Discriminator(c_dim=0, img_resolution=16, img_channels=3, channel_base=128, channel_max=8,
                      epilogue_kwargs=dict(mbstd_group_size=2))
    return G, D


def test_networks_take_the_fast_path_by_default():
    G, D = tiny_networks()
    calls = {}
    stack = contextlib.ExitStack()
    for module in OP_MODULES:
        fast = module._IMPLS['fast']

        def counted(*args, _fast=fast, _name=module.__name__, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _fast(*args, **kwargs)
        stack.enter_context(mock.patch.dict(module._IMPLS, fast=counted))
    with stack:
        D(G(torch.randn(2, 8), None), None)
    assert set(calls) == {m.__name__ for m in OP_MODULES}, calls


def phase_gradients(
    phase,          # 'Gmain', 'Greg', 'Dmain' or 'Dreg'
    impl,           # ops path for every op of the networks
    batch   = 4,    # images per phase
    seed    = 22,   # seed of the images and latents (and, + 1, of the noise inputs)
):
    """Gradients {name: tensor} of one training phase of tiny_networks() with every op on path `impl`."""
    G, D = tiny_networks()
    G.train().requires_grad_(False)
    D.train().requires_grad_(False)
    module = G if phase.startswith('G') else D
    module.requires_grad_(True)
    loss = StyleGAN2Loss(G=G, D=D, r1_gamma=1, pl_weight=2, style_mixing_prob=0)
    gen = torch.Generator().manual_seed(seed)
    real = torch.rand(batch, 3, 16, 16, generator=gen) * 2 - 1
    z = torch.randn(batch, 8, generator=gen)
    c = torch.zeros(batch, 0)
    torch.manual_seed(seed + 1)                                         # same noise inputs for every path
    with ops.default_impl(impl):
        loss.accumulate_gradients(phase=phase, real_img=real, real_c=c, gen_z=z, gen_c=c, gain=1)
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def assert_phase_gradients_close(grads, ref):
    """Every gradient within 1e-5 of the largest of the module (some R1 gradients, e.g. biases, are pure round-off)."""
    assert grads.keys() == ref.keys() and ref
    scale = max(float(g.abs().max()) for g in ref.values())
    for name in ref:
        assert float((grads[name] - ref[name]).abs().max()) < 1e-5 * scale, name


@pytest.mark.parametrize('phase', ['Greg', 'Dreg', 'Gmain'])
def test_training_phase_gradients_fast_equal_ref(phase):
    # Whole-network check of the double backward: path-length (Greg) and R1 (Dreg) gradients, float32.
    assert_phase_gradients_close(phase_gradients(phase, 'fast'), phase_gradients(phase, 'ref'))


def test_default_impl_scope_switches_and_resets():
    from stylegan2ada.ops.impl import choose_impl, default_impl
    assert choose_impl('upfirdn2d', None) == 'fast'
    with pytest.raises(RuntimeError):
        with default_impl('ref'):
            assert choose_impl('upfirdn2d', None) == 'ref'
            assert choose_impl('upfirdn2d', 'fast') == 'fast'          # an explicit impl= wins
            with default_impl(None):
                assert choose_impl('upfirdn2d', None) == 'fast'
            raise RuntimeError('leave the block by an exception')
    assert choose_impl('upfirdn2d', None) == 'fast'                    # reset, even after the exception
    with default_impl('fast'):
        assert choose_impl('bias_act', None, fast_ok=False) == 'ref'   # falls back where the fast path does not apply
    with pytest.raises(ValueError, match='unknown ops impl'):
        with default_impl('cuda'):
            pass
