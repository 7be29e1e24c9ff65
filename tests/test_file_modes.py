"""Files others can read: everything written through a temporary file and a rename gets the mode open() would give."""

import contextlib
import os
import stat
import threading

import pytest

from stylegan2ada import util
from stylegan2ada.pickles import save_network_pkl
from stylegan2ada.training_loop import training_loop
from training_helpers import tiny_loop_kwargs, write_zip

UMASKS = (0o022, 0o027, 0o002, 0o077)
WRITER_UMASKS = (0o022, 0o077)      # each writer under two: a mode hard-coded to what one of them gives still fails


@contextlib.contextmanager
def umask(mask):
    previous = os.umask(mask)
    try:
        yield 0o666 & ~mask
    finally:
        os.umask(previous)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def _open_mode(folder):
    """What a plain open() gives a new file in `folder` now (the reference)."""
    probe = os.path.join(folder, 'probe-open')
    with open(probe, 'w'):
        pass
    mode = _mode(probe)
    os.remove(probe)
    return mode


@pytest.mark.parametrize('mask', UMASKS)
def test_atomic_writes_get_the_mode_open_gives(tmp_path, mask):
    with umask(mask) as expected:
        assert util.current_umask() == mask
        assert util.new_file_mode() == expected == _open_mode(tmp_path)
        util.write_text_atomic(tmp_path / 'a.txt', 'x')
        util.write_json_atomic(tmp_path / 'sub' / 'b.json', {'a': 1})
        with util.atomic_write(tmp_path / 'c.bin', 'wb', fsync=True) as f:
            f.write(b'\0')
        fd, tmp = util.make_temp_file(str(tmp_path), prefix='.t-', suffix='.tmp')
        os.close(fd)
    for name in ('a.txt', 'sub/b.json', 'c.bin', os.path.basename(tmp)):
        assert _mode(tmp_path / name) == expected, (oct(mask), name, oct(_mode(tmp_path / name)))


def test_umask_is_read_without_changing_it():
    # Read from /proc where possible: another thread creating a file meanwhile must not see a changed umask.
    with umask(0o027):
        seen = []
        thread = threading.Thread(target=lambda: seen.extend(util.current_umask() for _ in range(200)))
        thread.start()
        modes = []
        for _ in range(200):
            modes.append(util.new_file_mode())
        thread.join()
        assert set(seen) == {0o027} and set(modes) == {0o640}
        assert os.umask(0o027) == 0o027


def test_snapshots_logs_and_grids_of_a_run_are_readable_by_others(tmp_path):
    data = write_zip(tmp_path / 'd.zip')
    with umask(0o027) as expected:
        final = training_loop(**tiny_loop_kwargs(data, tmp_path / 'run', total_kimg=0.008))
        save_network_pkl(tmp_path / 'copy.pkl', dict(G=None))
    files = [name for name in os.listdir(tmp_path / 'run')]
    assert os.path.basename(final) in files and 'reals.png' in files and 'log.txt' in files
    for name in files:
        assert _mode(tmp_path / 'run' / name) == expected, (name, oct(_mode(tmp_path / 'run' / name)))
    assert _mode(tmp_path / 'copy.pkl') == expected


@pytest.mark.parametrize('mask', WRITER_UMASKS)
def test_datasets_and_manifest_get_the_mode_open_gives(tmp_path, mask):
    from test_dataset_tool import BASE_ARGS, _build, _write_collection
    src = tmp_path / 'photos'
    _write_collection(src, lambda file, path: '/'.join(path) + '/' + file)
    with umask(mask) as expected:
        _build(['--source', str(src), '--dest', str(tmp_path / 'datasets'), *BASE_ARGS])
    names = sorted(os.listdir(tmp_path / 'datasets'))
    assert 'manifest.json' in names and 'Copepoda.zip' in names
    for name in names:
        assert _mode(tmp_path / 'datasets' / name) == expected, (name, oct(_mode(tmp_path / 'datasets' / name)))


@pytest.mark.parametrize('mask', WRITER_UMASKS)
def test_downloads_get_the_mode_open_gives(tmp_path, mask):
    from stylegan2ada.metrics.detectors import download_file
    from taxogan_ext import collection
    from test_dataset_tool import _Server
    served = tmp_path / 'served'
    served.mkdir()
    (served / 'file.bin').write_bytes(b'abc' * 100)
    server = _Server(served)
    try:
        with umask(mask) as expected:
            download_file(f'{server.url}/file.bin', str(tmp_path / 'detector.pt'), progress=False)
            cache = tmp_path / 'cache'
            cache.mkdir()
            got = collection.download(f'{server.url}/file.bin', cache, collection.make_session(retries=0), timeout=5)
    finally:
        server.close()
    assert _mode(tmp_path / 'detector.pt') == expected and _mode(got) == expected


@pytest.mark.parametrize('mask', WRITER_UMASKS)
def test_plan_files_and_reports_get_the_mode_open_gives(tmp_path, mask):
    from taxogan_ext import hierarchy, report
    from test_hierarchy import FakeTraining, _fake_eval, _write_datasets
    manifest = _write_datasets(tmp_path / 'ds')
    out = tmp_path / 'exp'
    with umask(mask) as expected:
        plan = hierarchy.build_plan(manifest, out, 'conditional', targets='Cyclopoida', kimg_parent=0.002)
        hierarchy.run_plan(plan, manifest, FakeTraining(), ['fid10_full'], 'fake.pt', evaluate_fn=_fake_eval,
                           log=lambda *_: None, progress=False)
        paths = report.write_report(out, grids=False, curves=False)
    checked = [out / hierarchy.PLAN_FILE, out / 'Copepoda-cond' / hierarchy.STAGE_FILE, *map(str, paths)]
    checked += list((out / hierarchy.DERIVED_DIR).iterdir())
    assert any(str(p).endswith('table.md') for p in checked) and any(str(p).endswith('.zip') for p in checked)
    for path in checked:
        assert _mode(path) == expected, (path, oct(_mode(path)))
