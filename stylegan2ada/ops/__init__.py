"""Low-level ops of the engine. Every op takes `impl`, one of three paths with the same results (to float32
round-off) and the same gradients of any order:
  'ref'     plain PyTorch, kept exactly as NVIDIA's arithmetic reads: the definition the others are tested against;
  'fast'    PyTorch arranged to do less work (fewer passes, no padded copies, strided/transposed convolutions);
  'triton'  fused Triton kernels (upfirdn2d; bias_act for linear/relu/lrelu; conv2d_resample and modulated_conv2d
            through upfirdn2d), for CUDA tensors, or CPU tensors under Triton's interpreter (TRITON_INTERPRET=1).
None, the default the networks use, picks 'triton' for CUDA tensors when Triton imports and the op covers the
call, else 'fast' where it covers the call, else 'ref'; `with default_impl('ref'):` (or 'fast', 'triton') makes
impl=None mean that path for every op called inside the block (a whole network on one path). Triton kernels are
built on first use; if one cannot be built or launched, its op warns once and keeps to 'fast' from then on, until
`reset_triton()` forgets the kernels and the failures.
"""

from . import bias_act as _bias_act_module
from . import upfirdn2d as _upfirdn2d_module
from .bias_act import ACTIVATIONS, bias_act
from .conv2d_resample import conv2d_resample
from .fma import fma
from .impl import IMPL_CHOICES, default_impl, triton_importable
from .modulated_conv2d import modulated_conv2d
from .upfirdn2d import downsample2d, filter2d, setup_filter, upfirdn2d, upsample2d


def reset_triton():
    """Forget the built Triton kernels, their recorded failures and whether Triton imports (tests; a changed setup)."""
    _upfirdn2d_module._triton_kernels.cache_clear()
    _bias_act_module._triton_kernels.cache_clear()
    triton_importable.cache_clear()
