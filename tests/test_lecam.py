"""LeCam regularizer: value, EMA closed form, gradients (to the logits and to a real D), start_kimg, resume, 2-process EMA."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stylegan2ada.loss import StyleGAN2Loss
from stylegan2ada.networks import Discriminator, Generator
from stylegan2ada.pickles import load_network_pkl, save_network_pkl
from stylegan2ada.training_loop import training_loop
from stylegan2ada.training_stats import StatsCollector
from stylegan2ada.util import UserError
from taxogan_ext.lecam import LECAM_HELP, LeCamRegularizer, LeCamSettingError, lecam_penalty
from training_helpers import tiny_loop_kwargs, write_zip

REAL = [1.0, -0.5, 2.0, 0.3]
FAKE = [-1.0, 0.5, 0.2, -2.0]


def _logits(values, requires_grad=False):
    return torch.tensor(values, dtype=torch.float32).reshape(-1, 1).requires_grad_(requires_grad)  # [N, 1]


def _ema_closed_form(means, decay):
    """ema_k = sum_i (1 - d) d^(k - i) m_i, starting from 0, in float64."""
    k = len(means)
    return sum((1 - decay) * decay ** (k - i) * m for i, m in enumerate(means, start=1))


def test_value_against_hand_computation():
    term = LeCamRegularizer(weight=2.0, decay=0.5)
    loss, stats = term(real_logits=_logits(REAL), gen_logits=_logits(FAKE), cur_nimg=0)
    # Batch means: real 2.8 / 4 = 0.7, fake -2.3 / 4 = -0.575. EMAs from 0 with d = 0.5: 0.35 and -0.2875.
    assert float(term.ema_real) == pytest.approx(0.35, abs=1e-7)
    assert float(term.ema_fake) == pytest.approx(-0.2875, abs=1e-7)
    # relu(real + 0.2875) = [1.2875, 0, 2.2875, 0.5875] -> squares sum 7.23546875, mean 1.8088671875.
    # relu(0.35 - fake)   = [1.35, 0, 0.15, 2.35]       -> squares sum 7.3675,     mean 1.841875.
    penalty = 1.8088671875 + 1.841875                                   # 3.6507421875
    assert float(stats['LeCam/penalty']) == pytest.approx(penalty, rel=1e-6)
    assert float(loss) == pytest.approx(2.0 * penalty, rel=1e-6)      # the returned loss is already weighted
    assert float(stats['Loss/D/lecam']) == pytest.approx(2.0 * penalty, rel=1e-6)
    assert float(stats['LeCam/ema_real']) == pytest.approx(0.35) and float(stats['LeCam/ema_fake']) == pytest.approx(-0.2875)
    assert term.name == 'lecam'
    assert '0.3' in LECAM_HELP and '3e-7' in LECAM_HELP              # literature weights documented for --help


def test_ema_after_k_steps_matches_closed_form():
    rnd = np.random.RandomState(0)
    decay, k = 0.9, 25
    term = LeCamRegularizer(weight=1.0, decay=decay)
    real_means, fake_means = [], []
    for _ in range(k):
        real = rnd.normal(1.5, 2.0, size=8)
        fake = rnd.normal(-1.0, 2.0, size=8)
        term(real_logits=_logits(real.tolist()), gen_logits=_logits(fake.tolist()), cur_nimg=0)
        real_means.append(float(np.float32(real).astype(np.float64).mean()))
        fake_means.append(float(np.float32(fake).astype(np.float64).mean()))
    assert term.num_updates == k
    assert float(term.ema_real) == pytest.approx(_ema_closed_form(real_means, decay), abs=1e-5)
    assert float(term.ema_fake) == pytest.approx(_ema_closed_form(fake_means, decay), abs=1e-5)
    # Starting from 0 without bias correction, the EMA is (1 - d^k) of a constant mean after k steps.
    const = LeCamRegularizer(decay=decay)
    for _ in range(k):
        const(real_logits=_logits([3.0, 3.0]), gen_logits=_logits([-1.0, -1.0]), cur_nimg=0)
    assert float(const.ema_real) == pytest.approx(3.0 * (1 - decay ** k), rel=1e-5)


def test_gradient_wrt_logits_is_analytic():
    weight = 0.7
    term = LeCamRegularizer(weight=weight, decay=0.5)
    real, fake = _logits(REAL, requires_grad=True), _logits(FAKE, requires_grad=True)
    loss, _ = term(real_logits=real, gen_logits=fake, cur_nimg=0)
    loss.backward()
    ema_real, ema_fake = float(term.ema_real), float(term.ema_fake)
    n = len(REAL)
    expected_real = weight * 2 / n * F.relu(_logits(REAL) - ema_fake)     # d/dD(x): 2/N relu(D(x) - ema_fake)
    expected_fake = -weight * 2 / n * F.relu(ema_real - _logits(FAKE))    # d/dD(G(z)): -2/N relu(ema_real - D(G(z)))
    assert torch.allclose(real.grad, expected_real, atol=1e-7)
    assert torch.allclose(fake.grad, expected_fake, atol=1e-7)
    assert real.grad.abs().sum() > 0 and fake.grad.abs().sum() > 0      # the term is not detached


def _tiny_gan():
    torch.manual_seed(0)
    G = Generator(z_dim=4, c_dim=0, w_dim=4, img_resolution=8, img_channels=1,
                  mapping_kwargs=dict(num_layers=1), synthesis_kwargs=dict(channel_base=32, channel_max=4))
    D = Discriminator(c_dim=0, img_resolution=8, img_channels=1, channel_base=32, channel_max=4,
                      epilogue_kwargs=dict(mbstd_group_size=2))
    return G, D


def _d_grads_through_engine(G, D, term, real_img, gen_z, stats=None):
    """D's parameter gradients of one Dmain step of the engine's loss with `term` as extra D term."""
    loss = StyleGAN2Loss(G=G, D=D, r1_gamma=0, style_mixing_prob=0, pl_weight=0, extra_d_terms=[term], stats=stats)
    D.requires_grad_(True)
    for p in D.parameters():
        p.grad = None
    torch.manual_seed(1)                                                # same synthesis noise in every call
    c = torch.zeros([real_img.shape[0], 0])
    loss.accumulate_gradients('Dmain', real_img=real_img, real_c=c, gen_z=gen_z, gen_c=c, gain=1, cur_nimg=0)
    grads = [p.grad.detach().clone() for p in D.parameters()]
    D.requires_grad_(False)
    return grads


def test_d_gradient_changes_with_weight_and_difference_is_the_term():
    G, D = _tiny_gan()
    real_img = torch.randn([4, 1, 8, 8], generator=torch.Generator().manual_seed(2))
    gen_z = torch.randn([4, 4], generator=torch.Generator().manual_seed(3))
    stats = StatsCollector()
    warm = dict(ema_real=0.8, ema_fake=-0.6, num_updates=10)            # warm EMAs so both halves of R_LC are active
    terms = []
    for weight in (0.0, 1.0):
        term = LeCamRegularizer(weight=weight, decay=0.9)
        term.load_state_dict(warm)
        terms.append(term)
    grads0 = _d_grads_through_engine(G, D, terms[0], real_img, gen_z, stats=stats)
    grads1 = _d_grads_through_engine(G, D, terms[1], real_img, gen_z)

    # Gradient of the term alone (weight 1), with the EMAs the weighted call used.
    D.requires_grad_(True)
    torch.manual_seed(1)
    with torch.no_grad():
        gen_img = G.synthesis(G.mapping(gen_z, torch.zeros([4, 0])))
    c = torch.zeros([4, 0])
    real_logits, gen_logits = D(real_img, c), D(gen_img, c)
    penalty = lecam_penalty(real_logits, gen_logits, terms[1].ema_real, terms[1].ema_fake)
    term_grads = torch.autograd.grad(penalty, list(D.parameters()))
    D.requires_grad_(False)

    diff_norm = sum(float((g1 - g0).norm()) for g0, g1 in zip(grads0, grads1))
    assert diff_norm > 1e-3                                              # LeCam changes D's update
    for g0, g1, gt in zip(grads0, grads1, term_grads):
        assert torch.allclose(g1 - g0, gt, atol=1e-5, rtol=1e-4)
    # The engine reports the term's statistics; with weight 0 the applied loss is exactly 0.
    collected = stats.collect(all_reduce=False)
    assert collected['Loss/D/lecam']['mean'] == 0.0
    assert collected['LeCam/ema_real']['mean'] == pytest.approx(float(terms[0].ema_real))
    assert 'LeCam/ema_fake' in collected and collected['LeCam/penalty']['mean'] > 0


def test_before_start_kimg_loss_is_zero_but_ema_updates():
    term = LeCamRegularizer(weight=5.0, decay=0.5, start_kimg=0.01)    # starts at 10 images
    real, fake = _logits(REAL, requires_grad=True), _logits(FAKE, requires_grad=True)
    loss, stats = term(real_logits=real, gen_logits=fake, cur_nimg=9)
    assert float(loss) == 0.0 and not loss.requires_grad
    assert float(stats['Loss/D/lecam']) == 0.0 and float(stats['LeCam/penalty']) > 0
    assert float(term.ema_real) == pytest.approx(0.35) and float(term.ema_fake) == pytest.approx(-0.2875)
    loss, _ = term(real_logits=real, gen_logits=fake, cur_nimg=10)
    # Second update from warm EMAs: 0.35 -> 0.525, -0.2875 -> -0.43125.
    expected = lecam_penalty(_logits(REAL), _logits(FAKE), 0.525, -0.43125) * 5.0
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-6) and loss.requires_grad
    off = LeCamRegularizer()                                            # default weight 0: off, stats still reported
    loss, stats = off(real_logits=real, gen_logits=fake, cur_nimg=10 ** 6)
    assert float(loss) == 0.0 and set(stats) >= {'Loss/D/lecam', 'LeCam/ema_real', 'LeCam/ema_fake'}


@pytest.mark.parametrize('kwargs,match', [(dict(weight=-1), r'^LeCam weight must be >= 0, got -1$'),
                                          (dict(decay=1.0), r'^LeCam decay must be in \[0, 1\), got 1.0$'),
                                          (dict(start_kimg=float('nan')), r'^LeCam start_kimg must be >= 0, got nan$')])
def test_settings_out_of_range_are_user_errors(kwargs, match):
    # A user error: the command-line tools print it as one line (a ValueError would show a traceback).
    with pytest.raises(LeCamSettingError, match=match) as err:
        LeCamRegularizer(**kwargs)
    assert isinstance(err.value, UserError)


def test_state_round_trip_through_pickle_resumes_exactly(tmp_path):
    rnd = np.random.RandomState(1)
    batches = [(rnd.normal(1, 1, 6).tolist(), rnd.normal(-1, 1, 6).tolist()) for _ in range(10)]
    uninterrupted = LeCamRegularizer(weight=0.3, decay=0.95)
    losses_a = [float(uninterrupted(real_logits=_logits(r), gen_logits=_logits(f), cur_nimg=i)[0]) for i, (r, f) in enumerate(batches)]

    first = LeCamRegularizer(weight=0.3, decay=0.95)
    losses_b = [float(first(real_logits=_logits(r), gen_logits=_logits(f), cur_nimg=i)[0]) for i, (r, f) in enumerate(batches[:5])]
    # Saved the way snapshots save it (a plain dict inside the network pickle), then restored into a fresh term.
    save_network_pkl(tmp_path / 'snap.pkl', dict(G=_tiny_gan()[0], progress=dict(loss=dict(extra_d_terms={'lecam': first.state_dict()}))))
    state = load_network_pkl(tmp_path / 'snap.pkl')['progress']['loss']['extra_d_terms']['lecam']
    resumed = LeCamRegularizer(weight=0.3, decay=0.95)
    resumed.load_state_dict(state)
    assert resumed.num_updates == 5 and float(resumed.ema_real) == float(first.ema_real)
    losses_b += [float(resumed(real_logits=_logits(r), gen_logits=_logits(f), cur_nimg=5 + i)[0]) for i, (r, f) in enumerate(batches[5:])]
    assert losses_b == losses_a
    assert resumed.state_dict() == uninterrupted.state_dict()
    # A term restarted from zero instead would give a different value right after the resume point.
    fresh = LeCamRegularizer(weight=0.3, decay=0.95)
    r, f = batches[5]
    assert float(fresh(real_logits=_logits(r), gen_logits=_logits(f), cur_nimg=5)[0]) != pytest.approx(losses_a[5], rel=1e-3)


def test_training_loop_saves_and_resumes_lecam_state(tmp_path):
    data = write_zip(tmp_path / 'd.zip', num_images=8)
    # No augmentation and no lazy regularization: only what LeCam needs, to keep the three runs fast.
    common = dict(augment_kwargs=None, augment_p=0, ada_target=None, image_snapshot_ticks=None, kimg_per_tick=0.008,
                  loss_kwargs=dict(r1_gamma=0, pl_weight=0, style_mixing_prob=0), G_reg_interval=None, D_reg_interval=None,
                  G_opt_kwargs=dict(lr=0.0025, betas=[0.0, 0.99]), D_opt_kwargs=dict(lr=0.0025, betas=[0.0, 0.99]))
    terms = {name: LeCamRegularizer(weight=0.1, decay=0.9) for name in ('full', 'half', 'resumed')}
    full = training_loop(**tiny_loop_kwargs(data, tmp_path / 'full', total_kimg=0.016, extra_d_terms=[terms['full']], **common))
    half = training_loop(**tiny_loop_kwargs(data, tmp_path / 'half', total_kimg=0.008, extra_d_terms=[terms['half']], **common))
    half_state = load_network_pkl(half)['progress']['loss']['extra_d_terms']['lecam']
    assert half_state == terms['half'].state_dict() and half_state['num_updates'] == 2   # one Dmain call per step
    resumed = training_loop(**tiny_loop_kwargs(data, tmp_path / 'half', total_kimg=0.016, resume_pkl=half,
                                               extra_d_terms=[terms['resumed']], **common))
    # The resumed term continued from the saved EMAs: same state as the uninterrupted run, not a restart from 0.
    assert terms['resumed'].num_updates == 4
    assert terms['resumed'].state_dict() == terms['full'].state_dict()
    assert load_network_pkl(resumed)['progress']['loss']['extra_d_terms']['lecam'] == terms['full'].state_dict()
    with open(tmp_path / 'full' / 'stats.jsonl') as f:
        records = [json.loads(line) for line in f]
    for key in ('Loss/D/lecam', 'LeCam/ema_real', 'LeCam/ema_fake'):
        assert any(key in r for r in records), key
    assert records[-1]['LeCam/ema_real']['mean'] == pytest.approx(terms['full'].state_dict()['ema_real'], rel=1e-6)
    assert full == str(tmp_path / 'full' / 'network-snapshot-000000.pkl')


def _distributed_worker(rank, init_file, out_dir, decay, rank_batches):
    torch.distributed.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    try:
        term = LeCamRegularizer(weight=1.0, decay=decay)
        for real, fake in rank_batches[rank]:
            term(real_logits=_logits(real), gen_logits=_logits(fake), cur_nimg=0)
        with open(os.path.join(out_dir, f'rank{rank}.json'), 'w') as f:
            json.dump(term.state_dict(), f)
    finally:
        torch.distributed.destroy_process_group()


def test_two_process_gloo_ema_is_ema_of_global_means(tmp_path):
    rnd = np.random.RandomState(2)
    decay, steps = 0.8, 3
    # Each rank sees different logits (rank 1 shifted by +3 / -3).
    rank_batches = [[(rnd.normal(3 * r, 1, 4).astype(np.float32).tolist(), rnd.normal(-3 * r, 1, 4).astype(np.float32).tolist())
                     for _ in range(steps)] for r in range(2)]
    torch.multiprocessing.spawn(_distributed_worker, args=(str(tmp_path / 'init'), str(tmp_path), decay, rank_batches), nprocs=2)
    states = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in range(2)]
    assert states[0] == states[1]                                       # identical EMAs on every replica
    real_means = [np.mean(rank_batches[0][i][0] + rank_batches[1][i][0]) for i in range(steps)]
    fake_means = [np.mean(rank_batches[0][i][1] + rank_batches[1][i][1]) for i in range(steps)]
    assert states[0]['ema_real'] == pytest.approx(_ema_closed_form(real_means, decay), abs=1e-5)
    assert states[0]['ema_fake'] == pytest.approx(_ema_closed_form(fake_means, decay), abs=1e-5)
    one_rank = _ema_closed_form([np.mean(b[0]) for b in rank_batches[0]], decay)
    assert abs(states[0]['ema_real'] - one_rank) > 0.1                 # not rank 0's local EMA
