"""Network pickles: our own round trip, NVIDIA-format pickles loaded without running their code, bad files."""

import collections
import io
import os
import pickle
import sys
import types

import pytest
import torch

from stylegan2ada.networks import Discriminator, Generator
from stylegan2ada.pickles import NetworkPickleError, load_network_pkl, save_network_pkl
from conftest import load_golden_case, rel_error
from test_networks import build_golden_networks, golden_errors

TOL = 1e-4
MODULE_SRC = "raise RuntimeError('module_src was executed')\n"


# ----------------------------------------------------------------------------
# Writing NVIDIA-format pickles: persistent objects reduced to
# torch_utils.persistence._reconstruct_persistent_obj(meta), meta holding module_src + state.

def _reconstruct_must_not_run(meta):
    raise AssertionError('the real _reconstruct_persistent_obj must never be called by our loader')


class _EasyDict(dict):
    pass


@pytest.fixture
def nvidia_modules(monkeypatch):
    """Fake torch_utils.persistence and dnnlib.util so pickle can name their globals while writing."""
    persistence = types.ModuleType('torch_utils.persistence')
    _reconstruct_must_not_run.__module__ = 'torch_utils.persistence'
    _reconstruct_must_not_run.__qualname__ = _reconstruct_must_not_run.__name__ = '_reconstruct_persistent_obj'
    persistence._reconstruct_persistent_obj = _reconstruct_must_not_run
    util = types.ModuleType('dnnlib.util')
    _EasyDict.__module__ = 'dnnlib.util'
    _EasyDict.__qualname__ = 'EasyDict'
    util.EasyDict = _EasyDict
    for name, mod in [('torch_utils', types.ModuleType('torch_utils')), ('torch_utils.persistence', persistence),
                      ('dnnlib', types.ModuleType('dnnlib')), ('dnnlib.util', util)]:
        monkeypatch.setitem(sys.modules, name, mod)
    yield


class _Persistent:
    """Pickles as NVIDIA's persistence does: a call to _reconstruct_persistent_obj(meta)."""

    def __init__(self, class_name, state):
        self.meta = dict(type='class', version=6, module_src=MODULE_SRC, class_name=class_name, state=state)

    def __reduce__(self):
        return (sys.modules['torch_utils.persistence']._reconstruct_persistent_obj, (self.meta,))


def _as_nvidia(module, init_kwargs=None):
    """Mirror a module tree as NVIDIA persistent objects (parameters stay nn.Parameter, as in their pickles)."""
    state = {
        'training': False,
        '_parameters': collections.OrderedDict((k, v) for k, v in module._parameters.items()),
        # Our non-persistent buffers (constants derived at construction) have no counterpart in NVIDIA's modules.
        '_buffers': collections.OrderedDict((k, v) for k, v in module._buffers.items() if k not in module._non_persistent_buffers_set),
        '_non_persistent_buffers_set': set(),
        '_modules': collections.OrderedDict((k, _as_nvidia(v)) for k, v in module._modules.items()),
        '_init_args': (),
        '_init_kwargs': _EasyDict(init_kwargs or {}),
    }
    return _Persistent(type(module).__name__, state)


BGC = dict(xflip=1, rotate90=1, xint=1, scale=1, rotate=1, aniso=1, xfrac=1, brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1)


def _write_nvidia_pickle(path, G, D, G_ema, spec, protocol=pickle.DEFAULT_PROTOCOL, augment_pipe=None):
    data = dict(G=_as_nvidia(G, spec['G_kwargs']), D=_as_nvidia(D, spec['D_kwargs']), G_ema=_as_nvidia(G_ema, spec['G_kwargs']),
                augment_pipe=augment_pipe, training_set_kwargs=_EasyDict(path='calanoida.zip', use_labels=False, xflip=False))
    with open(path, 'wb') as f:
        pickle.dump(data, f, protocol=protocol)


