"""Procedural demo collection: deterministic copepod-like images for four orders.

Stands in for the paper's BOLD images (which cannot be downloaded here) so that the whole
pipeline (dataset tool -> hierarchical training -> tables and grids) runs on a laptop. Each
order has its own body plan, so the orders are told apart by shape, as in the real data:

  Calanoida          antennules as long as the body or longer, slender urosome, oil sac
  Cyclopoida         teardrop prosome, medium antennules in a V, egg sacs on some females
  Harpacticoida      worm-like cylinder with many segments and short antennules
  Siphonostomatoida  broad flattened shield (Caligus-like), genital complex, egg strings

Segmentation, appendages, pose, bending, size, colour, microscope background and blur vary
within an order. Counts follow the paper (902:766:150:151) times `scale`. The tree written,
`OUT/Copepoda/<Order>/<order>_<index:05d>.png` (plus `OUT/Copepoda/copepoda_<index:05d>.png`
for images identified only to the class), is read by the dataset tool like a real collection.

Every image draws from its own RNG seeded by (seed, order, index), so the same options give
byte-identical PNG files whatever the number of workers, and image i of an order is the same
at every `scale`.
"""

import concurrent.futures
import io
import json
import math
import os
import re
from pathlib import Path

import click
import numpy as np
import tqdm
from PIL import Image, ImageDraw, ImageFilter

from stylegan2ada.util import TEMP_PREFIX, atomic_write, write_json_atomic, write_text_atomic

ORDERS          = ('Calanoida', 'Cyclopoida', 'Harpacticoida', 'Siphonostomatoida')
PAPER_COUNTS    = (902, 766, 150, 151)     # images per order in the paper, aligned with ORDERS
CLASS_NAME      = 'Copepoda'
MANIFEST_NAME   = 'demo_collection.json'
FORMAT_VERSION  = 'taxogan-demo/1'        # bump when the drawing changes: old collections are then redrawn
_UNPLACED_TAG   = len(ORDERS)              # RNG key of the images identified only to the class
_SUPERSAMPLE    = 2                        # drawing resolution / output resolution, for antialiasing
_MIN_SIDE_LIMIT = 32                       # smaller images leave no room for an animal

#----------------------------------------------------------------------------
# Counts and file names.

def demo_counts(
    scale:          float = 1.0,    # multiplier of the paper's counts
    min_per_order:  int = 8,        # lower bound of every order's count
) -> dict:
    """Images per order: the paper's counts times `scale`, rounded half up, at least `min_per_order`."""
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f'scale must be a positive number, got {scale!r}')
    if min_per_order < 0:
        raise ValueError(f'min_per_order must be >= 0, got {min_per_order!r}')
    # Half up rather than Python's round(), which rounds halves to even: 7.5 -> 8 and 8.5 -> 9 alike.
    return {order: max(int(math.floor(n * scale + 0.5)), min_per_order) for order, n in zip(ORDERS, PAPER_COUNTS)}

def _file_name(tag: int, index: int) -> str:
    prefix = CLASS_NAME.lower() if tag == _UNPLACED_TAG else ORDERS[tag].lower()
    return f'{prefix}_{index:05d}.png'

def _rel_path(tag: int, index: int) -> str:
    if tag == _UNPLACED_TAG:
        return f'{CLASS_NAME}/{_file_name(tag, index)}'
    return f'{CLASS_NAME}/{ORDERS[tag]}/{_file_name(tag, index)}'

def _side_bounds(min_side: int, max_side: int, size_scale: float) -> tuple[int, int]:
    if not (size_scale > 0 and math.isfinite(size_scale)):
        raise ValueError(f'size_scale must be a positive number, got {size_scale!r}')
    if min_side > max_side:
        raise ValueError(f'min_side ({min_side}) must not exceed max_side ({max_side})')
    lo = int(math.floor(min_side * size_scale + 0.5))
    hi = int(math.floor(max_side * size_scale + 0.5))
    if lo < _MIN_SIDE_LIMIT:
        raise ValueError(f'image sides must be at least {_MIN_SIDE_LIMIT} px, got min_side * size_scale = {lo}')
    return lo, hi

def _image_rng(seed: int, tag: int, index: int) -> np.random.Generator:
    # One stream per image, independent of which worker draws it and in what order.
    return np.random.default_rng(np.random.SeedSequence([seed, tag, index]))

#----------------------------------------------------------------------------
# Geometry in body units: x runs along the body axis from the anterior tip (0) to the end of the
# urosome (1), y is lateral; the animal is seen dorsally. Shapes are collected as polygons and
# polylines, then bent, rotated, scaled and drawn in one go.

class _Sketch:
    """Shapes of one animal in body units, drawn in the order they were added."""

    def __init__(self):
        # (kind, points [N, 2], rgba, width in body units, loose); kind 'poly' or 'line'; loose shapes
        # (distal antennule parts) may leave the frame, as they often do in real photos.
        self.shapes = []

    def poly(self, pts, rgba, outline=None, width=0.0):
        self.shapes.append(('poly', np.asarray(pts, dtype=np.float64), _rgba(rgba), None, False))
        if outline is not None and width > 0:
            closed = np.concatenate([pts, pts[:1]])
            self.shapes.append(('line', np.asarray(closed, dtype=np.float64), _rgba(outline), width, False))

    def line(self, pts, rgba, width, loose=False):
        self.shapes.append(('line', np.asarray(pts, dtype=np.float64), _rgba(rgba), width, loose))

    def mirrored(self, fn, *args, **kwargs):
        # Bilateral symmetry: draw the right side, then the same shapes with y negated.
        start = len(self.shapes)
        fn(self, *args, **kwargs)
        for kind, pts, rgba, width, loose in self.shapes[start:]:
            self.shapes.append((kind, pts * np.array([1.0, -1.0]), rgba, width, loose))

