"""Bias, activation, gain and clamp fused in one op (as NVIDIA's bias_act).

`impl='ref'` adds the bias, applies the activation, scales and clamps in separate passes.
`impl='fast'` covers the positively homogeneous activations (linear, relu, lrelu) with a gain > 0:
act(x + b) * g = act(g * x + g * b), so bias and gain go in one pass (torch.add with alpha) and
the activation runs in place on that fresh tensor. `impl='triton'` covers the same calls when the
lrelu slope is >= 0: one Triton kernel reads x once and writes y once, and the backward is a second
kernel that gets the derivative from the saved output y (its sign is that of x + b), itself
differentiable again. impl=None takes 'triton' for such calls on CUDA, else 'fast' where it applies;
every other activation, and gain <= 0, runs the reference path.
"""

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .impl import TritonKernels, choose_impl, triton_interpret


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


# ----------------------------------------------------------------------------
# Triton path: one kernel for the forward (bias, activation, gain, clamp in one read and one write), one for the
# gradient. For a positively homogeneous activation with gain > 0 and slope alpha >= 0, the output y has the
# sign of x + b, so y alone gives the derivative: act'(x + b) = 1 where y > 0, else 0 (relu) or alpha (lrelu),
# and the clamp passed the gradient where |y| < clamp.

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_ACT_CODES = {'linear': 0, 'relu': 1, 'lrelu': 2}
_TRITON_BLOCK = 1024                # elements per program on the GPU: 8 per thread at 4 warps
_TRITON_BLOCK_INTERPRETED = 4096    # on the CPU: the interpreter runs each program in Python, so fewer, larger ones


