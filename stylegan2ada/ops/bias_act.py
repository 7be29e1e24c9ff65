"""Bias, activation, gain and clamp fused in one op (as NVIDIA's bias_act).

`impl='ref'` adds the bias, applies the activation, scales and clamps in separate passes.
`impl='fast'` covers the positively homogeneous activations (linear, relu, lrelu) with a gain > 0:
act(x + b) * g = act(g * x + g * b), so bias and gain go in one pass (torch.add with alpha) and
the activation runs in place on that fresh tensor; every other case runs the reference path.
"""

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .impl import choose_impl


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


# Activations with act(g * x) = g * act(x) for g > 0: the gain can move in front of them.
_HOMOGENEOUS = ('linear', 'relu', 'lrelu')


def _fast_supported(act, gain):
    """Whether the fast path covers this call (a positively homogeneous activation and a gain > 0)."""
    return act in _HOMOGENEOUS and gain > 0


def _bias_act_fast(x, b, dim, act, alpha, gain, clamp):
    """Fast path: g * x + g * b in one pass, activation in place, then clamp."""
    fresh = False
    if b is not None:
        b = b.reshape([-1 if i == dim else 1 for i in range(x.ndim)])
        x = torch.add(b * gain if gain != 1 else b, x, alpha=gain)    # g * b + g * x
        fresh = True
    elif gain != 1:
        x = x * gain
        fresh = True
    if act == 'lrelu':
        # In place only on a tensor made here (the caller's input must stay untouched), and only for
        # slopes >= 0, where autograd can differentiate the in-place form from its output.
        x = F.leaky_relu_(x, alpha) if fresh and alpha >= 0 else F.leaky_relu(x, alpha)
    elif act == 'relu':
        x = F.relu_(x) if fresh else F.relu(x)
    if clamp >= 0:
        x = x.clamp(-clamp, clamp)
    return x


# Both paths take (x, b, dim, act, alpha, gain, clamp) with defaults resolved.
_IMPLS = {'ref': _bias_act_ref, 'fast': _bias_act_fast}


def bias_act(
    x,                  # input tensor of any shape
    b     = None,       # bias [x.shape[dim]]; None = no bias
    dim   = 1,          # dimension of x that b runs along
    act   = 'linear',   # activation name, one of ACTIVATIONS
    alpha = None,       # activation parameter (lrelu slope); None = the activation's default
    gain  = None,       # scale after the activation; None = the activation's default gain
    clamp = None,       # clamp the output to [-clamp, clamp]; None = no clamping
    impl  = None,       # 'ref' or 'fast' (both any-order differentiable); None = 'fast' for linear/relu/lrelu with gain > 0, else 'ref'
):
    """Add a bias, apply an activation, scale by a gain and optionally clamp."""
    if act not in ACTIVATIONS:
        raise ValueError(f'unknown activation {act!r}; choose from {sorted(ACTIVATIONS)}')
    if b is not None and (b.ndim != 1 or b.shape[0] != x.shape[dim]):
        raise ValueError(f'bias of shape {list(b.shape)} does not match dim {dim} of input {list(x.shape)}')
    spec = ACTIVATIONS[act]
    alpha = float(spec.def_alpha if alpha is None else alpha)
    gain = float(spec.def_gain if gain is None else gain)
    clamp = float(-1 if clamp is None else clamp)
    impl = choose_impl('bias_act', impl, fast_ok=_fast_supported(act, gain))
    return _IMPLS[impl](x, b, dim, act, alpha, gain, clamp)
