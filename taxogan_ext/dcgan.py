"""DCGAN baseline (Radford et al., ICLR 2016) with the engine's generator/discriminator interface.

The networks expose what the StyleGAN2 training loop, loss, pickles, generate.py and the metrics use
(z_dim, c_dim, num_ws, mapping, synthesis, init_kwargs), so the baseline trains with the engine
unchanged: the non-saturating logistic loss with r1_gamma=0, pl_weight=0, no style mixing and no
augmentation is exactly DCGAN's BCE loss, because BCE(D(x), 1) = softplus(-D(x)) and
BCE(D(G(z)), 0) = softplus(D(G(z))). DCGAN_DEFAULTS holds the baseline's training settings.
"""

import torch

from stylegan2ada.pickles import register_module_class
from stylegan2ada.util import UserError

RESOLUTIONS = (32, 64, 128, 256)
INIT_STD = 0.02                                                         # N(0, 0.02) weights, BN scale N(1, 0.02)

# Training settings of the baseline, read (and copied) by train.py --model dcgan.
DCGAN_DEFAULTS = dict(
    G_opt=dict(lr=2e-4, betas=(0.5, 0.999), eps=1e-8),
    D_opt=dict(lr=2e-4, betas=(0.5, 0.999), eps=1e-8),
    r1_gamma=0,                 # no R1: plain BCE
    pl_weight=0,                # no path-length regularization
    style_mixing_prob=0,        # one latent per image
    ema_kimg=0,                 # G_ema = G (EMA with zero half-life)
    augment='none',             # no ADA
)


class DCGANConfigError(UserError, ValueError):
    """A dataset or size the baseline does not support (labels, resolution, channels); one line."""
    # Also a ValueError: load_network_pkl reports a pickle whose networks cannot be rebuilt (ValueError among others)
    # as that pickle's error, naming the file.


def _check_config(c_dim, img_resolution, img_channels, width, max_channels, width_name):
    """Clear errors for configurations the baseline does not support."""
    if c_dim:
        raise DCGANConfigError(f'the DCGAN baseline is unconditional: c_dim must be 0, got {c_dim}')
    if img_resolution not in RESOLUTIONS:
        raise DCGANConfigError(f'DCGAN supports resolutions {", ".join(map(str, RESOLUTIONS))} px, got {img_resolution}')
    if img_channels not in (1, 3):
        raise DCGANConfigError(f'DCGAN supports 1 or 3 image channels, got {img_channels}')
    if width < 1 or max_channels < 1:
        raise DCGANConfigError(f'{width_name} and max_channels must be >= 1, got {width} and {max_channels}')


