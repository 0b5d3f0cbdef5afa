"""Float vs INT8 inspection graphs of one bundle: latency at batch 1 and 8 and test-set quality, in one run.

    python -m benchmarks.int8 --model RUN/model.pt --data ROOT --category C [--threads 2] [--out DIR]

Exports the bundle twice (`anoddpm export`, then with `--quantize int8`), runs both files through the line
runtime (``deploy.runtime.Inspector``, CPU provider) on the category's labelled test set and on timing batches.
One JSON line per graph (image / pixel AUROC, AUPRO, false-alarm rate of the good test images at the graph's own
threshold, median ms per batch of 1 and 8, file MB, the export's synthetic-anomaly check) and one line of INT8 / float
ratios. Timings interleave the two graphs in ROUNDS rounds. The export's quality check is lifted here, so the loss it
would refuse is measured.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from anoddpm.bundle import load_bundle
from anoddpm.data.datasets import load_test_set
from deploy import quantize
from deploy.export import export_onnx
from deploy.runtime import Inspector
from eval.metrics import compute_metrics

BATCHES = (1, 8)
ROUNDS = 3  # interleaved timing rounds of both graphs


def latency_ms(inspector: Inspector, batch: int, repeats: int) -> float:
    """Median milliseconds of one `batch`-image forward pass (after one warm-up pass)."""
    rng = np.random.default_rng(0)
    x = rng.random((batch, inspector.channels, inspector.input_side, inspector.input_side), dtype=np.float32)
    inspector.run(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        inspector.run(x)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def quality(inspector: Inspector, samples: list) -> dict[str, Any]:
    """Test-set metrics of the graph at its own threshold, and the share of good test images it flags."""
    scores, maps = [], []
    for start in range(0, len(samples), inspector.batch_size):
        chunk = samples[start:start + inspector.batch_size]
        if inspector.tile_size:
            scored = [inspector.score_image(s.image) for s in chunk]
            maps += [m for m, _ in scored]
            scores += [s for _, s in scored]
        else:
            amap, score = inspector.run(np.stack([s.image for s in chunk]))
            maps += list(amap)
            scores += list(score)
    labels = np.array([s.label for s in samples])
    scores_arr = np.asarray(scores, np.float64)
    metrics = compute_metrics(scores_arr, labels, np.stack(maps), np.stack([s.mask for s in samples]),
                              image_threshold=inspector.image_threshold, pixel_threshold=inspector.pixel_threshold)
    good = labels == 0
    metrics["good_flagged"] = float(np.mean(scores_arr[good] > inspector.image_threshold)) if good.any() else None
    return metrics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path, help="calibrated bundle (model.pt)")
    p.add_argument("--data", required=True, help="dataset root with the labelled test set")
    p.add_argument("--category", help="category folder under ROOT")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: its choice)")
    p.add_argument("--repeats", type=int, default=10, help="timed passes per batch size and round (default 10; 3 "
                   "interleaved rounds)")
    p.add_argument("--out", type=Path, default=Path("runs/int8"), help="folder for the two ONNX files")
    args = p.parse_args(argv)
    quantize.QUALITY_TOLERANCE = float("inf")  # measure the loss the export's own check would refuse
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = load_bundle(args.model).cfg
    samples = load_test_set(cfg, args.data, args.category)
    rows, inspectors = {}, {}
    for name, mode in (("float", "none"), ("int8", "int8")):
        start = time.perf_counter()
        path = export_onnx(args.model, args.out / f"{name}.onnx", quantize=mode)
        export_s = time.perf_counter() - start
        inspector = Inspector(path, providers=["CPUExecutionProvider"], batch_size=max(BATCHES), threads=args.threads)
        inspectors[name] = inspector
        rows[name] = {"graph": name, "category": args.category, "export_s": round(export_s, 1),
                      "int8_check": inspector.metadata["threshold"].get("int8_check"),
                      "mb": round(path.stat().st_size / 1e6, 2), "threshold": inspector.image_threshold,
                      **quality(inspector, samples)}
    times: dict[tuple[str, int], list[float]] = {(n, b): [] for n in inspectors for b in BATCHES}
    for _ in range(ROUNDS):  # interleaved: drift and other load hit both graphs alike
        for name, inspector in inspectors.items():
            for b in BATCHES:
                times[name, b].append(latency_ms(inspector, b, args.repeats))
    for name, row in rows.items():
        row.update({f"ms_b{b}": round(statistics.median(times[name, b]), 2) for b in BATCHES})
        print(json.dumps(row), flush=True)
    f, q = rows["float"], rows["int8"]
    print(json.dumps({"ratio": "int8/float", "category": args.category,
                      **{f"speedup_b{b}": round(f[f"ms_b{b}"] / q[f"ms_b{b}"], 2) for b in BATCHES},
                      **{f"{k}_change": None if f.get(k) is None or q.get(k) is None else round(q[k] - f[k], 4)
                         for k in ("image_auroc", "pixel_auroc", "aupro")}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