def _rgba(c) -> tuple:
    c = tuple(int(round(float(v))) for v in c)
    c = c if len(c) == 4 else c + (255,)
    return tuple(min(max(v, 0), 255) for v in c)

def _shade(rgb, factor: float, alpha: float) -> tuple:
    """A colour darker (factor < 1) or lighter (factor > 1) than `rgb`, with opacity `alpha` in [0, 1]."""
    rgb = np.asarray(rgb, dtype=np.float64)
    out = rgb * factor if factor <= 1 else 255 - (255 - rgb) / factor
    return tuple(out) + (alpha * 255,)

def _profile(x0, x1, half_width, n=40, notches=(), notch_depth=0.0, notch_width=0.01):
    """Polygon of a bilaterally symmetric body region from its half-width profile along x.

    `half_width(t)` takes t in [0, 1] (x0 -> x1); segment boundaries at `notches` (body units) pinch
    the outline so the segmentation shows in the silhouette.
    """
    t = np.linspace(0.0, 1.0, n)
    x = x0 + (x1 - x0) * t
    w = half_width(t)
    for xb in notches:
        w = w * (1.0 - notch_depth * np.exp(-(((x - xb) / notch_width) ** 2)))
    upper = np.stack([x, w], axis=1)            # [n, 2]
    lower = np.stack([x[::-1], -w[::-1]], axis=1)
    return np.concatenate([upper, lower])       # [2n, 2]

def _spindle(a: float, b: float):
    """Half-width profile sin(pi t^a)^b: maximum at t = 0.5^(1/a), ends blunter as b falls."""
    return lambda t: np.sin(np.pi * np.clip(t, 0, 1) ** a) ** b

def _ellipse(cx, cy, rx, ry, angle=0.0, n=28):
    phi = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x, y = rx * np.cos(phi), ry * np.sin(phi)
    c, s = math.cos(angle), math.sin(angle)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], axis=1)   # [n, 2]

def _curve(base, angle, length, curvature, n=14):
    """Points of a curve from `base` in direction `angle` (radians, 0 = +x), turning by `curvature` rad per unit."""
    ds = length / (n - 1)
    pts = [np.asarray(base, dtype=np.float64)]
    theta = angle
    for _ in range(n - 1):
        pts.append(pts[-1] + ds * np.array([math.cos(theta), math.sin(theta)]))
        theta += curvature * ds
    return np.stack(pts)    # [n, 2]

def _width_at(poly, x):
    """Half-width of a `_profile` polygon at body position x (upper side)."""
    n = len(poly) // 2
    return float(np.interp(x, poly[:n, 0], poly[:n, 1]))

def _segment_lines(sk, poly, xs, rgba, width, bow):
    """Transverse segment boundaries, bowed backwards in the middle as seen dorsally."""
    for xb in xs:
        w = _width_at(poly, xb) * 0.92
        y = np.linspace(-w, w, 9)
        sk.line(np.stack([xb + bow * (1 - (y / max(w, 1e-6)) ** 2), y], axis=1), rgba, width)

def _tapered(sk, pts, rgba, w0, w1, loose_from=1.0):
    """A polyline whose width falls from w0 to w1 (antennules, setae); parts past `loose_from` may be cropped."""
    n = len(pts) - 1
    for i in range(n):
        w = w0 + (w1 - w0) * i / max(n - 1, 1)
        sk.line(pts[i:i + 2], rgba, w, loose=i >= loose_from * n)

def _antennule(sk, rng, base, angle, length, curvature, w0, rgba, setae, loose_from=1.0):
    pts = _curve(base, angle, length, curvature, n=16)
    _tapered(sk, pts, rgba, w0, w0 * 0.35, loose_from)
    # Short setae along the distal part stick out sideways, alternating in side.
    for i in range(5, len(pts) - 1, 2 if setae else 100):
        d = pts[i + 1] - pts[i]
        nrm = np.array([-d[1], d[0]]) / (np.linalg.norm(d) + 1e-12)
        side = 1 if i % 4 == 1 else -1
        tip = pts[i] + nrm * side * length * rng.uniform(0.03, 0.07) + d * 0.6
        sk.line(np.stack([pts[i], tip]), rgba, w0 * 0.25, loose=i >= loose_from * (len(pts) - 1))
    return pts

def _caudal_setae(sk, rng, base_x, half_gap, count, length, spread, rgba, width):
    """Furca (two rami) at the end of the urosome and the fan of setae each carries."""
    for side in (1, -1):
        ramus = np.array([[base_x - 0.005, side * half_gap], [base_x + 0.045, side * (half_gap + 0.008)]])
        sk.line(ramus, rgba, width * 2.2)
        tip = ramus[1]
        for j in range(count):
            a = side * (spread * (j / max(count - 1, 1) - 0.35)) + rng.normal(0, 0.04)
            ln = length * (1.0 if j in (1, 2) else rng.uniform(0.35, 0.7)) * rng.uniform(0.85, 1.1)
            pts = _curve(tip, a, ln, rng.normal(0, 0.4), n=5)
            _tapered(sk, pts, rgba, width, width * 0.5)

def _legs(sk, xs, body, rgba, width, reach, sweep):
    """Swimming legs: thin rami from under the body, tips sticking out beyond the outline."""
    def right(sk):
        for xl in xs:
            w = _width_at(body, xl)
            base = np.array([xl, 0.35 * w])
            tip = np.array([xl + sweep, w + reach])
            mid = (base + tip) / 2 + np.array([-0.01, 0.0])
            sk.line(np.stack([base, mid, tip]), rgba, width)
            sk.line(np.stack([mid, tip + np.array([0.02, -0.01])]), rgba, width * 0.7)
    sk.mirrored(right)

