"""Training phases as graphs (stylegan2ada/graphs.py, training_loop.PhaseGraphs).

A CUDA graph replays the kernels of its capture on the same memory with the constants of the capture. Its model,
the 'oplog' backend, does the same with aten ops on the CPU; training through it must give exactly the numbers of
eager training. Any Python value that changed between iterations inside a phase, any state replaced instead of
updated in place, any host-side effect lost on replay would make them differ, so equality here is the CPU check
that the phases are fit for CUDA graphs.
"""

import numpy as np
import pytest
import torch

from stylegan2ada import graphs as graph_backends
from stylegan2ada.graphs import GraphCaptureError, OpLogGraph
from stylegan2ada.loss import StyleGAN2Loss
from stylegan2ada.pickles import load_network_pkl
from stylegan2ada.training_loop import PhaseGraphs, ada_adjust_, run_phases, training_loop, update_ema_
from stylegan2ada.util import UserError
from taxogan_ext.lecam import LeCamRegularizer

from test_training_iteration import tiny_state
from training_helpers import tiny_loop_kwargs, write_zip


@pytest.fixture(name='tiny_dataset')
def _tiny_dataset(tmp_path):
    return write_zip(tmp_path / 'data.zip')

#----------------------------------------------------------------------------
# The model backend itself.

def test_oplog_replay_reads_state_in_place_draws_fresh_numbers_and_keeps_python_constants():
    state = torch.zeros([3])
    static_x = torch.tensor([1.0, 2.0, 3.0])
    scale = [2.0]                                       # a Python value: frozen at capture, as in a CUDA graph

    def step(x):
        state.add_(x * scale[0])                        # in-place state update
        return state * torch.randn([3])                 # a fresh draw every run

    torch.manual_seed(0)
    graph = OpLogGraph()
    first = graph.capture(lambda: step(static_x))
    outputs = [first]
    for value in ([10.0, 20.0, 30.0], [-1.0, 0.0, 1.0]):
        static_x.copy_(torch.tensor(value))
        scale[0] = 100.0                                # not seen by the replay
        outputs.append(graph.replay())

    # The same computation eagerly, with the captured constant.
    torch.manual_seed(0)
    ref_state = torch.zeros([3])
    expected = []
    for value in ([1.0, 2.0, 3.0], [10.0, 20.0, 30.0], [-1.0, 0.0, 1.0]):
        ref_state.add_(torch.tensor(value) * 2.0)
        expected.append(ref_state * torch.randn([3]))
    assert torch.equal(state, ref_state)
    for got, want in zip(outputs, expected):
        assert torch.equal(got, want)
    assert not torch.equal(outputs[1] / state, outputs[2] / state)   # the draws differ between replays


def test_oplog_refuses_a_host_read():
    x = torch.ones([2])
    with pytest.raises(GraphCaptureError, match='reads a device value on the host'):
        OpLogGraph().capture(lambda: x * float(x.sum()))


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="unknown graph backend 'metal'"):
        graph_backends.make_graph('metal')

#----------------------------------------------------------------------------
# Training through graphs equals eager training.

def _train(iterations, graphs, rounds=2, batch=4, seed=5, lecam_start_kimg=0.06, make_graph=None, log=None):
    """Tiny training with every phase, LeCam switching on part-way, ADA moving p every 4 iterations."""
    state = tiny_state('cpu', augment_p=0.3, extra_d_terms=[LeCamRegularizer(weight=0.1, start_kimg=lecam_start_kimg)])
    state['augment_pipe'].skip_at_p0 = False             # what PhaseGraphs sets; the eager run must match it
    runner = PhaseGraphs(state['loss'], backend=graphs, log=log or (lambda line: None)) if graphs else None
    torch.manual_seed(seed)
    G, phases = state['G'], state['phases']
    for batch_idx in range(iterations):
        real_img = [torch.rand([batch, 3, 16, 16]) * 2 - 1 for _ in range(rounds)]
        real_c = [torch.zeros([batch, 0]) for _ in range(rounds)]
        gen_z = torch.randn([len(phases), rounds, batch, G.z_dim])
        gen_c = torch.zeros([len(phases), rounds, batch, 0])
        run_phases(phases, state['loss'], batch_idx, real_img, real_c, gen_z, gen_c, cur_nimg=batch_idx * batch * rounds,
                   num_gpus=1, watch=state['watch'], graphs=runner)
        update_ema_(state['G_ema'], G, beta=0.9)
        if batch_idx % 4 == 3:
            sign_sum, count = state['watch'].take_real_signs()
            state['stats'].report('Progress/ada_rt', ada_adjust_(state['augment_pipe'], sign_sum, count, target=0.6, step=0.05))
    state['runner'] = runner
    return state