# NVIDIA's training loop pickles with Python 3.7's default protocol (3), which writes sets as builtins.set calls.
@pytest.mark.parametrize('protocol', [3, pickle.DEFAULT_PROTOCOL])
@pytest.mark.parametrize('case', ['g32_uncond', 'g32_cond4'])
def test_nvidia_pickle_loads_without_running_code_and_reproduces_golden(tmp_path, golden_spec, nvidia_modules, monkeypatch, case, protocol):
    from stylegan2ada.augment import AugmentPipe
    G, D, io_ = build_golden_networks(golden_spec, case)
    pipe = AugmentPipe(**BGC)
    pipe.p.fill_(0.37)
    path = tmp_path / 'nvidia.pkl'
    _write_nvidia_pickle(path, G.requires_grad_(False), D.requires_grad_(False), G, golden_spec['cases'][case], protocol,
                         augment_pipe=_as_nvidia(pipe, BGC))
    # Make sure nothing on sys.modules could satisfy the globals: our loader must not import them.
    for name in ['torch_utils', 'torch_utils.persistence', 'dnnlib', 'dnnlib.util']:
        monkeypatch.delitem(sys.modules, name)
    data = load_network_pkl(path)
    assert isinstance(data['G'], Generator) and isinstance(data['D'], Discriminator) and isinstance(data['G_ema'], Generator)
    assert data['training_set_kwargs'] == dict(path='calanoida.zip', use_labels=False, xflip=False)
    assert type(data['training_set_kwargs']) is dict
    errors = golden_errors(data['G_ema'], data['D'].requires_grad_(True), io_)
    assert max(errors.values()) < TOL, errors
    loaded_pipe = data['augment_pipe']
    assert isinstance(loaded_pipe, AugmentPipe) and float(loaded_pipe.p) == pytest.approx(0.37)
    assert loaded_pipe.xflip == 1 and loaded_pipe.hue == 1 and loaded_pipe.noise == 0
    assert torch.equal(loaded_pipe.Hz_fbank, pipe.Hz_fbank)


def test_nvidia_augment_pipe_with_unknown_tensor_fails_loudly(tmp_path, golden_spec, nvidia_modules):
    from stylegan2ada.augment import AugmentPipe
    G, D, _ = build_golden_networks(golden_spec, 'g32_uncond')
    stub = _as_nvidia(AugmentPipe(**BGC), BGC)
    stub.meta['state']['_buffers']['Hz_extra'] = torch.zeros(3)
    path = tmp_path / 'pipe.pkl'
    _write_nvidia_pickle(path, G, D, G, golden_spec['cases']['g32_uncond'], augment_pipe=stub)
    with pytest.raises(NetworkPickleError, match=r'pipe\.pkl.*AugmentPipe.*unexpected.*Hz_extra'):
        load_network_pkl(path)


def test_nvidia_pickle_with_missing_tensor_fails_loudly(tmp_path, golden_spec, nvidia_modules):
    G, D, _ = build_golden_networks(golden_spec, 'g32_uncond')
    obj = _as_nvidia(G, golden_spec['cases']['g32_uncond']['G_kwargs'])
    del obj.meta['state']['_modules']['mapping'].meta['state']['_buffers']['w_avg']
    path = tmp_path / 'broken.pkl'
    with open(path, 'wb') as f:
        pickle.dump(dict(G=obj, D=None, G_ema=obj), f)
    with pytest.raises(NetworkPickleError, match=r'broken\.pkl.*missing.*mapping\.w_avg'):
        load_network_pkl(path)


def test_foreign_global_is_refused_and_never_called(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ('touch ' + str(tmp_path / 'pwned'),))
    path = tmp_path / 'evil.pkl'
    path.write_bytes(pickle.dumps({'G': Evil()}))
    with pytest.raises(NetworkPickleError, match=r'evil\.pkl.*refused global (posix|os|nt)\.system'):
        load_network_pkl(path)
    assert not (tmp_path / 'pwned').exists()