#----------------------------------------------------------------------------
# Body plans. Each returns a sketch and the body-axis position where the urosome starts (where a
# bend of the urosome pivots).

def _palette(rng, choices, jitter=12.0):
    base = np.asarray(choices[rng.integers(len(choices))], dtype=np.float64)
    base = base + rng.normal(0, jitter, 3)
    # Partly washed out towards grey: preserved specimens are rarely vivid.
    base = base + rng.uniform(0.0, 0.4) * (base.mean() - base)
    return tuple(np.clip(base, 0, 255))

def _calanoida(rng):
    sk = _Sketch()
    body_rgb = _palette(rng, [(140, 155, 165), (185, 135, 95), (165, 150, 120), (175, 120, 110)])
    alpha = rng.uniform(0.45, 0.7)
    fill, edge, dark = _shade(body_rgb, 1.0, alpha), _shade(body_rgb, 0.5, 0.85), _shade(body_rgb, 0.45, 0.6)
    lw = rng.uniform(0.006, 0.009)   # outline width

    pro_len = rng.uniform(0.64, 0.72)
    pro_hw = rng.uniform(0.12, 0.16)
    n_seg = int(rng.integers(4, 7))   # cephalosome + 3..5 free pedigerous segments
    ceph = pro_len * rng.uniform(0.36, 0.44)
    seg_x = list(ceph + (pro_len - ceph) * np.arange(1, n_seg) / n_seg)
    prosome = _profile(0.0, pro_len, lambda t: pro_hw * _spindle(0.78, 0.45)(t), notches=seg_x, notch_depth=0.06)

    n_uro = int(rng.integers(3, 5))
    uro_hw = rng.uniform(0.03, 0.042)
    uro_x = list(pro_len + (1 - pro_len) * np.arange(1, n_uro) / n_uro)
    genital = rng.uniform(1.1, 1.35)   # the genital double-somite is the widest urosome segment
    urosome = _profile(pro_len - 0.02, 1.0, lambda t: uro_hw * (1 + (genital - 1) * np.exp(-((t - 0.15) / 0.15) ** 2))
                       * _spindle(1.0, 0.12)(t), notches=uro_x, notch_depth=0.15, notch_width=0.008)

    # Antennules first so the body covers their bases.
    a_len = rng.uniform(1.0, 1.45)
    a_ang = np.pi / 2 + rng.uniform(0.0, 0.6)    # lateral, a little forward
    a_curv = -rng.uniform(0.15, 0.6)              # sweeping backwards
    base = np.array([0.05, _width_at(prosome, 0.05) * 0.7])
    setae = bool(rng.random() < 0.7)
    skew = rng.normal(0, 0.12)   # the two antennules are rarely held quite alike
    loose = rng.uniform(0.45, 1.0)
    _antennule(sk, rng, base, a_ang + skew, a_len, a_curv, 0.012, edge, setae, loose)
    _antennule(sk, rng, base * [1, -1], -(a_ang - skew), a_len * rng.uniform(0.93, 1.0), -a_curv, 0.012, edge, setae, loose)

    n_legs = int(rng.integers(3, 6))
    _legs(sk, list(np.linspace(ceph + 0.02, pro_len - 0.06, n_legs)), prosome, _shade(body_rgb, 0.55, 0.55),
          0.006, rng.uniform(0.0, 0.05), rng.uniform(0.03, 0.08))
    _caudal_setae(sk, rng, 1.0, uro_hw * 0.6, int(rng.integers(3, 6)), rng.uniform(0.15, 0.32), 0.9, edge, 0.006)

    sk.poly(urosome, fill, edge, lw)
    sk.poly(prosome, fill, edge, lw)
    _segment_lines(sk, prosome, [ceph] + seg_x, dark, lw * 0.8, 0.015)
    _segment_lines(sk, urosome, uro_x, dark, lw * 0.7, 0.004)
    # Gut along the axis, an oil sac on some, the naupliar eye.
    sk.poly(_ellipse(pro_len * 0.55, 0, pro_len * 0.38, pro_hw * 0.18), _shade(body_rgb, 0.55, 0.45))
    if rng.random() < 0.55:
        sk.poly(_ellipse(pro_len * rng.uniform(0.35, 0.55), rng.normal(0, 0.01), pro_hw * rng.uniform(0.3, 0.6),
                         pro_hw * rng.uniform(0.25, 0.45)), (215, 120, 40, 150))
    sk.poly(_ellipse(0.03, 0, 0.012, 0.01), (120, 20, 20, 220))
    return sk, pro_len

