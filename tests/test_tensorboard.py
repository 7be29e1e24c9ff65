"""TensorBoard events of the training loop: the scalars of stats.jsonl and metric-*.jsonl, read back with tensorboard's
own reader; and a run without tensorboard installed."""

import json
import os
import sys
import threading

import numpy as np
import pytest
import torch

from stylegan2ada.pickles import load_network_pkl
from stylegan2ada.training_loop import TrainingInterrupted, training_loop
from test_metrics import TinyDetector
from training_helpers import tiny_loop_kwargs, write_zip


def _jsonl(path):
    with open(path, encoding='utf-8') as f:
        return [json.loads(line) for line in f]


def _need_tensorboard():
    """Fails (not skips) without tensorboard: the test extra installs it, and a skip would hide the events untested."""
    try:
        import torch.utils.tensorboard  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError as exc:
        pytest.fail(f'tensorboard is not installed ({exc}): pip install -e ".[test]" installs it', pytrace=False)


def _events(run_dir):
    """{tag: [(step, value), ...]} of every scalar in the run folder's events files, as TensorBoard reads them."""
    from tensorboard.backend.event_processing import event_accumulator as accumulator  # pylint: disable=import-outside-toplevel
    reader = accumulator.EventAccumulator(str(run_dir), size_guidance={accumulator.SCALARS: 0})   # 0: keep every event
    reader.Reload()
    return {tag: [(e.step, e.value) for e in reader.Scalars(tag)] for tag in reader.Tags()['scalars']}


def _events_files(run_dir):
    return [name for name in os.listdir(run_dir) if name.startswith('events.out.tfevents.')]


def _writer_threads():
    # The events writer's background thread (tensorboard's _AsyncWriterThread): none may outlive the run.
    return [t for t in threading.enumerate() if 'AsyncWriter' in type(t).__name__]


def test_events_hold_every_scalar_of_stats_and_metrics(tmp_path):
    _need_tensorboard()
    data = write_zip(tmp_path / 'd.zip', num_images=8)
    detector = tmp_path / 'tiny_detector.pt'
    torch.jit.save(torch.jit.script(TinyDetector()), str(detector))
    run_dir = tmp_path / 'run'
    # Batches of 32, 0.5 kimg per tick: the ticks end at 32, 544 and 1024 images, steps 0, 0 and 1 (whole kimg, as
    # NVIDIA's events count them); a snapshot and its metrics at every tick.
    training_loop(**tiny_loop_kwargs(data, run_dir, metrics=['fid8_full', 'pr83_full'], detector=str(detector),
                                     batch_size=32, batch_gpu=32, total_kimg=1.0, kimg_per_tick=0.5, image_snapshot_ticks=None))
    assert len(_events_files(run_dir)) == 1 and not _writer_threads()
    events = _events(run_dir)
    stats = _jsonl(run_dir / 'stats.jsonl')
    assert [s['Progress/kimg'] for s in stats] == [0.032, 0.544, 1.024]
    steps = [int(s['Progress/kimg'] * 1000 / 1e3) for s in stats]
    expected = {}
    for step, record in zip(steps, stats):
        for name, value in record.items():
            if name != 'timestamp':
                mean = value['mean'] if isinstance(value, dict) else value
                expected.setdefault(name, []).append((step, mean))
    for family in ('fid8_full', 'pr83_full'):
        lines = _jsonl(run_dir / f'metric-{family}.jsonl')
        assert len(lines) == len(stats)
        for step, line in zip(steps, lines):
            for name, value in line['results'].items():
                expected.setdefault(f'Metrics/{name}', []).append((step, value))
    assert {'Metrics/fid8_full', 'Metrics/pr83_full_precision', 'Metrics/pr83_full_recall', 'Loss/G/loss', 'Loss/D/loss',
            'Progress/augment', 'Timing/sec_per_kimg'} <= set(expected)
    assert set(events) == set(expected)
    for tag, points in expected.items():
        assert [step for step, _ in events[tag]] == [step for step, _ in points], tag
        # The events hold float32 values.
        assert np.allclose([v for _, v in events[tag]], np.float32([v for _, v in points]), rtol=1e-6, atol=0), tag
    assert [s for s, _ in events['Metrics/fid8_full']] == [s for s, _ in events['Progress/kimg']] == [0, 0, 1]


