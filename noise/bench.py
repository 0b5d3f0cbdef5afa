"""`python -m noise.bench`: our torch noise vs opensimplex(+numba) on the same grids; prints one JSON line.

Cases: fractal 3-D noise (batch 16, 1 channel, 256x256, 6 octaves, one timestep per sample; the reference
loops octaves x samples over noise3array as AnoDDPM does) and single-octave 2-D noise (256x256,
noise2array). Each timing is the median of `--repeats` runs after one warm-up (numba JIT excluded).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from noise.fractal import simplex_noise


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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


def run(batch: int = 16, size: int = 256, octaves: int = 6, repeats: int = 3) -> dict:
    """Time both implementations on the benchmark grids; returns the JSON-able result dict."""
    import opensimplex

    try:
        import numba  # noqa: F401

        numba_on = True
    except ImportError:
        numba_on = False
    gen = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    t_np = t.numpy().astype(np.float64)
    ours3 = _median_seconds(lambda: simplex_noise((batch, 1, size, size), t, octaves, generator=gen), repeats)
    ref3 = _median_seconds(lambda: _reference_fractal3(opensimplex, size, t_np, octaves, 0.8, 64.0), repeats)
    coords = np.arange(size, dtype=np.float64) / 64.0
    ours2 = _median_seconds(lambda: simplex_noise((1, 1, size, size), None, 1, generator=gen), repeats)
    ref2 = _median_seconds(lambda: opensimplex.noise2array(coords, coords), repeats)
    return {
        "fractal3d": {"shape": [batch, 1, size, size], "octaves": octaves, "ours_s": round(ours3, 4),
                      "ref_s": round(ref3, 4), "ratio_ref_over_ours": round(ref3 / ours3, 3)},
        "single2d": {"shape": [size, size], "ours_s": round(ours2, 5), "ref_s": round(ref2, 5),
                     "ratio_ref_over_ours": round(ref2 / ours2, 3)},
        "numba": numba_on,
        "torch_threads": torch.get_num_threads(),
        "repeats": repeats,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """CLI entry: parse options, run the benchmark, print one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m noise.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--octaves", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch and numba threads (default: theirs)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        import numba

        torch.set_num_threads(args.threads)
        numba.set_num_threads(args.threads)
    print(json.dumps(run(args.batch, args.size, args.octaves, args.repeats)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