def _cyclopoida(rng):
    sk = _Sketch()
    body_rgb = _palette(rng, [(125, 130, 110), (140, 120, 95), (110, 115, 125), (130, 128, 122)])
    alpha = rng.uniform(0.55, 0.8)
    fill, edge, dark = _shade(body_rgb, 1.0, alpha), _shade(body_rgb, 0.5, 0.85), _shade(body_rgb, 0.45, 0.6)
    lw = rng.uniform(0.006, 0.009)

    pro_len = rng.uniform(0.54, 0.62)
    pro_hw = rng.uniform(0.16, 0.2)
    n_seg = int(rng.integers(4, 6))
    ceph = pro_len * rng.uniform(0.42, 0.5)
    seg_x = list(ceph + (pro_len - ceph) * np.arange(1, n_seg) / n_seg)
    # Teardrop: widest in the anterior third, tapering to the urosome.
    prosome = _profile(0.0, pro_len, lambda t: pro_hw * _spindle(0.58, 0.55)(t) * (1 - 0.25 * t),
                       notches=seg_x, notch_depth=0.09, notch_width=0.012)

    n_uro = int(rng.integers(4, 6))
    uro_hw = rng.uniform(0.045, 0.06)
    uro_x = list(pro_len + (1 - pro_len) * np.arange(1, n_uro) / n_uro)
    urosome = _profile(pro_len - 0.03, 1.0, lambda t: uro_hw * (1.35 - 0.55 * t) * _spindle(1.0, 0.1)(t),
                       notches=uro_x, notch_depth=0.14, notch_width=0.009)

    a_len = rng.uniform(0.35, 0.55)
    a_ang = np.pi - rng.uniform(0.45, 1.0)      # forward and out, the two making a V
    a_curv = -rng.uniform(0.5, 1.6)
    base = np.array([0.04, _width_at(prosome, 0.04) * 0.6])
    skew = rng.normal(0, 0.1)
    _antennule(sk, rng, base, a_ang + skew, a_len, a_curv, 0.016, edge, True)
    _antennule(sk, rng, base * [1, -1], -(a_ang - skew), a_len, -a_curv, 0.016, edge, True)

    # Egg sacs: paired ovals beside the urosome, packed with eggs.
    if rng.random() < 0.45:
        sac_x, sac_y = rng.uniform(0.72, 0.8), uro_hw + rng.uniform(0.07, 0.1)
        rx, ry = rng.uniform(0.11, 0.15), rng.uniform(0.06, 0.08)
        tilt = rng.uniform(0.1, 0.4)
        egg_rgb = _palette(rng, [(90, 80, 60), (70, 85, 70), (110, 90, 70)])
        def sac(sk):
            sk.poly(_ellipse(sac_x, sac_y, rx, ry, tilt), _shade(egg_rgb, 1.0, 0.75), _shade(egg_rgb, 0.5, 0.9), lw)
            for i in range(-2, 3):
                for j in (-1, 0, 1):
                    ex, ey = i * rx * 0.36 + (j % 2) * rx * 0.18, j * ry * 0.55
                    if (ex / rx) ** 2 + (ey / ry) ** 2 < 0.7:
                        c, s = math.cos(tilt), math.sin(tilt)
                        sk.poly(_ellipse(sac_x + c * ex - s * ey, sac_y + s * ex + c * ey, rx * 0.17, rx * 0.17, n=10),
                                _shade(egg_rgb, 0.6, 0.7))
        sk.mirrored(sac)

    _legs(sk, list(np.linspace(ceph + 0.03, pro_len - 0.05, int(rng.integers(3, 5)))), prosome,
          _shade(body_rgb, 0.55, 0.55), 0.007, rng.uniform(0.0, 0.04), rng.uniform(0.04, 0.08))
    _caudal_setae(sk, rng, 1.0, uro_hw * 0.55, int(rng.integers(2, 5)), rng.uniform(0.18, 0.32), 0.5, edge, 0.007)

    sk.poly(urosome, fill, edge, lw)
    sk.poly(prosome, fill, edge, lw)
    _segment_lines(sk, prosome, [ceph] + seg_x, dark, lw * 0.8, 0.02)
    _segment_lines(sk, urosome, uro_x, dark, lw * 0.7, 0.005)
    sk.poly(_ellipse(pro_len * 0.55, 0, pro_len * 0.33, pro_hw * 0.22), _shade(body_rgb, 0.5, 0.5))
    sk.poly(_ellipse(0.035, 0, 0.014, 0.012), (120, 20, 20, 220))
    return sk, pro_len