def _assert_same_training_state(a, b):
    for name in ('G', 'D', 'G_ema', 'augment_pipe'):
        for (key, x), (_, y) in zip(a[name].state_dict().items(), b[name].state_dict().items()):
            assert torch.equal(x, y), f'{name}.{key} differs'
    for phase_a, phase_b in zip(a['phases'], b['phases']):
        state_a, state_b = phase_a['opt'].state_dict()['state'], phase_b['opt'].state_dict()['state']
        for index in state_a:
            for key in state_a[index]:
                assert torch.equal(state_a[index][key], state_b[index][key]), f'{phase_a["name"]} Adam {key} differs'
    loss_a, loss_b = a['loss'].state_dict(), b['loss'].state_dict()
    assert torch.equal(loss_a['pl_mean'], loss_b['pl_mean'])
    assert loss_a['extra_d_terms'] == loss_b['extra_d_terms']
    assert a['watch'].non_finite(num_gpus=1) == b['watch'].non_finite(num_gpus=1) == []
    assert a['stats'].collect(all_reduce=False) == b['stats'].collect(all_reduce=False)


def test_training_through_oplog_graphs_equals_eager_training_exactly():
    # 34 iterations: Dreg runs eagerly at 0, is captured at 16, replayed at 32; LeCam switches on at 60 images
    # (iteration 8), which captures new D graphs; p moves every 4 iterations and the graphs read it in place.
    eager = _train(34, graphs=None)
    graphed = _train(34, graphs='oplog')
    _assert_same_training_state(eager, graphed)
    assert float(graphed['augment_pipe'].p) != 0.3                 # ADA moved p between replays
    graphs = graphed['runner']._graphs                                # pylint: disable=protected-access
    # Each (phase, key) runs eagerly once, is captured on its second run (which runs it), and is replayed on every run
    # after that: Gmain and Dmain run every iteration (Dmain with LeCam off at iterations 0-7, on at 8-33), Greg every
    # 4th (9 runs), Dreg every 16th (3 runs). A replay that ran the phase eagerly instead would give the same state.
    replays = {key: graph.num_replays for key, (graph, _) in graphs.items()}
    assert replays == {('Gmain', ()): 32, ('Dmain', ('lecam off',)): 6, ('Dmain', ('lecam on',)): 24, ('Greg', ()): 7,
                       ('Dreg', ()): 1}
    assert graphed['runner']._eager_runs == {key: 1 for key in replays}      # pylint: disable=protected-access


