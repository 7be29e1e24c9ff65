"""What every command-line tool shares: user errors as one line, the torch device, and stop signals.

- `Command` / `Group` (click classes): a `UserError` raised anywhere below a command prints as one line
  (`Error: <message>`) and exits with status 1, and so does a full disk met by a write that does not say so itself;
  any other exception keeps its traceback, since it is a bug.
- `pick_device`: 'auto', 'cpu', 'cuda' or 'cuda:N' -> torch.device, or a UserError naming the option.
- `option_field` / `dataclass_options`: options declared once, as dataclass fields carrying their click help, type and
  metavar, and added to any number of commands.
- `stop_signals`: the one handler of SIGINT and SIGTERM. Ctrl-C, timeout, scancel, preemption and docker stop signal
  every process of a job; a training process either stops at once (KeyboardInterrupt: the loop writes its final
  snapshot) or, as one of several processes that must stop together, only notes the request.
"""

import contextlib
import dataclasses
import os
import re
import signal
import threading

import click

from .util import UserError, disk_full_error, is_disk_full

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def parse_range(
    text,               # e.g. '0-3,7'
    option  = None,     # how an error names the option, e.g. '--seeds'; None = no name
):
    """'0-3,7' -> [0, 1, 2, 3, 7]; UserError (one line, naming the option) when it does not parse."""
    where = f'{option} {text}: ' if option else ''
    values = []
    for part in str(text).split(','):
        part = part.strip()
        match = re.fullmatch(r'(\d+)-(\d+)', part)
        if match:
            lo, hi = int(match.group(1)), int(match.group(2))
            if hi < lo:
                raise UserError(f'{where}empty range {part!r}')
            values.extend(range(lo, hi + 1))
        elif re.fullmatch(r'\d+', part):
            values.append(int(part))
        else:
            raise UserError(f'{where}cannot parse {part!r}; expected numbers and ranges like 0-7,12')
    return values


def option_field(
    default     = None,     # value when not given, written as on the command line (`type` converts it); None = unset
    help        = '',       # --help text
    type        = None,     # click type (str, range or choice); None = a flag (False unless given)
    metavar     = None,     # placeholder in --help; None = click's (the choices, for a choice)
    required    = False,    # the command refuses to run without it
):
    """A dataclass field that is also a command-line option: its default, and what click needs to offer it."""
    return dataclasses.field(default=False if type is None else default,
                             metadata=dict(help=help, type=type, metavar=metavar, required=required))


def _click_option(field):
    """The click option of one option_field."""
    meta = field.metadata
    kwargs = dict(help=meta['help'])
    if meta['metavar'] is not None:
        kwargs['metavar'] = meta['metavar']
    if meta['type'] is None:
        kwargs['is_flag'] = True
    else:
        kwargs['type'] = meta['type']
    if meta['required']:
        kwargs['required'] = True
    if field.default is not None and meta['type'] is not None:
        kwargs.update(default=field.default, show_default=True)
    return click.option('--' + field.name.replace('_', '-'), **kwargs)


def dataclass_options(
    cls,                # dataclass whose option_field fields become --options ('_' -> '-')
    exclude = (),       # field names the command does not offer (it sets them itself)
):
    """Decorator adding a dataclass's option fields to a click command, in declaration (--help) order."""
    fields = [f for f in dataclasses.fields(cls) if 'help' in f.metadata and f.name not in exclude]

    def add(fn):
        # click lists options in the reverse order of their decorators' application: the last field goes on first.
        for field in reversed(fields):
            fn = _click_option(field)(fn)
        return fn
    return add


def typed_values(obj):
    """Convert a dataclass's option values as click would (4 -> 4.0 for a float option); call in __post_init__."""
    for field in dataclasses.fields(obj):
        value, click_type = getattr(obj, field.name), field.metadata.get('type')
        if value is not None and click_type is not None:
            object.__setattr__(obj, field.name, click_type(value))     # frozen dataclasses too


def _one_line_error(exc):
    """The click.ClickException of a UserError or of a full disk; None for anything else (a bug: keep the traceback)."""
    if isinstance(exc, UserError):
        return click.ClickException(str(exc))
    if is_disk_full(exc):
        # A write with no atomic_write of its own (a log line, a library's file): the OSError names the file, if any.
        return click.ClickException(str(disk_full_error(exc.filename or os.getcwd())))
    return None


class Command(click.Command):
    """A click command whose UserErrors (and full disks) print as one line (click.ClickException), without a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (UserError, OSError) as exc:
            error = _one_line_error(exc)
            if error is None:
                raise
            raise error from None


class Group(click.Group):
    """A click group whose callback's and subcommands' UserErrors (and full disks) print as one line."""

    command_class = Command

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (UserError, OSError) as exc:
            error = _one_line_error(exc)
            if error is None:
                raise
            raise error from None


def pick_device(
    name,               # 'auto', 'cpu', 'cuda', 'cuda:N' or any torch device string
    rank    = 0,        # process rank: 'auto' and 'cuda' take GPU rank % count
    option  = '--device',   # how messages name the option
):
    """The torch.device a --device option asks for; UserError when it is not available here."""
    # Imported here: tools without a device (dataset_tool_ext.py build) start without torch's ~1 s of imports.
    import torch  # pylint: disable=import-outside-toplevel
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    if name.startswith('cuda') and not torch.cuda.is_available():
        raise UserError(f'{option} {name} asked for, but no CUDA device is available')
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UserError(f'{option} {name}: {exc}') from None
    if device.type == 'cuda' and device.index is None:
        device = torch.device('cuda', rank % torch.cuda.device_count())
    return device


@contextlib.contextmanager
def stop_signals(
    event   = None,     # threading.Event: signals only set it (one of several processes); None = stop at once
):
    """Within the block, the first SIGINT or SIGTERM stops training: KeyboardInterrupt, or `event` set.

    After a KeyboardInterrupt further signals are ignored (with a note on stderr) until the block ends, so that they
    cannot cut the final snapshot short; SIGKILL still ends the process.
    """
    if threading.current_thread() is not threading.main_thread():
        yield                   # only the main thread may set handlers (and receives the signals)
        return
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    def already_stopping(signum, frame):
        # os.write, not print: a handler may run while the main code is inside a print to the same stream.
        os.write(2, f'{signal.Signals(signum).name} ignored: stopping already, writing the final snapshot '
                    f'(SIGKILL or Ctrl-\\ quits without it)\n'.encode())

    def stop(signum, frame):
        if event is not None:
            event.set()
            return
        for sig in STOP_SIGNALS:
            signal.signal(sig, already_stopping)
        raise KeyboardInterrupt

    for sig in STOP_SIGNALS:
        signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
