"""Project an image into a generator's W space (NVIDIA's method and defaults): find the w whose image is closest to a
target under a perceptual distance, by optimising w (and the noise buffers) with Adam.

The method, as published with StyleGAN2 (Karras et al. 2020, section 5) and stylegan2-ada-pytorch:
- start from the mean w of 10 000 mapped samples; w_std = the root-mean-square distance of the samples to it;
- 1000 Adam steps (betas 0.9, 0.999), learning rate 0.1 ramped up over the first 5 % of the steps and down (cosine)
  over the last 25 %; Gaussian noise of std w_std * 0.05 * max(0, 1 - t / 0.75)^2 added to w at step fraction t;
- the loss is the perceptual distance plus 1e5 x the noise regularisation (squared autocorrelation of every noise
  buffer, at shifts of one pixel in x and y, at every scale of a 2x2 average-pooling pyramid down to 8x8); the noise
  buffers are optimised too and renormalised (zero mean, unit variance) after each step;
- the distance is the squared L2 distance of NVIDIA's VGG16 LPIPS features of the images (resized to 256 px when
  larger), or here, offline, of the taxon classifier's normalised activations (--distance taxon:PATH).

The projected w is rendered with the network's own constant noise (as generate.py renders it), so
`generate.py --projected-w projected_w.npz` gives proj.png again, byte for byte.
"""

import copy
import os

import click
import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
import tqdm

from stylegan2ada import cli
from stylegan2ada.image_utils import save_png_atomic, to_pil, to_uint8, video_writer_module, write_video
from stylegan2ada.metrics.detectors import DetectorError, downloaded_detector_path, jit_load, resolve_detector
from stylegan2ada.pickles import load_style_generator
from stylegan2ada.util import UserError, atomic_write

LPIPS_SIDE = 256                # VGG16's LPIPS features are computed at 256 px at most (larger images area-downsampled)
W_SAMPLES_SEED = 123            # seed of the 10 000 latents whose mean w is the start
GIF_FRAME_STRIDE = 10           # without imageio, the GIF keeps every 10th step (a GIF holds all frames in memory)


class ProjectionError(UserError):
    """A projection that cannot be made (target image, distance, network); one line naming the problem."""

#----------------------------------------------------------------------------
# Perceptual distances: features(img float [N, C, H, W] in [0, 255]) -> [N, D]; the distance is the squared L2.

class VGG16Features:
    """NVIDIA's VGG16 TorchScript file (the metrics' 'vgg16' detector, downloaded and cached once) in LPIPS mode."""

    def __init__(self, device, cache_dir=None):
        # The metrics' download, cache and checksum; its DetectorError is the one-line offline message.
        self.module = jit_load(downloaded_detector_path('vgg16', cache_dir), map_location=device).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)                                 # gradients flow to the image only

    def __call__(self, img):
        if img.shape[1] == 1:
            img = img.repeat(1, 3, 1, 1)
        if img.shape[2] > LPIPS_SIDE:
            img = F.interpolate(img, size=(LPIPS_SIDE, LPIPS_SIDE), mode='area')
        return self.module(img, resize_images=False, return_lpips=True)


class TaxonFeatures:
    """The taxon classifier's activations after every ReLU (unit length per pixel, as LPIPS normalises VGG's) and its
    penultimate features (unit length): an offline perceptual distance at the classifier's resolution."""

    def __init__(self, detector, device):
        self.module = detector.load(device)
        for param in self.module.parameters():
            param.requires_grad_(False)                                 # gradients flow to the image only
        self.layers = list(self.module.body.children())

    def __call__(self, img):
        x = self.module.preprocess(img)                                 # float [N, 3, r, r] in [-1, 1]
        parts = []
        for layer in self.layers:
            x = layer(x)
            if layer.original_name == 'ReLU':
                unit = x / (x.square().sum(dim=1, keepdim=True) + 1e-10).sqrt()
                # / sqrt(H W): every layer weighs the same, whatever its size (the mean over pixels, as LPIPS).
                parts.append(unit.flatten(1) / np.sqrt(x.shape[2] * x.shape[3]))
        features = x.mean(dim=[2, 3])                                   # [N, D], as the detector's features
        parts.append(features / (features.norm(dim=1, keepdim=True) + 1e-10))
        return torch.cat(parts, dim=1)