def _harpacticoida(rng):
    sk = _Sketch()
    body_rgb = _palette(rng, [(190, 120, 65), (170, 100, 70), (160, 130, 85), (180, 145, 100)])
    alpha = rng.uniform(0.7, 0.92)
    fill, edge, dark = _shade(body_rgb, 1.0, alpha), _shade(body_rgb, 0.5, 0.9), _shade(body_rgb, 0.5, 0.65)
    lw = rng.uniform(0.006, 0.009)

    hw = rng.uniform(0.07, 0.095)
    taper = rng.uniform(0.2, 0.45)
    n_seg = int(rng.integers(8, 11))
    seg_x = list(np.linspace(0.0, 1.0, n_seg + 1)[1:-1] * rng.uniform(0.97, 1.0) + 0.02)
    body = _profile(0.0, 1.0, lambda t: hw * (1 - taper * t ** 1.5) * _spindle(1.0, 0.16)(t),
                    n=60, notches=seg_x, notch_depth=0.12, notch_width=0.01)

    a_len = rng.uniform(0.08, 0.14)
    a_ang = np.pi - rng.uniform(0.5, 1.1)
    base = np.array([0.025, hw * 0.5])
    _antennule(sk, rng, base, a_ang, a_len, -rng.uniform(0.5, 2.0), 0.02, edge, False)
    _antennule(sk, rng, base * [1, -1], -a_ang, a_len, rng.uniform(0.5, 2.0), 0.02, edge, False)

    # Short legs: a small spine per thoracic segment.
    def spines(sk):
        for xb in seg_x[:max(n_seg // 2, 2)]:
            w = _width_at(body, xb - 0.03)
            sk.line(np.array([[xb - 0.04, w * 0.9], [xb - 0.015, w + 0.02]]), _shade(body_rgb, 0.5, 0.7), 0.006)
    if rng.random() < 0.8:
        sk.mirrored(spines)
    _caudal_setae(sk, rng, 1.0, hw * (1 - taper) * 0.6, 2, rng.uniform(0.12, 0.25), 0.4, edge, 0.007)

    sk.poly(body, fill, edge, lw)
    _segment_lines(sk, body, seg_x, dark, lw * 0.8, 0.008)
    rostrum = np.array([[0.005, 0.02], [-0.025, 0.0], [0.005, -0.02]])
    sk.poly(rostrum, edge)
    sk.poly(_ellipse(0.5, 0, 0.35, hw * 0.25), _shade(body_rgb, 0.55, 0.45))
    sk.poly(_ellipse(0.03, 0, 0.012, 0.01), (120, 20, 20, 220))
    return sk, 0.5

def _siphonostomatoida(rng):
    sk = _Sketch()
    body_rgb = _palette(rng, [(165, 145, 105), (145, 125, 95), (125, 115, 105), (170, 150, 120)])
    alpha = rng.uniform(0.65, 0.88)
    fill, edge, dark = _shade(body_rgb, 1.0, alpha), _shade(body_rgb, 0.45, 0.9), _shade(body_rgb, 0.5, 0.6)
    lw = rng.uniform(0.007, 0.01)

    sh_len = rng.uniform(0.54, 0.62)
    sh_hw = rng.uniform(0.31, 0.36)
    # Shield: a broad ellipse whose posterior margin has a median sinus between two lateral lobes.
    phi = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    sx = sh_len / 2 + sh_len / 2 * np.cos(phi)
    sy = sh_hw * np.sin(phi)
    sinus = rng.uniform(0.05, 0.1)
    sx = sx - sinus * np.exp(-((np.angle(np.exp(1j * phi)) / 0.32) ** 2))
    sx = np.maximum(sx, rng.uniform(0.015, 0.05))   # the frontal plates make a straight front margin
    shield = np.stack([sx, sy], axis=1)    # [72, 2]
    rim = shield + (shield - [sh_len / 2, 0]) * rng.uniform(0.03, 0.06)   # hyaline marginal membrane

    free_x0, free_x1 = sh_len - sinus - 0.02, sh_len + 0.04
    gen_len = rng.uniform(0.18, 0.24)
    gen_hw = rng.uniform(0.11, 0.16)
    gen_x0 = free_x1 - 0.01
    free = _profile(free_x0, free_x1 + 0.01, lambda t: 0.06 * np.ones_like(t) * _spindle(1.0, 0.2)(t))
    genital = _profile(gen_x0, gen_x0 + gen_len, lambda t: gen_hw * _spindle(1.0, 0.3)(t) * (1 - 0.1 * t))
    abd = _profile(gen_x0 + gen_len - 0.02, 1.0, lambda t: 0.045 * (1 - 0.2 * t) * _spindle(1.0, 0.15)(t),
                   notches=[gen_x0 + gen_len + (1 - gen_x0 - gen_len) / 2], notch_depth=0.2, notch_width=0.01)

    # Egg strings: two long straight strips of stacked disc-shaped eggs.
    if rng.random() < 0.55:
        s_len = rng.uniform(0.55, 0.95)
        s_ang = rng.uniform(0.03, 0.18)
        s_hw = rng.uniform(0.024, 0.034)
        egg_pitch = rng.uniform(0.022, 0.035)
        egg_rgb = _palette(rng, [(150, 125, 90), (165, 135, 100), (130, 115, 100)])
        x0, y0 = gen_x0 + gen_len * 0.8, gen_hw * 0.55
        def strings(sk):
            d = np.array([math.cos(s_ang), math.sin(s_ang)])
            n = np.array([-d[1], d[0]])
            p0, p1 = np.array([x0, y0]), np.array([x0, y0]) + s_len * d
            sk.poly(np.stack([p0 + n * s_hw, p1 + n * s_hw, p1 - n * s_hw, p0 - n * s_hw]),
                    _shade(egg_rgb, 1.0, 0.7), _shade(egg_rgb, 0.6, 0.8), lw * 0.7)
            for u in np.arange(0.03, s_len, egg_pitch):
                c = p0 + u * d
                sk.line(np.stack([c + n * s_hw * 0.85, c - n * s_hw * 0.85]), _shade(egg_rgb, 0.75, 0.6), lw * 0.5)
        sk.mirrored(strings)

    a_len = rng.uniform(0.07, 0.11)
    a_ang = np.pi / 2 + rng.uniform(0.1, 0.5)     # flat along the front margin
    base = np.array([0.04, sh_hw * 0.3])
    _antennule(sk, rng, base, a_ang, a_len, -1.0, 0.028, edge, False)
    _antennule(sk, rng, base * [1, -1], -a_ang, a_len, 1.0, 0.028, edge, False)
    # Legs peeping out under the shield's lateral margin.
    shield_profile = _profile(0, sh_len, lambda t: sh_hw * _spindle(1, 0.5)(t))
    _legs(sk, list(np.linspace(0.22, 0.4, int(rng.integers(2, 4)))), shield_profile,
          _shade(body_rgb, 0.5, 0.6), 0.008, rng.uniform(-0.02, 0.02), 0.05)
    _caudal_setae(sk, rng, 1.0, 0.03, 3, rng.uniform(0.05, 0.09), 0.6, edge, 0.007)

    sk.poly(abd, fill, edge, lw)
    sk.poly(genital, fill, edge, lw)
    sk.poly(free, fill, edge, lw)
    sk.poly(rim, _shade(body_rgb, 1.4, alpha * 0.45))
    sk.poly(shield, fill, edge, lw)
    # Dorsal grooves of the shield (an H-like pattern) and the frontal plates' lunules.
    g = rng.uniform(0.45, 0.6)
    for side in (1, -1):
        sk.line(np.array([[sh_len * 0.2, side * sh_hw * g], [sh_len * 0.45, side * sh_hw * (g + 0.05)],
                          [sh_len * 0.8, side * sh_hw * (g - 0.05)]]), dark, lw)
        sk.poly(_ellipse(0.035, side * sh_hw * 0.5, 0.022, 0.022, n=14), _shade(body_rgb, 0.6, 0.5), edge, lw * 0.6)
    sk.line(np.array([[sh_len * 0.45, -sh_hw * g], [sh_len * 0.45, sh_hw * g]]), dark, lw * 0.8)
    # Pigment spots: chromatophores scattered over the shield and genital complex.
    for _ in range(int(rng.integers(4, 14))):
        r, a = math.sqrt(rng.random()) * 0.8, rng.uniform(0, 2 * np.pi)
        sk.poly(_ellipse(sh_len / 2 + r * sh_len / 2 * math.cos(a), r * sh_hw * math.sin(a), 0.012, 0.012, n=8),
                _shade(body_rgb, 0.35, 0.7))
    sk.poly(_ellipse(gen_x0 + gen_len * 0.5, 0, gen_len * 0.3, gen_hw * 0.35), _shade(body_rgb, 0.55, 0.4))
    return sk, gen_x0

_BODY_PLANS = (_calanoida, _cyclopoida, _harpacticoida, _siphonostomatoida)   # aligned with ORDERS

#----------------------------------------------------------------------------
# Rendering.

def _background(rng, width, height) -> Image.Image:
    """Bright-field microscope background: tinted light, a gradient, vignetting, faint blotches."""
    # Near-neutral light: halogen lamps are warm, LED and daylight-filtered ones cool, a few greenish.
    casts = np.array([[0, 0, 0], [8, 4, -12], [-8, -2, 8], [-4, 5, -6]], dtype=np.float64)
    tint = rng.uniform(200, 245) + rng.uniform(0, 1.5) * casts[rng.integers(len(casts))] + rng.normal(0, 3, 3)
    # Everything here is smooth, so it is computed on a coarse grid and enlarged: much cheaper.
    gw, gh = max(width // 8, 4), max(height // 8, 4)
    v, u = np.mgrid[0:gh, 0:gw].astype(np.float64)
    u, v = u / (gw - 1) - 0.5, v / (gh - 1) - 0.5
    g_ang = rng.uniform(0, 2 * np.pi)
    light = 1.0 + rng.uniform(0, 0.12) * (u * math.cos(g_ang) + v * math.sin(g_ang))
    cx, cy = rng.normal(0, 0.1, 2)
    light -= rng.uniform(0.0, 0.35) * ((u - cx) ** 2 + (v - cy) ** 2)
    # Low-frequency blotches: a 4x4 noise grid enlarged smoothly.
    coarse = Image.fromarray(((rng.random((4, 4)) - 0.5) * 127 + 128).astype(np.uint8))
    blot = np.asarray(coarse.resize((gw, gh), Image.BICUBIC), dtype=np.float64) / 127.0 - 1.0
    light += rng.uniform(0, 0.04) * blot
    rgb = np.clip(tint[None, None, :] * light[..., None], 0, 255)   # [gh, gw, 3]
    return Image.fromarray(np.round(rgb).astype(np.uint8))

def _bend(pts, pivot, k_uro, k_body):
    """Flex the urosome (behind `pivot`) and the whole axis a little: a lateral shear growing with x."""
    x, y = pts[:, 0], pts[:, 1]
    y = y + k_body * (x - 0.5) ** 2 + k_uro * np.maximum(x - pivot, 0) ** 2
    return np.stack([x, y], axis=1)

def _draw_dust(draw, rng, w, h, ss):
    for _ in range(int(rng.poisson(4))):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(0.6, 2.5) * ss
        shade = int(rng.uniform(60, 180))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=(shade, shade, shade, int(rng.uniform(60, 200))))
    for _ in range(int(rng.poisson(0.7))):
        # A fibre or a piece of debris.
        pts = _curve((rng.uniform(0, w), rng.uniform(0, h)), rng.uniform(0, 2 * np.pi), rng.uniform(0.05, 0.3) * min(w, h),
                     rng.normal(0, 8) / min(w, h), n=6)
        shade = int(rng.uniform(80, 170))
        draw.line([tuple(p) for p in pts], fill=(shade, shade, shade, 120), width=max(int(rng.uniform(1, 3) * ss), 1))

def _render(rng, tag, lo, hi) -> Image.Image:
    """Draw one image from its own RNG; `tag` is the order index or the unplaced tag."""
    width, height = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
    if tag == _UNPLACED_TAG:
        # An animal of some order, not identified further, drawn in the paper's proportions.
        tag = int(rng.choice(len(ORDERS), p=np.array(PAPER_COUNTS) / sum(PAPER_COUNTS)))
    ss = _SUPERSAMPLE
    W, H = width * ss, height * ss

    # Smooth enlargement to the output size, then a cheap nearest-neighbour one to the drawing size.
    canvas = _background(rng, width, height).resize((width, height), Image.BILINEAR).resize((W, H), Image.NEAREST)
    draw = ImageDraw.Draw(canvas, 'RGBA')
    _draw_dust(draw, rng, W, H, ss)

    sk, pivot = _BODY_PLANS[tag](rng)
    k_uro = rng.normal(0, 0.35)
    k_body = rng.normal(0, 0.5 if tag == 2 else 0.12)   # harpacticoids are the bendy ones
    angle = rng.uniform(0, 2 * np.pi)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    shapes = [(kind, _bend(pts, pivot, k_uro, k_body) @ rot.T, rgba, lw, loose) for kind, pts, rgba, lw, loose in sk.shapes]

    # Fit the animal, appendages but not loose parts included, into the frame with a random size and position.
    allpts = np.concatenate([pts for _, pts, _, _, loose in shapes if not loose])
    lo_xy, hi_xy = allpts.min(axis=0), allpts.max(axis=0)
    # The animal fits the central square, as a specimen centred under the microscope, so that squaring
    # the image by a centre crop keeps it whole.
    margin = 0.04
    avail = np.full(2, min(W, H) * (1 - 2 * margin))
    scale = float(np.min(avail / np.maximum(hi_xy - lo_xy, 1e-6))) * rng.uniform(0.6, 0.95)
    slack = (avail - scale * (hi_xy - lo_xy)) / 2
    offset = np.array([W, H]) / 2 + rng.uniform(-1, 1, 2) * slack - scale * (lo_xy + hi_xy) / 2

    for kind, pts, rgba, lw, _ in shapes:
        xy = [tuple(p) for p in (pts * scale + offset)]
        if kind == 'poly':
            draw.polygon(xy, fill=rgba)
        else:
            draw.line(xy, fill=rgba, width=max(int(round(lw * scale)), 1), joint='curve' if len(xy) > 2 else None)

    img = canvas.reduce(ss)   # box filter: the antialiasing step
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 1.4)))   # focus varies between photos
    arr = np.asarray(img, dtype=np.float32)
    # Sensor noise, kept faint: it dominates the PNG size.
    arr = arr + rng.standard_normal(arr.shape, dtype=np.float32) * np.float32(rng.uniform(0.3, 1.5))
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))

