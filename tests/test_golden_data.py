"""The golden reference data ships with the repository, and its absence fails the parity tests instead of skipping them."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from conftest import GOLDEN_DIR

REPO = Path(__file__).resolve().parents[1]
IN_REPO = REPO / 'tests' / 'data' / 'golden'
FILES = ('golden.json', 'g32_uncond.npz', 'g32_cond4.npz', 'g64_uncond.npz', 'ops.npz')


def test_reference_files_are_in_the_repository_and_complete():
    assert all((IN_REPO / name).is_file() for name in FILES)
    if 'TAXOGAN_GOLDEN' not in os.environ:
        assert GOLDEN_DIR.resolve() == IN_REPO.resolve()
    for case in ('g32_uncond', 'g32_cond4', 'g64_uncond'):
        keys = np.load(IN_REPO / f'{case}.npz').files
        assert {'io.z', 'io.img_psi1', 'io.d_logits', 'io.d_r1_grad_b4_out_weight'} <= set(keys), case
        assert sum(k.startswith('G.') for k in keys) > 50 and sum(k.startswith('D.') for k in keys) > 30, case


def test_reference_files_are_not_ignored_by_git():
    if shutil.which('git') is None or not (REPO / '.git').exists():
        return                                      # an unpacked source archive: nothing to check
    paths = [str(IN_REPO.relative_to(REPO) / name) for name in FILES + ('README.md',)]
    result = subprocess.run(['git', 'check-ignore', '--no-index', *paths], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1 and result.stdout == '', f'ignored by .gitignore: {result.stdout}'


def test_missing_reference_file_fails_instead_of_skipping(tmp_path):
    # A copy without g64_uncond.npz: its tests must fail (naming the file), the others still pass.
    for name in FILES:
        if name != 'g64_uncond.npz':
            shutil.copy(IN_REPO / name, tmp_path / name)
    env = dict(os.environ, TAXOGAN_GOLDEN=str(tmp_path))
    cmd = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-rfs', 'tests/test_networks.py', '-k', 'golden_outputs']
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out[-3000:]
    assert 'skipped' not in out and 'g64_uncond.npz is missing' in out, out[-3000:]
    assert ' failed' in out and ' passed' in out, out[-3000:]
