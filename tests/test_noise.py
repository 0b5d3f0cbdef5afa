"""noise/: exactness against opensimplex, fractal noise properties, make_noise."""

from __future__ import annotations

import os

import numpy as np
import opensimplex
import pytest
import torch

import noise
from noise import cpu
from noise.simplex import Tables, noise3

SEEDS = [0, 1, 42, 2**31 - 1, -123456789]


def _points(n: int, scale: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(3, n, generator=g, dtype=torch.float64) * 2 - 1) * scale


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("scale", [3.0, 1e4])
def test_simplex_pointwise_equals_opensimplex(seed: int, scale: float) -> None:
    p = _points(400, scale, seed & 0xFFFF)
    opensimplex.seed(seed)
    ref2 = np.array([opensimplex.noise2(a, b) for a, b in zip(p[0].tolist(), p[1].tolist())])
    ref3 = np.array([opensimplex.noise3(a, b, c) for a, b, c in zip(*p.tolist())])
    got2 = noise.simplex2(p[0], p[1], seed)
    got3 = noise.simplex3(p[0], p[1], p[2], seed)
    assert got2.dtype == torch.float64 and got3.shape == (400,)
    assert np.abs(got2.numpy() - ref2).max() <= 1e-5
    assert np.abs(got3.numpy() - ref3).max() <= 1e-5
    p32 = p.float()
    opensimplex.seed(seed)
    ref3_32 = np.array([opensimplex.noise3(a, b, c) for a, b, c in zip(*p32.double().tolist())])
    got3_32 = noise.simplex3(p32[0], p32[1], p32[2], seed)
    assert got3_32.dtype == torch.float32
    assert np.abs(got3_32.double().numpy() - ref3_32).max() <= 1e-4


@pytest.mark.parametrize("seed", SEEDS)
def test_simplex_grids_equal_noise_arrays(seed: int) -> None:
    # Grids hit exact ties (x == y, integer lattice coordinates) where the reference's branches matter.
    xs = torch.arange(-24, 24, dtype=torch.float64) / 6
    zs = torch.tensor([-5.0, 0.0, 0.5, 7.25], dtype=torch.float64)
    opensimplex.seed(seed)
    ref2 = opensimplex.noise2array(xs.numpy(), xs.numpy())
    ref3 = opensimplex.noise3array(xs.numpy(), xs.numpy(), zs.numpy())
    got2 = noise.simplex2(xs[None, :], xs[:, None], seed)
    got3 = noise.simplex3(xs[None, None, :], xs[None, :, None], zs[:, None, None], seed)
    assert got2.shape == ref2.shape and got3.shape == ref3.shape
    assert np.abs(got2.numpy() - ref2).max() <= 1e-5
    assert np.abs(got3.numpy() - ref3).max() <= 1e-5
    got2_32 = noise.simplex2(xs[None, :].float(), xs[:, None].float(), seed)
    assert np.abs(got2_32.double().numpy() - ref2).max() <= 1e-4


def test_simplex_noise_deterministic_and_independent_fields() -> None:
    t = torch.tensor([10, 500])
    a = noise.simplex_noise((2, 3, 32, 32), t, octaves=3, generator=torch.Generator().manual_seed(7))
    b = noise.simplex_noise((2, 3, 32, 32), t, octaves=3, generator=torch.Generator().manual_seed(7))
    c = noise.simplex_noise((2, 3, 32, 32), t, octaves=3, generator=torch.Generator().manual_seed(8))
    assert a.shape == (2, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 0.5
    flat = a.reshape(6, -1)
    corr = torch.corrcoef(flat)
    off_diag = corr[~torch.eye(6, dtype=torch.bool)]
    assert off_diag.abs().max() < 0.9  # batch items and channels are different fields


def test_simplex_noise_standardised_and_raw() -> None:
    g = torch.Generator().manual_seed(0)
    n = noise.simplex_noise((3, 2, 48, 48), torch.tensor([0, 250, 999]), generator=g)
    mean = n.mean(dim=(2, 3))
    std = n.std(dim=(2, 3))
    assert torch.allclose(mean, torch.zeros_like(mean), atol=1e-5)
    assert torch.allclose(std, torch.ones_like(std), atol=1e-4)
    raw = noise.simplex_noise((1, 1, 48, 48), None, standardise=False, generator=g)
    assert raw.abs().max() < 5.0 and raw.std() > 0.01


def test_simplex_noise_matches_anoddpm_octave_loop() -> None:
    """Without standardisation one field equals the AnoDDPM octave sum over simplex3 with that field's seed."""
    perm_seed_gen = torch.Generator().manual_seed(3)
    got = noise.simplex_noise((1, 1, 16, 16), torch.tensor([40]), octaves=2, frequency=8.0, standardise=False,
                              generator=perm_seed_gen, dtype=torch.float64)  # fmt: skip
    perm = torch.argsort(torch.rand(1, 256, generator=torch.Generator().manual_seed(3)), dim=1)
    tab = Tables(perm, torch.float64)
    xs = torch.arange(16, dtype=torch.float64)
    want = noise3(xs[None, :] / 8, xs[:, None] / 8, torch.tensor(40 / 8.0), tab)
    want = want + 0.8 * noise3(xs[None, :] / 4, xs[:, None] / 4, torch.tensor(40 / 4.0), tab)
    assert torch.allclose(got[0, 0], want, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_make_noise_kinds_dtype_device(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    s = noise.make_noise("simplex", (2, 1, 16, 16), t=torch.tensor([1, 2]), generator=g, dtype=dtype, octaves=2)
    n = noise.make_noise("gaussian", (2, 1, 16, 16), generator=torch.Generator().manual_seed(1), dtype=dtype)
    assert s.dtype == dtype and n.dtype == dtype and s.device.type == "cpu"
    assert torch.equal(n, torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1), dtype=dtype))
    with pytest.raises(ValueError, match="simplex"):
        noise.make_noise("perlin", (1, 1, 8, 8))
    with pytest.raises(ValueError, match="t must have shape"):
        noise.simplex_noise((2, 1, 8, 8), torch.tensor([1, 2, 3]))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu() -> None:
    xs = torch.arange(-20, 20, dtype=torch.float64) / 3
    cpu = noise.simplex3(xs[None, :], xs[:, None], torch.tensor(0.5, dtype=torch.float64), 42)
    gpu = noise.simplex3(xs[None, :].cuda(), xs[:, None].cuda(), torch.tensor(0.5, device="cuda"), 42)
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-9)
    g = torch.Generator(device="cuda").manual_seed(0)
    t = torch.tensor([3, 4], device="cuda")
    n = noise.make_noise("simplex", (2, 1, 32, 32), t=t, generator=g, device="cuda")
    assert n.device.type == "cuda" and n.shape == (2, 1, 32, 32)


