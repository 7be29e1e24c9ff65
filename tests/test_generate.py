"""generate.py end to end on a pickle the test writes."""

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import generate
from stylegan2ada.image_utils import generate_images
from stylegan2ada.networks import Generator
from stylegan2ada.pickles import save_network_pkl
from taxogan_ext import report
from training_helpers import write_zip


def _tiny_generator(c_dim=0):
    torch.manual_seed(0)
    return Generator(z_dim=8, c_dim=c_dim, w_dim=8, img_resolution=16, img_channels=3,
                     mapping_kwargs=dict(num_layers=2), synthesis_kwargs=dict(channel_base=64, channel_max=8)).eval()


@pytest.fixture
def pkl(tmp_path):
    path = tmp_path / 'net.pkl'
    save_network_pkl(path, dict(G=_tiny_generator(), G_ema=_tiny_generator()))
    return path


def test_parse_range():
    from stylegan2ada import cli
    from stylegan2ada.util import UserError
    assert cli.parse_range('0-3,7') == [0, 1, 2, 3, 7]
    with pytest.raises(UserError, match=r"^--seeds a-b: cannot parse 'a-b'"):
        cli.parse_range('a-b', '--seeds')
    with pytest.raises(UserError, match="empty range '5-3'"):
        cli.parse_range('5-3')


def test_writes_images_equal_to_direct_generation(tmp_path, pkl):
    out = tmp_path / 'out'
    result = CliRunner().invoke(generate.main, ['--network', str(pkl), '--seeds', '0-2,5', '--outdir', str(out), '--grid', '--device', 'cpu'])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ['grid.png', 'seed0000.png', 'seed0001.png', 'seed0002.png', 'seed0005.png']
    G = _tiny_generator()
    z = torch.from_numpy(np.random.RandomState(5).randn(1, 8)).float()
    expected = (G(z, None, noise_mode='const') * 127.5 + 128).clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(PIL.Image.open(out / 'seed0005.png')), expected)
    assert PIL.Image.open(out / 'grid.png').size == (32, 32)        # 2x2 grid of 16 px


def test_conditional_needs_class(tmp_path):
    path = tmp_path / 'cond.pkl'
    save_network_pkl(path, dict(G_ema=_tiny_generator(c_dim=3)))
    result = CliRunner().invoke(generate.main, ['--network', str(path), '--outdir', str(tmp_path / 'o')])
    assert result.exit_code != 0 and 'conditional (3 classes); choose one with --class' in result.output
    result = CliRunner().invoke(generate.main, ['--network', str(path), '--outdir', str(tmp_path / 'o'), '--class', '3'])
    assert result.exit_code != 0 and 'out of range' in result.output
    result = CliRunner().invoke(generate.main, ['--network', str(path), '--outdir', str(tmp_path / 'o'), '--class', '2', '--seeds', '1'])
    assert result.exit_code == 0, result.output


def test_generate_and_report_make_the_same_conditional_images(tmp_path):
    # One generation function: generate.py --class 2 and the report's grid rows (class of the dataset's first image)
    # give the same images, equal to a direct forward pass with the one-hot label (batches of 16, so 20 seeds use two).
    path = tmp_path / 'cond.pkl'
    save_network_pkl(path, dict(G_ema=_tiny_generator(c_dim=3)))
    seeds = list(range(20))
    result = CliRunner().invoke(generate.main, ['--network', str(path), '--class', '2', '--seeds', '0-19', '--outdir', str(tmp_path / 'o')])
    assert result.exit_code == 0, result.output
    from_cli = np.stack([np.asarray(PIL.Image.open(tmp_path / 'o' / f'seed{s:04d}.png')).transpose(2, 0, 1) for s in seeds])
    data = write_zip(tmp_path / 'd.zip', num_images=4, labels=[2, 0, 1, 2])
    from_report = report.generated_images(str(path), data, 20)
    G = _tiny_generator(c_dim=3)
    z = torch.from_numpy(np.stack([np.random.RandomState(s).randn(8) for s in seeds])).float()
    with torch.no_grad():
        direct = (G(z, torch.eye(3)[[2] * 20], noise_mode='const') * 127.5 + 128).clamp(0, 255).to(torch.uint8).numpy()
    assert np.array_equal(from_cli, direct) and np.array_equal(from_report, direct)
    assert np.array_equal(generate_images(G, seeds, label=[0, 0, 1]).numpy(), direct)


@pytest.mark.parametrize('content', [None, b'garbage'])
def test_bad_network_is_one_line_error(tmp_path, content):
    path = tmp_path / 'bad.pkl'
    if content is not None:
        path.write_bytes(content)
    result = CliRunner().invoke(generate.main, ['--network', str(path), '--outdir', str(tmp_path / 'o')])
    assert result.exit_code == 1
    assert result.output.startswith('Error: ') and str(path) in result.output
    assert result.output.count('\n') == 1 and 'Traceback' not in result.output
