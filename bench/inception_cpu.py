"""Benchmark: seconds (wall and CPU) per 1000 images of Inception-v3-sized feature extraction.

NVIDIA's `inception-2015-12-05.pt` cannot be fetched on an offline machine, so this builds a stand-in of the
same shape and cost: Inception-v3 (Szegedy et al. 2015, "Rethinking the Inception Architecture for Computer
Vision") with random weights, eval-mode BatchNorm (eps 0.001), no auxiliary head, a 1008-class fc as in the
TensorFlow 2015-12-05 graph, and the detector's calling convention: uint8 [N, 3, H, W] of any size, resized
bilinearly to 299x299, normalised as (x - 128) / 128, `forward(x, return_features=True)` -> [N, 2048].
It is scripted, saved to a temporary file and loaded through the project's own detector path
(`resolve_detector(PATH)`), then timed on random 256x256 uint8 images after one warm-up batch.
The features are meaningless (random weights); only the cost is representative.

Last line: `images/s <feature-extraction throughput>`.
"""

import os
import sys
import tempfile
import time
import warnings

import click
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout: bench/ sits beside the package
from stylegan2ada.metrics.detectors import DetectorError, INCEPTION_FEATURES, resolve_detector  # noqa: E402

INPUT_SIDE = 299
NUM_CLASSES = 1008      # the 2015-12-05 TensorFlow graph's softmax width

#----------------------------------------------------------------------------
# Inception-v3, written from the paper's architecture (Table 1 and Figures 5-7) and its well-known layer list.

class ConvUnit(nn.Module):
    """Convolution without bias -> BatchNorm (eps 0.001) -> ReLU."""

    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        nn.init.kaiming_normal_(self.conv.weight, nonlinearity='relu')  # activations stay O(1) through 94 layers (torch's default shrinks them ~1e-7)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class Grid35(nn.Module):
    """35x35 module (paper Fig. 5, 5x5 kept as in the released model): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, cin, pool_ch):
        super().__init__()
        self.p1 = ConvUnit(cin, 64, 1)
        self.p5a = ConvUnit(cin, 48, 1)
        self.p5b = ConvUnit(48, 64, 5, padding=2)
        self.p3a = ConvUnit(cin, 64, 1)
        self.p3b = ConvUnit(64, 96, 3, padding=1)
        self.p3c = ConvUnit(96, 96, 3, padding=1)
        self.pp = ConvUnit(cin, pool_ch, 1)

    def forward(self, x):
        pooled = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        return torch.cat([self.p1(x), self.p5b(self.p5a(x)), self.p3c(self.p3b(self.p3a(x))), self.pp(pooled)], 1)


class Reduce35to17(nn.Module):
    """Grid reduction 35 -> 17: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, cin):
        super().__init__()
        self.p3 = ConvUnit(cin, 384, 3, stride=2)
        self.pda = ConvUnit(cin, 64, 1)
        self.pdb = ConvUnit(64, 96, 3, padding=1)
        self.pdc = ConvUnit(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.p3(x), self.pdc(self.pdb(self.pda(x))), F.max_pool2d(x, 3, stride=2)], 1)


class Grid17(nn.Module):
    """17x17 module with factorised 7x7 (paper Fig. 6): 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool-1x1."""

    def __init__(self, cin, mid):
        super().__init__()
        row, col = (1, 7), (7, 1)
        prow, pcol = (0, 3), (3, 0)
        self.p1 = ConvUnit(cin, 192, 1)
        self.s7a = ConvUnit(cin, mid, 1)
        self.s7b = ConvUnit(mid, mid, row, padding=prow)
        self.s7c = ConvUnit(mid, 192, col, padding=pcol)
        self.d7a = ConvUnit(cin, mid, 1)
        self.d7b = ConvUnit(mid, mid, col, padding=pcol)
        self.d7c = ConvUnit(mid, mid, row, padding=prow)
        self.d7d = ConvUnit(mid, mid, col, padding=pcol)
        self.d7e = ConvUnit(mid, 192, row, padding=prow)
        self.pp = ConvUnit(cin, 192, 1)

    def forward(self, x):
        single = self.s7c(self.s7b(self.s7a(x)))
        double = self.d7e(self.d7d(self.d7c(self.d7b(self.d7a(x)))))
        pooled = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        return torch.cat([self.p1(x), single, double, self.pp(pooled)], 1)