@pytest.mark.parametrize("backend", ["1", "0"])
def test_simplex_noise_same_for_any_thread_count(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU blocks go to a thread pool (numba and torch paths); the result must not depend on the thread count."""
    monkeypatch.setenv("ANODDPM_NOISE_NUMBA", backend)
    t = torch.tensor([5, 700])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = noise.simplex_noise((2, 1, 160, 160), t, octaves=2, generator=torch.Generator().manual_seed(4))
        torch.set_num_threads(2)
        two = noise.simplex_noise((2, 1, 160, 160), t, octaves=2, generator=torch.Generator().manual_seed(4))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


needs_numba = pytest.mark.skipif(not cpu.available(), reason="numba kernels unavailable")


def _field_perm(seed: int) -> np.ndarray:
    """The permutation simplex_noise draws for its first field from Generator().manual_seed(seed)."""
    return torch.argsort(torch.rand(1, 256, generator=torch.Generator().manual_seed(seed)), dim=1)[0].numpy()


@needs_numba
@pytest.mark.parametrize("use_t", [True, False])
def test_cpu_kernels_equal_opensimplex_with_the_fields_permutation(use_t: bool) -> None:
    """One octave of the numba path, pixel by pixel, against opensimplex's own noise2/noise3 with our perm."""
    from opensimplex.internals import _noise2, _noise3

    wl, t = 2.5, 37  # short wavelength: the 24 x 20 grid crosses many cells and hits ties (x == y, lattice points)
    g = torch.Generator().manual_seed(5)
    got = noise.simplex_noise((1, 1, 20, 24), torch.tensor([t]) if use_t else None, octaves=1, frequency=wl,
                              standardise=False, generator=g, dtype=torch.float64)  # fmt: skip
    perm = _field_perm(5).astype(np.int64)
    grad_index = (perm % 24) * 3
    want = np.array([[_noise3(x / wl, y / wl, t / wl, perm, grad_index) if use_t else _noise2(x / wl, y / wl, perm)
                      for x in range(24)] for y in range(20)])  # fmt: skip
    assert np.abs(got[0, 0].numpy() - want).max() <= 1e-12


@needs_numba
@pytest.mark.parametrize("use_t", [True, False])
def test_cpu_kernels_equal_torch_path(use_t: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """numba (default on CPU) and eager torch (ANODDPM_NOISE_NUMBA=0) give the same fields, raw and standardised."""
    t = torch.tensor([3, 640]) if use_t else None

    def both(**kw):
        out = []
        for flag, dtype in (("1", torch.float32), ("1", torch.float64), ("0", torch.float64)):
            monkeypatch.setenv("ANODDPM_NOISE_NUMBA", flag)
            assert cpu.available() == (flag == "1")
            g = torch.Generator().manual_seed(9)
            out.append(noise.simplex_noise((2, 2, 21, 34), t, generator=g, dtype=dtype, **kw))
        return out

    fast32, fast, slow = both(octaves=4, persistence=0.6, frequency=7.5, standardise=False)
    assert (fast - slow).abs().max() <= 1e-12
    assert fast32.dtype == torch.float32 and (fast32 - slow).abs().max() <= 1e-6  # float64 inside, then rounded
    fast32, fast, slow = both()
    assert (fast - slow).abs().max() <= 1e-10 and (fast32 - slow).abs().max() <= 1e-5


def _available_in_child(queue) -> None:
    queue.put(cpu.available())


@needs_numba
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_cpu_kernels_not_used_in_a_forked_child() -> None:
    """numba's GNU OpenMP layer kills a forked child that uses it, so a child falls back to torch."""
    import multiprocessing

    noise.simplex_noise((1, 1, 8, 8), torch.tensor([1]))
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_available_in_child, args=(queue,))
    child.start()
    in_child = queue.get(timeout=60)
    child.join(timeout=60)
    assert cpu.available() and not in_child