def render_demo_image(
    order:      str,            # an order of ORDERS, or CLASS_NAME for an image identified only to the class
    index:      int,            # image index within the order
    seed:       int = 0,        # collection seed
    min_side:   int = 270,      # smallest width or height, px
    max_side:   int = 400,      # largest width or height, px
) -> Image.Image:
    """One demo image, exactly as `write_demo_collection` writes it with these options (size_scale 1)."""
    tags = {name: i for i, name in enumerate(ORDERS)} | {CLASS_NAME: _UNPLACED_TAG}
    if order not in tags:
        raise ValueError(f'unknown order {order!r}; expected one of {", ".join(tags)}')
    lo, hi = _side_bounds(min_side, max_side, 1.0)
    return _render(_image_rng(seed, tags[order], index), tags[order], lo, hi)

#----------------------------------------------------------------------------
# Writing the collection.

def _encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    # Level 1: five times faster than the default 6 on these noisy images, files only ~15% larger.
    img.save(buf, format='PNG', compress_level=1)
    return buf.getvalue()

def _job(args) -> str:
    out_dir, seed, tag, index, lo, hi = args
    rel = _rel_path(tag, index)
    # Under a hidden temporary name (no .png suffix) until complete: the dataset tool never reads half an image.
    with atomic_write(Path(out_dir) / rel, 'wb') as f:
        f.write(_encode_png(_render(_image_rng(seed, tag, index), tag, lo, hi)))
    return rel