def test_phases_compute_on_the_device_only():
    # On CUDA, an op on CPU tensors inside a phase would run once at capture and be replayed as a frozen value (a CPU
    # scalar mixed into a device op is passed by value). The meta device stands in for the GPU here: every tensor that
    # a captured phase reads must be on it.
    state = tiny_state('meta', augment_p=0.3, extra_d_terms=[LeCamRegularizer(weight=0.1)])
    runner = PhaseGraphs(state['loss'], backend='oplog', log=lambda line: None)
    G, phases = state['G'], state['phases']
    for phase in phases:
        # Adam keeps its step count on the host unless fused or capturable, neither of which meta offers; on CUDA the
        # loop's Adam is both. SGD has no step count.
        phase['opt'] = torch.optim.SGD(phase['module'].parameters(), lr=0.01, foreach=True)
    for batch_idx in range(17):
        real_img = [torch.rand([4, 3, 16, 16], device='meta')]
        real_c = [torch.zeros([4, 0], device='meta')]
        gen_z = torch.randn([len(phases), 1, 4, G.z_dim], device='meta')
        gen_c = torch.zeros([len(phases), 1, 4, 0], device='meta')
        run_phases(phases, state['loss'], batch_idx, real_img, real_c, gen_z, gen_c, cur_nimg=batch_idx * 4, num_gpus=1,
                   watch=state['watch'], graphs=runner)
    graphs = runner._graphs                                           # pylint: disable=protected-access
    assert sorted(name for name, _ in graphs) == ['Dmain', 'Dreg', 'Gmain', 'Greg']
    for key, (graph, _) in graphs.items():
        assert graph.devices() == {'meta'}, key


def test_oplog_reports_the_devices_its_ops_read():
    x = torch.ones([2], device='meta')
    graph = OpLogGraph()
    graph.capture(lambda: x * torch.ones([], dtype=torch.float32) + 1)   # a CPU scalar tensor in a device op
    assert graph.devices() == {'meta', 'cpu'}


def test_a_failed_capture_runs_the_phase_eagerly_after_one_line(monkeypatch):
    class FailingGraph:
        def capture(self, fn):
            raise RuntimeError('operation not permitted when stream is capturing\ndetails')

    monkeypatch.setattr(graph_backends, 'make_graph', lambda backend, pool=None: FailingGraph())
    monkeypatch.setattr(torch.cuda, 'graph_pool_handle', lambda: None)
    lines = []
    eager = _train(18, graphs=None)
    fallback = _train(18, graphs='cuda', log=lines.append)
    _assert_same_training_state(eager, fallback)
    # One line per phase (Gmain, Greg, Dmain, Dreg; Dmain twice: LeCam switches on), never a traceback.
    assert len(lines) == 5 and all(l.startswith('CUDA graph of phase ') and l.endswith('running it eagerly') for l in lines)
    assert 'RuntimeError: operation not permitted when stream is capturing)' in lines[0]
    # The whole tracebacks are kept (bench/train_step.py prints them), one per failed (phase, graph key).
    failures = fallback['runner'].failures
    assert sorted(failures) == [('Dmain', ('lecam off',)), ('Dmain', ('lecam on',)), ('Dreg', ()), ('Gmain', ()), ('Greg', ())]
    assert all(trace.startswith('Traceback') and trace.rstrip().endswith('details') for trace in failures.values())


def test_extra_terms_without_graph_key_are_refused_for_graphs():
    class Term:
        name = 'plain'

        def __call__(self, real_logits, gen_logits, cur_nimg):
            return real_logits.sum() * 0, {}

    loss = StyleGAN2Loss(G=None, D=None, extra_d_terms=[Term()])
    assert loss.graph_key('Gmain', 0) == ()
    with pytest.raises(TypeError, match=r"without graph_key\(\) cannot run in CUDA graphs: \['Term'\]"):
        loss.graph_key('Dmain', 0)


