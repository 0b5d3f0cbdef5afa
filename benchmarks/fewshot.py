"""K-shot models against the PatchCore-style peer on the same shots, over several draws, in one run.

    python -m benchmarks.fewshot --data ROOT --category CAT --shots 1,2,4,8 --draws 3 [--init MODEL_PT]
        [--augment diffusion] [--max-steps N] [--out DIR] [--train-args "--preset tiny"] [--skip-peer]
    python -m benchmarks.fewshot --data ROOT --category CAT --shots 4 --draws 3 --base MODEL_PT

For each K of ``--shots`` and each draw d < ``--draws``: ``anoddpm train --shots K --shots-seed d`` (``--init`` and
``--augment`` passed through; fit seconds = training + leave-one-out calibration, in this process), then
``anoddpm evaluate`` on the category's whole test set; and the peer (``benchmarks.peers.run_peer``) with its bank
fitted on the same K files. One JSON line per (k, draw, method): method, category, k, draw, image_auroc,
pixel_auroc, aupro, seconds_per_image, fit_seconds (or "error", one line, and the run goes on: e.g. K = 1 without
derived images). With ``--base`` nothing is trained: ``anoddpm calibrate --model BASE --shots K --shots-seed d --out``
fits every state on the shots (a retrieval-conditioned base retrieves from them); fit seconds = that calibration.
Then one summary line per (k, method): mean and std (over the draws that did not fail) of each
number, with the draws and errors counted. JSON lines go to stdout; the verbs' own output goes to stderr.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from benchmarks.peers import _row, run_peer

DEFAULT_MAX_STEPS = 100  # a benchmark's default training budget per K-shot model (steps)
NUMBERS = ("image_auroc", "pixel_auroc", "aupro", "seconds_per_image", "fit_seconds")


class _Tee(io.TextIOBase):
    """Writes through to `stream` and keeps the text, so a verb's one-line error can be read back."""

    def __init__(self, stream: TextIO) -> None:
        self.stream, self.text = stream, io.StringIO()

    def write(self, text: str) -> int:
        self.stream.write(text)
        return self.text.write(text)

    def flush(self) -> None:
        self.stream.flush()