def _build_triton_kernels():
    """Define the bias_act Triton kernels (imports triton; triton.jit reads TRITON_INTERPRET now)."""
    import triton
    import triton.language as tl

    @triton.jit
    def bias_act_kernel(
        x_ptr, b_ptr, y_ptr,                    # input, bias, output: x and y share one dense memory layout
        total,                                  # elements of x
        bias_step, bias_len, b_stride,          # bias index of flat offset i: (i // bias_step) % bias_len
        alpha, gain, clamp,                     # lrelu slope, gain, clamp (used when HAS_CLAMP)
        ACT: tl.constexpr,                      # 0 linear, 1 relu, 2 lrelu
        HAS_BIAS: tl.constexpr,
        HAS_CLAMP: tl.constexpr,
        INDEX_64: tl.constexpr,
        ACC_FP64: tl.constexpr,                 # compute in float64 (float64 inputs), else float32
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        if INDEX_64:
            pid = pid.to(tl.int64)
        idx = pid * BLOCK + tl.arange(0, BLOCK)                 # [BLOCK]
        live = idx < total
        v = tl.load(x_ptr + idx, mask=live, other=0.0)
        if ACC_FP64:
            v = v.to(tl.float64)
        else:
            v = v.to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(b_ptr + ((idx // bias_step) % bias_len) * b_stride, mask=live, other=0.0)
            v = v + bias.to(v.dtype)
        if ACT == 1:
            v = tl.where(v > 0, v, 0.0)
        if ACT == 2:
            v = tl.where(v > 0, v, v * alpha)
        v = v * gain
        if HAS_CLAMP:
            v = tl.minimum(tl.maximum(v, -clamp), clamp)
        tl.store(y_ptr + idx, v.to(y_ptr.dtype.element_ty), mask=live)

    @triton.jit
    def bias_act_grad_kernel(
        dy_ptr, y_ptr, dx_ptr,                  # incoming gradient, forward output, result: one dense layout
        total,                                  # elements
        alpha, gain, clamp,
        ACT: tl.constexpr,
        HAS_CLAMP: tl.constexpr,
        INDEX_64: tl.constexpr,
        ACC_FP64: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        if INDEX_64:
            pid = pid.to(tl.int64)
        idx = pid * BLOCK + tl.arange(0, BLOCK)                 # [BLOCK]
        live = idx < total
        g = tl.load(dy_ptr + idx, mask=live, other=0.0)
        y = tl.load(y_ptr + idx, mask=live, other=0.0)
        if ACC_FP64:
            g = g.to(tl.float64)
            y = y.to(tl.float64)
        else:
            g = g.to(tl.float32)
            y = y.to(tl.float32)
        g = g * gain
        if ACT == 1:
            g = tl.where(y > 0, g, 0.0)
        if ACT == 2:
            g = tl.where(y > 0, g, g * alpha)
        if HAS_CLAMP:
            g = tl.where(tl.abs(y) < clamp, g, 0.0)
        tl.store(dx_ptr + idx, g.to(dx_ptr.dtype.element_ty), mask=live)

    return bias_act_kernel, bias_act_grad_kernel


@functools.cache
def _triton_kernels(
    interpret,              # TRITON_INTERPRET when built: part of the key, since triton.jit reads it when decorating
):
    """The op's Triton kernels, built on first use, with the memo of their first failure (cache_clear() resets)."""
    return TritonKernels('bias_act', _build_triton_kernels)


def _triton_supported(x, b, act, alpha, gain):
    """Whether the Triton path covers this call: linear/relu/lrelu (slope >= 0), gain > 0, one floating-point dtype."""
    # A bias of another dtype would promote the reference's output (x + b); the kernel writes x's dtype.
    return (act in _TRITON_ACT_CODES and gain > 0 and alpha >= 0 and x.dtype in _TRITON_DTYPES
            and (b is None or (b.dtype == x.dtype and b.device == x.device)))


def _dense(x):
    """x itself if its elements fill its storage span in some dimension order (contiguous, channels_last, ...), else a copy."""
    if x.is_contiguous() or (x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return x
    return x.contiguous()


def _block_size(x):
    """Elements per program for tensors on x's device."""
    return _TRITON_BLOCK_INTERPRETED if x.device.type == 'cpu' else _TRITON_BLOCK


def _index_64(x):
    """Whether flat offsets into x need 64 bits."""
    return x.numel() >= 2 ** 31


def _launch_bias_act(kernels, x, b, dim, act, alpha, gain, clamp):
    """Forward kernel: y = clamp(act(x + b) * gain), in x's memory layout."""
    x = _dense(x)
    y = torch.empty_like(x)                                         # same dense layout as x
    if x.numel() == 0:
        return y
    # In a dense layout, element offset i sits at index (i // stride[dim]) % size[dim] along dim.
    bias_step = max(x.stride(dim), 1) if x.ndim else 1
    block = _block_size(x)
    kernels[0][((x.numel() + block - 1) // block,)](
        x, x if b is None else b, y, x.numel(), bias_step, x.shape[dim] if x.ndim else 1, 0 if b is None else b.stride(0),
        float(alpha), float(gain), float(clamp), ACT=_TRITON_ACT_CODES[act], HAS_BIAS=(b is not None),
        HAS_CLAMP=(clamp >= 0), INDEX_64=_index_64(x), ACC_FP64=(x.dtype == torch.float64), BLOCK=block, num_warps=4)
    return y


def _launch_bias_act_grad(kernels, dy, y, act, alpha, gain, clamp):
    """Gradient kernel: dx = dy * act'(.) * gain, zero where the output was clamped, from the saved output y."""
    if dy.stride() != y.stride():
        dy = torch.empty_like(y).copy_(dy)                          # the kernel walks dy and y with one flat index
    dx = torch.empty_like(y)
    if y.numel() == 0:
        return dx
    block = _block_size(y)
    kernels[1][((y.numel() + block - 1) // block,)](
        dy, y, dx, y.numel(), float(alpha), float(gain), float(clamp), ACT=_TRITON_ACT_CODES[act], HAS_CLAMP=(clamp >= 0),
        INDEX_64=_index_64(y), ACC_FP64=(y.dtype == torch.float64), BLOCK=block, num_warps=4)
    return dx


def _bias_act_grad_torch(dy, y, act, alpha, gain, clamp):
    """The gradient kernel's formula in torch: the fallback when the kernels cannot run."""
    dx = dy * gain
    if act == 'relu':
        dx = dx * (y > 0).to(dx.dtype)
    elif act == 'lrelu':
        dx = dx * torch.where(y > 0, 1.0, alpha).to(dx.dtype)
    if clamp >= 0:
        dx = dx * (y.abs() < clamp).to(dx.dtype)
    return dx


def _bias_act_grad_triton(dy, y, act, alpha, gain, clamp):
    """dx from dy and the saved output by the gradient kernel (any order differentiable), or torch if Triton failed."""
    return _triton_kernels(triton_interpret()).run(
        launch=lambda kernels: _BiasActGradTriton.apply(dy, y, act, alpha, gain, clamp, kernels),
        fallback=lambda: _bias_act_grad_torch(dy, y, act, alpha, gain, clamp))


class _BiasActGradTriton(torch.autograd.Function):
    """dx = dy * act'(y) * gain * [|y| < clamp]: linear in dy, piecewise constant in y (zero derivative a.e.)."""

    @staticmethod
    def forward(ctx, dy, y, act, alpha, gain, clamp, kernels):
        ctx.save_for_backward(y)
        ctx.args = (act, alpha, gain, clamp)
        return _launch_bias_act_grad(kernels, dy, y, act, alpha, gain, clamp)

    @staticmethod
    def backward(ctx, ddx):
        y, = ctx.saved_tensors
        ddy = _bias_act_grad_triton(ddx, y, *ctx.args) if ctx.needs_input_grad[0] else None
        return ddy, None, None, None, None, None, None


class _BiasActTriton(torch.autograd.Function):
    """bias_act by the forward kernel; the backward is the gradient kernel, db its sum over every dim but `dim`."""

    @staticmethod
    def forward(ctx, x, b, dim, act, alpha, gain, clamp, kernels):
        y = _launch_bias_act(kernels, x, b, dim, act, alpha, gain, clamp)
        ctx.save_for_backward(y)
        ctx.args = (dim, act, alpha, gain, clamp)
        return y

    @staticmethod
    def backward(ctx, dy):
        y, = ctx.saved_tensors
        dim, act, alpha, gain, clamp = ctx.args
        dx = db = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            dx = _bias_act_grad_triton(dy, y, act, alpha, gain, clamp)
        if ctx.needs_input_grad[1]:
            db = dx.sum([i for i in range(dx.ndim) if i != dim])
        return dx if ctx.needs_input_grad[0] else None, db, None, None, None, None, None, None


def _bias_act_triton(x, b, dim, act, alpha, gain, clamp):
    """Triton path: the fused kernels; falls back to the fast path (one warning) if Triton fails."""
    return _triton_kernels(triton_interpret()).run(
        launch=lambda kernels: _BiasActTriton.apply(x, b, dim, act, alpha, gain, clamp, kernels),
        fallback=lambda: _bias_act_fast(x, b, dim, act, alpha, gain, clamp))


# All paths take (x, b, dim, act, alpha, gain, clamp) with defaults resolved.
_IMPLS = {'ref': _bias_act_ref, 'fast': _bias_act_fast, 'triton': _bias_act_triton}


def bias_act(
    x,                  # input tensor of any shape
    b     = None,       # bias [x.shape[dim]]; None = no bias
    dim   = 1,          # dimension of x that b runs along
    act   = 'linear',   # activation name, one of ACTIVATIONS
    alpha = None,       # activation parameter (lrelu slope); None = the activation's default
    gain  = None,       # scale after the activation; None = the activation's default gain
    clamp = None,       # clamp the output to [-clamp, clamp]; None = no clamping
    impl  = None,       # 'ref', 'fast' or 'triton' (all any-order differentiable); None = see the module docstring
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
    if dim < 0:
        dim += x.ndim
    impl = choose_impl('bias_act', impl, fast_ok=_fast_supported(act, gain),
                       triton_ok=_triton_supported(x, b, act, alpha, gain), device_type=x.device.type)
    return _IMPLS[impl](x, b, dim, act, alpha, gain, clamp)
