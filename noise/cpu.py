"""Fractal simplex noise on the CPU: drives the numba kernels of `noise._cpu_kernels` over threads.

Why: eager torch pays one memory pass per op (~300 ops per point and octave); the kernels run all octaves
of a pixel row in vectorised registers (5x opensimplex+numba on one thread, see `noise.bench`). Each
kernel call uses one numba thread, and row ranges are spread over torch.get_num_threads() Python threads
(kernels release the GIL): a second OpenMP pool beside torch's makes both spin against each other (tens
of times slower for small fields on a busy 2-core machine). Tables, standardisation and dtype casts stay
in numpy for the same reason (large torch CPU ops start torch's pool). Computed in float64 whatever the
output dtype. Compiled once per machine (numba's on-disk cache, ~10 s cold). `available()` is False
(callers use the torch path) without numba, with ANODDPM_NOISE_NUMBA=0, after a failure, or in a process
forked after the kernels ran (numba's GNU OpenMP layer is not fork-safe).
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from noise.simplex import _EXT3, _GRADIENTS2, _GRADIENTS3, _MID

_MIN_TASK_POINTS = 8192  # pixels per thread task: below this, thread hand-off costs more than it saves
_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}
_HAS_NUMBA = importlib.util.find_spec("numba") is not None
_STATE = {"failed": False, "pid": None}  # pid: the process whose numba threading layer has started


def available() -> bool:
    """True if the numba kernels can be used (numba importable, not disabled, no earlier failure)."""
    if not _HAS_NUMBA or _STATE["failed"] or os.environ.get("ANODDPM_NOISE_NUMBA", "1") == "0":
        return False
    return _STATE["pid"] in (None, os.getpid())


def _octave_arrays(octaves: int, persistence: float, frequency: float) -> tuple[np.ndarray, np.ndarray]:
    """Wavelengths and amplitudes per octave, by the same float recurrences as the torch path."""
    wavelengths, amps = [], []
    f, amplitude = float(frequency), 1.0
    for _ in range(octaves):
        wavelengths.append(f)
        amps.append(amplitude)
        f /= 2
        amplitude *= persistence
    return np.array(wavelengths), np.array(amps)


def _run_rows(kernel, out: np.ndarray, args: tuple) -> None:
    """kernel(out, start, stop, *args) over all rows of out, on up to torch.get_num_threads() threads."""
    import numba

    rows, w = out.shape
    threads = torch.get_num_threads()
    # A few tasks per thread so a thread descheduled on a busy machine does not hold up the rest.
    tasks = max(1, min(rows, 4 * threads if threads > 1 else 1, rows * w // _MIN_TASK_POINTS))
    bounds = [rows * i // tasks for i in range(tasks + 1)]

    def run(i: int) -> None:
        before = numba.get_num_threads()
        numba.set_num_threads(1)  # per calling thread; see the module docstring
        try:
            kernel(out, bounds[i], bounds[i + 1], *args)
        finally:
            numba.set_num_threads(before)

    if tasks == 1:
        run(0)
        return
    with ThreadPoolExecutor(min(threads, tasks)) as pool:
        list(pool.map(run, range(tasks)))


def fractal_noise(
    perm: Tensor, h: int, w: int, t: Tensor | None, octaves: int, persistence: float, frequency: float,
    standardise: bool, dtype: torch.dtype,
) -> Tensor | None:
    """Fractal noise [F, h, w] of `dtype` for F fields (perm: int64 [F, 256], CPU), t: [F] timesteps or None (2-D).

    With `standardise` every field is shifted/scaled to mean 0, std 1 (unbiased). All in numpy/numba:
    torch ops on large CPU tensors would start torch's thread pool, whose barriers cost more than the op
    on a busy machine. Returns None (caller falls back to torch) if the kernels fail to compile or run.
    """
    fields = perm.shape[0]
    wavelengths, amps = _octave_arrays(octaves, persistence, frequency)
    perm_np = perm.numpy()
    out = np.zeros((fields * h, w))
    try:
        from noise import _cpu_kernels as kernels

        _STATE["pid"] = os.getpid()
        if t is None:
            grad2 = np.array(_GRADIENTS2, dtype=np.float64).reshape(8, 2)
            _run_rows(kernels.fractal2_rows, out, (h, wavelengths, amps, perm_np.reshape(-1), grad2))
        else:
            hash3, grad = kernels.tables3(perm_np, np.array(_GRADIENTS3, dtype=np.float64).reshape(24, 3))
            zf = t.to(torch.float64).numpy()
            ext = np.array(_EXT3, dtype=np.int64)
            mid = np.array(_MID, dtype=np.int64)
            _run_rows(kernels.fractal3_rows, out, (h, zf, wavelengths, amps, hash3, grad, ext, mid))
    except Exception as err:  # a broken numba/LLVM install must not break training: use the torch path
        _STATE["failed"] = True
        warnings.warn(f"numba noise kernels unavailable ({err!r}); using the torch path", RuntimeWarning)
        return None
    out = out.reshape(fields, h * w)
    if standardise:
        out -= out.mean(axis=1, keepdims=True)
        out /= np.maximum(out.std(axis=1, ddof=1, keepdims=True), np.finfo(np.float64).tiny)
    np_dtype = _NUMPY_DTYPES.get(dtype)
    result = torch.from_numpy(out) if np_dtype is None else torch.from_numpy(out.astype(np_dtype))
    return result.to(dtype).view(fields, h, w)
