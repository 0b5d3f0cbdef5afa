"""OpenSimplex (legacy, KdotJPG) 2-D/3-D noise in vectorised torch, value-for-value equal to `opensimplex`.

The reference's per-point branches become case codes and table lookups: in 3-D every point evaluates 9
vertices, the 6 middle cube corners and one (0,0,0)/(1,1,1) slot (masked to its tetrahedron/octahedron
through the attenuation clamp) plus 2 extra vertices looked up by case. Masks are float 0/1 tensors and
selections use lerp, because bool tensors and torch.where are several times slower than arithmetic on CPU.
The lattice hash `perm[(perm[X & 255] + Y) & 255]` is folded into padded per-field tables, so a lattice
point costs one integer gather plus one gradient gather. Tables carry a leading field axis so `fractal.py`
evaluates many independent fields (one permutation each) in a single pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

_GRADIENTS2 = (5, 2, 2, 5, -5, 2, -2, 5, 5, -2, 2, -5, -5, -2, -2, -5)
_GRADIENTS3 = (
    -11, 4, 4, -4, 11, 4, -4, 4, 11,
    11, 4, 4, 4, 11, 4, 4, 4, 11,
    -11, -4, 4, -4, -11, 4, -4, -4, 11,
    11, -4, 4, 4, -11, 4, 4, -4, 11,
    -11, 4, -4, -4, 11, -4, -4, 4, -11,
    11, 4, -4, 4, 11, -4, 4, 4, -11,
    -11, -4, -4, -4, -11, -4, -4, -4, -11,
    11, -4, -4, 4, -11, -4, 4, -4, -11,
)  # fmt: skip
STRETCH2 = -0.211324865405187
SQUISH2 = 0.366025403784439
STRETCH3 = -1.0 / 6
SQUISH3 = 1.0 / 3
NORM2 = 47.0
NORM3 = 103.0
_PAD = 260  # lattice columns -1..258 per axis in the padded 3-D hash table
_ZPAD = 516  # final-hash indices -1..514 in the padded 3-D gradient table
_MASK64 = (1 << 64) - 1
_LCG_MUL = 6364136223846793005
_LCG_INC = 1442695040888963407


def _lcg(state: int) -> int:
    """One step of the reference's 64-bit LCG, wrapped to a signed int64 like ctypes.c_int64."""
    state = (state * _LCG_MUL + _LCG_INC) & _MASK64
    return state - (1 << 64) if state >= 1 << 63 else state


def permutation(seed: int) -> list[int]:
    """The 256-entry permutation opensimplex derives from `seed` (any Python int)."""
    state = seed
    for _ in range(3):
        state = _lcg(state)
    source = list(range(256))
    perm = [0] * 256
    for i in range(255, -1, -1):
        state = _lcg(state)
        r = (state + 31) % (i + 1)
        perm[i] = source[r]
        source[r] = source[i]
    return perm


class Tables:
    """Per-field gather tables (F fields, one permutation each).

    grad2[f*65536 + a*256 + b]: 2-D gradient of lattice point (a, b), hash perm[(perm[a] + b) & 255].
    hash3[f*PAD*PAD + (a+1)*PAD + (b+1)] = perm[(perm[a & 255] + b) & 255] for a, b in [-1, PAD-2];
    grad3p[:, f*ZPAD + m + 1]: 3-D gradient of final hash perm[m & 255] for m = hash3 + Z in [-1, ZPAD-2].
    """

    def __init__(self, perm: Tensor, dtype: torch.dtype, dims: tuple[int, ...] = (2, 3)) -> None:
        """perm: int64 [F, 256] permutations (one per field), on the target device; dims: which tables to build."""
        fields = perm.shape[0]
        device = perm.device
        self.fields = fields
        if 2 in dims:
            j = torch.arange(256, device=device)
            hash2 = torch.gather(perm, 1, ((perm[:, :, None] + j) & 255).reshape(fields, -1))  # [F, 65536]
            g2 = torch.tensor(_GRADIENTS2, dtype=dtype, device=device).reshape(8, 2)
            self.grad2 = g2.index_select(0, (hash2 >> 1 & 7).reshape(-1))  # [F*65536, 2]
        if 3 in dims:
            # Padded copies so a lattice offset in [-1, 2] is a plain index add (no re-wrapping per vertex).
            a = torch.arange(-1, _PAD - 1, device=device) & 255
            padded = torch.gather(perm, 1, a.expand(fields, -1))[:, :, None] + a  # [F, PAD, PAD] = perm[a] + b
            self.hash3 = torch.gather(perm, 1, (padded & 255).reshape(fields, -1)).reshape(-1).to(torch.int32)
            g3 = torch.tensor(_GRADIENTS3, dtype=dtype, device=device).reshape(24, 3)
            m = torch.arange(-1, _ZPAD - 1, device=device) & 255
            final = torch.gather(perm, 1, m.expand(fields, -1)) % 24  # [F, ZPAD] gradient index per final hash
            self.grad3p = g3.index_select(0, final.reshape(-1)).T.contiguous()  # [3, F*ZPAD]


