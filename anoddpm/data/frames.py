"""`anoddpm synth --frame-size WxH`: large line-camera frames with small defects, in the MVTec layout.

The textures are those of ``anoddpm.data.synth`` (one family per category, its scale that of a 256 px image, so a
frame shows many texture periods) and the defects are small against the frame: ``spot`` (dark or bright
ellipse, 6-20 px across), ``stain`` (irregular blob, at most 20 px), ``line`` (thin bright or dark scratch, 1-3 px
wide, 60-300 px long) and ``crack`` (dark branching walk, 1-2 px wide), one per defect frame, round-robin.
Squashed to a 128 px square, a 2048 px frame shrinks them below a pixel: the case tiling is for.
A mask is exactly the pixels whose 8-bit value the defect changed; the same seed gives the same bytes.
"""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from anoddpm.data.synth import smooth_noise, write_dataset

FRAME_DEFECTS = ("spot", "stain", "line", "crack")
TEXTURE_SCALE = 256  # the frames' texture has the scale of a synth image of this side, pixels


def parse_frame_size(text: str) -> tuple[int, int]:
    """'2048x1536' -> (width, height); ValueError naming --frame-size otherwise."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--frame-size {text!r} must look like WIDTHxHEIGHT, e.g. 2048x1536") from None
    if width < 64 or height < 64:
        raise ValueError(f"--frame-size {text!r}: both sides must be at least 64 px")
    return width, height


def _draw(shape: tuple[int, int], fn) -> np.ndarray:
    canvas = Image.new("L", (shape[1], shape[0]), 0)
    fn(ImageDraw.Draw(canvas))
    return np.asarray(canvas) > 0


def _walk(rng: np.random.Generator, start: np.ndarray, angle: float, steps: int, step: float,
          turn: float) -> list[tuple[float, float]]:
    pts, pos = [(float(start[0]), float(start[1]))], start.astype(np.float64)
    for _ in range(steps):
        angle += rng.normal(0.0, turn)
        pos = pos + step * np.array([np.cos(angle), np.sin(angle)])
        pts.append((float(pos[0]), float(pos[1])))
    return pts


def _frame_defect(rng: np.random.Generator, kind: str, img: np.ndarray) -> np.ndarray:
    """Apply one small defect to a frame float [H, W] in [0, 1] -> the defective frame."""
    h, w = img.shape
    centre = rng.uniform(0.1, 0.9, 2) * (w, h)  # (x, y), away from the border
    sign = 1.0 if rng.random() < 0.5 else -1.0
    out = img.copy()
    if kind == "spot":
        r = rng.uniform(3.0, 10.0, 2)
        box = [centre[0] - r[0], centre[1] - r[1], centre[0] + r[0], centre[1] + r[1]]
        region = _draw((h, w), lambda d: d.ellipse(box, fill=255))
        out[region] += sign * rng.uniform(0.25, 0.4)
    elif kind == "stain":
        r = rng.uniform(4.0, 8.0)
        y0, x0 = int(centre[1] - 2 * r), int(centre[0] - 2 * r)
        side = int(4 * r) + 1
        yy, xx = np.mgrid[0:side, 0:side]
        dist = np.hypot(xx + x0 - centre[0], yy + y0 - centre[1]) / r
        blob = (dist + 0.35 * smooth_noise(rng, side, 2.0) < 1.0) & (dist < 1.25)  # irregular, at most 20 px
        region = np.zeros((h, w), bool)
        top, left, bottom, right = max(y0, 0), max(x0, 0), min(y0 + side, h), min(x0 + side, w)
        region[top:bottom, left:right] = blob[top - y0:bottom - y0, left - x0:right - x0]
        out[region] += sign * rng.uniform(0.15, 0.22)
    elif kind == "line":
        length, steps = rng.uniform(60.0, 300.0), 12
        pts = _walk(rng, centre, rng.uniform(0, 2 * np.pi), steps, length / steps, 0.08)
        width = int(rng.integers(1, 4))
        region = _draw((h, w), lambda d: d.line(pts, fill=255, width=width))
        out[region] += sign * rng.uniform(0.25, 0.35)
    elif kind == "crack":
        angle, steps = rng.uniform(0, 2 * np.pi), int(rng.integers(10, 16))
        main = _walk(rng, centre, angle, steps, 8.0, 0.5)
        branch = _walk(rng, np.array(main[steps // 2]), angle + rng.choice([-1.0, 1.0]) * 0.9, steps // 2, 8.0, 0.5)
        width = int(rng.integers(1, 3))
        region = _draw((h, w), lambda d: (d.line(main, fill=255, width=width), d.line(branch, fill=255, width=1)))
        out[region] = np.minimum(out[region], rng.uniform(0.05, 0.15))
    else:
        raise ValueError(f"unknown frame defect kind {kind!r}; choose one of {', '.join(FRAME_DEFECTS)}")
    return np.clip(out, 0.0, 1.0)


def make_frame_dataset(out: str | Path, category: str = "frames", frame_hw: tuple[int, int] = (1536, 2048),
                       n_train: int = 8, n_test_good: int = 4, n_test_defect: int = 8, seed: int = 0) -> Path:
    """Write an MVTec-layout dataset of `frame_hw` (height, width) grey frames under ``out/category``; returns it."""
    if min(frame_hw) < 64:
        raise ValueError(f"frame size {frame_hw[1]}x{frame_hw[0]}: both sides must be at least 64 px")
    if n_train < 1 or n_test_good < 0 or n_test_defect < 0:
        raise ValueError("n_train must be at least 1 and the test counts must not be negative")
    return write_dataset(Path(out) / category, [seed, zlib.crc32(category.encode()), 1], frame_hw, TEXTURE_SCALE,
                         FRAME_DEFECTS, _frame_defect, n_train, n_test_good, n_test_defect)