def test_training_loop_with_oplog_graphs_writes_the_same_snapshot(tmp_path, tiny_dataset):
    # The loop's own data path (loader, two rounds of gradient accumulation, static input copies), 34 iterations.
    common = dict(batch_size=4, batch_gpu=2, total_kimg=0.136, kimg_per_tick=0.136, image_snapshot_ticks=None)
    snapshots = {}
    for name, graphs in [('eager', None), ('graphs', 'oplog')]:
        kwargs = dict(tiny_loop_kwargs(tiny_dataset, tmp_path / name, phase_graphs=graphs, **common))
        kwargs['extra_d_terms'] = [LeCamRegularizer(weight=0.05, start_kimg=0.05)]
        snapshots[name] = load_network_pkl(training_loop(**kwargs))
    a, b = snapshots['eager'], snapshots['graphs']
    for name in ('G', 'D', 'G_ema'):
        for (key, x), (_, y) in zip(a[name].state_dict().items(), b[name].state_dict().items()):
            assert torch.equal(x, y), f'{name}.{key} differs'
    assert a['progress']['cur_nimg'] == b['progress']['cur_nimg'] == 136
    assert a['progress']['augment_p'] == b['progress']['augment_p']
    assert a['progress']['loss']['extra_d_terms'] == b['progress']['loss']['extra_d_terms']
    assert torch.equal(a['progress']['loss']['pl_mean'], b['progress']['loss']['pl_mean'])
    for key in ('G', 'D'):
        adam_a, adam_b = a['progress']['optimizers'][key]['state'], b['progress']['optimizers'][key]['state']
        assert all(torch.equal(adam_a[i][k], adam_b[i][k]) for i in adam_a for k in adam_a[i])
    log = (tmp_path / 'graphs' / 'log.txt').read_text()
    assert 'eagerly' not in log
    captured = [line for line in log.splitlines() if line.startswith('Op-log graph of phase ')]
    assert captured == ['Op-log graph of phase Gmain captured', 'Op-log graph of phase Dmain captured (lecam off)',
                        'Op-log graph of phase Greg captured', 'Op-log graph of phase Dmain captured (lecam on)',
                        'Op-log graph of phase Dreg captured']


def test_cuda_graphs_need_one_cuda_device(tmp_path, tiny_dataset):
    with pytest.raises(UserError, match=r'CUDA graphs need one CUDA device \(here: 1 process\(es\) on cpu\)'):
        training_loop(**tiny_loop_kwargs(tiny_dataset, tmp_path / 'run', phase_graphs='cuda'))
    with pytest.raises(ValueError, match='phase_graphs must be None or one of'):
        training_loop(**tiny_loop_kwargs(tiny_dataset, tmp_path / 'run', phase_graphs='yes'))

#----------------------------------------------------------------------------
# Style mixing decided on the device keeps NVIDIA's distribution.

class _LayerTaggingG:
    """mapping() returns ws whose value says which call made them; synthesis() returns the ws."""

    def __init__(self, num_ws):
        self.num_ws = num_ws
        self.calls = 0

    def mapping(self, z, c, skip_w_avg_update=False):
        self.calls += 1
        return torch.full([z.shape[0], self.num_ws, 1], float(self.calls)).requires_grad_(False) + z[:, :1, None] * 0

    def synthesis(self, ws):
        return ws


def test_style_mixing_on_the_device_has_the_same_distribution():
    num_ws, draws, prob = 6, 4000, 0.9
    torch.manual_seed(0)
    G = _LayerTaggingG(num_ws)
    loss = StyleGAN2Loss(G=G, D=None, style_mixing_prob=prob)
    own_layers = []
    for _ in range(draws):
        G.calls = 0
        _, ws = loss.run_G(torch.zeros([1, 4]), torch.zeros([1, 0]))
        tags = ws[0, :, 0]
        cutoff = int((tags == 1).sum())
        assert torch.equal(tags[:cutoff], torch.ones(cutoff)) and torch.all(tags[cutoff:] == 2)   # a prefix of own ws
        own_layers.append(cutoff)
    counts = np.bincount(own_layers, minlength=num_ws + 1)
    assert counts[0] == 0                                              # layer 0 is never mixed
    # Mixing (probability prob) cuts at 1..num_ws-1 uniformly; no mixing keeps all num_ws layers.
    expected = np.array([0] + [prob / (num_ws - 1)] * (num_ws - 1) + [1 - prob]) * draws
    chi2 = float(((counts[1:] - expected[1:]) ** 2 / expected[1:]).sum())
    assert chi2 < 20.5                                                 # 5 degrees of freedom: p ~ 0.001
