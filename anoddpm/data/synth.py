"""Procedural grey textures with exact defect masks, in the MVTec layout.

Layout written under ``OUT/CATEGORY``::

    train/good/NNN.png  test/good/NNN.png  test/<defect>/NNN.png  ground_truth/<defect>/NNN_mask.png

One texture family per category (``noise`` | ``stripes`` | ``grains``, picked from the seed and
category name, base parameters fixed) so good images look alike; each image draws its own
noise, phase and small parameter jitter. Defects are ``scratch`` (thin bright/dark curve),
``hole`` (dark ellipse), ``stain`` (irregular blob with an intensity offset) and ``crack``
(dark branching random walk), assigned round-robin. A mask is exactly the pixels whose 8-bit
value the defect changed. numpy ``Generator`` + Pillow only: the same seed gives the same bytes.
"""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

FAMILIES = ("noise", "stripes", "grains")
DEFECTS = ("scratch", "hole", "stain", "crack")


def _hw(shape: int | tuple[int, int]) -> tuple[int, int]:
    return (shape, shape) if isinstance(shape, int) else shape


def smooth_noise(rng: np.random.Generator, shape: int | tuple[int, int], sigma: float) -> np.ndarray:
    """White noise low-passed by a Gaussian of ``sigma`` px (FFT) -> zero mean, unit std [h, w] (int: square)."""
    h, w = _hw(shape)
    white = rng.standard_normal((h, w))
    k2 = np.fft.fftfreq(h)[:, None] ** 2 + np.fft.fftfreq(w)[None, :] ** 2
    out = np.fft.ifft2(np.fft.fft2(white) * np.exp(-2.0 * (np.pi * sigma) ** 2 * k2)).real
    return (out - out.mean()) / (out.std() + 1e-12)


def _family_params(rng: np.random.Generator, size: int) -> dict:
    family = FAMILIES[int(rng.integers(len(FAMILIES)))]
    return {
        "family": family,
        "mean": float(rng.uniform(0.4, 0.6)),
        "contrast": float(rng.uniform(0.07, 0.11)),
        "sigma": float(rng.uniform(0.04, 0.08) * size),  # noise: blob scale
        "period": float(rng.uniform(0.08, 0.16) * size),  # stripes
        "angle": float(rng.uniform(0.0, np.pi)),
        "grain": float(rng.uniform(0.8, 1.6)),  # grains: grain scale, px
    }


def _texture(rng: np.random.Generator, size: int | tuple[int, int], p: dict) -> np.ndarray:
    """One good image of the category's family: float64 [size, size] (or [h, w]), about mean +- 3 contrast."""
    jitter = rng.uniform(0.9, 1.1)
    h, w = _hw(size)
    if p["family"] == "noise":
        tex = smooth_noise(rng, size, p["sigma"] * jitter) + 0.3 * smooth_noise(rng, size, p["sigma"] / 4)
    elif p["family"] == "stripes":
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        angle = p["angle"] + rng.normal(0.0, 0.03)
        u = xx * np.cos(angle) + yy * np.sin(angle)
        tex = 1.4 * np.sin(2 * np.pi * u / (p["period"] * jitter) + rng.uniform(0, 2 * np.pi))
        tex += 0.4 * smooth_noise(rng, size, 1.0)
    else:
        tex = smooth_noise(rng, size, p["grain"] * jitter) + 0.5 * smooth_noise(rng, size, min(h, w) / 6)
    return np.clip(p["mean"] + p["contrast"] * tex, 0.0, 1.0)


def _draw(size: int, fn) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    fn(ImageDraw.Draw(canvas))
    return np.asarray(canvas) > 0


def _curve(rng: np.random.Generator, size: int, n: int) -> list[tuple[float, float]]:
    """A gently bent curve across a random part of the image."""
    start = rng.uniform(0.15, 0.85, 2) * size
    angle = rng.uniform(0, 2 * np.pi)
    length = rng.uniform(0.3, 0.6) * size
    bend = rng.normal(0.0, 0.4)
    pts = []
    for i in range(n):
        s = i / (n - 1)
        a = angle + bend * s
        pts.append((float(start[0] + np.cos(a) * length * s), float(start[1] + np.sin(a) * length * s)))
    return pts


def _walk(rng: np.random.Generator, start: np.ndarray, angle: float, steps: int, step: float) -> list[tuple]:
    pts, pos = [tuple(start)], start.copy()
    for _ in range(steps):
        angle += rng.normal(0.0, 0.5)
        pos = pos + step * np.array([np.cos(angle), np.sin(angle)])
        pts.append((float(pos[0]), float(pos[1])))
    return pts


