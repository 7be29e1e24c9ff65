"""Parity on a GPU: the ref, fast and Triton op paths on CUDA with the golden networks (images, logits, R1 and its gradient), and against NVIDIA's golden images.

Usage: python bench/cuda_parity.py   (env DEV=cuda|cpu, IMPLS=ref,fast,triton)"""
import json, sys, time, torch, numpy as np
sys.path.insert(0, '.')
from stylegan2ada.networks import Generator, Discriminator
from stylegan2ada.ops import default_impl
torch.backends.cuda.matmul.allow_tf32 = False; torch.backends.cudnn.allow_tf32 = False
spec = json.load(open('tests/data/golden/golden.json'))
import os; dev = torch.device(os.environ.get('DEV', 'cuda')); IMPLS = os.environ.get('IMPLS', 'ref,fast,triton').split(',')
for case in ('g64_uncond', 'g32_cond4'):
    kw = spec[case] if case in spec else spec['cases'][case]
    data = np.load(f'tests/data/golden/{case}.npz')
    split = {'G.': {}, 'D.': {}, 'io.': {}}
    for k in data.files:
        for p, o in split.items():
            if k.startswith(p): o[k[len(p):]] = torch.from_numpy(data[k].copy())
    G = Generator(**kw['G_kwargs']).to(dev); G.load_state_dict(split['G.']); G.eval()
    D = Discriminator(**kw['D_kwargs']).to(dev); D.load_state_dict(split['D.'])
    io = {k: v.to(dev) for k, v in split['io.'].items()}
    out = {}
    for impl in IMPLS:
        with default_impl(impl):
            img = G(io['z'], io['c'], noise_mode='const')
            x = io['d_in'].clone().requires_grad_()
            logits = D(x, io['c'])
            g, = torch.autograd.grad(logits.sum(), x, create_graph=True)
            r1 = g.square().sum()
            gw, = torch.autograd.grad(r1, D.b4.out.weight)
        out[impl] = (img.detach(), logits.detach(), r1.detach(), gw.detach())
    for impl in IMPLS[1:]:
        errs = [float((a - b).abs().max() / b.abs().max()) for a, b in zip(out[impl], out['ref'])]
        print(f'{case} {impl} vs ref on {dev}: img {errs[0]:.2e} logits {errs[1]:.2e} r1 {errs[2]:.2e} dR1/dw {errs[3]:.2e}')
    gold = float((out[IMPLS[-1]][0].cpu() - split['io.']['img_psi1']).abs().max() / split['io.']['img_psi1'].abs().max())
    print(f'{case} {IMPLS[-1]} img vs NVIDIA golden img_psi1: {gold:.2e}')
