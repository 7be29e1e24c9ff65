"""Bias, activation, gain and clamp fused in one op (as NVIDIA's bias_act)."""

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Activation:
    """An activation function with its default alpha and gain."""
    func: Callable
    def_alpha: float
    def_gain: float


# Default gains keep the signal's second moment unchanged for ReLU-like functions (He init reasoning).
ACTIVATIONS = {
    'linear':   Activation(lambda x, alpha: x,                            0.0, 1.0),
    'relu':     Activation(lambda x, alpha: F.relu(x),                    0.0, math.sqrt(2)),
    'lrelu':    Activation(lambda x, alpha: F.leaky_relu(x, alpha),       0.2, math.sqrt(2)),
    'tanh':     Activation(lambda x, alpha: torch.tanh(x),                0.0, 1.0),
    'sigmoid':  Activation(lambda x, alpha: torch.sigmoid(x),             0.0, 1.0),
    'elu':      Activation(lambda x, alpha: F.elu(x),                     0.0, 1.0),
    'selu':     Activation(lambda x, alpha: F.selu(x),                    0.0, 1.0),
    'softplus': Activation(lambda x, alpha: F.softplus(x),                0.0, 1.0),
    'swish':    Activation(lambda x, alpha: torch.sigmoid(x) * x,         0.0, math.sqrt(2)),
}


def _bias_act_ref(x, b, dim, act, alpha, gain, clamp):
    """Reference path: broadcast-add, activation, gain, clamp."""
    if b is not None:
        x = x + b.reshape([-1 if i == dim else 1 for i in range(x.ndim)])
    x = ACTIVATIONS[act].func(x, alpha)
    if gain != 1:
        x = x * gain
    if clamp >= 0:
        x = x.clamp(-clamp, clamp)
    return x


_IMPLS = {'ref': _bias_act_ref}


def bias_act(
    x,                  # input tensor of any shape
    b     = None,       # bias [x.shape[dim]]; None = no bias
    dim   = 1,          # dimension of x that b runs along
    act   = 'linear',   # activation name, one of ACTIVATIONS
    alpha = None,       # activation parameter (lrelu slope); None = the activation's default
    gain  = None,       # scale after the activation; None = the activation's default gain
    clamp = None,       # clamp the output to [-clamp, clamp]; None = no clamping
    impl  = 'ref',      # implementation: 'ref' (plain PyTorch, any-order gradients)
):
    """Add a bias, apply an activation, scale by a gain and optionally clamp."""
    if act not in ACTIVATIONS:
        raise ValueError(f'unknown activation {act!r}; choose from {sorted(ACTIVATIONS)}')
    if b is not None and (b.ndim != 1 or b.shape[0] != x.shape[dim]):
        raise ValueError(f'bias of shape {list(b.shape)} does not match dim {dim} of input {list(x.shape)}')
    if impl not in _IMPLS:
        raise ValueError(f'unknown bias_act impl {impl!r}; choose from {sorted(_IMPLS)}')
    spec = ACTIVATIONS[act]
    alpha = float(spec.def_alpha if alpha is None else alpha)
    gain = float(spec.def_gain if gain is None else gain)
    clamp = float(-1 if clamp is None else clamp)
    return _IMPLS[impl](x, b, dim, act, alpha, gain, clamp)
