"""Small shared helpers: the user-error base class, file hashes, atomic file writes (with the permissions open()
gives; a full disk becomes one line naming the file and the space), DataLoader workers that leave stop signals to the
main process, and human-readable durations and sizes."""

import contextlib
import errno
import functools
import hashlib
import json
import os
import shutil
import signal
import tempfile
import threading

# atomic_write's temporary files are named TEMP_PREFIX + final name + random suffix (see remove_stale_temp_files).
TEMP_PREFIX = '.tmp-'


class UserError(Exception):
    """Bad input from the user (a file, an option, a combination): the message is one line naming it and the problem.

    Every error of this kind derives from it; the command-line tools print it without a traceback (stylegan2ada.cli),
    and any other exception keeps its traceback, since it is a bug.
    """


class DiskFullError(UserError):
    """A write failed for lack of space (or of quota); the message names the file, the space it needed and the space free."""


# errno values that mean "no room for these bytes": the device is full, or the user's quota is spent.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(exc):
    """True for an OSError saying that the disk (or the quota) is full."""
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


def format_bytes(num_bytes):
    """1536 -> '1.5 KiB'; 630 * 2**20 -> '630 MiB'; None -> 'unknown'."""
    if num_bytes is None:
        return 'unknown'
    value = float(num_bytes)
    for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
        if abs(value) < 1024 or unit == 'TiB':
            if unit == 'B':
                return f'{int(value)} B'
            return f'{value:.3g} {unit}' if abs(value) < 100 else f'{value:.0f} {unit}'
        value /= 1024
    return f'{value:.3g} TiB'


def existing_folder(path):
    """The nearest folder at or above `path` that exists (where a file for `path` would use space)."""
    folder = os.path.abspath(os.fspath(path))
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    return folder


def free_space(path):
    """Bytes free for this user on the file system that holds `path` (or would hold it); None when unknown."""
    try:
        return shutil.disk_usage(existing_folder(path)).free
    except OSError:
        return None


def disk_full_error(
    path,                   # the file that could not be written
    written     = None,     # bytes of it written before the disk filled; None = unknown
    needed      = None,     # bytes the whole file needs (an estimate); None = unknown
):
    """The DiskFullError for a write of `path` that found the disk full: one line with the space needed and free."""
    if needed is not None and written is not None and needed > written:
        need = f'needs about {format_bytes(needed)} ({format_bytes(written)} written, {format_bytes(needed - written)} to go)'
    elif needed is not None:
        need = f'needs about {format_bytes(needed)}'
    elif written:
        need = f'needs more than the {format_bytes(written)} written before the disk filled'
    else:
        need = 'needs more space'
    return DiskFullError(f'disk full writing {path}: it {need}, {format_bytes(free_space(path))} free on '
                         f'{existing_folder(os.path.dirname(os.path.abspath(os.fspath(path))))}; earlier files are untouched')


@contextlib.contextmanager
def disk_full_as_user_error(
    path,                   # the file written within the block (named by the message)
    needed      = None,     # bytes the write needs; None = unknown
):
    """Within the block, an OSError saying the disk is full becomes a one-line DiskFullError naming `path`."""
    try:
        yield
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        raise disk_full_error(path, needed=needed) from exc


def parse_list(text) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c']; a list or tuple passes through (stripped); None -> []."""
    if text is None:
        return []
    items = list(text) if isinstance(text, (list, tuple)) else str(text).split(',')
    return [str(item).strip() for item in items if str(item).strip()]


def sha256_file(
    path,                   # file to hash
    chunk_size  = 1 << 20,  # bytes read at a time
):
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(chunk_size), b''):
            digest.update(chunk)
    return digest.hexdigest()


def current_umask():
    """The process's umask, read without changing it where the system allows (Linux: /proc/self/status)."""
    # os.umask can only be read by setting it; other threads creating files meanwhile would get the temporary value.
    try:
        with open('/proc/self/status', encoding='ascii', errors='replace') as f:
            for line in f:
                if line.startswith('Umask:'):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode():
    """Permission bits open() gives a new file: 0o666 minus the umask."""
    return 0o666 & ~current_umask()