def tables_for_seed(seed: int, device: torch.device | str | None, dtype: torch.dtype) -> Tables:
    """Tables for a single opensimplex seed (F=1)."""
    perm = torch.tensor(permutation(int(seed)), dtype=torch.int64, device=device)[None]
    return Tables(perm, dtype)


def _gt(a: Tensor, b: Tensor | float) -> Tensor:
    """1.0 where a > b else 0.0; float masks because bool tensors and torch.where are ~10x slower on CPU."""
    return torch.gt(a, b, out=torch.empty_like(a))


def _ge(a: Tensor, b: Tensor | float) -> Tensor:
    """1.0 where a >= b else 0.0 (see _gt)."""
    return torch.ge(a, b, out=torch.empty_like(a))


def _le(a: Tensor, b: float) -> Tensor:
    """1.0 where a <= b else 0.0 (see _gt)."""
    return torch.le(a, b, out=torch.empty_like(a))


def _pick(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """a where mask == 1 else b; lerp returns either end bit-exactly for weights 0 and 1."""
    return torch.lerp(b, a, mask)


def _lattice(xsb: Tensor, ysb: Tensor, field: Tensor | None) -> Tensor:
    """Flat index into `grad2` of lattice point (xsb, ysb) in each point's field."""
    idx = ((xsb & 255) << 8) | (ysb & 255)
    return idx if field is None else idx + (field << 16)


def _contrib2(tab: Tables, xsb: Tensor, ysb: Tensor, dx: Tensor, dy: Tensor, field: Tensor | None) -> Tensor:
    attn = (2 - dx * dx - dy * dy).clamp_min_(0)
    attn = attn * attn
    g = tab.grad2.index_select(0, _lattice(xsb, ysb, field).reshape(-1)).reshape(*dx.shape, 2)
    return attn * attn * (g[..., 0] * dx + g[..., 1] * dy)


def noise2(x: Tensor, y: Tensor, tab: Tables, field: Tensor | None = None) -> Tensor:
    """Legacy OpenSimplex 2-D at broadcast (x, y); `field` (int32, broadcastable) selects the table row."""
    x, y = torch.broadcast_tensors(x, y)
    so = (x + y) * STRETCH2
    xsb_f = torch.floor(x + so)
    ysb_f = torch.floor(y + so)
    xins = x + so - xsb_f
    yins = y + so - ysb_f
    sq = (xsb_f + ysb_f) * SQUISH2
    dx0 = x - (xsb_f + sq)
    dy0 = y - (ysb_f + sq)
    xsb = xsb_f.to(torch.int32)
    ysb = ysb_f.to(torch.int32)
    in_sum = xins + yins
    value = _contrib2(tab, xsb + 1, ysb, dx0 - (1 + SQUISH2), dy0 - SQUISH2, field)
    value += _contrib2(tab, xsb, ysb + 1, dx0 - SQUISH2, dy0 - (1 + SQUISH2), field)
    # Extra vertex offset (ox, oy) relative to (xsb, ysb), following the reference's case analysis with
    # float 0/1 masks (bool tensors and torch.where are slow on CPU).
    lower = _le(in_sum, 1)
    x_gt_y = _gt(xins, yins)
    lo_near = torch.maximum(_gt(1 - in_sum, xins), _gt(1 - in_sum, yins))
    hi_near = torch.maximum(_gt(xins, 2 - in_sum), _gt(yins, 2 - in_sum))
    oxf = _pick(lower, 1 - 2 * lo_near * (1 - x_gt_y), 2 * hi_near * x_gt_y)
    oyf = _pick(lower, 1 - 2 * lo_near * x_gt_y, 2 * hi_near * (1 - x_gt_y))
    ox = oxf.to(torch.int32)
    oy = oyf.to(torch.int32)
    base = (1 - lower).to(torch.int32)
    shift = (oxf + oyf) * SQUISH2
    value += _contrib2(tab, xsb + ox, ysb + oy, dx0 - (oxf + shift), dy0 - (oyf + shift), field)
    bf = (1 - lower) * (1 + 2 * SQUISH2)
    value += _contrib2(tab, xsb + base, ysb + base, dx0 - bf, dy0 - bf, field)
    return value / NORM2


def _ext_table3() -> list[list[int]]:
    """Rows [ox0, oy0, oz0, ox1, oy1, oz1] of the two extra vertices, indexed by case*64 + c1*8 + c2."""

    def first_zero_minus(c: int) -> list[int]:
        k = 0 if not c & 1 else 1 if not c & 2 else 2
        return [-1 if i == k else 1 for i in range(3)]

    def first_set_two(c: int) -> list[int]:
        k = 0 if c & 1 else 1 if c & 2 else 2
        return [2 if i == k else 0 for i in range(3)]

    rows = []
    for case in range(7):
        for c1 in range(8):
            for c2 in range(8):
                bx, by, bz = c1 & 1, (c1 >> 1) & 1, (c1 >> 2) & 1
                if case == 0:  # (0,0,0) tetrahedron, origin among the closest two
                    e0 = [1 if bx else -1, 1 if by else (-1 if bx else 0), 1 if bz else 0]
                    e1 = [1 if bx else 0, 1 if by else (0 if bx else -1), 1 if bz else -1]
                elif case == 1:  # (0,0,0) tetrahedron, origin not among the closest two
                    e0 = [bx, by, bz]
                    e1 = [1 if b else -1 for b in (bx, by, bz)]
                elif case == 2:  # (1,1,1) tetrahedron, (1,1,1) among the closest two
                    e0 = [2 if bx else 0, (1 if bx else 2) if by else 0, 1 if bz else 0]
                    e1 = [1 if bx else 0, (2 if bx else 1) if by else 0, 2 if bz else 0]
                elif case == 3:  # (1,1,1) tetrahedron, (1,1,1) not among the closest two
                    e0 = [bx, by, bz]
                    e1 = [2 * bx, 2 * by, 2 * bz]
                elif case == 4:  # octahedron, both closest on the (1,1,1) side
                    e0 = [1, 1, 1]
                    e1 = first_set_two(c1)
                elif case == 5:  # octahedron, both closest on the (0,0,0) side
                    e0 = [0, 0, 0]
                    e1 = first_zero_minus(c1)
                else:  # octahedron, one closest point on each side
                    e0 = first_zero_minus(c1)
                    e1 = first_set_two(c2)
                rows.append(e0 + e1)
    return rows


_EXT3 = _ext_table3()


def _mid_codes() -> list[int]:
    """Octahedron table row per (a_pt * 8 + b_pt): points with two set bits are on the (1,1,1) side."""
    codes = []
    for a in range(8):
        for b in range(8):
            a_far, b_far = a in (3, 5, 6), b in (3, 5, 6)
            if a_far == b_far:
                codes.append(256 + (a & b) * 8 if a_far else 320 + (a | b) * 8)
            else:
                codes.append(384 + (a if a_far else b) * 8 + (b if a_far else a))
    return codes


_MID = _mid_codes()


def _case3(
    xins: Tensor, yins: Tensor, zins: Tensor, in_sum: Tensor, lower: Tensor, upper: Tensor, mid: Tensor
) -> Tensor:
    """Per-point row of the extra-vertex table (float): the reference's branch analysis as arithmetic."""
    # (0,0,0) tetrahedron: the closest two of (1,0,0)=1, (0,1,0)=2, (0,0,1)=4 (the two replacements exclude).
    x_ge_y = _ge(xins, yins)
    rep_b = x_ge_y * _gt(zins, yins)
    rep_a = (1 - x_ge_y) * _gt(zins, xins)
    a_pt = 1 + 3 * rep_a
    a_sc = _pick(rep_a, zins, xins)
    b_pt = 2 + 2 * rep_b
    b_sc = _pick(rep_b, zins, yins)
    wins = 1 - in_sum
    near = torch.maximum(_gt(wins, a_sc), _gt(wins, b_sc))
    closest = _pick(_gt(b_sc, a_sc), b_pt, a_pt)
    code_lo = _pick(near, closest * 8, 64 + (a_pt + b_pt) * 8)  # a_pt | b_pt == a_pt + b_pt here
    # (1,1,1) tetrahedron: the closest two of (1,1,0)=3, (1,0,1)=5, (0,1,1)=6.
    x_le_y = _ge(yins, xins)
    rep_b = x_le_y * _gt(yins, zins)
    rep_a = (1 - x_le_y) * _gt(xins, zins)
    a_pt = 6 - 3 * rep_a
    a_sc = _pick(rep_a, zins, xins)
    b_pt = 5 - 2 * rep_b
    b_sc = _pick(rep_b, zins, yins)
    wins = 3 - in_sum
    near = torch.maximum(_gt(a_sc, wins), _gt(b_sc, wins))
    closest = _pick(_gt(a_sc, b_sc), b_pt, a_pt)
    code_hi = _pick(near, 128 + closest * 8, 192 + (a_pt + b_pt - 7) * 8)  # a_pt & b_pt == a_pt + b_pt - 7
    # Octahedron in between.
    p1 = xins + yins
    a_far = _gt(p1, 1)
    a_sc = _pick(a_far, p1 - 1, 1 - p1)
    a_pt = 4 - a_far
    p2 = xins + zins
    b_far = _gt(p2, 1)
    b_sc = _pick(b_far, p2 - 1, 1 - p2)
    b_pt = 2 + 3 * b_far
    p3 = yins + zins
    p3_far = _gt(p3, 1)
    sc = _pick(p3_far, p3 - 1, 1 - p3)
    p3_pt = 1 + 5 * p3_far
    a_le_b = _ge(b_sc, a_sc)
    rep_a = a_le_b * _gt(sc, a_sc)
    rep_b = (1 - a_le_b) * _gt(sc, b_sc)
    a_pt = _pick(rep_a, p3_pt, a_pt)
    b_pt = _pick(rep_b, p3_pt, b_pt)
    code_mid = mid.index_select(0, (a_pt * 8 + b_pt).to(torch.int32).reshape(-1)).reshape(xins.shape)
    return _pick(lower, code_lo, _pick(upper, code_hi, code_mid))


_EXT_CACHE: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}