def test_own_pickle_round_trip_is_exact(tmp_path, golden_spec):
    G, D, io_ = build_golden_networks(golden_spec, 'g32_cond4')
    path = tmp_path / 'sub' / 'snap.pkl'
    save_network_pkl(path, dict(G=G, D=D, G_ema=G, augment_pipe=None, training_set_kwargs=dict(path='x.zip'),
                                progress=dict(cur_nimg=1234, opt_state={'a': torch.arange(3)})))
    assert sorted(os.listdir(path.parent)) == ['snap.pkl']               # no temp file left behind
    data = load_network_pkl(path)
    assert data['progress']['cur_nimg'] == 1234 and torch.equal(data['progress']['opt_state']['a'], torch.arange(3))
    for key in ('G', 'G_ema'):
        for name, tensor in G.state_dict().items():
            assert torch.equal(data[key].state_dict()[name], tensor), name
    assert data['G'].init_kwargs == G.init_kwargs
    assert not any(p.requires_grad for p in data['D'].parameters())
    assert max(golden_errors(data['G_ema'], data['D'].requires_grad_(True), io_).values()) < TOL
    assert not any(p.requires_grad for p in data['G'].parameters())


@pytest.mark.parametrize('content,match', [
    (b'', 'truncated or corrupt'),
    (b'hello world, not a pickle', 'not a valid network pickle'),
    (pickle.dumps([1, 2, 3]), 'top level is list'),
    (pickle.dumps({'a': 1}), 'no G, G_ema or D'),
])
def test_bad_files_give_one_line_errors(tmp_path, content, match):
    path = tmp_path / 'bad.pkl'
    path.write_bytes(content)
    with pytest.raises(NetworkPickleError, match=match) as info:
        load_network_pkl(path)
    assert str(path) in str(info.value) and '\n' not in str(info.value)


def test_truncated_own_pickle(tmp_path):
    G = Generator(z_dim=4, c_dim=0, w_dim=4, img_resolution=8, img_channels=1, synthesis_kwargs=dict(channel_base=32, channel_max=4))
    path = tmp_path / 'full.pkl'
    save_network_pkl(path, dict(G=G, G_ema=G))
    cut = tmp_path / 'cut.pkl'
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(NetworkPickleError, match=r'cut\.pkl'):
        load_network_pkl(cut)


def test_missing_file(tmp_path):
    with pytest.raises(NetworkPickleError, match='no such file'):
        load_network_pkl(tmp_path / 'nope.pkl')


def test_the_same_network_gives_the_same_file_in_another_process(tmp_path):
    # torch's own pickling names each tensor storage by its memory address; ours numbers them, so a snapshot's SHA-256
    # says whether two runs (serial, parallel, another machine of the same kind) made the same network.
    import subprocess
    import sys
    script = ('import sys, torch\n'
              'from stylegan2ada.networks import Generator\n'
              'from stylegan2ada.pickles import save_network_pkl\n'
              'torch.manual_seed(0)\n'
              'G = Generator(z_dim=8, c_dim=0, w_dim=8, img_resolution=16, img_channels=3, mapping_kwargs=dict(num_layers=2),\n'
              '              synthesis_kwargs=dict(channel_base=64, channel_max=8))\n'
              'junk = [torch.zeros(1000) for _ in range(int(sys.argv[2]))]   # other storages: other addresses\n'
              'save_network_pkl(sys.argv[1], dict(G=G, G_ema=G, progress=dict(x=torch.arange(3.))))\n')
    for name, junk in (('a.pkl', '0'), ('b.pkl', '7')):
        subprocess.run([sys.executable, '-c', script, str(tmp_path / name), junk], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert (tmp_path / 'a.pkl').read_bytes() == (tmp_path / 'b.pkl').read_bytes()
    data = load_network_pkl(str(tmp_path / 'a.pkl'))
    assert torch.equal(data['progress']['x'], torch.arange(3.)) and data['G'].img_resolution == 16
