"""StyleGAN2Loss's terms against closed forms: logistic losses, lazy R1 (gamma / 2, summed over pixels) and the path-length
regulariser (its tracked mean and penalty), with tiny float64 networks whose gradients are known analytically."""

import math

import torch
import torch.nn.functional as F

from stylegan2ada.loss import StyleGAN2Loss

N, C, H, W = 4, 3, 4, 5                 # non-square images: sqrt(H * W) differs from H and from W
NUM_WS, W_DIM = 3, 6


class QuadraticD(torch.nn.Module):
    """D(x) = sum(a * x^2) per sample: dD/dx = 2 a x, so R1 = sum(4 a^2 x^2) in closed form."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.rand([C, H, W], dtype=torch.float64) + 0.5)

    def forward(self, img, c):
        return (self.a * img.square()).sum(dim=[1, 2, 3])[:, None]     # [N, 1]


class LinearG(torch.nn.Module):
    """ws = z repeated per layer; img = sum over layers of ws . M: a constant Jacobian, so path lengths are closed-form."""

    def __init__(self):
        super().__init__()
        self.M = torch.nn.Parameter(torch.randn([NUM_WS, W_DIM, C, H, W], dtype=torch.float64))
        self.scale = torch.nn.Parameter(torch.ones([], dtype=torch.float64))     # so that ws require grad, as a mapping's do
        self.z_dim, self.c_dim = W_DIM, 0

    def mapping(self, z, c, **_):
        return z[:, None, :].repeat(1, NUM_WS, 1) * self.scale          # [N, num_ws, w_dim]

    def synthesis(self, ws):
        return torch.einsum('nlw,lwchx->nchx', ws, self.M)              # [N, C, H, W]


def _inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    real = torch.randn([N, C, H, W], dtype=torch.float64, generator=generator)
    z = torch.randn([N, W_DIM], dtype=torch.float64, generator=generator)
    return real, torch.zeros([N, 0]), z, torch.zeros([N, 0])


def test_r1_is_half_gamma_times_the_summed_squared_gradient():
    torch.manual_seed(0)
    D = QuadraticD()
    gamma, gain = 3.0, 16
    loss = StyleGAN2Loss(G=None, D=D, r1_gamma=gamma, pl_weight=0, style_mixing_prob=0)
    real, real_c, z, c = _inputs()
    loss.accumulate_gradients('Dreg', real, real_c, z, c, gain=gain)
    a = D.a.detach()
    penalty = (4 * a.square() * real.square()).sum(dim=[1, 2, 3])                   # [N] |dD/dx|^2
    assert torch.allclose(loss.last_losses['Loss/r1_penalty'], penalty, rtol=1e-12, atol=0)
    assert torch.allclose(loss.last_losses['Loss/D/reg'], penalty * gamma / 2, rtol=1e-12, atol=0)
    # d/da of gain * mean_n (gamma / 2) * sum(4 a^2 x_n^2) = gain * gamma * 4 a * mean_n x_n^2
    expected = gain * gamma * 4 * a * real.square().mean(dim=0)
    assert torch.allclose(D.a.grad, expected, rtol=1e-12, atol=0)


def test_logistic_losses_of_d_and_g():
    torch.manual_seed(0)
    G, D = LinearG(), QuadraticD()
    loss = StyleGAN2Loss(G=G, D=D, r1_gamma=0, pl_weight=0, style_mixing_prob=0)
    real, real_c, z, c = _inputs(1)
    loss.accumulate_gradients('Dmain', real, real_c, z, c, gain=1)
    fake = G.synthesis(G.mapping(z, c)).detach()
    a = D.a.detach().clone().requires_grad_(True)
    logits = lambda x: (a * x.square()).sum(dim=[1, 2, 3])
    reference = F.softplus(logits(fake)).mean() + F.softplus(-logits(real)).mean()     # -log(1 - s(D(G(z)))) - log s(D(x))
    grad, = torch.autograd.grad(reference, a)
    assert torch.allclose(D.a.grad, grad, rtol=1e-12, atol=0) and G.M.grad is None
    D.a.grad = None
    loss.accumulate_gradients('Gmain', real, real_c, z, c, gain=2)
    M = G.M.detach().clone().requires_grad_(True)
    fake = torch.einsum('nlw,lwchx->nchx', z[:, None, :].repeat(1, NUM_WS, 1), M)
    grad, = torch.autograd.grad(2 * F.softplus(-(D.a.detach() * fake.square()).sum(dim=[1, 2, 3])).mean(), M)
    assert torch.allclose(G.M.grad, grad, rtol=1e-12, atol=0)


def test_path_length_mean_and_penalty_follow_the_formula():
    torch.manual_seed(0)
    G = LinearG()
    decay, weight, shrink = 0.3, 2.0, 2
    loss = StyleGAN2Loss(G=G, D=None, r1_gamma=0, pl_weight=weight, pl_batch_shrink=shrink, pl_decay=decay, style_mixing_prob=0)
    loss.pl_mean = torch.zeros([], dtype=torch.float64)        # the state's dtype follows the network's (float32 in training)
    real, real_c, z, c = _inputs(2)
    M = G.M.detach()
    pl_mean = 0.0
    for step in range(3):
        torch.manual_seed(10 + step)
        loss.accumulate_gradients('Greg', real, real_c, z, c, gain=4)
        # The noise is the first draw of the phase: y ~ N(0, 1) / sqrt(H W), one image per path-length sample.
        torch.manual_seed(10 + step)
        y = torch.randn_like(torch.zeros([N // shrink, C, H, W], dtype=torch.float64)) / math.sqrt(H * W)
        grads = torch.einsum('nchx,lwchx->nlw', y, M)                                  # [n, num_ws, w_dim] J^T y
        lengths = grads.square().sum(dim=2).mean(dim=1).sqrt()                          # [n]
        pl_mean = pl_mean + decay * (float(lengths.mean()) - pl_mean)                   # moves `decay` of the way
        assert math.isclose(float(loss.pl_mean), pl_mean, rel_tol=1e-12)
        penalty = (lengths - pl_mean).square()
        assert torch.allclose(loss.last_losses['Loss/pl_penalty'], penalty, rtol=1e-10, atol=1e-15)
        assert torch.allclose(loss.last_losses['Loss/G/reg'], penalty * weight, rtol=1e-10, atol=1e-15)
    state = loss.state_dict()
    assert math.isclose(float(state['pl_mean']), pl_mean, rel_tol=1e-12)
