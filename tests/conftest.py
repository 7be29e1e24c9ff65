"""Shared test fixtures: golden reference data from NVIDIA's implementation."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

GOLDEN_DIR = Path(os.environ.get('TAXOGAN_GOLDEN', Path(__file__).resolve().parents[1].parent / 'shared' / 'golden'))


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny test tensors run fastest on one thread, and a busy second core cannot stall them."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _require_golden():
    if not (GOLDEN_DIR / 'golden.json').is_file():
        pytest.skip(f'golden reference data not found at {GOLDEN_DIR} (set TAXOGAN_GOLDEN)')


@pytest.fixture(scope='session')
def golden_spec():
    """golden.json: constructor kwargs of the cases and the op settings."""
    _require_golden()
    return json.loads((GOLDEN_DIR / 'golden.json').read_text())


def load_golden_case(name):
    """(G state dict, D state dict, io dict) of one golden case, as torch tensors."""
    _require_golden()
    data = np.load(GOLDEN_DIR / f'{name}.npz')
    split = {'G.': {}, 'D.': {}, 'io.': {}}
    for key in data.files:
        for prefix, out in split.items():
            if key.startswith(prefix):
                out[key[len(prefix):]] = torch.from_numpy(data[key].copy())
    return split['G.'], split['D.'], split['io.']


def load_golden_ops():
    """ops.npz as torch tensors."""
    _require_golden()
    data = np.load(GOLDEN_DIR / 'ops.npz')
    return {k: torch.from_numpy(data[k].copy()) for k in data.files}


def rel_error(actual, expected):
    """max |a - e| / max |e| (0 when both are zero)."""
    actual = actual.detach().to(torch.float64)
    expected = expected.detach().to(torch.float64)
    scale = expected.abs().max().clamp_min(1e-12)
    return float((actual - expected).abs().max() / scale)
