"""Tiling vs squashing on large generated frames: image / pixel AUROC and megapixels per second.

Run: ``python -m benchmarks.tiling --out DIR [--frame-size 2048x1536] [--steps 300] [--tile-scale 0.5]``.
Writes frames with small defects (``anoddpm synth --frame-size``) into DIR/data, trains one bundle per arm
with the same step budget (DIR/squashed: every frame squashed to --image-size; DIR/tiled: --tile-size crops of
the frames scaled by --tile-scale; an existing DIR/<arm>/model.pt is reused), scores the test frames and
prints one JSON line per arm. Both arms are compared at the same resolution, the frame scaled by
--tile-scale: the squashed arm's maps are resized up to it, and the masks are rescaled to it (nearest).
Throughput counts the frames' native megapixels over the wall time of reading, preprocessing and scoring.

``--denoiser blur`` skips training: both arms use the same training-free reconstruction (a Gaussian blur that
heals thin marks), so the difference is the resolution alone.

``--rss-frame WxH --model TILED_MODEL_PT`` instead scores one random frame of that size (tile_scale 1 of the
bundle unless --tile-scale is given) in a fresh process and prints its peak resident memory.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anoddpm.bundle import load_bundle
from anoddpm.config import Config
from anoddpm.detection.detector import Detector
from anoddpm.model.diffusion import GaussianDiffusion
from anoddpm.data.frames import make_frame_dataset, parse_frame_size
from anoddpm.data.imageio import image_hw, load_model_image, read_mask, rescale_mask, resize_map
from anoddpm.detection.tiling import TiledDetector
from benchmarks.blur_denoiser import BlurDenoiser
from eval.metrics import compute_metrics, per_type_auroc


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def _arm_config(arm: str, args: argparse.Namespace) -> Config:
    cfg = Config().override("model", preset=args.preset).override("data", channels=1, image_size=args.image_size)
    cfg = cfg.override("train", max_steps=args.steps, seed=args.seed)
    if arm == "tiled":
        cfg = cfg.override("data", tile_size=args.tile_size, tile_scale=args.tile_scale)
    return cfg.validate()


def _train(arm: str, args: argparse.Namespace, data: Path) -> Path:
    from anoddpm.training.train import train

    bundle = Path(args.out) / arm / "model.pt"
    if not bundle.is_file():
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON lines
            train(_arm_config(arm, args), data, None, bundle.parent, device="cpu")
    return bundle


def _detector(arm: str, args: argparse.Namespace, data: Path) -> Detector:
    """The arm's trained bundle (trained here when missing), or with --denoiser blur the training-free
    stand-in (``benchmarks.blur_denoiser``: reconstruction = Gaussian blur) so only the resolution differs."""
    if args.denoiser == "blur":
        cfg = _arm_config(arm, args).override("detect", map_reference="none")
        diffusion = GaussianDiffusion.from_config(cfg.diffusion)
        return Detector(BlurDenoiser(diffusion, args.blur_sigma), diffusion, cfg).eval()
    return Detector.from_bundle(load_bundle(_train(arm, args, data))).eval()


def _score_arm(arm: str, detector: Detector, data: Path, eval_scale: float, batch_size: int) -> dict[str, Any]:
    """Score every test frame of `data`; metrics at the frames' size times eval_scale."""
    cfg = detector.cfg
    d, device = cfg.data, torch.device("cpu")
    tiled = TiledDetector(detector, batch_size) if d.tile_size else None
    files = sorted(p for p in (data / "test").rglob("*.png"))
    scores, maps, masks, types, megapixels, seconds = [], [], [], [], 0.0, 0.0
    for path in files:
        start = time.perf_counter()
        image = load_model_image(path, 1, d.image_size, d.resize_policy, d.tile_size, d.tile_scale)
        if tiled is not None:
            amap, score, _, _ = tiled.score_image(image, device)
        else:
            with torch.inference_mode():
                out, pred, _ = detector(torch.from_numpy(image)[None])
            amap, score = out[0, 0].numpy(), float(pred[0])
        seconds += time.perf_counter() - start
        mask_path = data / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
        h, w = image_hw(path)
        mask = rescale_mask(read_mask(mask_path) if mask_path.is_file() else np.zeros((h, w), bool), eval_scale)
        megapixels += h * w / 1e6
        scores.append(score)
        maps.append(resize_map(amap, *mask.shape))
        masks.append(mask)
        types.append(path.parent.name)
    labels = np.array([int(t != "good") for t in types])
    metrics = compute_metrics(np.array(scores), labels, maps, masks)
    return {"arm": arm, "image_auroc": metrics["image_auroc"], "pixel_auroc": metrics["pixel_auroc"],
            "aupro": metrics["aupro"], "per_type_image_auroc": per_type_auroc(np.array(scores), labels, types),
            "megapixels_per_s": round(megapixels / seconds, 4), "seconds_per_frame": round(seconds / len(files), 3),
            "n_frames": len(files), "eval_resolution": f"native x {eval_scale:g}",
            "config": {"image_size": d.image_size, "tile_size": d.tile_size, "tile_scale": d.tile_scale,
                       "model": "blur stand-in" if isinstance(detector.unet, BlurDenoiser) else cfg.model.preset,
                       "max_steps": None if isinstance(detector.unet, BlurDenoiser) else cfg.train.max_steps,
                       "map_reference": cfg.detect.map_reference}}


