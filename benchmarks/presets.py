"""Measure each UNet preset on this machine: parameters, forward time per image, training-step time.

Prints one JSON line per preset. Run: ``python -m benchmarks.presets [--size 128 --batch 8]``.
Presets were chosen so that `small` trains ~1500 steps of batch 8 at 128 px in 30 min on a
2-core CPU. GMAC (multiply-accumulates per forward) does not depend on machine load; times do.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from anoddpm.config import Config
from anoddpm.model.unet import build_unet


def measure(preset: str, size: int, batch: int, repeats: int) -> dict:
    """Median timings of `repeats` runs after one warm-up for one preset."""
    cfg = Config().override("model", preset=preset).override("data", image_size=size)
    model = build_unet(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, cfg.data.channels, size, size)
    t = torch.rand(batch) * 1000
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x[:1], t[:1])
    fwd, step = [], []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        with torch.inference_mode():
            model(x, t)
        fwd.append(time.perf_counter() - start)
        start = time.perf_counter()
        loss = (model(x, t) - x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        step.append(time.perf_counter() - start)
    median = lambda v: sorted(v[1:])[len(v[1:]) // 2]  # noqa: E731
    step_s = median(step)
    return {
        "preset": preset,
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "image_size": size,
        "batch": batch,
        "gmac_fwd_per_image": round(counter.get_total_flops() / 2e9, 2),
        "fwd_ms_per_image": round(1000 * median(fwd) / batch, 1),
        "train_step_ms": round(1000 * step_s),
        "steps_per_30min": int(1800 / step_s),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small", "base"])
    args = parser.parse_args()
    for preset in args.presets:
        print(json.dumps(measure(preset, args.size, args.batch, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