class Reduce17to8(nn.Module):
    """Grid reduction 17 -> 8: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, cin):
        super().__init__()
        self.pa = ConvUnit(cin, 192, 1)
        self.pb = ConvUnit(192, 320, 3, stride=2)
        self.qa = ConvUnit(cin, 192, 1)
        self.qb = ConvUnit(192, 192, (1, 7), padding=(0, 3))
        self.qc = ConvUnit(192, 192, (7, 1), padding=(3, 0))
        self.qd = ConvUnit(192, 192, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.pb(self.pa(x)), self.qd(self.qc(self.qb(self.qa(x)))), F.max_pool2d(x, 3, stride=2)], 1)


class Grid8(nn.Module):
    """8x8 module with expanded filter banks (paper Fig. 7): 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1.

    The 2015-12-05 graph's last module (mixed_10) pools with max instead of average.
    """

    use_max_pool: bool

    def __init__(self, cin, use_max_pool=False):
        super().__init__()
        self.use_max_pool = use_max_pool
        self.p1 = ConvUnit(cin, 320, 1)
        self.ea = ConvUnit(cin, 384, 1)
        self.eb_row = ConvUnit(384, 384, (1, 3), padding=(0, 1))
        self.eb_col = ConvUnit(384, 384, (3, 1), padding=(1, 0))
        self.fa = ConvUnit(cin, 448, 1)
        self.fb = ConvUnit(448, 384, 3, padding=1)
        self.fc_row = ConvUnit(384, 384, (1, 3), padding=(0, 1))
        self.fc_col = ConvUnit(384, 384, (3, 1), padding=(1, 0))
        self.pp = ConvUnit(cin, 192, 1)

    def forward(self, x):
        e = self.ea(x)
        f = self.fb(self.fa(x))
        if self.use_max_pool:
            pooled = F.max_pool2d(x, 3, stride=1, padding=1)
        else:
            pooled = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        return torch.cat([self.p1(x), self.eb_row(e), self.eb_col(e), self.fc_row(f), self.fc_col(f), self.pp(pooled)], 1)


class InceptionV3Standin(nn.Module):
    """uint8 [N, 3, H, W] -> 299 px -> Inception-v3 trunk -> [N, 2048] pool features (or [N, 1008] softmax)."""

    side: int

    def __init__(self):
        super().__init__()
        self.side = INPUT_SIDE
        self.stem = nn.Sequential(
            ConvUnit(3, 32, 3, stride=2),           # Conv2d_1a_3x3: 299 -> 149
            ConvUnit(32, 32, 3),                    # Conv2d_2a_3x3: -> 147
            ConvUnit(32, 64, 3, padding=1),         # Conv2d_2b_3x3
            nn.MaxPool2d(3, stride=2),              # -> 73
            ConvUnit(64, 80, 1),                    # Conv2d_3b_1x1
            ConvUnit(80, 192, 3),                   # Conv2d_4a_3x3: -> 71
            nn.MaxPool2d(3, stride=2),              # -> 35
        )
        self.trunk = nn.Sequential(
            Grid35(192, 32),                        # Mixed_5b -> 256
            Grid35(256, 64),                        # Mixed_5c -> 288
            Grid35(288, 64),                        # Mixed_5d -> 288
            Reduce35to17(288),                      # Mixed_6a -> 768 @ 17
            Grid17(768, 128),                       # Mixed_6b
            Grid17(768, 160),                       # Mixed_6c
            Grid17(768, 160),                       # Mixed_6d
            Grid17(768, 192),                       # Mixed_6e
            Reduce17to8(768),                       # Mixed_7a -> 1280 @ 8
            Grid8(1280),                            # Mixed_7b -> 2048
            Grid8(2048, use_max_pool=True),         # Mixed_7c -> 2048
        )
        self.fc = nn.Linear(INCEPTION_FEATURES, NUM_CLASSES)

    def features(self, img: torch.Tensor) -> torch.Tensor:
        x = img.to(torch.float32)
        if x.shape[2] != self.side or x.shape[3] != self.side:
            x = F.interpolate(x, size=[self.side, self.side], mode='bilinear', align_corners=False)
        x = (x - 128) / 128
        return self.trunk(self.stem(x)).mean(dim=[2, 3])

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        feats = self.features(x)
        if return_features:
            return feats
        return torch.softmax(self.fc(feats), dim=1)


def count_macs(model, side=INPUT_SIDE):
    """Multiply-accumulates of the convolutions and the fc for one side x side image (eager model, hooks)."""
    total = [0]

    def hook(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total[0] += output.numel() * (module.in_channels // module.groups) * kh * kw
        else:
            total[0] += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(torch.zeros([1, 3, side, side], dtype=torch.uint8), return_features=False)
    finally:
        for h in handles:
            h.remove()
    return total[0]

#----------------------------------------------------------------------------

@click.command()
# Main options.
@click.option('--num',                    help='Random images to time', metavar='INT', type=click.IntRange(min=1), default=1000, show_default=True)
@click.option('--res',                    help='Side of the random uint8 images (resized to 299 inside)', metavar='INT', type=click.IntRange(min=8), default=256, show_default=True)
@click.option('--seed',                   help='Seed for the weights and the images', metavar='INT', type=int, default=0, show_default=True)
# Performance-related.
@click.option('--batch', 'batch_size',    help='Images per detector call', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--device',                 help='Device', type=click.Choice(['cpu', 'cuda']), default='cpu', show_default=True)
@click.option('--threads',                help='torch CPU threads  [default: torch\'s choice]', metavar='INT', type=click.IntRange(min=1), default=None)
def main(**kwargs):
    """Time Inception-v3-sized feature extraction per 1000 images (random-weight stand-in for NVIDIA's detector).

    \b
    Example:
    python bench/inception_cpu.py --threads 1 --num 256
    """
    opts = dict(kwargs)
    if opts['threads']:
        torch.set_num_threads(opts['threads'])
    device = torch.device(opts['device'])
    torch.manual_seed(opts['seed'])

    model = InceptionV3Standin().eval()
    params_fc = sum(p.numel() for p in model.fc.parameters())
    params_all = sum(p.numel() for p in model.parameters())
    macs = count_macs(model)
    click.echo(f'Inception-v3 stand-in: {(params_all - params_fc) / 1e6:.2f}M parameters without the fc '
               f'({params_all / 1e6:.2f}M with the {NUM_CLASSES}-class fc), {macs / 1e9:.2f} GMACs per {INPUT_SIDE} px image')

    with tempfile.TemporaryDirectory(prefix='inception-bench-') as tmp:
        path = os.path.join(tmp, 'inception-v3-random.pt')
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', category=DeprecationWarning, message=r'`torch\.jit\.')
            torch.jit.script(model).save(path)
        try:
            detector = resolve_detector(path)
            detector.load(device)
            detector_id = detector.id
        except DetectorError as exc:
            raise click.ClickException(str(exc)) from None

        gen = torch.Generator().manual_seed(opts['seed'])
        side = opts['res']
        batches = [torch.randint(0, 256, [min(opts['batch_size'], opts['num'] - s), 3, side, side], dtype=torch.uint8, generator=gen)
                   for s in range(0, opts['num'], opts['batch_size'])]
        dim = detector.features(batches[0], device).shape[1]   # warm-up batch (TorchScript optimises on the first calls)
        if dim != INCEPTION_FEATURES:
            raise click.ClickException(f'{path}: features of width {dim}, expected {INCEPTION_FEATURES}')
        start, start_cpu = time.perf_counter(), time.process_time()
        for batch in batches:
            detector.features(batch, device)
        if device.type == 'cuda':
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
        cpu = time.process_time() - start_cpu

    click.echo(f'detector {detector_id} ({dim} features), images [3, {side}, {side}], num {opts["num"]}, batch {opts["batch_size"]}, '
               f'device {device}, torch threads {torch.get_num_threads()}')
    click.echo(f'load average {os.getloadavg()[0]:.1f}; features: {wall / opts["num"] * 1000:.2f} s per 1000 images '
               f'(CPU time {cpu / opts["num"] * 1000:.2f} s)')
    click.echo(f'images/s {opts["num"] / wall:.2f}')


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
