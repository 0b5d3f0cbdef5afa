"""Inspection speed of one model on this machine: paper path vs fast path vs ONNX Runtime.

Run: ``python -m benchmarks.speed [--preset small] [--image-size 128] [--model model.pt] [--device cuda]``.
Prints one JSON line: per-image latency (batch 1) and throughput (batch 8) for
* the PyTorch paper path (ancestral sampler, ``depth`` steps with fresh simplex noise per step),
  timed at two small depths and extrapolated linearly to the real depth (said in the JSON),
* the PyTorch fast path (``steps`` deterministic strided steps, eager),
* the ONNX Runtime fast path (the exported graph through deploy.runtime.Inspector),
and the ratios between them. Without --model the weights are random (speed does not depend on them).
Both frameworks get the same threads (--threads); on a shared machine, --threads 1 avoids the
thread-pool contention that otherwise dominates the timings. Timings are best-of-N.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import onnxruntime as ort
import torch

from anoddpm.bundle import load_bundle, save_bundle
from anoddpm.config import Config
from anoddpm.detection.detector import Detector
from anoddpm.model.unet import build_unet
from deploy.export import export_onnx
from deploy.runtime import Inspector

BATCHES = (1, 8)


def _best_seconds(fn: Callable[[], object], repeats: int, device: torch.device = torch.device("cpu")) -> float:
    """Fastest of `repeats` timed runs after one warm-up (the least disturbed by other processes); CUDA work is
    synchronised so the clock measures the work, not the launch."""
    if device.type == "cuda":
        def synced(inner: Callable[[], object] = fn) -> object:
            out = inner()
            torch.cuda.synchronize(device)
            return out
        fn = synced
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _random_bundle(path: Path, preset: str, image_size: int) -> Path:
    # random weights have no feature memory to compare with: the reconstruction path alone
    cfg = (Config().override("model", preset=preset).override("data", image_size=image_size)
           .override("detect", scorer="residual").validate())
    torch.manual_seed(0)
    threshold = {"image": 0.0, "pixel": None, "method": "quantile", "note": "benchmark placeholder",
                 "detect": cfg.to_dict()["detect"], "components": ["residual"]}
    return save_bundle(path, cfg=cfg, state_dict=build_unet(cfg).state_dict(), fingerprint={"source": "random"},
                       threshold=threshold)


def _paper_path(bundle: object, fast: Detector, device: torch.device, depth: int) -> Detector:
    """The ancestral detector at `depth` with the fast path's fitted states (calibrated for other settings, they only
    need to be there for the timing: a feature_memory component cannot run without its bank)."""
    detector = Detector.from_bundle(bundle, device, sampler="ancestral", depth=depth, steps=1).eval()
    detector.load_fitted_state(fast.fitted_state())
    return detector.to(device)


def _timings(seconds: dict[int, float]) -> dict[str, float]:
    return {"latency_ms_batch1": round(1e3 * seconds[1], 2),
            "throughput_img_s_batch8": round(8 / seconds[8], 3)}


def measure(bundle_path: Path, onnx_path: Path, repeats: int, paper_depths: tuple[int, int], weights: str,
            threads: int, device: torch.device = torch.device("cpu")) -> dict:
    """Time the three paths on the same weights on `device` (ONNX: its CUDA provider when `device` is CUDA and the
    provider is installed); returns the JSON record."""
    bundle = load_bundle(bundle_path)
    cfg = bundle.cfg
    shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    images = {b: torch.rand(b, *shape, generator=torch.Generator().manual_seed(b)) for b in BATCHES}
    on_device = {b: x.to(device) for b, x in images.items()}
    fast = Detector.from_bundle(bundle, device, sampler="ddim").eval()
    depth, steps = fast.cfg.detect.depth, fast.cfg.detect.steps

    def run_torch(detector: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
        def call() -> object:
            with torch.inference_mode():
                return detector(x)
        return call

    torch_fast = {b: _best_seconds(run_torch(fast, on_device[b]), repeats, device) for b in BATCHES}
    paper = {}
    lo, hi = paper_depths
    for b in BATCHES:
        t = {d: _best_seconds(run_torch(_paper_path(bundle, fast, device, d), on_device[b]), max(1, repeats // 2), device)
             for d in (lo, hi)}
        per_step = max(t[hi] - t[lo], 0.0) / (hi - lo)
        paper[b] = t[lo] + per_step * (depth - lo)

    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    inspector = Inspector(onnx_path, providers=providers, batch_size=max(BATCHES), threads=threads)
    ort_fast = {b: _best_seconds(lambda b=b: inspector.run(images[b].numpy()), repeats) for b in BATCHES}

    return {
        "bench": "speed",
        "preset": cfg.model.preset, "image_size": cfg.data.image_size, "channels": cfg.data.channels,
        "depth": depth, "steps": steps, "weights": weights,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "threads": threads, "load_avg_1min": round(os.getloadavg()[0], 2), "torch": torch.__version__,
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "onnxruntime": ort.__version__, "ort_provider": inspector.provider},
        "torch_paper": {**_timings(paper), "extrapolated": True,
                        "note": f"ancestral path timed at depth {lo} and {hi}, extrapolated linearly to depth {depth}"},
        "torch_fast": _timings(torch_fast),
        "ort_fast": {**_timings(ort_fast), "graph_optimization": "ORT_ENABLE_ALL"},
        "ratios": {
            "ort_vs_torch_fast_batch1": round(torch_fast[1] / ort_fast[1], 3),
            "ort_vs_torch_fast_batch8": round(torch_fast[8] / ort_fast[8], 3),
            "fast_vs_paper_batch1": round(paper[1] / torch_fast[1], 1),
            "fast_vs_paper_batch8": round(paper[8] / torch_fast[8], 1),
        },
        "timing": f"best of {repeats} runs after a warm-up",
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m benchmarks.speed`."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="bundle model.pt to time (default: random weights of --preset)")
    p.add_argument("--preset", default="small", help="UNet preset for random weights (default small)")
    p.add_argument("--image-size", type=int, default=128, help="image side for random weights (default 128)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement, median kept (default 5)")
    p.add_argument("--paper-depths", type=int, nargs=2, default=(1, 9), metavar=("LO", "HI"),
                   help="ancestral depths timed for the linear extrapolation (default 1 9)")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="threads for both PyTorch and onnxruntime (default: all cores)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto for the PyTorch paths; ONNX "
                                                   "Runtime then uses its CUDA provider when it has one")
    args = p.parse_args(argv)
    from anoddpm.platform.device import resolve_device

    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(args.model) if args.model else _random_bundle(Path(tmp) / "model.pt", args.preset,
                                                                    args.image_size)
        onnx_path = export_onnx(bundle, Path(tmp) / "model.onnx")
        record = measure(bundle, onnx_path, args.repeats, tuple(args.paper_depths), args.model or "random",
                         args.threads, device)
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
