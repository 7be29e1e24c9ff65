"""What every command-line tool shares: user errors as one line, the torch device, and stop signals.

- `Command` / `Group` (click classes): a `UserError` raised anywhere below a command prints as one line
  (`Error: <message>`) and exits with status 1; any other exception keeps its traceback, since it is a bug.
- `pick_device`: 'auto', 'cpu', 'cuda' or 'cuda:N' -> torch.device, or a UserError naming the option.
- `stop_signals`: the one handler of SIGINT and SIGTERM. Ctrl-C, timeout, scancel, preemption and docker stop signal
  every process of a job; a training process either stops at once (KeyboardInterrupt: the loop writes its final
  snapshot) or, as one of several processes that must stop together, only notes the request.
"""

import contextlib
import os
import signal
import threading

import click
import torch

from .util import UserError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Command(click.Command):
    """A click command whose UserErrors print as one line (click.ClickException), without a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            raise click.ClickException(str(exc)) from None


class Group(click.Group):
    """A click group whose callback's and subcommands' UserErrors print as one line."""

    command_class = Command

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            raise click.ClickException(str(exc)) from None


def pick_device(
    name,               # 'auto', 'cpu', 'cuda', 'cuda:N' or any torch device string
    rank    = 0,        # process rank: 'auto' and 'cuda' take GPU rank % count
    option  = '--device',   # how messages name the option
):
    """The torch.device a --device option asks for; UserError when it is not available here."""
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