def _defect(rng: np.random.Generator, kind: str, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Apply one defect -> (defective image float [H, W], region bool [H, W])."""
    size = img.shape[0]
    sign = 1.0 if rng.random() < 0.5 else -1.0
    out = img.copy()
    if kind == "scratch":
        width = int(rng.integers(1, max(2, size // 48) + 1))
        region = _draw(size, lambda d: d.line(_curve(rng, size, 12), fill=255, width=width))
        out[region] += sign * rng.uniform(0.25, 0.35)
    elif kind == "hole":
        r = rng.uniform(0.04, 0.09, 2) * size
        c = rng.uniform(0.2, 0.8, 2) * size
        region = _draw(size, lambda d: d.ellipse([c[0] - r[0], c[1] - r[1], c[0] + r[0], c[1] + r[1]], fill=255))
        out[region] = rng.uniform(0.05, 0.15) + 0.3 * (img[region] - img[region].mean())
    elif kind == "stain":
        r = rng.uniform(0.08, 0.16) * size
        c = rng.uniform(0.25, 0.75, 2) * size
        yy, xx = np.mgrid[0:size, 0:size]
        dist = np.hypot(xx - c[0], yy - c[1]) / r
        region = dist + 0.35 * smooth_noise(rng, size, size / 16) < 1.0
        out[region] += sign * rng.uniform(0.15, 0.22)
    elif kind == "crack":
        start = rng.uniform(0.2, 0.8, 2) * size
        angle = rng.uniform(0, 2 * np.pi)
        steps, step = int(rng.integers(10, 16)), size / 40
        main = _walk(rng, start, angle, steps, step)
        branch = _walk(rng, np.array(main[steps // 2]), angle + rng.choice([-1.0, 1.0]) * 0.9, steps // 2, step)
        width = 1 if size < 96 else 2
        region = _draw(size, lambda d: (d.line(main, fill=255, width=width), d.line(branch, fill=255, width=1)))
        out[region] = np.minimum(out[region], rng.uniform(0.05, 0.15))
    else:
        raise ValueError(f"unknown defect kind {kind!r}; choose one of {', '.join(DEFECTS)}")
    return np.clip(out, 0.0, 1.0), region


def _to_u8(img: np.ndarray) -> np.ndarray:
    return np.round(img * 255.0).astype(np.uint8)


def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG")


def make_synthetic_dataset(out: str | Path, category: str = "synthetic", size: int = 128, n_train: int = 60,
                           n_test_good: int = 20, n_test_defect: int = 30, seed: int = 0) -> Path:
    """Write the MVTec-layout dataset under ``out/category``; returns that category folder."""
    if size < 16:
        raise ValueError(f"size={size} must be at least 16")
    for name, n in (("n_train", n_train), ("n_test_good", n_test_good), ("n_test_defect", n_test_defect)):
        if n < 0:
            raise ValueError(f"{name}={n} must not be negative")
    if n_train < 1:
        raise ValueError(f"n_train={n_train} must be at least 1")
    return write_dataset(Path(out) / category, [seed, zlib.crc32(category.encode())], size, size, DEFECTS,
                         lambda rng, kind, good: _defect(rng, kind, good)[0], n_train, n_test_good, n_test_defect)


def write_dataset(root: Path, entropy: list[int], texture_size: Any, family_scale: int, kinds: Sequence[str],
                  draw_defect: Callable[[np.random.Generator, str, np.ndarray], np.ndarray], n_train: int,
                  n_test_good: int, n_test_defect: int) -> Path:
    """Write good textures of one family (``_texture`` at `texture_size`) and defects of `kinds` in turn, each
    drawn by `draw_defect(rng, kind, good in [0, 1])`, in the MVTec layout under `root` (refused when it holds one)."""
    if (root / "train").exists() or (root / "test").exists():
        raise ValueError(f"{root} already holds a dataset; choose another --out or --category")
    seeds = np.random.SeedSequence(entropy).spawn(4)
    params = _family_params(np.random.default_rng(seeds[0]), family_scale)
    rng_train, rng_good, rng_defect = (np.random.default_rng(s) for s in seeds[1:])
    for i in range(n_train):
        _save(root / "train" / "good" / f"{i:03d}.png", _to_u8(_texture(rng_train, texture_size, params)))
    for i in range(n_test_good):
        _save(root / "test" / "good" / f"{i:03d}.png", _to_u8(_texture(rng_good, texture_size, params)))
    for i in range(n_test_defect):
        kind, index = kinds[i % len(kinds)], i // len(kinds)
        good = _to_u8(_texture(rng_defect, texture_size, params))
        mask = np.zeros_like(good, dtype=bool)
        while not mask.any():  # a defect that changes no 8-bit value is redrawn
            bad = _to_u8(draw_defect(rng_defect, kind, good.astype(np.float64) / 255.0))
            mask = bad != good
        _save(root / "test" / kind / f"{index:03d}.png", bad)
        _save(root / "ground_truth" / kind / f"{index:03d}_mask.png", mask.astype(np.uint8) * 255)
    return root
