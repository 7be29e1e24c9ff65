"""Fused multiply-add a * b + c with broadcasting."""

import torch


def fma(a, b, c):
    """Return a * b + c (broadcasting); differentiable to any order."""
    return torch.addcmul(c, a, b)
