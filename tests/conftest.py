"""Shared test fixtures: golden reference data from NVIDIA's implementation."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

# The reference tensors live in the repository (tests/data/golden, see its README.md), so that every clone tests parity;
# TAXOGAN_GOLDEN points the tests at another copy.
GOLDEN_DIR = Path(os.environ.get('TAXOGAN_GOLDEN') or Path(__file__).resolve().parent / 'data' / 'golden')


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny test tensors run fastest on one thread, and a busy second core cannot stall them."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def golden_file(name):
    """Path of one golden reference file; a missing file fails the test (a skip would hide that parity went untested)."""
    path = GOLDEN_DIR / name
    if not path.is_file():
        pytest.fail(f'golden reference file {path} is missing (restore tests/data/golden from the repository, or point '
                    f'TAXOGAN_GOLDEN at a folder that holds it)', pytrace=False)
    return path


@pytest.fixture(scope='session')
def golden_spec():
    """golden.json: constructor kwargs of the cases and the op settings."""
    return json.loads(golden_file('golden.json').read_text())


def load_golden_case(name):
    """(G state dict, D state dict, io dict) of one golden case, as torch tensors."""
    data = np.load(golden_file(f'{name}.npz'))
    split = {'G.': {}, 'D.': {}, 'io.': {}}
    for key in data.files:
        for prefix, out in split.items():
            if key.startswith(prefix):
                out[key[len(prefix):]] = torch.from_numpy(data[key].copy())
    return split['G.'], split['D.'], split['io.']


def load_golden_ops():
    """ops.npz as torch tensors."""
    data = np.load(golden_file('ops.npz'))
    return {k: torch.from_numpy(data[k].copy()) for k in data.files}


def rel_error(actual, expected):
    """max |a - e| / max |e| (0 when both are zero)."""
    actual = actual.detach().to(torch.float64)
    expected = expected.detach().to(torch.float64)
    scale = expected.abs().max().clamp_min(1e-12)
    return float((actual - expected).abs().max() / scale)