def run_verb(argv: list[str]) -> str | None:
    """`anoddpm ARGV` in this process (its stdout goes to stderr, keeping stdout for JSON lines) -> None when it
    succeeded, else its error line."""
    from anoddpm.cli import main

    tee = _Tee(sys.stderr)
    with contextlib.redirect_stdout(sys.stderr), contextlib.redirect_stderr(tee):
        try:
            code = main(argv)
        except SystemExit as stop:  # argparse: a flag this anoddpm does not know
            code = stop.code if isinstance(stop.code, int) else 2
    if not code:
        return None
    lines = [line for line in tee.text.getvalue().splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    return (errors or lines or [f"exit code {code}"])[-1].strip()


def toolkit_row(args: argparse.Namespace, category: str, k: int, draw: int, run: Path) -> dict[str, Any]:
    """Train a K-shot model on draw `draw` and evaluate it -> its JSON row (with "error" when a step failed)."""
    extra = ["--category", args.category] if args.category else []
    passed = [*(["--init", args.init] if args.init else []), *(["--augment", args.augment] if args.augment else [])]
    fit_verb = ["train", "--data", args.data, *extra, "--out", str(run / "run"), "--shots", str(k), "--shots-seed",
                str(draw), "--max-steps", str(args.max_steps), "--device", args.device, *passed,
                *args.train_args.split(), "-q"]
    if args.base:
        (run / "run").mkdir(parents=True, exist_ok=True)
        fit_verb = ["calibrate", "--model", args.base, "--data", args.data, *extra, "--shots", str(k),
                    "--shots-seed", str(draw), "--out", str(run / "run" / "model.pt"), "--device", args.device,
                    "--batch-size", str(args.batch_size), "-q"]
    start = time.perf_counter()
    error = run_verb(fit_verb)
    fit = time.perf_counter() - start
    head = {"method": "anoddpm", "category": category, "k": k, "draw": draw, "init": args.init,
            "augment": args.augment, "base": args.base}
    if error is not None:
        return {**head, "error": error}
    report = run / "report"
    error = run_verb(["evaluate", "--model", str(run / "run" / "model.pt"), "--data", args.data, *extra, "--out",
                      str(report), "--device", args.device, "--batch-size", str(args.batch_size), "-q"])
    if error is not None:
        return {**head, "error": error, "fit_seconds": round(fit, 1)}
    metrics = json.loads((report / "metrics.json").read_text())
    row = _row("anoddpm", category, metrics, metrics.get("seconds_per_image") or 0.0, fit)
    return {**head, **{key: row[key] for key in NUMBERS}}


def peer_row(args: argparse.Namespace, category: str, k: int, draw: int) -> dict[str, Any]:
    """The peer with its bank on the same K shots -> its JSON row (with "error" when it failed)."""
    head = {"method": "patchcore_peer", "category": category, "k": k, "draw": draw}
    try:
        metrics, seconds, fit = run_peer(args.data, args.category, seed=draw, shots=k, shots_seed=draw)
    except (ValueError, FileNotFoundError) as err:
        return {**head, "error": " ".join(str(err).split())}
    row = _row("patchcore_peer", category, metrics, seconds, fit)
    return {**head, **{key: row[key] for key in NUMBERS}}


def summary_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (k, method): mean and std (population) over the draws without an error of every number."""
    out = []
    for k, method in dict.fromkeys((r["k"], r["method"]) for r in rows):
        group = [r for r in rows if r["k"] == k and r["method"] == method]
        done = [r for r in group if "error" not in r]
        summary: dict[str, Any] = {"summary": True, "method": method, "category": group[0]["category"], "k": k,
                                   "draws": len(done), "errors": len(group) - len(done)}
        for key in NUMBERS:
            values = [float(r[key]) for r in done if r.get(key) is not None]
            summary[f"{key}_mean"] = round(float(np.mean(values)), 4) if values else None
            summary[f"{key}_std"] = round(float(np.std(values)), 4) if values else None
        out.append(summary)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run every (k, draw) for the toolkit and the peer, print their JSON lines, then the summaries."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.fewshot", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, metavar="ROOT", help="MVTec-style root or category folder")
    p.add_argument("--category", metavar="NAME", help="category folder under ROOT")
    p.add_argument("--shots", default="1,2,4,8", help="comma-separated K values (default 1,2,4,8)")
    p.add_argument("--draws", type=int, default=3, help="draws of the shots per K: --shots-seed 0..draws-1 (default 3)")
    p.add_argument("--init", metavar="MODEL_PT", help="passed to `anoddpm train --init` (a base bundle to fine-tune)")
    p.add_argument("--base", metavar="MODEL_PT", help="no training: `anoddpm calibrate --model BASE --shots K` on each "
                   "draw (e.g. a --condition retrieval model of another product)")
    p.add_argument("--augment", metavar="KIND", help="passed to `anoddpm train --augment` (e.g. diffusion)")
    p.add_argument("--max-steps", type=int, default=DEFAULT_MAX_STEPS,
                   help=f"training steps of each K-shot model (default {DEFAULT_MAX_STEPS}: small, few images)")
    p.add_argument("--train-args", default="", help="further `anoddpm train` flags, e.g. \"--preset tiny\"")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass when evaluating (default 8)")
    p.add_argument("--device", default="auto", help="device of training and evaluation (default auto)")
    p.add_argument("--out", type=Path, help="folder for the runs and reports (default runs/fewshot/CAT/<time>)")
    p.add_argument("--skip-peer", action="store_true", help="only the toolkit")
    args = p.parse_args(argv)
    category = args.category or Path(args.data).name
    out = args.out or Path("runs/fewshot") / category / time.strftime("%Y%m%d-%H%M%S")
    try:
        ks = [int(k) for k in args.shots.split(",") if k.strip()]
    except ValueError:
        p.error(f"--shots {args.shots!r} must be comma-separated integers, e.g. 1,2,4,8")
    rows = []
    for k in ks:
        for draw in range(args.draws):
            rows.append(toolkit_row(args, category, k, draw, out / f"k{k}_draw{draw}"))
            print(json.dumps(rows[-1]), flush=True)
            if not args.skip_peer:
                rows.append(peer_row(args, category, k, draw))
                print(json.dumps(rows[-1]), flush=True)
    for summary in summary_rows(rows):
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
