"""Fused multiply-add a * b + c with broadcasting."""

import torch

from .impl import choose_impl


def fma(
    a,              # tensor
    b,              # tensor, broadcastable with a
    c,              # tensor, broadcastable with a * b
    impl = None,    # 'ref' or 'fast'; both are torch.addcmul (already one fused pass); None = 'fast'
):
    """Return a * b + c (broadcasting); differentiable to any order."""
    choose_impl('fma', impl)
    return torch.addcmul(c, a, b)