def resolve_distance(
    spec,               # 'vgg16' or 'taxon:PATH'
    device,             # torch device
    cache_dir   = None, # cache of NVIDIA's files; None = $TAXOGAN_CACHE or ~/.cache/taxogan
):
    """The features function of a --distance choice; one-line errors for a missing or wrong file."""
    if spec == 'vgg16':
        return VGG16Features(device, cache_dir)
    kind, colon, _path = spec.partition(':')
    if not colon or kind != 'taxon':
        raise ProjectionError(f'--distance {spec}: expected vgg16 or taxon:PATH')
    import taxogan_ext.taxon_detector  # noqa: F401  registers the 'taxon' detector kind
    return TaxonFeatures(resolve_detector(spec), device)

#----------------------------------------------------------------------------
# The projection.

def noise_regularization(noise_buffers):
    """Sum over buffers and scales of the squared autocorrelation at one-pixel shifts in x and y."""
    loss = 0.0
    for buf in noise_buffers:
        noise = buf[None, None]                                         # [1, 1, H, W]
        while True:
            loss = loss + (noise * torch.roll(noise, shifts=1, dims=3)).mean() ** 2
            loss = loss + (noise * torch.roll(noise, shifts=1, dims=2)).mean() ** 2
            if noise.shape[2] <= 8:
                break
            noise = F.avg_pool2d(noise, kernel_size=2)
    return loss


def learning_rate(
    t,                  # step / num_steps
    initial,            # peak learning rate
    rampdown,           # fraction of the steps at the end with the cosine ramp down
    rampup,             # fraction of the steps at the start with the linear ramp up
):
    """NVIDIA's learning-rate schedule at step fraction t."""
    ramp = min(1.0, (1.0 - t) / rampdown)
    ramp = 0.5 - 0.5 * np.cos(ramp * np.pi)
    return initial * ramp * min(1.0, t / rampup)


def mean_w(
    G,                          # StyleGAN2 generator
    label       = None,         # one-hot [c_dim]; None = unconditional
    num_samples = 10000,        # latents averaged
    device      = 'cpu',        # torch device of G
    batch_size  = 1000,         # latents mapped at a time
):
    """(mean w [1, 1, w_dim], w_std: root-mean-square distance of the samples' w to it) of num_samples latents."""
    z = np.random.RandomState(W_SAMPLES_SEED).randn(num_samples, G.z_dim)
    ws = []
    with torch.no_grad():
        for start in range(0, num_samples, batch_size):
            chunk = torch.from_numpy(z[start:start + batch_size]).to(device, torch.float32)
            c = torch.zeros([len(chunk), G.c_dim], device=device)
            if label is not None:
                c[:] = torch.as_tensor(label, device=device)
            ws.append(G.mapping(chunk, c)[:, :1].cpu().to(torch.float64))   # [B, 1, w_dim]: all ws are equal
    ws = torch.cat(ws)
    w_avg = ws.mean(dim=0, keepdim=True)                                # [1, 1, w_dim]
    w_std = float(((ws - w_avg).square().sum() / num_samples).sqrt())
    return w_avg.to(torch.float32), w_std