def channels_at(
    res,            # feature-map resolution (4 .. img_resolution / 2)
    img_resolution, # output (G) or input (D) resolution
    width,          # ngf or ndf: channels next to the image
    max_channels,   # cap on the number of channels
):
    """Channels of the feature maps at `res`: width next to the image, doubling per halving, capped."""
    return min(width * (img_resolution // (2 * res)), max_channels)


def _init_dcgan(module):
    """Radford et al.'s init: conv weights N(0, 0.02), batch-norm scale N(1, 0.02) and shift 0."""
    for m in module.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            torch.nn.init.normal_(m.weight, 0.0, INIT_STD)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
        elif isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.normal_(m.weight, 1.0, INIT_STD)
            torch.nn.init.zeros_(m.bias)


class DCGANMapping(torch.nn.Module):
    """z -> ws [N, 1, z_dim]: DCGAN has no mapping network; truncation scales z towards its mean 0."""

    def __init__(self, z_dim):
        super().__init__()
        self.z_dim = z_dim

    def forward(self,
        z,                          # latents [N, z_dim]
        c=None,                     # labels [N, 0] or None (unconditional)
        truncation_psi=1,           # z is scaled by psi: the mean of N(0, I) is 0, so this is the truncation trick
        truncation_cutoff=None,     # ignored: there is a single ws entry
        skip_w_avg_update=False,    # ignored: no w_avg to track
    ):
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f'z must have shape [N, {self.z_dim}], got {list(z.shape)}')
        if c is not None and c.numel() != 0:
            raise ValueError(f'the DCGAN baseline is unconditional, got labels of shape {list(c.shape)}')
        ws = z.unsqueeze(1)                                            # [N, 1, z_dim]
        if truncation_psi != 1:
            ws = ws * truncation_psi
        return ws


class DCGANSynthesis(torch.nn.Module):
    """ws [N, 1, z_dim] -> images [N, C, H, W] in [-1, 1]: transposed convs, batch norm, ReLU, tanh."""

    def __init__(self, z_dim, img_resolution, img_channels, ngf, max_channels):
        super().__init__()
        self.z_dim = z_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        ch = channels_at(4, img_resolution, ngf, max_channels)
        # Project z to 4x4: a 4x4 transposed conv on a 1x1 input is a dense layer reshaped to [ch, 4, 4].
        layers = [torch.nn.ConvTranspose2d(z_dim, ch, 4, 1, 0, bias=False), torch.nn.BatchNorm2d(ch), torch.nn.ReLU(True)]
        res = 4
        while res * 2 < img_resolution:
            out_ch = channels_at(res * 2, img_resolution, ngf, max_channels)
            layers += [torch.nn.ConvTranspose2d(ch, out_ch, 4, 2, 1, bias=False), torch.nn.BatchNorm2d(out_ch), torch.nn.ReLU(True)]
            ch, res = out_ch, res * 2
        layers += [torch.nn.ConvTranspose2d(ch, img_channels, 4, 2, 1, bias=False), torch.nn.Tanh()]
        self.net = torch.nn.Sequential(*layers)

    def forward(self,
        ws,                     # [N, 1, z_dim]
        noise_mode='random',    # ignored: DCGAN has no noise inputs
        **kwargs,               # ignored engine options (force_fp32, fused_modconv, ...)
    ):
        if ws.ndim != 3 or ws.shape[1] != 1 or ws.shape[2] != self.z_dim:
            raise ValueError(f'ws must have shape [N, 1, {self.z_dim}], got {list(ws.shape)}')
        x = ws[:, 0, :, None, None].to(torch.float32)                  # [N, z_dim, 1, 1]
        return self.net(x)                                              # [N, C, H, W]


@register_module_class
class DCGANGenerator(torch.nn.Module):
    """DCGAN generator with the engine's Generator interface (mapping + synthesis, one ws entry)."""

    def __init__(self,
        z_dim           = 100,  # latent dimensionality
        c_dim           = 0,    # must be 0: the baseline is unconditional
        img_resolution  = 64,   # output resolution: 32, 64, 128 or 256
        img_channels    = 3,    # 1 or 3
        ngf             = 64,   # channels of the last hidden layer; doubled per halving of resolution
        max_channels    = 512,  # cap on the channels of any layer
    ):
        _check_config(c_dim, img_resolution, img_channels, ngf, max_channels, 'ngf')
        super().__init__()
        self.z_dim = z_dim
        self.c_dim = 0
        self.w_dim = z_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.num_ws = 1
        self.init_kwargs = dict(z_dim=z_dim, c_dim=c_dim, img_resolution=img_resolution, img_channels=img_channels,
                                ngf=ngf, max_channels=max_channels)
        self.mapping = DCGANMapping(z_dim)
        self.synthesis = DCGANSynthesis(z_dim, img_resolution, img_channels, ngf, max_channels)
        _init_dcgan(self)

    def forward(self,
        z,                          # latents [N, z_dim]
        c=None,                     # labels [N, 0] or None
        truncation_psi=1,           # scales z (see DCGANMapping)
        truncation_cutoff=None,     # ignored
        noise_mode='const',         # ignored
        **synthesis_kwargs,         # ignored engine options
    ):
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
        return self.synthesis(ws, noise_mode=noise_mode, **synthesis_kwargs)


@register_module_class
class DCGANDiscriminator(torch.nn.Module):
    """DCGAN discriminator: stride-2 convs, LeakyReLU(0.2), batch norm after the first; one logit per image."""

    def __init__(self,
        c_dim           = 0,    # must be 0: the baseline is unconditional
        img_resolution  = 64,   # input resolution: 32, 64, 128 or 256
        img_channels    = 3,    # 1 or 3
        ndf             = 64,   # channels of the first layer; doubled per halving of resolution
        max_channels    = 512,  # cap on the channels of any layer
    ):
        _check_config(c_dim, img_resolution, img_channels, ndf, max_channels, 'ndf')
        super().__init__()
        self.c_dim = 0
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.init_kwargs = dict(c_dim=c_dim, img_resolution=img_resolution, img_channels=img_channels,
                                ndf=ndf, max_channels=max_channels)
        res = img_resolution // 2
        ch = channels_at(res, img_resolution, ndf, max_channels)
        layers = [torch.nn.Conv2d(img_channels, ch, 4, 2, 1, bias=False), torch.nn.LeakyReLU(0.2, True)]
        while res > 4:
            out_ch = channels_at(res // 2, img_resolution, ndf, max_channels)
            layers += [torch.nn.Conv2d(ch, out_ch, 4, 2, 1, bias=False), torch.nn.BatchNorm2d(out_ch), torch.nn.LeakyReLU(0.2, True)]
            ch, res = out_ch, res // 2
        layers += [torch.nn.Conv2d(ch, 1, 4, 1, 0, bias=False)]         # 4x4 -> 1x1 logit, no sigmoid
        self.net = torch.nn.Sequential(*layers)
        _init_dcgan(self)

    def forward(self,
        img,                # images [N, C, H, W] in [-1, 1]
        c=None,             # labels [N, 0] or None
        **block_kwargs,     # ignored engine options (force_fp32, ...)
    ):
        if img.ndim != 4 or tuple(img.shape[1:]) != (self.img_channels, self.img_resolution, self.img_resolution):
            raise ValueError(f'images must have shape [N, {self.img_channels}, {self.img_resolution}, {self.img_resolution}], '
                             f'got {list(img.shape)}')
        if c is not None and c.numel() != 0:
            raise ValueError(f'the DCGAN baseline is unconditional, got labels of shape {list(c.shape)}')
        return self.net(img.to(torch.float32)).flatten(1)               # [N, 1]