def make_temp_file(
    folder,             # where to create it (the final file's folder, so that the rename stays on one file system)
    prefix,             # start of the random name
    suffix  = '',       # end of the random name
):
    """tempfile.mkstemp, but with the permissions open() would give; returns (fd, path)."""
    # mkstemp makes 0o600 files, and a rename keeps the mode: on a shared disk, colleagues could not read the result.
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    try:
        os.fchmod(fd, new_file_mode())
    except BaseException:
        os.close(fd)
        os.remove(path)
        raise
    return fd, path


@contextlib.contextmanager
def atomic_write(
    path,               # final file path; its folder is created if missing
    mode    = 'w',      # 'w' (text, UTF-8) or 'wb'
    fsync   = False,    # flush to disk before the rename (for large, precious files)
    size_hint = None,   # bytes the file will have (for the message when the disk fills); None = unknown
):
    """Open a temporary file beside `path` for writing; rename it over `path` only if the block succeeds.

    The final file gets the permissions open() would give (0o666 minus the umask). When the disk (or quota) fills, the
    temporary file is removed, `path` keeps its old content, and a one-line DiskFullError says how much was needed.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    with disk_full_as_user_error(path, needed=size_hint):
        os.makedirs(folder, exist_ok=True)
        fd, tmp = make_temp_file(folder, prefix=f'{TEMP_PREFIX}{os.path.basename(path)}.')
    try:
        with os.fdopen(fd, mode, **({} if 'b' in mode else {'encoding': 'utf-8', 'newline': ''})) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        written = None
        if os.path.exists(tmp):
            written = os.path.getsize(tmp)
            os.remove(tmp)
        if is_disk_full(exc):
            # Measured after the removal: the space free is what the user has to work with now.
            raise disk_full_error(path, written=written, needed=size_hint) from exc
        raise


def remove_stale_temp_files(
    folder,             # folder to clean
    name_prefix,        # final file names the temporary files were for start with this (e.g. 'network-snapshot-'; '' = any)
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


def _exit_on_sigterm_from(parent_pid):
    """A worker's watcher thread: take SIGTERM synchronously; exit when the parent sent it (or the parent is gone)."""
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent_pid or os.getppid() != parent_pid:
            os._exit(0)


def _leave_stop_signals_to_parent(worker_init_fn, worker_id):
    signal.signal(signal.SIGINT, signal.SIG_IGN)       # the main process never stops its workers with SIGINT
    if hasattr(signal, 'sigwaitinfo'):
        # SIGTERM is also how the main process ends workers that do not stop by themselves (multiprocessing's
        # terminate(), at the latest when it exits), so it cannot be ignored outright: only the sender tells that one
        # from a signal to the whole group. Blocked here (threads started later inherit the mask) and taken by one
        # thread, which sees the sender.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        threading.Thread(target=_exit_on_sigterm_from, args=(os.getppid(),), name='sigterm-watch', daemon=True).start()
    if worker_init_fn is not None:
        worker_init_fn(worker_id)


def worker_init_ignoring_stop_signals(
    worker_init_fn  = None,     # the DataLoader's own worker_init_fn, run afterwards; None = none
):
    """A DataLoader worker_init_fn after which each worker ignores SIGINT, and SIGTERM unless the main process sends it."""
    # Ctrl-C, timeout, scancel and (with an init) docker stop signal every process of the job. A worker that died of it
    # would make the main process fail (DataLoader worker killed by signal) while it writes its final snapshot; so the
    # workers leave these signals to the main process, which writes the snapshot and then ends them. A partial of
    # module-level functions pickles, so this works with the spawn start method too.
    return functools.partial(_leave_stop_signals_to_parent, worker_init_fn)


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
