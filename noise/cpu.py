"""Fractal simplex noise on the CPU with numba: the same OpenSimplex formulation as `simplex.py`, per point.

Why: eager torch pays one memory pass per op (~300 ops per point and octave); here the pixel loop of a
row is branch-free enough for LLVM to vectorise it (AVX2/AVX-512 gathers) and rows are spread over
torch.get_num_threads() threads with numba's prange (parallel=True is also what lets LLVM vectorise:
numba then marks the arrays as not aliasing). Computed in float64 whatever the output dtype; tables are
those of `simplex.Tables` (one permutation per field). Compiled once per machine (numba's on-disk cache,
~5 s cold). `available()` is False (callers use the torch path) without numba, after a failure, with
ANODDPM_NOISE_NUMBA=0, or in a process forked after the kernels ran (GNU OpenMP is not fork-safe).
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import torch
from torch import Tensor

from noise.simplex import _EXT3, _MID, _PAD, _ZPAD, NORM2, NORM3, SQUISH2, SQUISH3, STRETCH2, STRETCH3, Tables

try:
    import numba
except ImportError:  # optional: the torch path covers everything
    numba = None

_OFF = 100.0  # subtracted from attn of vertices the reference skips, so the clamp zeroes them
_STATE = {"failed": False, "pid": None}  # pid of the process whose threading layer has started

if numba is not None:
    _jit = numba.njit(parallel=True, nogil=True, cache=True, error_model="numpy")
    _inline = numba.njit(inline="always", error_model="numpy")

    @_inline
    def _vertex3(value, hash3, grad, hrow, zrow, ox, oy, oz, dx0, dy0, dz0, off):
        """value + max(2 - |d|^2 - off, 0)^4 * (g . d) for lattice offset (ox, oy, oz); d = offset position."""
        n = (ox + oy + oz) * SQUISH3
        dx = dx0 - (ox + n)
        dy = dy0 - (oy + n)
        dz = dz0 - (oz + n)
        attn = max(2.0 - dx * dx - dy * dy - dz * dz - off, 0.0)
        attn *= attn
        g = zrow + hash3[hrow + ox * _PAD + oy] + oz
        return value + attn * attn * (grad[g, 0] * dx + grad[g, 1] * dy + grad[g, 2] * dz)

    @_inline
    def _case3(xins, yins, zins, in_sum, mid):
        """Row of the extra-vertex table (see simplex._ext_table3): the reference's region analysis."""
        if in_sum <= 1.0:  # (0,0,0) tetrahedron: closest two of (1,0,0)=1, (0,1,0)=2, (0,0,1)=4
            a_pt, a_sc, b_pt, b_sc = 1, xins, 2, yins
            if xins >= yins:
                if zins > yins:
                    b_pt, b_sc = 4, zins
            elif zins > xins:
                a_pt, a_sc = 4, zins
            wins = 1.0 - in_sum
            if wins > a_sc or wins > b_sc:
                return (b_pt if b_sc > a_sc else a_pt) * 8
            return 64 + (a_pt | b_pt) * 8
        if in_sum >= 2.0:  # (1,1,1) tetrahedron: closest two of (1,1,0)=3, (1,0,1)=5, (0,1,1)=6
            a_pt, a_sc, b_pt, b_sc = 6, xins, 5, yins
            if yins >= xins:
                if yins > zins:
                    b_pt, b_sc = 3, zins
            elif xins > zins:
                a_pt, a_sc = 3, zins
            wins = 3.0 - in_sum
            if a_sc > wins or b_sc > wins:
                return 128 + (b_pt if a_sc > b_sc else a_pt) * 8
            return 192 + (a_pt & b_pt) * 8
        a_sc, a_pt = xins + yins - 1.0, 3  # octahedron: score each pair of opposite edge points
        if a_sc <= 0.0:
            a_sc, a_pt = -a_sc, 4
        b_sc, b_pt = xins + zins - 1.0, 5
        if b_sc <= 0.0:
            b_sc, b_pt = -b_sc, 2
        sc, pt = yins + zins - 1.0, 6
        if sc <= 0.0:
            sc, pt = -sc, 1
        if b_sc >= a_sc:
            if sc > a_sc:
                a_pt = pt
        elif sc > b_sc:
            b_pt = pt
        return mid[a_pt * 8 + b_pt]

    @_inline
    def _noise3(x, y, z, f, hash3, grad, ext, mid):
        """OpenSimplex 3-D at (x, y, z) in field f: 7 cube-corner slots (masked by region) + 2 extra vertices."""
        so = (x + y + z) * STRETCH3
        xs, ys, zs = x + so, y + so, z + so
        xsb, ysb, zsb = math.floor(xs), math.floor(ys), math.floor(zs)
        xins, yins, zins = xs - xsb, ys - ysb, zs - zsb
        in_sum = xins + yins + zins
        sq = (xsb + ysb + zsb) * SQUISH3
        dx0, dy0, dz0 = x - (xsb + sq), y - (ysb + sq), z - (zsb + sq)
        hrow = f * (_PAD * _PAD) + ((np.int64(xsb) & 255) + 1) * _PAD + (np.int64(ysb) & 255) + 1
        zrow = f * _ZPAD + (np.int64(zsb) & 255) + 1
        up = np.int64(in_sum >= 2.0)
        lo_off = 0.0 if in_sum <= 1.0 else _OFF  # lower tetrahedron: no |c| = 2 corners
        up_off = _OFF - _OFF * up  # upper tetrahedron: no |c| = 1 corners
        v = _vertex3(0.0, hash3, grad, hrow, zrow, up, up, up, dx0, dy0, dz0, min(lo_off, up_off))
        one, two = _OFF - up_off, _OFF - lo_off
        v = _vertex3(v, hash3, grad, hrow, zrow, 1, 0, 0, dx0, dy0, dz0, one)
        v = _vertex3(v, hash3, grad, hrow, zrow, 0, 1, 0, dx0, dy0, dz0, one)
        v = _vertex3(v, hash3, grad, hrow, zrow, 0, 0, 1, dx0, dy0, dz0, one)
        v = _vertex3(v, hash3, grad, hrow, zrow, 1, 1, 0, dx0, dy0, dz0, two)
        v = _vertex3(v, hash3, grad, hrow, zrow, 1, 0, 1, dx0, dy0, dz0, two)
        v = _vertex3(v, hash3, grad, hrow, zrow, 0, 1, 1, dx0, dy0, dz0, two)
        c = _case3(xins, yins, zins, in_sum, mid)
        v = _vertex3(v, hash3, grad, hrow, zrow, ext[c, 0], ext[c, 1], ext[c, 2], dx0, dy0, dz0, 0.0)
        v = _vertex3(v, hash3, grad, hrow, zrow, ext[c, 3], ext[c, 4], ext[c, 5], dx0, dy0, dz0, 0.0)
        return v / NORM3

    @_jit
    def _fractal3_rows(out, h, zf, wavelengths, amps, hash3, grad, ext, mid):
        """out[r, :] += sum_o amps[o] * noise3(x / wl_o, y / wl_o, t_f / wl_o) for rows r = f * h + y."""
        w = out.shape[1]
        for r in numba.prange(out.shape[0]):
            f = r // h
            yi = r - f * h
            for o in range(wavelengths.size):
                wl, amp = wavelengths[o], amps[o]
                y, z = yi / wl, zf[f] / wl
                for xi in range(w):  # the vectorised loop
                    out[r, xi] += amp * _noise3(xi / wl, y, z, f, hash3, grad, ext, mid)

    @_inline
    def _vertex2(value, grad2, frow, xsb, ysb, dx, dy):
        """value + max(2 - |d|^2, 0)^4 * (g . d) for lattice point (xsb, ysb) of the field at frow."""
        attn = max(2.0 - dx * dx - dy * dy, 0.0)
        attn *= attn
        g = frow + ((np.int64(xsb) & 255) << 8) + (np.int64(ysb) & 255)
        return value + attn * attn * (grad2[g, 0] * dx + grad2[g, 1] * dy)

    @_inline
    def _noise2(x, y, frow, grad2):
        """OpenSimplex 2-D at (x, y): (1,0), (0,1), the base corner (0,0)/(1,1) and one extra vertex."""
        so = (x + y) * STRETCH2
        xsb, ysb = math.floor(x + so), math.floor(y + so)
        xins, yins = x + so - xsb, y + so - ysb
        in_sum = xins + yins
        sq = (xsb + ysb) * SQUISH2
        dx0, dy0 = x - (xsb + sq), y - (ysb + sq)
        v = _vertex2(0.0, grad2, frow, xsb + 1, ysb, dx0 - (1 + SQUISH2), dy0 - SQUISH2)
        v = _vertex2(v, grad2, frow, xsb, ysb + 1, dx0 - SQUISH2, dy0 - (1 + SQUISH2))
        x_gt_y = xins > yins
        if in_sum <= 1.0:
            base = 0.0
            near = (1.0 - in_sum > xins) or (1.0 - in_sum > yins)
            ox = 1.0 - 2.0 * (near and not x_gt_y)
            oy = 1.0 - 2.0 * (near and x_gt_y)
        else:
            base = 1.0
            near = (xins > 2.0 - in_sum) or (yins > 2.0 - in_sum)
            ox = 2.0 * (near and x_gt_y)
            oy = 2.0 * (near and not x_gt_y)
        shift = (ox + oy) * SQUISH2
        v = _vertex2(v, grad2, frow, xsb + ox, ysb + oy, dx0 - (ox + shift), dy0 - (oy + shift))
        bf = base * (1 + 2 * SQUISH2)
        v = _vertex2(v, grad2, frow, xsb + base, ysb + base, dx0 - bf, dy0 - bf)
        return v / NORM2

    @_jit
    def _fractal2_rows(out, h, wavelengths, amps, grad2):
        """out[r, :] += sum_o amps[o] * noise2(x / wl_o, y / wl_o) for rows r = f * h + y."""
        w = out.shape[1]
        for r in numba.prange(out.shape[0]):
            f = r // h
            yi = r - f * h
            for o in range(wavelengths.size):
                wl, amp = wavelengths[o], amps[o]
                y = yi / wl
                for xi in range(w):
                    out[r, xi] += amp * _noise2(xi / wl, y, f << 16, grad2)