def test_interrupted_run_closes_its_events_file(tmp_path):
    _need_tensorboard()
    data = write_zip(tmp_path / 'd.zip')
    calls = []
    stop = lambda: calls.append(1) or len(calls) > 6         # a stop asked for in the last tick (ticks end at calls 1, 5, 8)
    with pytest.raises(TrainingInterrupted):
        training_loop(**tiny_loop_kwargs(data, tmp_path / 'run', stop_requested=stop))
    assert not _writer_threads()
    assert [v for _, v in _events(tmp_path / 'run')['Progress/kimg']] == \
        pytest.approx([s['Progress/kimg'] for s in _jsonl(tmp_path / 'run' / 'stats.jsonl')])


def test_without_tensorboard_one_line_and_the_same_training(tmp_path, monkeypatch):
    data = write_zip(tmp_path / 'd.zip')
    with_events = training_loop(**tiny_loop_kwargs(data, tmp_path / 'with'))
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)      # the import fails as if not installed
    without = training_loop(**tiny_loop_kwargs(data, tmp_path / 'without'))
    lines = [line for line in (tmp_path / 'without' / 'log.txt').read_text().splitlines() if 'TensorBoard' in line]
    assert len(lines) == 1 and lines[0].startswith('TensorBoard events not written') and 'pip install tensorboard' in lines[0]
    assert not _events_files(tmp_path / 'without')
    # Training is unaffected: the same statistics and the same weights as the run that wrote events.
    strip = lambda records: [{k: v for k, v in r.items() if not k.startswith(('Timing/', 'Resources/', 'timestamp'))}
                             for r in records]
    assert strip(_jsonl(tmp_path / 'without' / 'stats.jsonl')) == strip(_jsonl(tmp_path / 'with' / 'stats.jsonl'))
    a, b = load_network_pkl(with_events)['G_ema'].state_dict(), load_network_pkl(without)['G_ema'].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_each_stage_of_a_plan_is_its_own_run(tmp_path):
    _need_tensorboard()
    from click.testing import CliRunner  # pylint: disable=import-outside-toplevel
    from tensorboard.backend.event_processing import event_multiplexer as multiplexer  # pylint: disable=import-outside-toplevel
    import train_hier  # pylint: disable=import-outside-toplevel
    from test_hierarchy import _write_datasets  # pylint: disable=import-outside-toplevel
    _write_datasets(tmp_path / 'ds')
    args = ['--cbase', '64', '--cmax', '8', '--zdim', '8', '--map', '2', '--batch', '4', '--tick', '0.008', '--snap', '1',
            '--gamma', '0.01', '--aug', 'noaug', '--quiet', '--datasets', str(tmp_path / 'ds'), '--metrics', 'none',
            '--outdir', str(tmp_path / 'exp'), '--method', 'descending', '--parent', 'Copepoda',
            '--targets', 'Harpacticoida', '--kimg-parent', '0.008', '--kimg-child', '0.008']
    result = CliRunner().invoke(train_hier.main, args)
    assert result.exit_code == 0, result.output
    # What `tensorboard --logdir exp` shows: one run per stage folder, each with its own stats.
    runs = multiplexer.EventMultiplexer().AddRunsFromDirectory(str(tmp_path / 'exp'))
    runs.Reload()
    assert sorted(runs.Runs()) == ['Copepoda', 'Copepoda__Harpacticoida']
    for run in runs.Runs():
        kimg = [e.value for e in runs.Scalars(run, 'Progress/kimg')]
        assert kimg == pytest.approx([s['Progress/kimg'] for s in _jsonl(tmp_path / 'exp' / run / 'stats.jsonl')])
