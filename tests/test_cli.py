"""stylegan2ada.cli: user errors print as one line, other exceptions keep their traceback; devices; stop signals."""

import os
import signal
import threading

import click
import pytest
import torch
from click.testing import CliRunner

from stylegan2ada import cli
from stylegan2ada.dataset import DatasetError
from stylegan2ada.util import UserError


def _command(error):
    @click.command(cls=cli.Command)
    def main():
        raise error
    return main


def test_user_error_is_one_line_and_other_errors_keep_their_traceback():
    result = CliRunner().invoke(_command(DatasetError('data.zip: not a zip file')))
    assert result.exit_code == 1 and result.output == 'Error: data.zip: not a zip file\n'
    result = CliRunner().invoke(_command(ValueError('a bug')))
    assert isinstance(result.exception, ValueError)                   # not turned into "Error: a bug"


def test_group_turns_subcommand_user_errors_into_one_line():
    @click.group(cls=cli.Group)
    def group():
        pass

    @group.command()
    def sub():
        raise UserError('--x 3: must be even')

    result = CliRunner().invoke(group, ['sub'])
    assert result.exit_code == 1 and result.output == 'Error: --x 3: must be even\n'


def test_pick_device():
    assert cli.pick_device('cpu') == torch.device('cpu')
    assert cli.pick_device('auto') == torch.device('cuda', 0) if torch.cuda.is_available() else torch.device('cpu')
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match=r'^--device cuda asked for, but no CUDA device is available$'):
            cli.pick_device('cuda')
    with pytest.raises(UserError, match=r'^--gpu-device nonsense: '):
        cli.pick_device('nonsense', option='--gpu-device')


def _spin():
    for _ in range(10000):          # Python runs signal handlers between bytecodes of the main thread
        pass


def test_stop_signals_raise_once_then_ignore_or_only_set_the_event(capfd):
    previous = signal.getsignal(signal.SIGTERM)
    with cli.stop_signals():
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            _spin()
        os.kill(os.getpid(), signal.SIGINT)                             # while the final snapshot is written: ignored
        _spin()
    assert 'SIGINT ignored: stopping already' in capfd.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is previous                 # restored
    event = threading.Event()
    with cli.stop_signals(event):
        os.kill(os.getpid(), signal.SIGINT)
        _spin()
        assert event.is_set()
