"""numba kernels behind `noise.cpu` (imported on first use, so `import noise` does not pay for numba).

The pixel loop of a row is branch-free enough for LLVM to vectorise it (AVX2/AVX-512 gathers). The row
kernels are parallel=True only because numba then marks the arrays as not aliasing, which vectorisation
needs; `noise.cpu` runs them with one numba thread per calling thread. Same formulation as `simplex.py`
(7 cube-corner slots masked by region + 2 extra vertices looked up by case), in float64.
"""

import math

import numba
import numpy as np

# Frozen into numba's on-disk cache, which is keyed on this file only: touch this file if they change.
from noise.simplex import _PAD, _ZPAD, NORM2, NORM3, SQUISH2, SQUISH3, STRETCH2, STRETCH3

_OFF = 100.0  # subtracted from attn of vertices the reference skips, so the clamp zeroes them
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
def fractal3_rows(out, start, stop, h, zf, wavelengths, amps, hash3, grad, ext, mid):
    """out[r, :] += sum_o amps[o] * noise3(x / wl_o, y / wl_o, t_f / wl_o), rows r = f * h + y in [start, stop)."""
    w = out.shape[1]
    for r in numba.prange(start, stop):
        f = r // h
        yi = r - f * h
        for o in range(wavelengths.size):
            wl, amp = wavelengths[o], amps[o]
            y, z = yi / wl, zf[f] / wl
            for xi in range(w):  # the vectorised loop
                out[r, xi] += amp * _noise3(xi / wl, y, z, f, hash3, grad, ext, mid)


@_inline
def _vertex2(value, perm, prow, grad2, xsb, ysb, dx, dy):
    """value + max(2 - |d|^2, 0)^4 * (g . d), g hashed from lattice point (xsb, ysb) by perm[prow:prow + 256]."""
    attn = max(2.0 - dx * dx - dy * dy, 0.0)
    attn *= attn
    g = perm[prow + ((perm[prow + (np.int64(xsb) & 255)] + np.int64(ysb)) & 255)] >> 1 & 7
    return value + attn * attn * (grad2[g, 0] * dx + grad2[g, 1] * dy)


@_inline
def _noise2(x, y, perm, prow, grad2):
    """OpenSimplex 2-D at (x, y): (1,0), (0,1), the base corner (0,0)/(1,1) and one extra vertex."""
    so = (x + y) * STRETCH2
    xsb, ysb = math.floor(x + so), math.floor(y + so)
    xins, yins = x + so - xsb, y + so - ysb
    in_sum = xins + yins
    sq = (xsb + ysb) * SQUISH2
    dx0, dy0 = x - (xsb + sq), y - (ysb + sq)
    v = _vertex2(0.0, perm, prow, grad2, xsb + 1, ysb, dx0 - (1 + SQUISH2), dy0 - SQUISH2)
    v = _vertex2(v, perm, prow, grad2, xsb, ysb + 1, dx0 - SQUISH2, dy0 - (1 + SQUISH2))
    # Extra vertex (ox, oy) and base corner (0,0)/(1,1) by region, as selects so the loop vectorises.
    lower = in_sum <= 1.0
    gt = 1.0 if xins > yins else 0.0
    near_lo = 1.0 if 1.0 - in_sum > min(xins, yins) else 0.0
    near_hi = 1.0 if max(xins, yins) > 2.0 - in_sum else 0.0
    ox = 1.0 - 2.0 * near_lo * (1.0 - gt) if lower else 2.0 * near_hi * gt
    oy = 1.0 - 2.0 * near_lo * gt if lower else 2.0 * near_hi * (1.0 - gt)
    base = 0.0 if lower else 1.0
    shift = (ox + oy) * SQUISH2
    v = _vertex2(v, perm, prow, grad2, xsb + ox, ysb + oy, dx0 - (ox + shift), dy0 - (oy + shift))
    bf = base * (1 + 2 * SQUISH2)
    v = _vertex2(v, perm, prow, grad2, xsb + base, ysb + base, dx0 - bf, dy0 - bf)
    return v / NORM2


@_jit
def fractal2_rows(out, start, stop, h, wavelengths, amps, perm, grad2):
    """out[r, :] += sum_o amps[o] * noise2(x / wl_o, y / wl_o), rows r = f * h + y in [start, stop)."""
    w = out.shape[1]
    for r in numba.prange(start, stop):
        f = r // h
        yi = r - f * h
        prow = f * 256
        for o in range(wavelengths.size):
            wl, amp = wavelengths[o], amps[o]
            y = yi / wl
            for xi in range(w):
                out[r, xi] += amp * _noise2(xi / wl, y, perm, prow, grad2)


@numba.njit(nogil=True, cache=True)
def tables3(perm, g3):
    """(hash3 [F*PAD*PAD], grad [F*ZPAD, 3]): the padded 3-D tables of `simplex.Tables`, in one pass."""
    fields = perm.shape[0]
    hash3 = np.empty(fields * _PAD * _PAD, dtype=np.int64)
    grad = np.empty((fields * _ZPAD, 3))
    for f in range(fields):
        p = perm[f]
        for i in range(_PAD):  # lattice x = i - 1
            px = p[(i - 1) & 255]
            row = (f * _PAD + i) * _PAD
            for j in range(_PAD):  # lattice y = j - 1
                hash3[row + j] = p[(px + j - 1) & 255]
        for m in range(_ZPAD):  # final hash m - 1
            grad[f * _ZPAD + m] = g3[p[(m - 1) & 255] % 24]
    return hash3, grad
