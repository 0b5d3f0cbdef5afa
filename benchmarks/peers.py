"""The toolkit's defaults side by side with a PatchCore-style peer on the same data, in one run.

    python -m benchmarks.peers --data ROOT --category CAT [--max-minutes M | --max-steps N] [--model model.pt]
        [--out DIR] [--scorers residual+head,feature_memory,...] [--arms "--guidance 2;--depth 250 --steps 10"]
        [--adapt-steps N --adapted-arms "--scorer feature_residual;--scorer residual+feature_residual"]

(a) ``defaults``: ``anoddpm train`` with the default config (budget from the flags; ``--model`` evaluates an
existing bundle instead), then ``anoddpm evaluate`` with the bundle's own scorer and, for every ``--scorers`` entry,
the same bundle with ``--scorer`` (calibrated on the fly), and for every ``--arms`` entry (';'-separated) the same
bundle with those `anoddpm evaluate` flags; with ``--adapt-steps N`` a copy of the bundle gets the backbone adapted to
its reconstructions as ``anoddpm train --adapt-steps N`` ends (same function, same seed), is calibrated, and every
``--adapted-arms`` entry is evaluated on it (method ``adapted``). (b) ``patchcore_peer``: no training; the recipe of
``shared/FINDINGS.md``: the same pretrained backbone (EfficientNet-Lite0 stages 3 and 5, 3x3 pooled) at 256 x 256,
a random 10 % of all training-patch descriptors as the bank, map = distance to the nearest one, blurred (sigma 4 px
at 256), score = its max. One JSON line per method: method, category, image_auroc, pixel_auroc, aupro,
seconds_per_image, fit_seconds (training + calibration, or the peer's bank fitting), per_type_image_auroc.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anoddpm.config import Config

PEER_SIZE = 256  # the peer's input side, pixels
PEER_BANK_FRACTION = 0.1  # share of the training-patch descriptors the peer keeps, drawn at random
PEER_SIGMA = 4.0  # the peer's map blur at PEER_SIZE, pixels


def _row(method: str, category: str, metrics: dict[str, Any], seconds: float, fit: float, **extra: Any) -> dict:
    keys = ("image_auroc", "pixel_auroc", "aupro", "per_type_image_auroc")
    return {"method": method, "category": category, **{k: metrics.get(k) for k in keys},
            "seconds_per_image": round(seconds, 4), "fit_seconds": round(fit, 1), **extra}


def train_defaults(data: str, category: str | None, out: Path, max_steps: int | None,
                   max_minutes: float | None) -> tuple[Path, float]:
    """Train a bundle with the default config (channels from the data) -> (model.pt, seconds incl. calibration)."""
    from anoddpm.data.datasets import infer_channels
    from anoddpm.training.train import train

    cfg = Config().override("train", max_steps=max_steps, max_minutes=max_minutes)
    cfg = cfg.override("data", channels=infer_channels(data, category)).validate()
    start = time.perf_counter()
    bundle = train(cfg, data, category, out / "run")
    return Path(bundle), time.perf_counter() - start


def evaluate_bundle(model: Path, data: str, category: str | None, out: Path, flags: list[str],
                    batch_size: int = 8) -> dict[str, Any]:
    """`anoddpm evaluate` of `model` with extra evaluate `flags` (e.g. ["--scorer", "residual"]) -> its metrics.json."""
    from anoddpm.cli import main

    name = "_".join(f.lstrip("-").replace("+", "_") for f in flags) or "bundle"
    report = out / f"report_{name}"
    argv = ["evaluate", "--model", str(model), "--data", data, "--out", str(report), "-q",
            "--batch-size", str(batch_size), *flags]
    argv += ["--category", category] if category else []
    if main(argv) != 0:
        raise RuntimeError(f"evaluate failed for {model} ({' '.join(flags)})")
    return json.loads((report / "metrics.json").read_text())


def run_peer(data: str, category: str | None, seed: int = 0, shots: int = 0,
             shots_seed: int = 0) -> tuple[dict[str, Any], float, float]:
    """The PatchCore-style peer -> (metrics, seconds per test image, fit seconds); `shots` K >= 1 fits its bank on the
    K good images a K-shot `anoddpm train --shots K --shots-seed S` draws (data.shots)."""
    from anoddpm.detection.backbone import build_backbone
    from anoddpm.data.datasets import infer_channels, load_test_set, load_training_data
    from anoddpm.detection.components.feature_memory import memory_distance_map, patch_features
    from anoddpm.detection.scoring_loop import batched
    from eval.metrics import compute_metrics
    from anoddpm.detection.maps import gaussian_blur

    cfg = Config()
    cfg = replace(cfg, data=replace(cfg.data, image_size=PEER_SIZE, channels=infer_channels(data, category),
                                    shots=shots, shots_seed=shots_seed),
                  backbone=replace(cfg.backbone, image_size=PEER_SIZE)).validate()
    backbone = build_backbone(cfg.backbone)

    def descriptors(arrays: list) -> torch.Tensor:
        with torch.no_grad():
            x = torch.as_tensor(np.stack([np.asarray(a, dtype=np.float32) for a in arrays]))
            return patch_features(backbone(x), cfg.backbone.pool)

    start = time.perf_counter()
    train_ds, _, _ = load_training_data(cfg, data, category, seed)
    arrays = [train_ds.arrays[i] for i in range(len(train_ds.arrays))]
    rows = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
                      for f in (descriptors(chunk) for chunk in batched(arrays, 16))])
    generator = torch.Generator().manual_seed(seed)
    bank = rows[torch.randperm(rows.shape[0], generator=generator)[: max(1, int(PEER_BANK_FRACTION * len(rows)))]]
    fit = time.perf_counter() - start
    samples = load_test_set(cfg, data, category)
    start = time.perf_counter()
    maps = []
    for chunk in batched([s.image for s in samples], 16):
        with torch.no_grad():
            amap = memory_distance_map(descriptors(chunk), bank, PEER_SIZE)
            maps.append(gaussian_blur(amap, PEER_SIGMA)[:, 0].numpy())
    seconds = (time.perf_counter() - start) / max(1, len(samples))
    maps = np.concatenate(maps)
    labels = np.array([s.label for s in samples])
    masks = np.stack([s.mask for s in samples])
    metrics = compute_metrics(maps.reshape(len(maps), -1).max(1), labels, maps, masks)
    return metrics, seconds, fit


def adapted_copy(model: Path, out: Path, steps: int) -> tuple[Path, float]:
    """OUT/adapted/model.pt: `model` with a backbone adapted for `steps` steps on its training images, calibrated as
    at the end of `anoddpm train` -> (path, seconds of adaptation and calibration)."""
    from anoddpm.bundle import load_bundle, save_bundle
    from anoddpm.data.datasets import load_training_data
    from anoddpm.detection.calibration import calibrate_bundle
    from anoddpm.model.diffusion import GaussianDiffusion
    from anoddpm.model.unet import build_unet
    from anoddpm.platform.device import resolve_device
    from anoddpm.training.adaptation import adapt_backbone

    start = time.perf_counter()
    bundle = load_bundle(model)
    cfg = bundle.cfg.override("train", adapt_steps=steps).validate()
    fingerprint = bundle.fingerprint
    train_ds, val_ds, _ = load_training_data(cfg, fingerprint["root"], fingerprint["category"], cfg.train.seed)
    unet = build_unet(cfg)
    unet.load_state_dict(bundle.state_dict)
    device = resolve_device("auto")
    adapted = adapt_backbone(cfg, unet.to(device).eval(), GaussianDiffusion.from_config(cfg.diffusion).to(device),
                             train_ds, device)
    path = save_bundle(out / "adapted" / "model.pt", cfg=cfg, state_dict=bundle.state_dict, fingerprint=fingerprint,
                       head_state_dict=bundle.head_state_dict, adapted_backbone=adapted)
    calibrate_bundle(path, val_ds, device, train_ds)
    return path, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    """Run both methods and print one JSON line each."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, metavar="ROOT", help="MVTec-style root or category folder")
    p.add_argument("--category", metavar="NAME", help="category folder under ROOT")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--max-steps", type=int, metavar="N", help="training steps of the defaults run")
    budget.add_argument("--max-minutes", type=float, metavar="M", help="training minutes of the defaults run")
    p.add_argument("--model", type=Path, help="evaluate this bundle instead of training one")
    p.add_argument("--scorers", default="", help="comma-separated extra --scorer values to evaluate the bundle with")
    p.add_argument("--arms", default="", help="';'-separated sets of evaluate flags to evaluate the bundle with, e.g. "
                                            "\"--guidance 2;--scorer residual --depth 250 --steps 10\"")
    p.add_argument("--adapt-steps", type=int, default=0, metavar="N",
                   help="also evaluate a copy of the bundle with its backbone adapted for N steps (train --adapt-steps)")
    p.add_argument("--adapted-arms", default="--scorer feature_residual",
                   help="';'-separated sets of evaluate flags for the adapted copy (default: --scorer feature_residual)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass when evaluating (default 8)")
    p.add_argument("--out", type=Path, default=Path("runs/peers"), help="folder for the run and its reports")
    p.add_argument("--skip-peer", action="store_true", help="only the toolkit (the peer needs no bundle)")
    args = p.parse_args(argv)
    category = args.category or Path(args.data).name
    out = args.out / category
    if not args.skip_peer:
        metrics, seconds, fit = run_peer(args.data, args.category)
        print(json.dumps(_row("patchcore_peer", category, metrics, seconds, fit)), flush=True)
    model, fit = args.model, 0.0
    if model is None:
        model, fit = train_defaults(args.data, args.category, out, args.max_steps, args.max_minutes)
    arms = [[], *(["--scorer", s] for s in filter(None, args.scorers.split(","))),
            *(a.split() for a in filter(None, (a.strip() for a in args.arms.split(";"))))]
    for flags in arms:
        metrics = evaluate_bundle(model, args.data, args.category, out, flags, args.batch_size)
        print(json.dumps(_row(" ".join(["defaults", *flags]), category, metrics,
                              metrics.get("seconds_per_image") or 0.0, fit, model=str(model))), flush=True)
    if args.adapt_steps:
        adapted, adapt_seconds = adapted_copy(model, out, args.adapt_steps)
        for flags in (a.split() for a in filter(None, (a.strip() for a in args.adapted_arms.split(";")))):
            metrics = evaluate_bundle(adapted, args.data, args.category, out / "adapted", flags, args.batch_size)
            print(json.dumps(_row(" ".join(["adapted", *flags]), category, metrics,
                                  metrics.get("seconds_per_image") or 0.0, fit + adapt_seconds, model=str(adapted),
                                  adapt_steps=args.adapt_steps, adapt_seconds=round(adapt_seconds, 1))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
