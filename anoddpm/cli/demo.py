"""`make demo`: the whole flow on generated data in a few minutes on a CPU.

synth -> train (auto-calibrates) -> evaluate (HTML report) -> export ONNX -> inspect with the
ONNX runtime -> summary table. Every step is the public CLI verb a user would type.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from anoddpm.cli.app import main as cli


def _step(title: str, argv: list[str]) -> float:
    print(f"\n=== {title}: anoddpm {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    code = cli(argv)
    if code:
        raise SystemExit(f"demo step '{title}' failed with exit code {code}")
    return time.perf_counter() - start


MARKER = ".anoddpm-demo"  # marks a folder this demo wrote, so a rerun may replace it
OUTPUTS = ("data", "run", "report", "model.onnx", "inspect")


def fresh_demo_folder(out: Path) -> None:
    """Make `out` ready for a run: a folder a previous demo wrote loses its outputs; any other non-empty
    folder is refused (ValueError), so the demo never deletes files it did not write."""
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise ValueError(f"{out} is not empty and was not written by the demo; choose another --out")
        for name in OUTPUTS:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by python -m anoddpm.cli.demo; rerunning the demo replaces this folder's outputs\n")


def run_demo(out: Path, minutes: float, size: int, preset: str, n_train: int, max_steps: int | None = None) -> dict:
    """Run every step into `out`; returns the summary (metrics and seconds per step).

    Training stops at `minutes` or `max_steps`, whichever comes first. A rerun into the same folder replaces
    the previous demo's outputs (``fresh_demo_folder``)."""
    fresh_demo_folder(out)
    data, run, report = out / "data", out / "run", out / "report"
    onnx_path, inspect_dir = out / "model.onnx", out / "inspect"
    seconds = {
        "synth": _step("generate data", ["synth", "--out", str(data), "--category", "demo", "--size", str(size),
                                          "--n-train", str(n_train), "--seed", "0"]),
        "train": _step("train", ["train", "--data", str(data), "--category", "demo", "--out", str(run),
                                 "--image-size", str(size), "--preset", preset, "--max-minutes", str(minutes),
                                 *(["--max-steps", str(max_steps)] if max_steps else [])]),
        "evaluate": _step("evaluate", ["evaluate", "--model", str(run / "model.pt"), "--data", str(data),
                                       "--category", "demo", "--out", str(report)]),
        "export": _step("export", ["export", "--model", str(run / "model.pt"), "--out", str(onnx_path)]),
    }
    samples = sorted((data / "demo" / "test").glob("*/*.png"))[::10][:6]
    seconds["inspect"] = _step("inspect with ONNX Runtime", ["inspect", "--model", str(onnx_path), "--input",
                                                            *map(str, samples), "--out", str(inspect_dir)])
    metrics = json.loads((report / "metrics.json").read_text())
    inspections = [json.loads(line) for line in (inspect_dir / "inspections.jsonl").read_text().splitlines()]
    return {"metrics": metrics, "seconds": seconds, "inspections": inspections,
            "report": str((report / "index.html").resolve())}


def _print_summary(summary: dict) -> None:
    m = summary["metrics"]
    print("\n=== Summary")
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "threshold", "seconds_per_image"):
        value = m.get(key)
        print(f"  {key:<18} {value:.4f}" if isinstance(value, (int, float)) else f"  {key:<18} {value}")
    for step, sec in summary["seconds"].items():
        print(f"  time {step:<13} {sec:7.1f} s")
    print("  ONNX inspections:")
    for rec in summary["inspections"]:
        label = "NG" if rec.get("pred_label") else "OK"
        print(f"    {label}  score={rec.get('pred_score', float('nan')):.4f}  {Path(rec['path']).name}")
    print(f"\nHTML report: {summary['report']}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m anoddpm.cli.demo`."""
    p = argparse.ArgumentParser(prog="python -m anoddpm.cli.demo", description=__doc__)
    p.add_argument("--out", default="demo_out", help="folder for data, run, report, ONNX (default demo_out)")
    p.add_argument("--minutes", type=float, default=4.0, help="training budget in minutes (default 4)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--preset", default="tiny", help="UNet preset (default tiny)")
    p.add_argument("--n-train", type=int, default=60, help="generated training images (default 60)")
    p.add_argument("--max-steps", type=int, help="also stop training after this many steps")
    args = p.parse_args(argv)
    try:
        summary = run_demo(Path(args.out), args.minutes, args.size, args.preset, args.n_train, args.max_steps)
    except ValueError as err:
        print(f"demo: error: {err}", file=sys.stderr)
        return 2
    _print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
