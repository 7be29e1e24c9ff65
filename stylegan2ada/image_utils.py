"""Image generation, conversions and grids shared by generate.py, training snapshots and reports."""

import os

import numpy as np
import PIL.Image
import torch

from .util import atomic_write, make_temp_file


def to_uint8(images):
    """Float images in [-1, 1], [N, C, H, W] -> uint8 tensor (NVIDIA's rounding: x * 127.5 + 128, clamped)."""
    return (images * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def to_pil(image_uint8):
    """One uint8 image [C, H, W] (tensor or array) -> PIL image (L or RGB)."""
    array = image_uint8.cpu().numpy() if isinstance(image_uint8, torch.Tensor) else np.asarray(image_uint8)
    array = array.transpose(1, 2, 0)                                    # [H, W, C]
    return PIL.Image.fromarray(array[:, :, 0], 'L') if array.shape[2] == 1 else PIL.Image.fromarray(array, 'RGB')


def make_grid(images_uint8, grid_size):
    """Tile uint8 images [N, C, H, W] into one [C, gh * H, gw * W] array, row-major, blank cells black."""
    images = images_uint8.cpu().numpy() if isinstance(images_uint8, torch.Tensor) else np.asarray(images_uint8)
    gw, gh = grid_size
    N, C, H, W = images.shape
    if N > gw * gh:
        raise ValueError(f'{N} images do not fit a {gw}x{gh} grid')
    canvas = np.zeros([gh, gw, C, H, W], dtype=np.uint8)
    canvas.reshape(gh * gw, C, H, W)[:N] = images
    return canvas.transpose(2, 0, 3, 1, 4).reshape(C, gh * H, gw * W)


def grid_size_for(num_images, max_width=None):
    """A near-square (width, height) grid for num_images; max_width caps the columns."""
    gw = int(np.ceil(np.sqrt(num_images)))
    if max_width is not None:
        gw = min(gw, max_width)
    return gw, int(np.ceil(num_images / gw))


def save_png_atomic(image, path):
    """Write a PIL image as PNG via a temporary file and rename."""
    with atomic_write(path, 'wb') as f:
        image.save(f, format='PNG')


def save_image_grid(images_uint8, path, grid_size=None):
    """Tile uint8 images [N, C, H, W] and save them as one PNG."""
    grid_size = grid_size or grid_size_for(len(images_uint8))
    save_png_atomic(to_pil(make_grid(images_uint8, grid_size)), path)


def generate_images(
    G,                              # generator: G(z, c, truncation_psi=, noise_mode=) -> float images in [-1, 1]
    seeds,                          # one image per seed; its z is drawn from np.random.RandomState(seed)
    label           = None,         # conditioning vector [c_dim] of every image; None = no label (zeros of size c_dim)
    truncation_psi  = 1,            # truncation: 1 = none
    noise_mode      = 'const',      # 'const', 'random' or 'none'
    device          = 'cpu',        # torch device of G
    batch_size      = 16,           # images per forward pass
):
    """uint8 images [len(seeds), C, H, W] on the CPU, one per seed."""
    c = torch.zeros([1, G.c_dim], device=device)
    if label is not None:
        c[:] = torch.as_tensor(label, device=device)
    out = []
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start:start + batch_size]
        z = torch.from_numpy(np.stack([np.random.RandomState(s).randn(G.z_dim) for s in chunk])).to(device, torch.float32)
        with torch.no_grad():
            img = G(z, c.expand(len(chunk), -1), truncation_psi=truncation_psi, noise_mode=noise_mode)
        out.append(to_uint8(img).cpu())
    return torch.cat(out)


def video_writer_module():
    """imageio (v2 API) when it can write mp4 (imageio-ffmpeg installed), else None: neither is a dependency."""
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401  imageio writes mp4 only through it
    except ImportError:
        return None
    return imageio


def write_video(
    frames,             # uint8 arrays [H, W, C]
    stem,               # path without the extension
    fps,                # frames per second
):
    """stem.mp4 when imageio with ffmpeg is installed, else an animated stem.gif (Pillow); returns the path."""
    imageio = video_writer_module()
    if imageio is not None:
        path = stem + '.mp4'
        fd, tmp = make_temp_file(os.path.dirname(os.path.abspath(path)), prefix='.tmp-' + os.path.basename(path) + '.',
                                 suffix='.mp4')
        os.close(fd)
        try:
            with imageio.get_writer(tmp, mode='I', fps=fps, codec='libx264') as writer:
                for frame in frames:
                    writer.append_data(frame)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return path
    path = stem + '.gif'
    images = [PIL.Image.fromarray(f[:, :, 0] if f.shape[2] == 1 else f).convert('RGB') for f in frames]
    with atomic_write(path, 'wb') as f:
        images[0].save(f, format='GIF', save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path