def _readme_text(options: dict, counts: dict) -> str:
    lines = [
        'taxogan demo collection',
        '=======================',
        '',
        'Synthetic, procedurally drawn copepod-like images, NOT photographs of real animals. They stand',
        'in for the BOLD images of Martinel et al. (2024) so that the whole taxogan pipeline can be tried',
        'without downloading data. FID/KID numbers obtained on them are not comparable with the paper.',
        '',
        'Body plans: Calanoida = long antennules and a slender urosome; Cyclopoida = teardrop body, medium',
        'antennules, egg sacs on some; Harpacticoida = worm-like cylinder, short antennules;',
        'Siphonostomatoida = broad flattened shield (Caligus-like), egg strings on some.',
        '',
        'Images per order (paper 902:766:150:151 times scale):',
    ]
    lines += [f'  {order:<18} {n:5d}   {CLASS_NAME}/{order}/' for order, n in counts.items()]
    lines += [f'  {"(class only)":<18} {options["unplaced"]:5d}   {CLASS_NAME}/{CLASS_NAME.lower()}_*.png', '']
    lines += ['Options: ' + ', '.join(f'{k}={v}' for k, v in options.items() if k != 'format'), '']
    lines += ['Rebuild: python -m taxogan_ext.demo_data --out DIR ' + ' '.join(
        f'--{k.replace("_", "-")} {v}' for k, v in options.items() if k != 'format'), '']
    return '\n'.join(lines)

def _is_complete(out_dir: Path, options: dict, jobs) -> bool:
    try:
        with open(out_dir / MANIFEST_NAME, encoding='utf-8') as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        return False
    if not isinstance(recorded, dict) or recorded.get('options') != options:
        return False
    return all((out_dir / _rel_path(tag, index)).is_file() for _, _, tag, index, _, _ in jobs)

def _remove_stale(out_dir: Path, expected: set):
    """Delete our own files left by an earlier run with other options (only names this module writes)."""
    names = '|'.join(name.lower() for name in ORDERS + (CLASS_NAME,))
    ours = re.compile(r'^(%s)_\d{5,}\.png$' % names)
    ours_tmp = re.compile(r'^%s(%s)_\d{5,}\.png\.' % (re.escape(TEMP_PREFIX), names))  # atomic_write's, of a killed run
    for folder in [out_dir / CLASS_NAME] + [out_dir / CLASS_NAME / order for order in ORDERS]:
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            rel = entry.relative_to(out_dir).as_posix()
            if entry.is_file() and ((ours.match(entry.name) and rel not in expected) or ours_tmp.match(entry.name)):
                entry.unlink()

