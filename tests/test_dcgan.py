"""DCGAN baseline: shapes, parameter counts, init, pickles + generate.py, BCE = engine loss, a tiny training run."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stylegan2ada.image_utils import generate_images, to_uint8
from stylegan2ada.loss import StyleGAN2Loss
from stylegan2ada.pickles import load_network_pkl, save_network_pkl
from stylegan2ada.training_loop import training_loop
from stylegan2ada.util import UserError
from taxogan_ext.dcgan import DCGAN_DEFAULTS, DCGANConfigError, DCGANDiscriminator, DCGANGenerator
from training_helpers import tiny_loop_kwargs, write_zip


def _num_params(module):
    return sum(p.numel() for p in module.parameters())


def _channels(res, img_resolution, width, max_channels):
    return min(width * img_resolution // (2 * res), max_channels)


def _g_params_formula(z_dim, img_resolution, img_channels, ngf, max_channels):
    """4x4 kernels, no conv biases; each hidden layer has a batch norm (scale + shift)."""
    resolutions = [4 * 2 ** i for i in range(int(np.log2(img_resolution)) - 2)]  # 4 .. img_resolution / 2
    chans = [_channels(r, img_resolution, ngf, max_channels) for r in resolutions]
    total = z_dim * chans[0] * 16 + 2 * chans[0]
    for cin, cout in zip(chans[:-1], chans[1:]):
        total += cin * cout * 16 + 2 * cout
    return total + chans[-1] * img_channels * 16


def _d_params_formula(img_resolution, img_channels, ndf, max_channels):
    resolutions = [img_resolution // 2 ** i for i in range(1, int(np.log2(img_resolution)) - 1)]  # img/2 .. 4
    chans = [_channels(r, img_resolution, ndf, max_channels) for r in resolutions]
    total = img_channels * chans[0] * 16                               # first layer: no batch norm
    for cin, cout in zip(chans[:-1], chans[1:]):
        total += cin * cout * 16 + 2 * cout
    return total + chans[-1] * 16                                      # 4x4 -> one logit


@pytest.mark.parametrize('resolution', [32, 64, 128, 256])
@pytest.mark.parametrize('channels', [1, 3])
def test_shapes_and_range(resolution, channels):
    torch.manual_seed(0)
    G = DCGANGenerator(z_dim=8, img_resolution=resolution, img_channels=channels, ngf=2, max_channels=8)
    D = DCGANDiscriminator(img_resolution=resolution, img_channels=channels, ndf=2, max_channels=8)
    z = torch.randn([3, 8]) * 10                                        # large z: tanh must still bound the output
    c = torch.zeros([3, 0])
    ws = G.mapping(z, c)
    assert ws.shape == (3, G.num_ws, G.w_dim) == (3, 1, 8)
    img = G.synthesis(ws, noise_mode='const')
    assert img.shape == (3, channels, resolution, resolution)
    assert img.abs().max() <= 1 and img.std() > 0
    logits = D(img, c)
    assert logits.shape == (3, 1)
    # Stride-2 layers: log2(res) - 2 in G after the 4x4 projection, log2(res) - 2 in D before the 4x4 head.
    n_up = sum(isinstance(m, torch.nn.ConvTranspose2d) and m.stride == (2, 2) for m in G.modules())
    n_down = sum(isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2) for m in D.modules())
    assert n_up == n_down == int(np.log2(resolution)) - 2


def test_parameter_counts_against_hand_formula():
    G = DCGANGenerator(z_dim=8, img_resolution=64, img_channels=3, ngf=4, max_channels=512)
    D = DCGANDiscriminator(img_resolution=64, img_channels=3, ndf=4, max_channels=512)
    # G: 8*32*16 + 64 | 32*16*16 + 32 | 16*8*16 + 16 | 8*4*16 + 8 | 4*3*16 = 4160 + 8224 + 2064 + 520 + 192.
    assert _num_params(G) == 15160 == _g_params_formula(8, 64, 3, 4, 512)
    # D: 3*4*16 | 4*8*16 + 16 | 8*16*16 + 32 | 16*32*16 + 64 | 32*1*16 = 192 + 528 + 2080 + 8256 + 512.
    assert _num_params(D) == 11568 == _d_params_formula(64, 3, 4, 512)
    # Channel cap: 128 px with ngf = ndf = 16 and max_channels 64 caps the 4x4 and 8x8 layers.
    G = DCGANGenerator(z_dim=10, img_resolution=128, img_channels=1, ngf=16, max_channels=64)
    D = DCGANDiscriminator(img_resolution=128, img_channels=1, ndf=16, max_channels=64)
    assert _num_params(G) == _g_params_formula(10, 128, 1, 16, 64)
    assert _num_params(D) == _d_params_formula(128, 1, 16, 64)
    assert G.synthesis.net[0].out_channels == 64 and D.net[-1].in_channels == 64


def test_init_statistics():
    torch.manual_seed(0)
    G = DCGANGenerator()                                                # 64 px, ngf 64: ~3.6M conv weights
    D = DCGANDiscriminator()
    for net in (G, D):
        convs = torch.cat([m.weight.detach().flatten() for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))])
        assert float(convs.std()) == pytest.approx(0.02, rel=0.01) and abs(float(convs.mean())) < 1e-4
        bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        scales = torch.cat([m.weight.detach() for m in bns])
        assert float(scales.mean()) == pytest.approx(1.0, abs=0.005)
        assert float(scales.std()) == pytest.approx(0.02, rel=0.15)   # ~1000 samples
        assert all(float(m.bias.detach().abs().max()) == 0 for m in bns)
        assert all(m.bias is None for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)))


def test_bad_configurations_raise():
    # Configurations are user errors (one line from the command-line tools) that pickle loading still sees as ValueError.
    assert issubclass(DCGANConfigError, UserError) and issubclass(DCGANConfigError, ValueError)
    with pytest.raises(DCGANConfigError, match='unconditional'):
        DCGANGenerator(c_dim=4)
    with pytest.raises(DCGANConfigError, match='unconditional'):
        DCGANDiscriminator(c_dim=2)
    with pytest.raises(DCGANConfigError, match='resolutions'):
        DCGANGenerator(img_resolution=48)
    with pytest.raises(DCGANConfigError, match='channels'):
        DCGANDiscriminator(img_channels=2)
    G = DCGANGenerator(z_dim=8, img_resolution=32, ngf=2)
    with pytest.raises(ValueError, match='unconditional'):
        G(torch.randn([2, 8]), torch.ones([2, 3]))


def test_truncation_scales_z():
    G = DCGANGenerator(z_dim=8, img_resolution=32, ngf=2).eval()
    z = torch.randn([2, 8])
    assert torch.equal(G.mapping(z, None, truncation_psi=0.5), z.unsqueeze(1) * 0.5)
    assert torch.allclose(G(z, None, truncation_psi=0.5), G.synthesis(z.unsqueeze(1) * 0.5))


def test_pickle_round_trip_and_generate(tmp_path):
    torch.manual_seed(0)
    G = DCGANGenerator(z_dim=16, img_resolution=32, img_channels=3, ngf=4)
    D = DCGANDiscriminator(img_resolution=32, img_channels=3, ndf=4)
    G(torch.randn([8, 16]), None)                                      # a training-mode pass: non-trivial BN running stats
    G.eval()
    D.eval()
    save_network_pkl(tmp_path / 'dcgan.pkl', dict(G=G, D=D, G_ema=G))
    data = load_network_pkl(tmp_path / 'dcgan.pkl')
    assert isinstance(data['G_ema'], DCGANGenerator) and isinstance(data['D'], DCGANDiscriminator)
    assert data['G_ema'].init_kwargs == G.init_kwargs
    for key, ref in (('G', G), ('G_ema', G), ('D', D)):
        for (name, x), y in zip(ref.state_dict().items(), data[key].state_dict().values()):
            assert torch.equal(x, y), f'{key}.{name}'
    images = generate_images(data['G_ema'], seeds=[0, 1])
    z = torch.from_numpy(np.stack([np.random.RandomState(s).randn(16) for s in (0, 1)])).float()
    with torch.no_grad():
        direct = G(z, torch.zeros([2, 0]), noise_mode='const')
        assert torch.equal(data['G_ema'](z, torch.zeros([2, 0])), direct)
        img = torch.randn([2, 3, 32, 32])
        assert torch.equal(data['D'](img, None), D(img, None))
    assert images.dtype == torch.uint8 and images.shape == (2, 3, 32, 32)
    assert torch.equal(images, to_uint8(direct))


def test_softplus_equals_bce():
    logits = torch.linspace(-30, 30, 121, dtype=torch.float64)
    ones, zeros = torch.ones_like(logits), torch.zeros_like(logits)
    bce_real = F.binary_cross_entropy_with_logits(logits, ones, reduction='none')     # BCE(D(x), 1)
    bce_fake = F.binary_cross_entropy_with_logits(logits, zeros, reduction='none')    # BCE(D(G(z)), 0)
    # softplus switches to the identity above 20 (error < exp(-20) ~ 2e-9); elsewhere they agree to rounding.
    assert float((bce_real - F.softplus(-logits)).abs().max()) < 2e-9
    assert float((bce_fake - F.softplus(logits)).abs().max()) < 2e-9
    # Hand values: softplus(0) = log 2, softplus(-1) = log(1 + e^-1) = 0.313261687518...
    assert float(F.binary_cross_entropy_with_logits(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))) == pytest.approx(np.log(2), rel=1e-12)
    assert float(F.softplus(torch.tensor(-1.0, dtype=torch.float64))) == pytest.approx(0.31326168751822286, rel=1e-12)
    assert float(F.binary_cross_entropy_with_logits(torch.tensor(1.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))) == pytest.approx(0.31326168751822286, rel=1e-12)


def test_engine_loss_is_dcgan_bce():
    # The engine's loss with the baseline's settings gives the same D and G gradients as DCGAN's BCE.
    torch.manual_seed(0)
    G = DCGANGenerator(z_dim=8, img_resolution=32, img_channels=1, ngf=4).train().requires_grad_(False)
    D = DCGANDiscriminator(img_resolution=32, img_channels=1, ndf=4).train().requires_grad_(False)
    loss = StyleGAN2Loss(G=G, D=D, r1_gamma=DCGAN_DEFAULTS['r1_gamma'], pl_weight=DCGAN_DEFAULTS['pl_weight'],
                         style_mixing_prob=DCGAN_DEFAULTS['style_mixing_prob'])
    real = torch.rand([4, 1, 32, 32]) * 2 - 1
    z = torch.randn([4, 8])
    c = torch.zeros([4, 0])

    def engine_grads(phase, module):
        module.requires_grad_(True)
        for p in module.parameters():
            p.grad = None
        loss.accumulate_gradients(phase, real_img=real, real_c=c, gen_z=z, gen_c=c, gain=1)
        module.requires_grad_(False)
        return [p.grad.clone() for p in module.parameters()]

    def bce_grads(module, value):
        module.requires_grad_(True)
        grads = torch.autograd.grad(value(), list(module.parameters()))
        module.requires_grad_(False)
        return grads

    def d_bce():
        with torch.no_grad():
            fake = G(z, c)
        real_logits, fake_logits = D(real, c), D(fake, c)               # separate BN batches, as in the engine
        return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
                + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))

    def g_bce():
        fake_logits = D(G(z, c), c)
        return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))

    for phase, module, value in (('Dboth', D, d_bce), ('Gboth', G, g_bce)):
        expected = bce_grads(module, value)
        got = engine_grads(phase, module)
        assert sum(float(g.abs().sum()) for g in got) > 0
        for g, e in zip(got, expected):
            assert torch.allclose(g, e, rtol=1e-4, atol=1e-7), phase


def _two_images(resolution=32):
    """A bright square and a dark disc, [2, 1, H, W] in [-1, 1]."""
    yy, xx = torch.meshgrid(torch.arange(resolution), torch.arange(resolution), indexing='ij')
    square = ((xx - 16).abs() < 8) & ((yy - 16).abs() < 8)
    disc = (xx - 10) ** 2 + (yy - 20) ** 2 < 36
    return torch.stack([square.float() * 1.6 - 0.8, 0.8 - disc.float() * 1.6]).unsqueeze(1)


def test_tiny_training_lowers_d_loss():
    torch.manual_seed(0)
    G = DCGANGenerator(z_dim=16, img_resolution=32, img_channels=1, ngf=8)
    D = DCGANDiscriminator(img_resolution=32, img_channels=1, ndf=8)
    opt_G = torch.optim.Adam(G.parameters(), **DCGAN_DEFAULTS['G_opt'])
    opt_D = torch.optim.Adam(D.parameters(), **DCGAN_DEFAULTS['D_opt'])
    reals = _two_images().repeat(2, 1, 1, 1)                            # batch of 4: the 2 images twice
    eval_z = torch.randn([4, 16], generator=torch.Generator().manual_seed(1))

    def d_loss():
        with torch.no_grad():
            return float(F.softplus(-D(reals)).mean() + F.softplus(D(G(eval_z))).mean())

    before = d_loss()
    for _ in range(16):
        fake = G(torch.randn([4, 16]))
        loss_D = F.softplus(-D(reals)).mean() + F.softplus(D(fake.detach())).mean()
        opt_D.zero_grad(set_to_none=True)
        loss_D.backward()
        opt_D.step()
        loss_G = F.softplus(-D(G(torch.randn([4, 16])))).mean()
        opt_G.zero_grad(set_to_none=True)
        loss_G.backward()
        opt_G.step()
    after = d_loss()
    # At init D cannot tell reals from fakes: loss ~ 2 log 2 = 1.386. Measured (seed 0): 1.421 -> 0.865.
    assert before == pytest.approx(2 * np.log(2), abs=0.1)
    assert after < before - 0.4


def _dcgan_loop_kwargs(data, run_dir, **overrides):
    d = DCGAN_DEFAULTS
    return tiny_loop_kwargs(
        data, run_dir,
        G_class=f'{DCGANGenerator.__module__}.{DCGANGenerator.__qualname__}',
        D_class=f'{DCGANDiscriminator.__module__}.{DCGANDiscriminator.__qualname__}',
        G_kwargs=dict(z_dim=8, ngf=2), D_kwargs=dict(ndf=2), G_opt_kwargs=dict(d['G_opt']), D_opt_kwargs=dict(d['D_opt']),
        loss_kwargs=dict(r1_gamma=d['r1_gamma'], pl_weight=d['pl_weight'], style_mixing_prob=d['style_mixing_prob']),
        ema_kimg=d['ema_kimg'], ema_rampup=None, G_reg_interval=None, D_reg_interval=None,
        **{**dict(augment_kwargs=None, augment_p=0, ada_target=None, total_kimg=0.008, kimg_per_tick=0.004,
                  image_snapshot_ticks=None), **overrides})


def test_training_loop_trains_dcgan_with_its_defaults(tmp_path):
    data = write_zip(tmp_path / 'd.zip', num_images=4, resolution=32, channels=1)
    snap = load_network_pkl(training_loop(**_dcgan_loop_kwargs(data, tmp_path / 'run')))
    assert isinstance(snap['G'], DCGANGenerator) and isinstance(snap['D'], DCGANDiscriminator)
    assert snap['G'].img_resolution == 32 and snap['G'].img_channels == 1
    init = DCGANGenerator(**snap['G'].init_kwargs)
    assert any(not torch.equal(a, b) for a, b in zip(init.state_dict().values(), snap['G'].state_dict().values()))  # trained
    for (name, x), y in zip(snap['G'].state_dict().items(), snap['G_ema'].state_dict().values()):
        assert torch.equal(x, y), name                                  # ema_kimg 0: G_ema = G
    assert generate_images(snap['G_ema'], seeds=[0]).shape == (1, 1, 32, 32)


def test_dcgan_trains_through_oplog_graphs_exactly_as_eagerly(tmp_path):
    # Gboth/Dboth phases (no lazy regularization) and batch-norm running statistics updated in place: 6 iterations, so
    # each phase runs eagerly, is captured, then replayed 4 times.
    data = write_zip(tmp_path / 'd.zip', num_images=4, resolution=32, channels=1)
    snapshots = {}
    for name, graphs in [('eager', None), ('graphs', 'oplog')]:
        kwargs = _dcgan_loop_kwargs(data, tmp_path / name, phase_graphs=graphs, total_kimg=0.024, kimg_per_tick=0.024)
        snapshots[name] = load_network_pkl(training_loop(**kwargs))
    a, b = snapshots['eager'], snapshots['graphs']
    assert a['progress']['cur_nimg'] == b['progress']['cur_nimg'] == 24
    assert any(key.endswith('running_mean') for key in a['G'].state_dict())  # batch-norm statistics compared too
    for name in ('G', 'D', 'G_ema'):
        state_a, state_b = a[name].state_dict(), b[name].state_dict()
        for key in state_a:
            assert torch.equal(state_a[key], state_b[key]), f'{name}.{key} differs'
    log = (tmp_path / 'graphs' / 'log.txt').read_text()
    captured = [line for line in log.splitlines() if line.startswith('Op-log graph of phase ')]
    assert captured == ['Op-log graph of phase Gboth captured', 'Op-log graph of phase Dboth captured']
