"""Low-level ops of the engine. Every op takes `impl`: 'ref' (the plain-PyTorch reference path, kept exactly
as NVIDIA's arithmetic reads) or 'fast' (same results to float32 round-off, same gradients of any order);
None, the default the networks use, picks 'fast' wherever the fast path covers the call (see each op), or what
`with default_impl('ref'):` chooses for every op called inside the block (a whole network on the reference path)."""

from .bias_act import ACTIVATIONS, bias_act
from .conv2d_resample import conv2d_resample
from .fma import fma
from .impl import IMPL_CHOICES, default_impl
from .modulated_conv2d import modulated_conv2d
from .upfirdn2d import downsample2d, filter2d, setup_filter, upfirdn2d, upsample2d