def _rss(args: argparse.Namespace) -> dict[str, Any]:
    width, height = parse_frame_size(args.rss_frame)
    bundle = load_bundle(args.model)
    cfg = bundle.cfg
    if not cfg.data.tile_size:
        raise ValueError(f"--rss-frame needs a tiled bundle; {args.model} has data.tile_size 0")
    scale = args.tile_scale if args.tile_scale_given else cfg.data.tile_scale
    tiled = TiledDetector(Detector.from_bundle(bundle).eval(), args.batch_size)
    before = _peak_rss_mb()
    frame = np.random.default_rng(0).random((1, round(height * scale), round(width * scale)), dtype=np.float32)
    start = time.perf_counter()
    tiled.score_image(frame, torch.device("cpu"))
    seconds = time.perf_counter() - start
    return {"rss_frame": f"{width}x{height}", "megapixels": round(width * height / 1e6, 2), "tile_scale": scale,
            "tile_size": cfg.data.tile_size, "batch_size": args.batch_size, "peak_rss_mb_before": round(before, 1),
            "peak_rss_mb": round(_peak_rss_mb(), 1), "seconds": round(seconds, 1),
            "megapixels_per_s": round(width * height / 1e6 / seconds, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/bench_tiling", help="work folder (data, one bundle per arm)")
    parser.add_argument("--frame-size", default="2048x1536", metavar="WxH")
    parser.add_argument("--n-train", type=int, default=8)
    parser.add_argument("--n-test-good", type=int, default=4)
    parser.add_argument("--n-test-defect", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300, help="training steps of each arm")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--image-size", type=int, default=128, help="square side of the squashed arm")
    parser.add_argument("--tile-size", type=int, default=128)
    parser.add_argument("--tile-scale", type=float, default=None, help="tiled arm's scale (default 0.5)")
    parser.add_argument("--batch-size", type=int, default=8, help="tiles per forward pass")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--denoiser", choices=("trained", "blur"), default="trained",
                        help="trained = one bundle per arm; blur = a training-free Gaussian-blur stand-in")
    parser.add_argument("--blur-sigma", type=float, default=2.0, help="blur of the stand-in, pixels")
    parser.add_argument("--rss-frame", metavar="WxH", help="only measure peak RSS scoring one frame of this size")
    parser.add_argument("--model", help="tiled bundle for --rss-frame")
    args = parser.parse_args()
    args.tile_scale_given = args.tile_scale is not None
    args.tile_scale = 0.5 if args.tile_scale is None else args.tile_scale
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    context = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "load_average_1min": round(os.getloadavg()[0], 2)}
    if args.rss_frame:
        print(json.dumps({**_rss(args), **context}), flush=True)
        return
    width, height = parse_frame_size(args.frame_size)
    data = Path(args.out) / "data" / "frames"
    if not data.is_dir():
        make_frame_dataset(Path(args.out) / "data", "frames", (height, width), args.n_train, args.n_test_good,
                           args.n_test_defect, args.seed)
    for arm in ("squashed", "tiled"):
        result = _score_arm(arm, _detector(arm, args, data), data, args.tile_scale, args.batch_size)
        print(json.dumps({**result, "frame_size": args.frame_size, **context,
                          "load_average_1min_after": round(os.getloadavg()[0], 2)}), flush=True)


if __name__ == "__main__":
    main()
