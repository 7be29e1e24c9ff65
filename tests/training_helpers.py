"""Tiny datasets and training settings shared by the training tests."""

import contextlib
import io
import os
import signal
import subprocess
import zipfile

import numpy as np
import PIL.Image

TINY_G = dict(z_dim=8, w_dim=8, mapping_kwargs=dict(num_layers=2), synthesis_kwargs=dict(channel_base=64, channel_max=8))
TINY_D = dict(channel_base=64, channel_max=8, epilogue_kwargs=dict(mbstd_group_size=2))
ADAM = dict(lr=0.0025, betas=[0, 0.99], eps=1e-8)


@contextlib.contextmanager
def process_group(
    cmd,                # the command line
    folder,             # its output goes to folder/out.txt and folder/err.txt
    cwd,                # working folder
    env,                # environment
):
    """Run cmd in a session (process group) of its own; a group still running when the block ends is killed."""
    with open(os.path.join(folder, 'out.txt'), 'w') as out, open(os.path.join(folder, 'err.txt'), 'w') as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=cwd, env=env, start_new_session=True)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def zip_entry(name):
    """A zip entry with a fixed timestamp: the same images give the same zip bytes (and hash) whenever written."""
    return zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))


def write_zip(path, num_images=16, resolution=16, channels=3, labels=None, seed=0, size=None, name=None):
    """A dataset zip of random-blob images; labels = list of class indices or None; size = (w, h) of one bad image."""
    rnd = np.random.RandomState(seed)
    fnames = []
    with zipfile.ZipFile(path, 'w') as z:
        for i in range(num_images):
            yy, xx = np.mgrid[:resolution, :resolution]
            cx, cy, r = rnd.uniform(4, resolution - 4, 2).tolist() + [rnd.uniform(2, resolution / 3)]
            blob = ((xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2).astype(np.float32)
            img = np.clip(blob[..., None] * rnd.uniform(80, 255, channels) + rnd.uniform(0, 40), 0, 255).astype(np.uint8)
            pil = PIL.Image.fromarray(img[..., 0] if channels == 1 else img)
            if size is not None and i == num_images - 1:
                pil = pil.resize(size)
            buf = io.BytesIO()
            pil.save(buf, format='PNG')
            fname = f'img{i:05d}.png'
            fnames.append(fname)
            z.writestr(zip_entry(fname), buf.getvalue())
        if labels is not None:
            import json
            z.writestr(zip_entry('dataset.json'), json.dumps({'labels': [[f, int(c)] for f, c in zip(fnames, labels)]}))
    return str(path)


def tiny_loop_kwargs(data_path, run_dir, **overrides):
    """training_loop kwargs for a 16 px, few-channel network; override anything."""
    kwargs = dict(
        run_dir=str(run_dir), training_set_kwargs=dict(path=data_path), G_kwargs=TINY_G, D_kwargs=TINY_D,
        G_opt_kwargs=ADAM, D_opt_kwargs=ADAM, loss_kwargs=dict(r1_gamma=0.01, pl_weight=2),
        augment_kwargs=dict(xflip=1, rotate90=1, xint=1, brightness=1, contrast=1), augment_p=0.1, ada_target=0.6,
        batch_size=4, batch_gpu=4, total_kimg=0.032, kimg_per_tick=0.016, image_snapshot_ticks=1, network_snapshot_ticks=1,
        ema_kimg=0.01, image_grid_size=(4, 2), random_seed=0,
    )
    kwargs.update(overrides)
    return kwargs
