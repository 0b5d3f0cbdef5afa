"""Images/s of `anoddpm score` local vs --engine ray on the same generated images: one JSON line per engine.

    python -m benchmarks.ray_scoring --model model.pt [--n 200] [--workers 2] [--ray-address ADDR]
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from anoddpm.bundle import load_bundle
from anoddpm.cli import main
from anoddpm.data.synth import make_synthetic_dataset


def _images(root: Path, n: int, size: int) -> Path:
    """`n` generated images of `size` px in one folder (good and defective test images, repeated names avoided)."""
    cat = make_synthetic_dataset(root / "data", category="bench", size=size, n_train=n, n_test_good=1,
                                 n_test_defect=1)
    return cat / "train" / "good"


def run(model: Path, n: int, workers: int, batch_size: int, address: str | None) -> list[dict]:
    """Score the same `n` images with each engine into a fresh --out -> one record per engine."""
    size = load_bundle(model, map_location="cpu").cfg.data.image_size
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = _images(Path(tmp), n, size)
        for engine in ("local", "ray"):
            out = Path(tmp) / engine
            extra = ["--engine", engine, "--workers", str(workers)] + (["--ray-address", address] if address else [])
            start = time.perf_counter()
            code = main(["score", "--model", str(model), "--input", str(folder), "--out", str(out),
                         "--batch-size", str(batch_size), "--device", "cpu", *extra])
            seconds = time.perf_counter() - start
            records.append({"bench": "ray_scoring", "engine": engine, "images": n, "workers": workers,
                            "batch_size": batch_size, "image_size": size, "exit_code": code,
                            "seconds": round(seconds, 3), "images_per_s": round(n / seconds, 2)})
            shutil.rmtree(out)
    return records


def cli() -> None:
    """Parse flags, print one JSON line per engine."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path, help="bundle (model.pt) to score with")
    p.add_argument("--n", type=int, default=200, help="images (default 200)")
    p.add_argument("--workers", type=int, default=2, help="Ray model actors (default 2)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    p.add_argument("--ray-address", help="Ray cluster to join (default: a local Ray)")
    args = p.parse_args()
    for record in run(args.model, args.n, args.workers, args.batch_size, args.ray_address):
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    cli()
