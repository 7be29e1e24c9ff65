"""Small shared helpers: atomic file writes and human-readable durations."""

import contextlib
import json
import os
import tempfile

# atomic_write's temporary files are named TEMP_PREFIX + final name + random suffix (see remove_stale_temp_files).
TEMP_PREFIX = '.tmp-'


@contextlib.contextmanager
def atomic_write(
    path,               # final file path; its folder is created if missing
    mode    = 'w',      # 'w' (text, UTF-8) or 'wb'
    fsync   = False,    # flush to disk before the rename (for large, precious files)
):
    """Open a temporary file beside `path` for writing; rename it over `path` only if the block succeeds."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'{TEMP_PREFIX}{os.path.basename(path)}.', dir=folder)
    try:
        with os.fdopen(fd, mode, **({} if 'b' in mode else {'encoding': 'utf-8', 'newline': ''})) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def remove_stale_temp_files(
    folder,             # folder to clean
    name_prefix,        # final file names the temporary files were for start with this (e.g. 'network-snapshot-')
):
    """Delete atomic_write temporaries left in `folder` by a process killed while writing (they are never complete)."""
    for name in os.listdir(folder):
        if name.startswith(TEMP_PREFIX + name_prefix):
            os.remove(os.path.join(folder, name))


def write_text_atomic(path, text):
    """Write text to `path` atomically."""
    with atomic_write(path) as f:
        f.write(text)


def write_json_atomic(path, data, indent=2):
    """Write JSON (with a final newline) to `path` atomically."""
    with atomic_write(path) as f:
        json.dump(data, f, indent=indent, ensure_ascii=False)
        f.write('\n')


def format_duration(seconds):
    """12345 -> '3h 25m'; 125 -> '2m 05s'; NaN or infinity -> '-'."""
    if seconds != seconds or seconds in (float('inf'), float('-inf')):
        return '-'
    seconds = int(round(seconds))
    if seconds < 60:
        return f'{seconds}s'
    if seconds < 3600:
        return f'{seconds // 60}m {seconds % 60:02d}s'
    return f'{seconds // 3600}h {(seconds // 60) % 60:02d}m'