def _ext_tables(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(table [10, 448], mid [64]): per case code, rows (lattice add, z add, sx, sy, sz) of both extra vertices.

    One column gather fetches all ten values (cheaper than ten 1-D gathers); the lattice adds are small
    integers, exact in float32. `mid` maps a_pt * 8 + b_pt to the octahedron's case code.
    """
    key = (device, dtype)
    if key not in _EXT_CACHE:
        rows = []
        for e in (0, 3):
            ox, oy, oz = ([row[e + a] for row in _EXT3] for a in range(3))
            n = [(a + b + c) * SQUISH3 for a, b, c in zip(ox, oy, oz)]
            rows += [[a * _PAD + b for a, b in zip(ox, oy)], oz]
            rows += [[a + m for a, m in zip(o, n)] for o in (ox, oy, oz)]
        _EXT_CACHE[key] = (
            torch.tensor(rows, dtype=torch.float64, device=device).to(dtype),
            torch.tensor(_MID, dtype=dtype, device=device),
        )
    return _EXT_CACHE[key]


def _gradient_dot(tab: Tables, lattice: Tensor, zlattice: Tensor, dx: Tensor, dy: Tensor, dz: Tensor) -> Tensor:
    """g . (dx, dy, dz) with g the gradient hashed from lattice point (lattice, zlattice)."""
    h = tab.hash3.index_select(0, lattice)
    g = tab.grad3p.index_select(1, h.add_(zlattice))
    return (g[0] * dx).addcmul_(g[1], dy).addcmul_(g[2], dz)


def _add_vertex(value: Tensor, tab: Tables, lattice: Tensor, zlattice: Tensor, attn: Tensor, d: tuple) -> None:
    """value += max(attn, 0)**4 * (g . d): one vertex's contribution, `attn` = 2 - |d|**2 (overwritten)."""
    attn = attn.clamp_min_(0).square_().square_()
    value.addcmul_(attn, _gradient_dot(tab, lattice, zlattice, *d))


_CORNERS3 = [(i, j, k) for i in (0, 1) for j in (0, 1) for k in (0, 1)]
_OFF = 100.0  # subtracted from attn of corners the reference skips for a point, so the clamp zeroes them


def noise3(x: Tensor, y: Tensor, z: Tensor, tab: Tables, field: Tensor | None = None) -> Tensor:
    """Legacy OpenSimplex 3-D at broadcast (x, y, z); `field` (int32, broadcastable) selects the table row."""
    x, y, z = torch.broadcast_tensors(x, y, z)
    shape = x.shape
    so = (x + y + z) * STRETCH3
    xs, ys, zs = x + so, y + so, z + so
    xsb_f, ysb_f, zsb_f = torch.floor(xs), torch.floor(ys), torch.floor(zs)
    xins, yins, zins = xs - xsb_f, ys - ysb_f, zs - zsb_f
    in_sum = xins + yins + zins
    sq = (xsb_f + ysb_f + zsb_f) * SQUISH3
    d0 = [(c - (cb + sq)).reshape(-1) for c, cb in ((x, xsb_f), (y, ysb_f), (z, zsb_f))]
    xsb = xsb_f.to(torch.int32) & 255
    ysb = ysb_f.to(torch.int32) & 255
    zsb = zsb_f.to(torch.int32) & 255
    base = xsb * _PAD + ysb + (_PAD + 1)
    zbase = zsb + 1
    if field is not None:
        base = base + field * (_PAD * _PAD)
        zbase = zbase + field * _ZPAD
    base = base.reshape(-1)
    zbase = zbase.reshape(-1)
    lower = _le(in_sum, 1)
    upper = _ge(in_sum, 2)
    value = torch.zeros_like(d0[0])
    _add_corners(value, tab, base, zbase, d0, lower.reshape(-1), upper.reshape(-1))
    table, mid = _ext_tables(x.device, x.dtype)
    code = _case3(xins, yins, zins, in_sum, lower, upper, mid).to(torch.int32).reshape(-1)
    ext = table.index_select(1, code)
    for e in range(2):
        lattice, zlattice, sx, sy, sz = ext[5 * e : 5 * e + 5]
        d = (d0[0] - sx, d0[1] - sy, d0[2] - sz)
        attn = (d[0] * d[0]).addcmul_(d[1], d[1]).addcmul_(d[2], d[2]).neg_().add_(2)
        _add_vertex(value, tab, lattice.to(torch.int32).add_(base), zlattice.to(torch.int32).add_(zbase), attn, d)
    return (value / NORM3).reshape(shape)


def _add_corners(value: Tensor, tab: Tables, base: Tensor, zbase: Tensor, d0: list, lower: Tensor, upper: Tensor):
    """Add the cube corners the reference uses: (0,0,0) in the lower tetrahedron, (1,1,1) in the upper one,
    the three |c| = 1 corners outside the upper and the three |c| = 2 corners outside the lower tetrahedron.

    With o = c + |c|/3 the corner's offset, 2 - |d0 - o|**2 = 2 - |d0|**2 - |o|**2 + 2 c.d0 + (2|c|/3) S
    (S = sum of d0, |o|**2 = 0, 2, 6, 12 for |c| = 0..3), so each corner's attn is one add on a shared base;
    skipped corners get -_OFF in the base so the clamp zeroes them. (0,0,0) and (1,1,1) share one slot.
    """
    s = d0[0] + d0[1] + d0[2]
    a = (d0[0] * d0[0]).addcmul_(d0[1], d0[1]).addcmul_(d0[2], d0[2]).neg_().add_(2)
    # (0,0,0) or (1,1,1): at most one of lower/upper is set, so the max picks its attn (or stays negative).
    attn = torch.maximum(a + (lower - 1) * _OFF, torch.add(a, s, alpha=4).sub_(12 + (1 - upper) * _OFF))
    up = upper.to(torch.int32)
    far = upper * 2  # (1,1,1) sits at offset 1 + 3 * SQUISH3 = 2 on every axis
    _add_vertex(value, tab, base + up * (_PAD + 1), zbase + up, attn, tuple(c - far for c in d0))
    base1 = torch.add(a, s, alpha=2 / 3).sub_(upper * _OFF + 2)
    base2 = torch.add(a, s, alpha=2 + 4 / 3).sub_(lower * _OFF + 6)  # + 2 S, minus twice the missing axis
    shifted: dict[tuple[int, float], Tensor] = {}
    for c in _CORNERS3:
        n = sum(c)
        if n == 1:
            attn = torch.add(base1, d0[c.index(1)], alpha=2)
        elif n == 2:
            attn = torch.add(base2, d0[c.index(0)], alpha=-2)
        else:
            continue
        d = []
        for axis, ci in enumerate(c):
            key = (axis, ci + n * SQUISH3)
            if key not in shifted:
                shifted[key] = d0[axis] - key[1]
            d.append(shifted[key])
        _add_vertex(value, tab, base + (c[0] * _PAD + c[1]), zbase + c[2], attn, tuple(d))
