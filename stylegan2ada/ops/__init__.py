"""Low-level ops of the engine: every op has a plain-PyTorch reference path (`impl='ref'`)."""

from .bias_act import ACTIVATIONS, bias_act
from .conv2d_resample import conv2d_resample
from .fma import fma
from .modulated_conv2d import modulated_conv2d
from .upfirdn2d import downsample2d, filter2d, setup_filter, upfirdn2d, upsample2d
