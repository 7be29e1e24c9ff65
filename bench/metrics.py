"""Benchmark: seconds per 1000 images to compute detector features (and to decode the images) on one device."""

import os
import sys
import time

import click
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout: bench/ sits beside the package
from stylegan2ada import cli  # noqa: E402
from stylegan2ada.dataset import ImageFolderDataset  # noqa: E402
from stylegan2ada.metrics.detectors import resolve_detector  # noqa: E402
import taxogan_ext.taxon_detector  # noqa: E402,F401  registers the 'taxon' detector kind (--detector taxon:PATH)


@click.command(cls=cli.Command)
# Main options.
@click.option('--data',                   help='Dataset zip or folder of real images', metavar='ZIP', type=str, required=True)
@click.option('--detector',               help='inception, taxon:PATH or a TorchScript PATH', metavar='SPEC', type=str, required=True)
@click.option('--num',                    help='Images to time (cycled when the dataset is smaller)', metavar='INT', type=click.IntRange(min=1), default=1000, show_default=True)
# Performance-related.
@click.option('--batch', 'batch_size',    help='Images per detector call', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--device',                 help='Device', type=click.Choice(['cpu', 'cuda']), default='cpu', show_default=True)
@click.option('--threads',                help='torch CPU threads  [default: torch\'s choice]', metavar='INT', type=click.IntRange(min=1), default=None)
def main(**kwargs):
    """Time feature extraction per 1000 images for one detector.

    \b
    Example:
    python bench/metrics.py --data datasets/Calanoida.zip --detector taxon:taxon.pt --num 1000
    """
    opts = dict(kwargs)
    if opts['threads']:
        torch.set_num_threads(opts['threads'])
    device = cli.pick_device(opts['device'])
    dataset = ImageFolderDataset(opts['data'], cache=False)
    detector = resolve_detector(opts['detector'])
    detector.load(device)

    start = time.perf_counter()
    images = np.stack([dataset[i % len(dataset)][0] for i in range(min(opts['num'], len(dataset)))])
    decode_s = (time.perf_counter() - start) / len(images) * 1000
    batches = [torch.from_numpy(images[np.arange(s, min(s + opts['batch_size'], opts['num'])) % len(images)])
               for s in range(0, opts['num'], opts['batch_size'])]
    detector.features(batches[0][:2], device)   # warm-up (TorchScript optimises on the first calls)
    start, start_cpu = time.perf_counter(), time.process_time()
    dim = 0
    for batch in batches:
        dim = detector.features(batch, device).shape[1]
    if device.type == 'cuda':
        torch.cuda.synchronize()
    detect_s = (time.perf_counter() - start) / opts['num'] * 1000
    detect_cpu_s = (time.process_time() - start_cpu) / opts['num'] * 1000
    click.echo(f'detector {detector.id} ({dim} features), images {list(images.shape[1:])}, batch {opts["batch_size"]}, '
               f'device {device}, torch threads {torch.get_num_threads()}')
    click.echo(f'load average {os.getloadavg()[0]:.1f}; features: {detect_s:.2f} s per 1000 images '
               f'(CPU time {detect_cpu_s:.2f} s); decoding PNGs: {decode_s:.2f} s per 1000 images')


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
