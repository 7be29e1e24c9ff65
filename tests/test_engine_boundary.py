"""The engine/extension boundary: stylegan2ada trains and evaluates while taxogan_ext cannot be imported, and no module
of the engine knows the dataset tool's manifest or what a taxon is."""

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from stylegan2ada.metrics import calc_metric
from stylegan2ada.pickles import load_network_pkl
import taxogan_ext.taxon_metrics  # noqa: F401  (here, in the test process; the engine-only process refuses it)

REPO = Path(__file__).resolve().parent.parent
ENGINE = REPO / 'stylegan2ada'
# What the engine must not know: the extension, the dataset tool's manifest (file and format), taxa.
FORBIDDEN = re.compile(r'taxon|taxa|manifest|taxogan_ext|taxogan-datasets', re.IGNORECASE)

# Run in a fresh interpreter whose import system refuses taxogan_ext: every engine module imports, the training loop
# trains a few images with a metric at each snapshot, calc_metric evaluates the snapshot with a TorchScript detector.
ENGINE_ONLY = textwrap.dedent('''
    import importlib, importlib.abc, json, pkgutil, sys

    class RefuseExtension(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == 'taxogan_ext' or name.startswith('taxogan_ext.'):
                raise ModuleNotFoundError(f'{name} refused by the test', name=name)
            return None

    sys.meta_path.insert(0, RefuseExtension())     # before any other import: nothing below may reach the extension
    try:
        import taxogan_ext  # noqa: F401
        raise SystemExit('taxogan_ext could be imported')
    except ModuleNotFoundError:
        pass

    import stylegan2ada
    modules = [m.name for m in pkgutil.walk_packages(stylegan2ada.__path__, 'stylegan2ada.')]
    for name in modules:
        importlib.import_module(name)

    import torch
    import torch.nn.functional as F
    from stylegan2ada.metrics import DetectorError, MetricError, calc_metric, parse_metric_name, resolve_detector
    from stylegan2ada.pickles import load_network_pkl
    from stylegan2ada.training_loop import training_loop
    from training_helpers import tiny_loop_kwargs, write_zip

    class TinyDetector(torch.nn.Module):
        def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            x = img.to(torch.float32) / 255
            return torch.cat([F.adaptive_avg_pool2d(x, 2).flatten(1), x.std(dim=[2, 3])], dim=1)

    out, detector = sys.argv[1], sys.argv[1] + '/detector.pt'
    torch.jit.save(torch.jit.script(TinyDetector()), detector)
    data = write_zip(out + '/d.zip', num_images=8)
    training_loop(**tiny_loop_kwargs(data, out + '/run', metrics=['fid8_full'], detector=detector))
    G = load_network_pkl(out + '/run/network-snapshot-000000.pkl')['G_ema']
    direct = calc_metric('fid8_full', G, dict(path=data), detector=detector, device='cpu', progress=False,
                         cache_dir=out + '/cache')
    refused = []
    for name in ['acc_taxon', 'fid8_full_taxon']:
        try:
            parse_metric_name(name)
        except MetricError as exc:
            refused.append(str(exc))
    try:
        resolve_detector('taxon:' + detector)
    except DetectorError as exc:
        refused.append(str(exc))
    print(json.dumps(dict(modules=modules, direct=direct['results']['fid8_full'], refused=refused,
                          loaded=sorted(m for m in sys.modules if m.startswith('taxogan')))))
''')


def test_engine_trains_and_evaluates_without_the_extension(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / 'tests'), str(REPO)]), OMP_NUM_THREADS='1',
               TAXOGAN_OFFLINE='1', TAXOGAN_CACHE=str(tmp_path / 'cache'))
    script = tmp_path / 'engine_only.py'          # a file, not -c: TorchScript reads the detector's source
    script.write_text(ENGINE_ONLY, encoding='utf-8')
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out['loaded'] == []
    assert {'stylegan2ada.training_loop', 'stylegan2ada.metrics.metric_main', 'stylegan2ada.dataset'} <= set(out['modules'])
    # Without the extension its names are unknown, and say so in one line.
    assert len(out['refused']) == 3 and all('\n' not in m for m in out['refused'])
    assert 'valid forms' in out['refused'][0] and 'acc' not in out['refused'][0].split('valid forms')[1]
    assert 'no such detector file' in out['refused'][2]
    # The loop's metric at its last snapshot equals calc_metric of that snapshot, in the engine-only process and here,
    # where taxogan_ext is imported (its registrations change nothing of the engine's numbers).
    lines = [json.loads(line) for line in open(tmp_path / 'run' / 'metric-fid8_full.jsonl', encoding='utf-8')]
    assert len(lines) == 3 and np.isfinite(out['direct'])
    assert out['direct'] == pytest.approx(lines[-1]['results']['fid8_full'], rel=1e-6)
    G = load_network_pkl(tmp_path / 'run' / 'network-snapshot-000000.pkl')['G_ema']
    here = calc_metric('fid8_full', G, dict(path=str(tmp_path / 'd.zip')), detector=str(tmp_path / 'detector.pt'),
                       device='cpu', progress=False, cache_dir=str(tmp_path / 'cache-here'))
    assert here['metric'] == 'fid8_full' and here['results']['fid8_full'] == out['direct']


def _code_words(tree):
    """(line, text) of every name and non-docstring string of a parsed module: what the code says, not its comments."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                docstrings.add(id(first.value))
    for node in ast.walk(tree):
        line = getattr(node, 'lineno', 0)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield line, node.value
        elif isinstance(node, ast.Name):
            yield line, node.id
        elif isinstance(node, ast.Attribute):
            yield line, node.attr
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield line, node.name
        elif isinstance(node, ast.arg):
            yield line, node.arg
        elif isinstance(node, ast.keyword) and node.arg:
            yield line, node.arg
        elif isinstance(node, ast.alias):
            yield line, node.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield line, node.module


def test_code_words_sees_names_and_strings_but_not_comments():
    source = '"""About taxa."""\n# a taxon comment\nx = manifest_path + "taxon"\ndef f(taxa=1):\n    """Manifest."""\n'
    assert [text for _, text in _code_words(ast.parse(source)) if FORBIDDEN.search(text)] == ['manifest_path', 'taxon', 'taxa']


def test_engine_code_knows_no_manifest_and_no_taxa():
    files = sorted(ENGINE.rglob('*.py'))
    assert len(files) > 10
    found = []
    for path in files:
        tree = ast.parse(path.read_text(encoding='utf-8'))
        found += [f'{path.relative_to(REPO)}:{line}: {text[:60]!r}' for line, text in _code_words(tree) if FORBIDDEN.search(text)]
    assert found == []