def project(
    G,                                      # StyleGAN2 generator (not modified: a copy's noise buffers are optimised)
    target,                                 # uint8 [C, H, W] at G.img_resolution
    features,                               # features(img float [N, C, H, W] in [0, 255]) -> [N, D]
    label                   = None,         # one-hot [c_dim] of a conditional network; None = unconditional
    num_steps               = 1000,         # optimisation steps
    w_avg_samples           = 10000,        # latents whose mean w is the start
    initial_learning_rate   = 0.1,          # peak Adam learning rate
    initial_noise_factor    = 0.05,         # std of the noise added to w at the start, in units of w_std
    lr_rampdown_length      = 0.25,         # fraction of the steps with the learning rate ramping down
    lr_rampup_length        = 0.05,         # fraction of the steps with the learning rate ramping up
    noise_ramp_length       = 0.75,         # fraction of the steps over which the w noise falls to 0
    regularize_noise_weight = 1e5,          # weight of the noise regularisation
    seed                    = 0,            # seed of the initial noise buffers and the w noise
    device                  = 'cpu',        # torch device of G
    progress                = False,        # tqdm progress bar
):
    """w after each step [num_steps, w_dim] float32 on the CPU; the last row is the projection."""
    if tuple(target.shape) != (G.img_channels, G.img_resolution, G.img_resolution):
        raise ValueError(f'target must be [{G.img_channels}, {G.img_resolution}, {G.img_resolution}], got {list(target.shape)}')
    G = copy.deepcopy(G).eval().requires_grad_(False).to(device)
    w_avg, w_std = mean_w(G, label, w_avg_samples, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    noise_buffers = [buf for name, buf in G.synthesis.named_buffers() if 'noise_const' in name]
    with torch.no_grad():
        target_features = features(target[None].to(device, torch.float32))

    w_opt = w_avg.clone().to(device).requires_grad_(True)              # [1, 1, w_dim]
    optimizer = torch.optim.Adam([w_opt] + noise_buffers, betas=(0.9, 0.999), lr=initial_learning_rate)
    with torch.no_grad():
        for buf in noise_buffers:
            buf.copy_(torch.randn(buf.shape, generator=gen, device=device))
            buf.requires_grad_(True)
    out = torch.zeros([num_steps, G.w_dim])
    bar = tqdm.tqdm(range(num_steps), desc='projecting', unit='step', disable=not progress)
    for step in bar:
        t = step / num_steps
        w_noise_scale = w_std * initial_noise_factor * max(0.0, 1.0 - t / noise_ramp_length) ** 2
        for group in optimizer.param_groups:
            group['lr'] = learning_rate(t, initial_learning_rate, lr_rampdown_length, lr_rampup_length)
        w_noise = torch.randn(w_opt.shape, generator=gen, device=device) * w_noise_scale
        ws = (w_opt + w_noise).repeat(1, G.num_ws, 1)                   # [1, num_ws, w_dim]
        synth = (G.synthesis(ws, noise_mode='const') + 1) * (255 / 2)  # float [1, C, H, W] in [0, 255]
        dist = (target_features - features(synth)).square().sum()
        loss = dist + regularize_noise_weight * noise_regularization(noise_buffers)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        out[step] = w_opt.detach()[0, 0].cpu()
        with torch.no_grad():
            # Renormalised after each step: the noise cannot grow into a second image that carries the target.
            for buf in noise_buffers:
                buf -= buf.mean()
                buf *= buf.square().mean().rsqrt()
        if step % 10 == 0 or step == num_steps - 1:
            bar.set_postfix(dist=f'{dist.item():.4g}', loss=f'{loss.item():.4g}')
    return out


def render_w(
    G,                          # StyleGAN2 generator
    w,                          # [w_dim] or [num_ws, w_dim]
    noise_mode  = 'const',      # 'const', 'random' or 'none'
):
    """uint8 image [C, H, W] of one w, with the network's own noise (as generate.py --projected-w renders it)."""
    ws = w.to(next(G.parameters()).device, torch.float32)
    ws = ws[None].repeat(G.num_ws, 1) if ws.ndim == 1 else ws
    with torch.no_grad():
        return to_uint8(G.synthesis(ws[None], noise_mode=noise_mode))[0].cpu()

#----------------------------------------------------------------------------
# Files.

def load_target(
    path,               # image file
    resolution,         # the network's side
    channels,           # the network's image channels (1 or 3)
):
    """NVIDIA's target: centre crop to a square, Lanczos resize to the network's side; uint8 [C, H, W]."""
    try:
        with PIL.Image.open(path) as image:
            image = image.convert('L' if channels == 1 else 'RGB')
    except (OSError, ValueError, PIL.Image.DecompressionBombError) as exc:
        raise ProjectionError(f'{path}: cannot read the target image ({type(exc).__name__}: {exc})') from None
    w, h = image.size
    side = min(w, h)
    image = image.crop(((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2))
    image = image.resize((resolution, resolution), PIL.Image.LANCZOS)
    array = np.asarray(image, dtype=np.uint8)
    array = array[:, :, None] if array.ndim == 2 else array
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def save_projected_w(path, ws):
    """ws [N, num_ws, w_dim] as NVIDIA's projected_w.npz (key 'w'), written atomically."""
    with atomic_write(path, 'wb') as f:
        np.savez(f, w=ws.cpu().numpy().astype(np.float32))


@click.command(cls=cli.Command)
# Main options.
@click.option('--network', 'network_pkl', help='Network pickle (ours or NVIDIA stylegan2-ada-pytorch)', metavar='PKL', type=str, required=True)
@click.option('--target', 'target_fname', help='Target image (centre-cropped to a square, resized to the network)', metavar='FILE', type=str, required=True)
@click.option('--outdir',         help='Where to save target.png, proj.png, projected_w.npz', metavar='DIR', type=str, required=True)
@click.option('--class', 'class_idx', help='Class index (required for a conditional network)', metavar='INT', type=click.IntRange(min=0), default=None)
# Optimisation.
@click.option('--num-steps',      help='Optimisation steps', metavar='INT', type=click.IntRange(min=1), default=1000, show_default=True)
@click.option('--distance',       help='Perceptual distance: vgg16 (NVIDIA\'s file, downloaded once) or taxon:PATH (offline)', metavar='SPEC', type=str, default='vgg16', show_default=True)
@click.option('--seed',           help='Seed of the initial noise buffers and the w noise', metavar='INT', type=click.IntRange(min=0), default=303, show_default=True)
# I/O-related.
@click.option('--save-video',     help='Also write the optimisation as a video (mp4 with imageio-ffmpeg, else GIF of every 10th step)', is_flag=True)
@click.option('--device',         help='Device to run on', type=click.Choice(['auto', 'cpu', 'cuda']), default='auto', show_default=True)
def main(**kwargs):
    """Project an image into the W space of a network.

    Writes target.png (the target at the network's size), proj.png (the projection) and projected_w.npz (key 'w',
    [1, num_ws, w_dim], as NVIDIA's projector); `generate.py --projected-w` renders it again.

    \b
    Examples:
    python projector.py --network net.pkl --target photo.png --outdir out
    python projector.py --network net.pkl --target photo.png --distance taxon:taxon.pt --outdir out --save-video
    """
    opts = dict(kwargs)
    device = cli.pick_device(opts['device'])
    G = load_style_generator(opts['network_pkl'], device)
    label = None
    if G.c_dim:
        if opts['class_idx'] is None:
            raise UserError(f'{opts["network_pkl"]}: the network is conditional ({G.c_dim} classes); choose one with --class')
        if opts['class_idx'] >= G.c_dim:
            raise UserError(f'--class {opts["class_idx"]} out of range: the network has {G.c_dim} classes (0-{G.c_dim - 1})')
        label = np.eye(G.c_dim, dtype=np.float32)[opts['class_idx']]
    elif opts['class_idx'] is not None:
        click.echo('warning: --class ignored: the network is unconditional')
    target = load_target(opts['target_fname'], G.img_resolution, G.img_channels)
    try:
        features = resolve_distance(opts['distance'], device)
    except DetectorError as exc:
        raise ProjectionError(f'--distance {opts["distance"]}: {exc}') from None
    try:
        os.makedirs(opts['outdir'], exist_ok=True)
    except OSError as exc:
        raise UserError(f'{opts["outdir"]}: cannot create the output folder: {exc.strerror}') from None

    steps_w = project(G, target, features, label=label, num_steps=opts['num_steps'], seed=opts['seed'], device=device,
                      progress=True)                                     # [num_steps, w_dim]
    projected = steps_w[-1][None].repeat(G.num_ws, 1)                   # [num_ws, w_dim]
    save_png_atomic(to_pil(target), os.path.join(opts['outdir'], 'target.png'))
    save_png_atomic(to_pil(render_w(G, projected)), os.path.join(opts['outdir'], 'proj.png'))
    save_projected_w(os.path.join(opts['outdir'], 'projected_w.npz'), projected[None])
    written = ['target.png', 'proj.png', 'projected_w.npz']
    if opts['save_video']:
        # NVIDIA's video: target | projection at every step, 10 fps; a GIF keeps every 10th step (ten times faster).
        stride = 1 if video_writer_module() is not None else GIF_FRAME_STRIDE
        target_hwc = target.numpy().transpose(1, 2, 0)
        frames = (np.concatenate([target_hwc, render_w(G, w).numpy().transpose(1, 2, 0)], axis=1)
                  for w in tqdm.tqdm(steps_w[stride - 1::stride], desc='video', unit='frame'))
        written.append(os.path.basename(write_video(frames, os.path.join(opts['outdir'], 'proj'), fps=10)))
    click.echo(f'wrote {", ".join(written)} to {opts["outdir"]}')


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