def write_demo_collection(
    out_dir,                        # folder to write; created if missing
    scale:          float = 1.0,    # multiplier of the paper's counts (902:766:150:151)
    seed:           int = 0,        # collection seed; image i of an order depends only on (seed, order, i)
    unplaced:       int = 0,        # images identified only to the class, in Copepoda/ itself
    min_per_order:  int = 8,        # lower bound of every order's count
    min_side:       int = 270,      # smallest width or height before size_scale, px
    max_side:       int = 400,      # largest width or height before size_scale, px
    size_scale:     float = 1.0,    # multiplier of min_side and max_side
    workers:        int = 0,        # processes; 0 = one per CPU core, 1 = in this process
    force:          bool = False,   # redraw even when a complete collection with these options is there
    progress:       bool = True,    # show a progress bar
) -> dict:
    """Write the demo collection to `out_dir` (skipped when already complete) and return the images per order."""
    counts = demo_counts(scale, min_per_order)
    lo, hi = _side_bounds(min_side, max_side, size_scale)
    if seed < 0:
        raise ValueError(f'seed must be >= 0, got {seed!r}')
    if unplaced < 0:
        raise ValueError(f'unplaced must be >= 0, got {unplaced!r}')
    if workers < 0:
        raise ValueError(f'workers must be >= 0, got {workers!r}')
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f'{out_dir}: exists and is not a folder')

    options = dict(format=FORMAT_VERSION, scale=scale, seed=seed, unplaced=unplaced, min_per_order=min_per_order,
                   min_side=min_side, max_side=max_side, size_scale=size_scale)
    jobs = [(str(out_dir), seed, tag, i, lo, hi) for tag, order in enumerate(ORDERS) for i in range(counts[order])]
    jobs += [(str(out_dir), seed, _UNPLACED_TAG, i, lo, hi) for i in range(unplaced)]
    if not force and _is_complete(out_dir, options, jobs):
        return counts

    # The record goes first so an interrupted run is never mistaken for a complete one.
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    for order in ORDERS:
        (out_dir / CLASS_NAME / order).mkdir(parents=True, exist_ok=True)
    _remove_stale(out_dir, {_rel_path(tag, index) for _, _, tag, index, _, _ in jobs})

    workers = workers or os.cpu_count() or 1
    bar = tqdm.tqdm(total=len(jobs), desc='demo images', unit='img', disable=not progress)
    with bar:
        if workers == 1 or len(jobs) < 2:
            for job in jobs:
                _job(job)
                bar.update(1)
        else:
            with concurrent.futures.ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
                for _ in pool.map(_job, jobs, chunksize=8):
                    bar.update(1)

    write_text_atomic(out_dir / 'README.txt', _readme_text(options, counts))
    write_json_atomic(out_dir / MANIFEST_NAME, dict(options=options, counts=counts, unplaced=unplaced, num_images=len(jobs)))
    return counts

#----------------------------------------------------------------------------
# Command line.

@click.command()

# Main options.
@click.option('--out',           help='Folder to write the collection to', metavar='DIR', type=str, required=True)
@click.option('--scale',         help='Multiplier of the paper\'s counts 902:766:150:151', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True)
@click.option('--seed',          help='Collection seed', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--unplaced',      help='Images identified only to the class', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--min-per-order', help='Lower bound of every order\'s count', metavar='INT', type=click.IntRange(min=0), default=8, show_default=True)

# Image-related.
@click.option('--min-side',      help='Smallest width or height, px', metavar='INT', type=click.IntRange(min=1), default=270, show_default=True)
@click.option('--max-side',      help='Largest width or height, px', metavar='INT', type=click.IntRange(min=1), default=400, show_default=True)
@click.option('--size-scale',    help='Multiplier of --min-side and --max-side', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True)

# Performance-related.
@click.option('--workers',       help='Processes, 0 = one per CPU core', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)

# I/O-related.
@click.option('--force',         help='Redraw even if the collection is complete', is_flag=True)

def main(**kwargs):
    """Write the procedural demo collection of copepod-like images.

    \b
    Example:
    python -m taxogan_ext.demo_data --out demo/images --scale 0.1 --seed 0
    """
    opts = dict(kwargs)
    c = dict(out_dir=opts['out'], scale=opts['scale'], seed=opts['seed'], unplaced=opts['unplaced'],
             min_per_order=opts['min_per_order'], min_side=opts['min_side'], max_side=opts['max_side'],
             size_scale=opts['size_scale'], workers=opts['workers'], force=opts['force'])
    if c['min_side'] > c['max_side']:
        raise click.ClickException(f'--min-side ({c["min_side"]}) must not exceed --max-side ({c["max_side"]})')
    if c['min_side'] * c['size_scale'] < _MIN_SIDE_LIMIT - 0.5:
        raise click.ClickException(f'--min-side times --size-scale must be at least {_MIN_SIDE_LIMIT} px')
    if os.path.exists(c['out_dir']) and not os.path.isdir(c['out_dir']):
        raise click.ClickException(f'--out {c["out_dir"]}: exists and is not a folder')
    try:
        counts = write_demo_collection(**c)
    except (ValueError, OSError) as e:
        raise click.ClickException(str(e))
    total = sum(counts.values()) + c['unplaced']
    click.echo(f'{c["out_dir"]}: {total} images (' + ', '.join(f'{n} {o}' for o, n in counts.items())
               + (f', {c["unplaced"]} class only' if c['unplaced'] else '') + ')')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()
