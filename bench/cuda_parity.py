"""Parity of the op paths on a device: each path's networks against NVIDIA's golden outputs and against the ref path.

For every golden case with a discriminator (tests/data/golden), with TF32 off: G's image (noise 'const', psi 1), D's
logits, R1 (D's input gradient, squared and summed) and the gradient of R1 with respect to D's last weight (a double
backward through all of D). Each path is compared with the golden tensors (as the CPU tests do, on this device) and the
non-ref paths also with the ref path on the same device. Exits with status 1 when an error exceeds --tol.

Examples:
    python bench/cuda_parity.py                                   # CUDA, paths ref, fast, triton
    python bench/cuda_parity.py --device cpu --impls ref,fast     # the same check on the CPU (what the test runs)
"""

import json
import os
import sys

import click
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from stylegan2ada.networks import Discriminator, Generator  # noqa: E402
from stylegan2ada.ops import IMPL_CHOICES, default_impl  # noqa: E402

GOLDEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests', 'data', 'golden')
CASES = ('g64_uncond', 'g32_cond4')
OUTPUTS = ('img_psi1', 'd_logits', 'd_r1', 'd_r1_grad_b4_out_weight')


def load_case(case, spec, device):
    """G and D of one golden case on `device`, and its io tensors."""
    data = np.load(os.path.join(GOLDEN_DIR, f'{case}.npz'))
    parts = {prefix: {k[len(prefix):]: torch.from_numpy(data[k].copy()) for k in data.files if k.startswith(prefix)}
             for prefix in ('G.', 'D.', 'io.')}
    G = Generator(**spec['G_kwargs']).eval().to(device)
    D = Discriminator(**spec['D_kwargs']).eval().to(device)
    G.load_state_dict(parts['G.'], strict=True)
    D.load_state_dict(parts['D.'], strict=True)
    return G, D, {k: v.to(device) for k, v in parts['io.'].items()}


def outputs(G, D, io, impl):
    """The OUTPUTS of one op path, detached, in that order."""
    with default_impl(impl):
        img = G(io['z'], io['c'], noise_mode='const')
        x = io['d_in'].clone().requires_grad_(True)
        logits = D(x, io['c'])
        grad_x, = torch.autograd.grad(logits.sum(), x, create_graph=True)
        r1 = grad_x.square().sum()
        grad_w, = torch.autograd.grad(r1, D.b4.out.weight)
    return dict(zip(OUTPUTS, (t.detach() for t in (img, logits, r1, grad_w))))


def rel_error(actual, expected):
    """max |actual - expected| / max |expected|, on the CPU in float64."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    return float((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-30))


@click.command()
@click.option('--device', help='Torch device',                           metavar='STR',  type=str, default='cuda', show_default=True)
@click.option('--impls',  help='Op paths, comma-separated (first = the reference)', metavar='LIST', type=str, default='ref,fast,triton', show_default=True)
@click.option('--tol',    help='Largest relative error that passes',    metavar='FLOAT', type=click.FloatRange(min=0), default=1e-4, show_default=True)
def main(device, impls, tol):
    """Compare the op paths with NVIDIA's golden outputs and with each other; exit 1 above --tol."""
    impls = [impl.strip() for impl in impls.split(',') if impl.strip()]
    unknown = sorted(set(impls) - set(IMPL_CHOICES))
    if not impls or unknown:
        raise click.ClickException(f'--impls {",".join(impls)}: choose from {",".join(IMPL_CHOICES)}')
    try:
        device = torch.device(device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:
        raise click.ClickException(f'--device {device}: {str(error).splitlines()[0]}')
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with open(os.path.join(GOLDEN_DIR, 'golden.json')) as f:
        spec = json.load(f)['cases']
    worst = 0.0
    for case in CASES:
        G, D, io = load_case(case, spec[case], device)
        results = {impl: outputs(G, D, io, impl) for impl in impls}
        for impl in impls:
            against = [('NVIDIA golden', io)] + ([(f'{impls[0]} on {device}', results[impls[0]])] if impl != impls[0] else [])
            for name, reference in against:
                errors = {key: rel_error(results[impl][key], reference[key]) for key in OUTPUTS}
                worst = max(worst, *errors.values())
                print(f'{case} {impl:6s} vs {name:16s} ' + ' '.join(f'{k} {v:.2e}' for k, v in errors.items()))
    verdict = 'ok' if worst <= tol else 'FAILED'
    print(f'largest relative error {worst:.2e} (tolerance {tol:.0e}): {verdict}')
    if worst > tol:
        sys.exit(1)


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
