"""StyleGAN2 generator and discriminator with NVIDIA's constructor arguments and tensor names.

The module tree, parameter names and buffer names match stylegan2-ada-pytorch's, so a state dict
from one of its network pickles loads 1:1 (see pickles.py). fp16 layers run in fp16 only on CUDA;
on CPU the same network runs in fp32.
"""

import math

import numpy as np
import torch

from .ops import bias_act, conv2d_resample, fma, modulated_conv2d, setup_filter, upsample2d, downsample2d
from .ops.bias_act import ACTIVATIONS

DEFAULT_RESAMPLE_FILTER = (1, 3, 3, 1)
_HOMOGENEOUS_ACTIVATIONS = ('linear', 'relu', 'lrelu')     # act(g x) = g act(x) for g > 0


def normalize_2nd_moment(x, dim=1, eps=1e-8):
    """Scale x to unit mean square along `dim`."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


def _block_dtype(use_fp16, force_fp32, device):
    """Compute dtype of a block: fp16 only where asked for and on CUDA."""
    return torch.float16 if (use_fp16 and not force_fp32 and device.type == 'cuda') else torch.float32


def _memory_format(channels_last, dtype, device, fused_modconv=False):
    """Activation layout of a block: channels_last for fp16 blocks that ask for it (NVIDIA's design), and on the CPU.

    On the CPU channels_last is oneDNN's native layout, so its convolutions skip a reorder of their tensors on every
    call (training 1.06-1.12x as fast at 32 px, 1.14-1.15x at 64 px: docs/benchmarks.md); the values are those of the
    same ops. Fused modulated convolutions fold the batch into the channels, which channels_last would make a copy:
    they keep NCHW.
    """
    if device.type == 'cpu' and not fused_modconv:
        return torch.channels_last
    return torch.channels_last if (channels_last and dtype == torch.float16) else torch.contiguous_format


# ----------------------------------------------------------------------------
# Basic layers.

class FullyConnectedLayer(torch.nn.Module):
    """Dense layer with equalized learning rate."""

    def __init__(self,
        in_features,                # number of input features
        out_features,               # number of output features
        bias            = True,     # learn a bias
        activation      = 'linear', # activation name (ops.bias_act)
        lr_multiplier   = 1,        # learning-rate multiplier of this layer
        bias_init       = 0,        # initial value of the bias
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self.weight = torch.nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        self.bias = torch.nn.Parameter(torch.full([out_features], np.float32(bias_init))) if bias else None
        self.weight_gain = lr_multiplier / np.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x):
        # The gains ride along as scalars of addmm and bias_act instead of scaling weight and bias first: the same
        # layer with fewer ops forward and backward, which matters on a GPU where launching kernels bounds the speed.
        w = self.weight.to(x.dtype)
        b = self.bias.to(x.dtype) if self.bias is not None else None
        if self.activation == 'linear' and b is not None:
            return torch.addmm(b.unsqueeze(0), x, w.t(), beta=self.bias_gain, alpha=self.weight_gain)
        if self.activation in _HOMOGENEOUS_ACTIVATIONS:
            # act(g x + b) = g act(x + b / g) for g > 0: the weight gain moves into the activation's gain.
            if b is not None and self.bias_gain != self.weight_gain:
                b = b * (self.bias_gain / self.weight_gain)
            return bias_act(x.matmul(w.t()), b, act=self.activation, gain=self.weight_gain * ACTIVATIONS[self.activation].def_gain)
        b = b * self.bias_gain if b is not None and self.bias_gain != 1 else b
        return bias_act(x.matmul(w.t() * self.weight_gain), b, act=self.activation)

    def extra_repr(self):
        return f'in_features={self.in_features}, out_features={self.out_features}, activation={self.activation}'


class Conv2dLayer(torch.nn.Module):
    """Convolution with equalized learning rate, optional FIR up/downsampling, bias and activation."""

    def __init__(self,
        in_channels,                    # number of input channels
        out_channels,                   # number of output channels
        kernel_size,                    # width and height of the kernel
        bias            = True,         # learn a bias
        activation      = 'linear',     # activation name (ops.bias_act)
        up              = 1,            # integer upsampling factor
        down            = 1,            # integer downsampling factor
        resample_filter = DEFAULT_RESAMPLE_FILTER,  # low-pass filter taps for resampling
        conv_clamp      = None,         # clamp outputs to +-this; None = no clamping
        channels_last   = False,        # channels_last memory format for the weight
        trainable       = True,         # False = weights are buffers (Freeze-D)
    ):
        super().__init__()
        self.activation = activation
        self.up = up
        self.down = down
        self.conv_clamp = conv_clamp
        self.register_buffer('resample_filter', setup_filter(resample_filter))
        self.padding = kernel_size // 2
        self.weight_gain = 1 / np.sqrt(in_channels * (kernel_size ** 2))
        self.act_gain = ACTIVATIONS[activation].def_gain

        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        weight = torch.randn([out_channels, in_channels, kernel_size, kernel_size]).to(memory_format=memory_format)
        bias = torch.zeros([out_channels]) if bias else None
        if trainable:
            self.weight = torch.nn.Parameter(weight)
            self.bias = torch.nn.Parameter(bias) if bias is not None else None
        else:
            # Frozen layers keep their tensors as buffers so optimizers never see them.
            self.register_buffer('weight', weight)
            if bias is not None:
                self.register_buffer('bias', bias)
            else:
                self.bias = None

    def forward(self, x, gain=1):
        w = self.weight * self.weight_gain
        b = self.bias.to(x.dtype) if self.bias is not None else None
        flip_weight = (self.up == 1)  # slightly faster
        x = conv2d_resample(x, w.to(x.dtype), f=self.resample_filter, up=self.up, down=self.down,
                            padding=self.padding, flip_weight=flip_weight)
        act_gain = self.act_gain * gain
        act_clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, b, act=self.activation, gain=act_gain, clamp=act_clamp)


class MappingNetwork(torch.nn.Module):
    """z (and label c) -> w, broadcast to num_ws, with truncation towards the tracked w_avg."""

    def __init__(self,
        z_dim,                      # input latent dimensionality; 0 = no latent
        c_dim,                      # conditioning label dimensionality; 0 = unconditional
        w_dim,                      # intermediate latent dimensionality
        num_ws,                     # number of ws to broadcast to; None = return [N, w_dim]
        num_layers      = 8,        # number of mapping layers
        embed_features  = None,     # label embedding size; None = w_dim
        layer_features  = None,     # hidden layer size; None = w_dim
        activation      = 'lrelu',  # activation of the hidden layers
        lr_multiplier   = 0.01,     # learning-rate multiplier of the mapping layers
        w_avg_beta      = 0.995,    # decay of the tracked w average; None = do not track
    ):
        super().__init__()
        self.z_dim = z_dim
        self.c_dim = c_dim
        self.w_dim = w_dim
        self.num_ws = num_ws
        self.num_layers = num_layers
        self.w_avg_beta = w_avg_beta

        if embed_features is None:
            embed_features = w_dim
        if c_dim == 0:
            embed_features = 0
        if layer_features is None:
            layer_features = w_dim
        features = [z_dim + embed_features] + [layer_features] * (num_layers - 1) + [w_dim]

        if c_dim > 0:
            self.embed = FullyConnectedLayer(c_dim, embed_features)
        for idx in range(num_layers):
            layer = FullyConnectedLayer(features[idx], features[idx + 1], activation=activation, lr_multiplier=lr_multiplier)
            setattr(self, f'fc{idx}', layer)
        if num_ws is not None and w_avg_beta is not None:
            self.register_buffer('w_avg', torch.zeros([w_dim]))

    def forward(self, z, c, truncation_psi=1, truncation_cutoff=None, skip_w_avg_update=False):
        x = None
        if self.z_dim > 0:
            x = normalize_2nd_moment(z.to(torch.float32))
        if self.c_dim > 0:
            y = normalize_2nd_moment(self.embed(c.to(torch.float32)))
            x = torch.cat([x, y], dim=1) if x is not None else y
        for idx in range(self.num_layers):
            x = getattr(self, f'fc{idx}')(x)                          # [N, w_dim]

        if self.w_avg_beta is not None and self.training and not skip_w_avg_update:
            self.w_avg.copy_(x.detach().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))

        if self.num_ws is not None:
            x = x.unsqueeze(1).repeat([1, self.num_ws, 1])            # [N, num_ws, w_dim]

        if truncation_psi != 1:
            if self.w_avg_beta is None:
                raise ValueError('truncation needs a mapping network that tracks w_avg')
            if self.num_ws is None or truncation_cutoff is None:
                x = self.w_avg.lerp(x, truncation_psi)
            else:
                x = x.clone()
                x[:, :truncation_cutoff] = self.w_avg.lerp(x[:, :truncation_cutoff], truncation_psi)
        return x


# ----------------------------------------------------------------------------
# Synthesis network.

class SynthesisLayer(torch.nn.Module):
    """Modulated 3x3 convolution + noise + bias + activation."""

    def __init__(self,
        in_channels,                    # number of input channels
        out_channels,                   # number of output channels
        w_dim,                          # intermediate latent dimensionality
        resolution,                     # output resolution of this layer
        kernel_size     = 3,            # convolution kernel size
        up              = 1,            # integer upsampling factor
        use_noise       = True,         # add per-pixel noise
        activation      = 'lrelu',      # activation name
        resample_filter = DEFAULT_RESAMPLE_FILTER,  # low-pass filter taps for upsampling
        conv_clamp      = None,         # clamp outputs to +-this; None = no clamping
        channels_last   = False,        # channels_last memory format for the weight
    ):
        super().__init__()
        self.resolution = resolution
        self.up = up
        self.use_noise = use_noise
        self.activation = activation
        self.conv_clamp = conv_clamp
        self.register_buffer('resample_filter', setup_filter(resample_filter))
        self.padding = kernel_size // 2
        self.act_gain = ACTIVATIONS[activation].def_gain

        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.weight = torch.nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]).to(memory_format=memory_format))
        if use_noise:
            self.register_buffer('noise_const', torch.randn([resolution, resolution]))
            self.noise_strength = torch.nn.Parameter(torch.zeros([]))
        self.bias = torch.nn.Parameter(torch.zeros([out_channels]))

    def forward(self, x, w, noise_mode='random', fused_modconv=True, gain=1):
        if noise_mode not in ('random', 'const', 'none'):
            raise ValueError(f"noise_mode must be 'random', 'const' or 'none', got {noise_mode!r}")
        styles = self.affine(w)                                       # [N, C_in]

        noise = None
        if self.use_noise and noise_mode == 'random':
            noise = torch.randn([x.shape[0], 1, self.resolution, self.resolution], device=x.device) * self.noise_strength
        if self.use_noise and noise_mode == 'const':
            noise = self.noise_const * self.noise_strength

        flip_weight = (self.up == 1)  # slightly faster
        x = modulated_conv2d(x=x, weight=self.weight, styles=styles, noise=noise, up=self.up, padding=self.padding,
                             resample_filter=self.resample_filter, flip_weight=flip_weight, fused_modconv=fused_modconv)
        act_gain = self.act_gain * gain
        act_clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, self.bias.to(x.dtype), act=self.activation, gain=act_gain, clamp=act_clamp)


class ToRGBLayer(torch.nn.Module):
    """Modulated 1x1 convolution to image channels, without demodulation."""

    def __init__(self,
        in_channels,                # number of input channels
        out_channels,               # number of image channels
        w_dim,                      # intermediate latent dimensionality
        kernel_size     = 1,        # convolution kernel size
        conv_clamp      = None,     # clamp outputs to +-this; None = no clamping
        channels_last   = False,    # channels_last memory format for the weight
    ):
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.weight = torch.nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]).to(memory_format=memory_format))
        self.bias = torch.nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / np.sqrt(in_channels * (kernel_size ** 2))

    def forward(self, x, w, fused_modconv=True):
        styles = self.affine(w) * self.weight_gain
        x = modulated_conv2d(x=x, weight=self.weight, styles=styles, demodulate=False, fused_modconv=fused_modconv)
        return bias_act(x, self.bias.to(x.dtype), clamp=self.conv_clamp)


class SynthesisBlock(torch.nn.Module):
    """One resolution of the synthesis network: (upsampling) conv0, conv1, toRGB / skip."""

    def __init__(self,
        in_channels,                        # input channels; 0 = first block (learned constant)
        out_channels,                       # output channels
        w_dim,                              # intermediate latent dimensionality
        resolution,                         # resolution of this block
        img_channels,                       # number of image channels
        is_last,                            # is this the last block?
        architecture        = 'skip',       # 'orig', 'skip' or 'resnet'
        resample_filter     = DEFAULT_RESAMPLE_FILTER,  # low-pass filter taps
        conv_clamp          = None,         # clamp conv outputs to +-this; None = no clamping
        use_fp16            = False,        # run this block in fp16 (CUDA only)
        fp16_channels_last  = False,        # channels_last for fp16 blocks
        **layer_kwargs,                     # arguments for SynthesisLayer
    ):
        if architecture not in ('orig', 'skip', 'resnet'):
            raise ValueError(f"G architecture must be 'orig', 'skip' or 'resnet', got {architecture!r}")
        super().__init__()
        self.in_channels = in_channels
        self.w_dim = w_dim
        self.resolution = resolution
        self.img_channels = img_channels
        self.is_last = is_last
        self.architecture = architecture
        self.use_fp16 = use_fp16
        self.channels_last = (use_fp16 and fp16_channels_last)
        self.register_buffer('resample_filter', setup_filter(resample_filter))
        self.num_conv = 0
        self.num_torgb = 0

        if in_channels == 0:
            self.const = torch.nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        if in_channels != 0:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim=w_dim, resolution=resolution, up=2,
                                        resample_filter=resample_filter, conv_clamp=conv_clamp,
                                        channels_last=self.channels_last, **layer_kwargs)
            self.num_conv += 1
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim=w_dim, resolution=resolution,
                                    conv_clamp=conv_clamp, channels_last=self.channels_last, **layer_kwargs)
        self.num_conv += 1
        if is_last or architecture == 'skip':
            self.torgb = ToRGBLayer(out_channels, img_channels, w_dim=w_dim, conv_clamp=conv_clamp,
                                    channels_last=self.channels_last)
            self.num_torgb += 1
        if in_channels != 0 and architecture == 'resnet':
            self.skip = Conv2dLayer(in_channels, out_channels, kernel_size=1, bias=False, up=2,
                                    resample_filter=resample_filter, channels_last=self.channels_last)

    def forward(self, x, img, ws, force_fp32=False, fused_modconv=None, **layer_kwargs):
        w_iter = iter(ws.unbind(dim=1))
        dtype = _block_dtype(self.use_fp16, force_fp32, ws.device)
        if fused_modconv is None:
            # Grouped convolutions are fast for inference but slow for training (NVIDIA's choice).
            fused_modconv = (not self.training) and (dtype == torch.float32 or int(ws.shape[0]) == 1)
        memory_format = _memory_format(self.channels_last, dtype, ws.device, fused_modconv)

        if self.in_channels == 0:
            x = self.const.to(dtype=dtype).unsqueeze(0).repeat([ws.shape[0], 1, 1, 1])     # [N, C, 4, 4]
            x = x.contiguous(memory_format=memory_format)
        else:
            x = x.to(dtype=dtype, memory_format=memory_format)

        if self.in_channels == 0:
            x = self.conv1(x, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)
        elif self.architecture == 'resnet':
            y = self.skip(x, gain=np.sqrt(0.5))
            x = self.conv0(x, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)
            x = self.conv1(x, next(w_iter), fused_modconv=fused_modconv, gain=np.sqrt(0.5), **layer_kwargs)
            x = y + x
        else:
            x = self.conv0(x, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)
            x = self.conv1(x, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)

        if img is not None:
            img = upsample2d(img, self.resample_filter)
        if self.is_last or self.architecture == 'skip':
            y = self.torgb(x, next(w_iter), fused_modconv=fused_modconv)
            y = y.to(dtype=torch.float32, memory_format=torch.contiguous_format)
            img = img + y if img is not None else y
        return x, img


class SynthesisNetwork(torch.nn.Module):
    """ws [N, num_ws, w_dim] -> images [N, C, H, W] in about [-1, 1]."""

    def __init__(self,
        w_dim,                  # intermediate latent dimensionality
        img_resolution,         # output resolution (power of two >= 4)
        img_channels,           # number of output channels
        channel_base    = 32768,# overall multiplier for the number of channels
        channel_max     = 512,  # maximum number of channels in any layer
        num_fp16_res    = 0,    # use fp16 for the N highest resolutions
        **block_kwargs,         # arguments for SynthesisBlock
    ):
        if img_resolution < 4 or img_resolution & (img_resolution - 1) != 0:
            raise ValueError(f'img_resolution must be a power of two >= 4, got {img_resolution}')
        super().__init__()
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_resolution_log2 = int(np.log2(img_resolution))
        self.img_channels = img_channels
        self.block_resolutions = [2 ** i for i in range(2, self.img_resolution_log2 + 1)]
        channels_dict = {res: min(channel_base // res, channel_max) for res in self.block_resolutions}
        fp16_resolution = max(2 ** (self.img_resolution_log2 + 1 - num_fp16_res), 8)

        self.num_ws = 0
        for res in self.block_resolutions:
            in_channels = channels_dict[res // 2] if res > 4 else 0
            out_channels = channels_dict[res]
            is_last = (res == self.img_resolution)
            block = SynthesisBlock(in_channels, out_channels, w_dim=w_dim, resolution=res, img_channels=img_channels,
                                   is_last=is_last, use_fp16=(res >= fp16_resolution), **block_kwargs)
            self.num_ws += block.num_conv
            if is_last:
                self.num_ws += block.num_torgb
            setattr(self, f'b{res}', block)

    def forward(self, ws, **block_kwargs):
        if ws.ndim != 3 or ws.shape[1] != self.num_ws or ws.shape[2] != self.w_dim:
            raise ValueError(f'ws must be [N, {self.num_ws}, {self.w_dim}], got {list(ws.shape)}')
        ws = ws.to(torch.float32)
        block_ws = []
        w_idx = 0
        for res in self.block_resolutions:
            block = getattr(self, f'b{res}')
            # Consecutive blocks share one w: a block's toRGB uses the w of the next block's conv0.
            block_ws.append(ws.narrow(1, w_idx, block.num_conv + block.num_torgb))
            w_idx += block.num_conv

        x = img = None
        for res, cur_ws in zip(self.block_resolutions, block_ws):
            x, img = getattr(self, f'b{res}')(x, img, cur_ws, **block_kwargs)
        return img


class Generator(torch.nn.Module):
    """StyleGAN2 generator: mapping network + synthesis network."""

    def __init__(self,
        z_dim,                      # input latent dimensionality
        c_dim,                      # conditioning label dimensionality; 0 = unconditional
        w_dim,                      # intermediate latent dimensionality
        img_resolution,             # output resolution
        img_channels,               # number of output channels
        mapping_kwargs      = None, # arguments for MappingNetwork; None = defaults
        synthesis_kwargs    = None, # arguments for SynthesisNetwork; None = defaults
    ):
        super().__init__()
        mapping_kwargs = dict(mapping_kwargs or {})
        synthesis_kwargs = dict(synthesis_kwargs or {})
        self.z_dim = z_dim
        self.c_dim = c_dim
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.synthesis = SynthesisNetwork(w_dim=w_dim, img_resolution=img_resolution, img_channels=img_channels, **synthesis_kwargs)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, num_ws=self.num_ws, **mapping_kwargs)
        self.init_kwargs = dict(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, img_resolution=img_resolution,
                                img_channels=img_channels, mapping_kwargs=mapping_kwargs, synthesis_kwargs=synthesis_kwargs)

    def forward(self, z, c, truncation_psi=1, truncation_cutoff=None, **synthesis_kwargs):
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
        return self.synthesis(ws, **synthesis_kwargs)


# ----------------------------------------------------------------------------
# Discriminator.

class DiscriminatorBlock(torch.nn.Module):
    """One resolution of the discriminator: (fromRGB) conv0, downsampling conv1, skip."""

    def __init__(self,
        in_channels,                        # input channels; 0 = first block
        tmp_channels,                       # channels of the intermediate layer
        out_channels,                       # output channels
        resolution,                         # resolution of this block
        img_channels,                       # number of image channels
        first_layer_idx,                    # index of the first layer (counted from the top resolution)
        architecture        = 'resnet',     # 'orig', 'skip' or 'resnet'
        activation          = 'lrelu',      # activation name
        resample_filter     = DEFAULT_RESAMPLE_FILTER,  # low-pass filter taps
        conv_clamp          = None,         # clamp conv outputs to +-this; None = no clamping
        use_fp16            = False,        # run this block in fp16 (CUDA only)
        fp16_channels_last  = False,        # channels_last for fp16 blocks
        freeze_layers       = 0,            # freeze layers with index < this (Freeze-D)
    ):
        if architecture not in ('orig', 'skip', 'resnet'):
            raise ValueError(f"D architecture must be 'orig', 'skip' or 'resnet', got {architecture!r}")
        super().__init__()
        self.in_channels = in_channels
        self.resolution = resolution
        self.img_channels = img_channels
        self.first_layer_idx = first_layer_idx
        self.architecture = architecture
        self.use_fp16 = use_fp16
        self.channels_last = (use_fp16 and fp16_channels_last)
        self.register_buffer('resample_filter', setup_filter(resample_filter))
        self.num_layers = 0

        def next_trainable():
            # Layers are numbered from the highest resolution; the first freeze_layers are frozen.
            trainable = (first_layer_idx + self.num_layers) >= freeze_layers
            self.num_layers += 1
            return trainable

        if in_channels == 0 or architecture == 'skip':
            self.fromrgb = Conv2dLayer(img_channels, tmp_channels, kernel_size=1, activation=activation,
                                       trainable=next_trainable(), conv_clamp=conv_clamp, channels_last=self.channels_last)
        self.conv0 = Conv2dLayer(tmp_channels, tmp_channels, kernel_size=3, activation=activation,
                                 trainable=next_trainable(), conv_clamp=conv_clamp, channels_last=self.channels_last)
        self.conv1 = Conv2dLayer(tmp_channels, out_channels, kernel_size=3, activation=activation, down=2,
                                 trainable=next_trainable(), resample_filter=resample_filter, conv_clamp=conv_clamp,
                                 channels_last=self.channels_last)
        if architecture == 'resnet':
            self.skip = Conv2dLayer(tmp_channels, out_channels, kernel_size=1, bias=False, down=2,
                                    trainable=next_trainable(), resample_filter=resample_filter,
                                    channels_last=self.channels_last)

    def forward(self, x, img, force_fp32=False):
        device = img.device if img is not None else x.device
        dtype = _block_dtype(self.use_fp16, force_fp32, device)
        memory_format = _memory_format(self.channels_last, dtype, device)

        if x is not None:
            x = x.to(dtype=dtype, memory_format=memory_format)
        if self.in_channels == 0 or self.architecture == 'skip':
            img = img.to(dtype=dtype, memory_format=memory_format)
            y = self.fromrgb(img)
            x = x + y if x is not None else y
            img = downsample2d(img, self.resample_filter) if self.architecture == 'skip' else None

        if self.architecture == 'resnet':
            y = self.skip(x, gain=np.sqrt(0.5))
            x = self.conv0(x)
            x = self.conv1(x, gain=np.sqrt(0.5))
            x = y + x
        else:
            x = self.conv0(x)
            x = self.conv1(x)
        return x, img


class MinibatchStdLayer(torch.nn.Module):
    """Append the standard deviation over groups of samples as extra feature maps."""

    def __init__(self, group_size, num_channels=1):
        super().__init__()
        self.group_size = group_size
        self.num_channels = num_channels

    def forward(self, x):
        N, C, H, W = x.shape
        G = min(self.group_size, N) if self.group_size is not None else N
        if N % G != 0:
            raise ValueError(f'minibatch size {N} must be divisible by the mbstd group size {G}')
        F = self.num_channels
        c = C // F
        # Sample i belongs to group i % (N // G): the group index is the inner dimension.
        y = x.reshape(G, -1, F, c, H, W)                              # [G, n, F, c, H, W]
        y = y - y.mean(dim=0)
        y = y.square().mean(dim=0)                                    # [n, F, c, H, W]
        y = (y + 1e-8).sqrt()
        y = y.mean(dim=[2, 3, 4])                                     # [n, F]
        y = y.reshape(-1, F, 1, 1)
        y = y.repeat(G, 1, H, W)                                      # [N, F, H, W]
        return torch.cat([x, y], dim=1)

    def extra_repr(self):
        return f'group_size={self.group_size}, num_channels={self.num_channels}'


class DiscriminatorEpilogue(torch.nn.Module):
    """4x4 head: minibatch-stddev, conv, fc, out (projected onto the label embedding when conditional)."""

    def __init__(self,
        in_channels,                    # number of input channels
        cmap_dim,                       # label embedding dimensionality; 0 = unconditional
        resolution,                     # resolution of this block (4)
        img_channels,                   # number of image channels
        architecture        = 'resnet', # 'orig', 'skip' or 'resnet'
        mbstd_group_size    = 4,        # group size of the minibatch-stddev layer; None = whole batch
        mbstd_num_channels  = 1,        # features of the minibatch-stddev layer; 0 = disabled
        activation          = 'lrelu',  # activation name
        conv_clamp          = None,     # clamp conv outputs to +-this; None = no clamping
    ):
        super().__init__()
        self.in_channels = in_channels
        self.cmap_dim = cmap_dim
        self.resolution = resolution
        self.architecture = architecture

        if architecture == 'skip':
            self.fromrgb = Conv2dLayer(img_channels, in_channels, kernel_size=1, activation=activation)
        self.mbstd = MinibatchStdLayer(group_size=mbstd_group_size, num_channels=mbstd_num_channels) if mbstd_num_channels > 0 else None
        self.conv = Conv2dLayer(in_channels + mbstd_num_channels, in_channels, kernel_size=3, activation=activation, conv_clamp=conv_clamp)
        self.fc = FullyConnectedLayer(in_channels * (resolution ** 2), in_channels, activation=activation)
        self.out = FullyConnectedLayer(in_channels, 1 if cmap_dim == 0 else cmap_dim)

    def forward(self, x, img, cmap, force_fp32=False):
        x = x.to(dtype=torch.float32, memory_format=torch.contiguous_format)
        if self.architecture == 'skip':
            img = img.to(dtype=torch.float32, memory_format=torch.contiguous_format)
            x = x + self.fromrgb(img)
        if self.mbstd is not None:
            x = self.mbstd(x)
        x = self.conv(x)
        x = self.fc(x.flatten(1))
        x = self.out(x)                                               # [N, 1] or [N, cmap_dim]
        if self.cmap_dim > 0:
            x = (x * cmap).sum(dim=1, keepdim=True) * (1 / np.sqrt(self.cmap_dim))
        return x                                                      # [N, 1]


class Discriminator(torch.nn.Module):
    """StyleGAN2 discriminator (resnet by default) with projection conditioning."""

    def __init__(self,
        c_dim,                          # conditioning label dimensionality; 0 = unconditional
        img_resolution,                 # input resolution
        img_channels,                   # number of input channels
        architecture        = 'resnet', # 'orig', 'skip' or 'resnet'
        channel_base        = 32768,    # overall multiplier for the number of channels
        channel_max         = 512,      # maximum number of channels in any layer
        num_fp16_res        = 0,        # use fp16 for the N highest resolutions
        conv_clamp          = None,     # clamp conv outputs to +-this; None = no clamping
        cmap_dim            = None,     # label embedding dimensionality; None = channels at 4x4
        block_kwargs        = None,     # arguments for DiscriminatorBlock; None = defaults
        mapping_kwargs      = None,     # arguments for the label MappingNetwork; None = defaults
        epilogue_kwargs     = None,     # arguments for DiscriminatorEpilogue; None = defaults
    ):
        if img_resolution < 8 or img_resolution & (img_resolution - 1) != 0:
            raise ValueError(f'img_resolution must be a power of two >= 8, got {img_resolution}')
        super().__init__()
        block_kwargs = dict(block_kwargs or {})
        mapping_kwargs = dict(mapping_kwargs or {})
        epilogue_kwargs = dict(epilogue_kwargs or {})
        self.c_dim = c_dim
        self.img_resolution = img_resolution
        self.img_resolution_log2 = int(np.log2(img_resolution))
        self.img_channels = img_channels
        self.block_resolutions = [2 ** i for i in range(self.img_resolution_log2, 2, -1)]
        channels_dict = {res: min(channel_base // res, channel_max) for res in self.block_resolutions + [4]}
        fp16_resolution = max(2 ** (self.img_resolution_log2 + 1 - num_fp16_res), 8)
        self.init_kwargs = dict(c_dim=c_dim, img_resolution=img_resolution, img_channels=img_channels,
                                architecture=architecture, channel_base=channel_base, channel_max=channel_max,
                                num_fp16_res=num_fp16_res, conv_clamp=conv_clamp, cmap_dim=cmap_dim,
                                block_kwargs=block_kwargs, mapping_kwargs=mapping_kwargs, epilogue_kwargs=epilogue_kwargs)

        if cmap_dim is None:
            cmap_dim = channels_dict[4]
        if c_dim == 0:
            cmap_dim = 0

        common_kwargs = dict(img_channels=img_channels, architecture=architecture, conv_clamp=conv_clamp)
        cur_layer_idx = 0
        for res in self.block_resolutions:
            in_channels = channels_dict[res] if res < img_resolution else 0
            block = DiscriminatorBlock(in_channels, channels_dict[res], channels_dict[res // 2], resolution=res,
                                       first_layer_idx=cur_layer_idx, use_fp16=(res >= fp16_resolution),
                                       **block_kwargs, **common_kwargs)
            setattr(self, f'b{res}', block)
            cur_layer_idx += block.num_layers
        if c_dim > 0:
            self.mapping = MappingNetwork(z_dim=0, c_dim=c_dim, w_dim=cmap_dim, num_ws=None, w_avg_beta=None, **mapping_kwargs)
        self.b4 = DiscriminatorEpilogue(channels_dict[4], cmap_dim=cmap_dim, resolution=4, **epilogue_kwargs, **common_kwargs)

    def forward(self, img, c, **block_kwargs):
        x = None
        for res in self.block_resolutions:
            x, img = getattr(self, f'b{res}')(x, img, **block_kwargs)
        cmap = self.mapping(None, c) if self.c_dim > 0 else None
        return self.b4(x, img, cmap)                                  # [N, 1]