def available() -> bool:
    """True if the numba kernels can be used (numba importable, not disabled, no earlier failure)."""
    if numba is None or _STATE["failed"] or os.environ.get("ANODDPM_NOISE_NUMBA", "1") == "0":
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


def fractal_noise(
    perm: Tensor, h: int, w: int, t: Tensor | None, octaves: int, persistence: float, frequency: float
) -> Tensor | None:
    """Fractal noise [F, h, w] float64 for F fields (perm: int64 [F, 256] on the CPU), t: [F] or None (2-D).

    Returns None (caller falls back to torch) if the kernels fail to compile or run.
    """
    fields = perm.shape[0]
    wavelengths, amps = _octave_arrays(octaves, persistence, frequency)
    out = np.zeros((fields * h, w))
    try:
        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
        _STATE["pid"] = os.getpid()
        if t is None:
            grad2 = Tables(perm, torch.float64, dims=(2,)).grad2.numpy()
            _fractal2_rows(out, h, wavelengths, amps, grad2)
        else:
            tab = Tables(perm, torch.float64, dims=(3,))
            zf = t.to(torch.float64).numpy()
            hash3 = tab.hash3.to(torch.int64).numpy()
            grad = tab.grad3p.T.contiguous().numpy()
            ext = np.array(_EXT3, dtype=np.int64)
            mid = np.array(_MID, dtype=np.int64)
            _fractal3_rows(out, h, zf, wavelengths, amps, hash3, grad, ext, mid)
    except Exception as err:  # a broken numba/LLVM install must not break training: use the torch path
        _STATE["failed"] = True
        warnings.warn(f"numba noise kernels unavailable ({err!r}); using the torch path", RuntimeWarning)
        return None
    return torch.from_numpy(out).view(fields, h, w)
