"""`python -m noise.bench`: our noise vs opensimplex(+numba) on the same grids; prints one JSON line.

Cases: fractal 3-D noise (batch 16, 1 channel, 256x256, 6 octaves, one timestep per sample; the reference
loops octaves x samples over noise3array as AnoDDPM does) and single-octave 2-D noise (256x256,
noise2array). Each figure is the median of `--repeats` runs after one warm-up (numba JIT excluded), as wall
seconds and process CPU seconds: the machine may be shared, so compare ratios within one run. Ours is timed
with 1 torch thread and with the default thread count. The reference runs with one numba thread:
noise3array parallelises over z only (one z per call here), yet with more numba threads each call still
starts an OpenMP team, which on a busy machine costs 2-3x (it would flatter our ratio).
`backend` says which CPU path ran (numba kernels of noise.cpu, or eager torch); `ours_warmup_s` is our
first call in this process (numba compile, or loading it from numba's disk cache), `cold_compile_s` the
same in a fresh process with an empty numba cache (the one-off cost on a new machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch

from noise import cpu
from noise.fractal import simplex_noise

_COLD_SNIPPET = """
import time, torch
from noise.fractal import simplex_noise
start = time.perf_counter()
simplex_noise((1, 1, 8, 8), torch.tensor([1]))
simplex_noise((1, 1, 8, 8), None)
print(time.perf_counter() - start)
"""


def _median_seconds(fn: Callable[[], object], repeats: int) -> dict[str, float]:
    """Median wall and process-CPU seconds of `repeats` calls after one warm-up."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return {"wall_s": round(statistics.median(wall), 5), "cpu_s": round(statistics.median(cpu), 5)}


def _reference_fractal3(opensimplex, size: int, t: np.ndarray, octaves: int, persistence: float, frequency: float):
    out = np.zeros((len(t), size, size))
    coords = np.arange(size, dtype=np.float64)
    for b, tb in enumerate(t):
        opensimplex.seed(b)
        f, amplitude = frequency, 1.0
        for _ in range(octaves):
            out[b] += amplitude * opensimplex.noise3array(coords / f, coords / f, np.array([tb / f]))[0]
            f /= 2
            amplitude *= persistence
    return out


def _cold_compile_seconds() -> float | None:
    """Seconds of the first 3-D + 2-D calls in a fresh process with an empty numba cache (None: no numba)."""
    if not cpu.available():
        return None
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        cmd = [sys.executable, "-c", _COLD_SNIPPET]
        done = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, check=True)
    return round(float(done.stdout.split()[-1]), 3)


def _ratios(ref: dict[str, float], ours: dict[str, float]) -> dict[str, float]:
    """ref / ours for wall and CPU time (> 1: ours is faster)."""
    return {f"ratio_{k}": round(ref[k] / ours[k], 3) for k in ("wall_s", "cpu_s")}


def _single_threaded(fn: Callable[[], object]) -> Callable[[], object]:
    """fn run with one numba thread (the reference's parallel=True loops otherwise start an OpenMP team)."""
    try:
        import numba
    except ImportError:
        return fn

    def run() -> object:
        before = numba.get_num_threads()
        numba.set_num_threads(1)
        try:
            return fn()
        finally:
            numba.set_num_threads(before)

    return run


def _case(ours: Callable[[], object], ref: Callable[[], object], repeats: int, threads: int) -> dict:
    """Time the reference (one numba thread) once and ours at 1 thread and at `threads` threads."""
    result = {"ref": _median_seconds(_single_threaded(ref), repeats)}
    for label, n in (("ours_1thread", 1), ("ours_default_threads", threads)):
        torch.set_num_threads(n)
        timing = _median_seconds(ours, repeats)
        result[label] = {**timing, **_ratios(result["ref"], timing)}
    torch.set_num_threads(threads)
    return result


def run(batch: int = 16, size: int = 256, octaves: int = 6, repeats: int = 3) -> dict:
    """Time both implementations on the benchmark grids; returns the JSON-able result dict."""
    import opensimplex

    try:
        import numba  # noqa: F401

        numba_on = True
    except ImportError:
        numba_on = False
    threads = torch.get_num_threads()
    gen = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    t_np = t.numpy().astype(np.float64)
    coords = np.arange(size, dtype=np.float64) / 64.0
    start = time.perf_counter()
    simplex_noise((batch, 1, size, size), t, octaves, generator=gen)
    simplex_noise((1, 1, size, size), None, 1, generator=gen)
    warmup = round(time.perf_counter() - start, 3)
    fractal3d = _case(
        lambda: simplex_noise((batch, 1, size, size), t, octaves, generator=gen),
        lambda: _reference_fractal3(opensimplex, size, t_np, octaves, 0.8, 64.0),
        repeats,
        threads,
    )
    single2d = _case(
        lambda: simplex_noise((1, 1, size, size), None, 1, generator=gen),
        lambda: opensimplex.noise2array(coords, coords),
        repeats,
        threads,
    )
    return {
        "fractal3d": {"shape": [batch, 1, size, size], "octaves": octaves, **fractal3d},
        "single2d": {"shape": [size, size], **single2d},
        "numba": numba_on,
        "backend": "numba" if cpu.available() else "torch",
        "ours_warmup_s": warmup,
        "cold_compile_s": _cold_compile_seconds(),
        "ref_threads": 1,
        "ref_note": "opensimplex noise*array (numba) run with numba.set_num_threads(1)",
        "torch_default_threads": threads,
        "ratio_at_default_threads_cpu": fractal3d["ours_default_threads"]["ratio_cpu_s"],
        "ratio_at_default_threads_wall": fractal3d["ours_default_threads"]["ratio_wall_s"],
        "repeats": repeats,
    }


def main(argv: list[str] | None = None) -> int:
    """CLI entry: parse options, run the benchmark, print one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m noise.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--octaves", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="default torch thread count (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(json.dumps(run(args.batch, args.size, args.octaves, args.repeats)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
