"""Diffusion math: golden schedule values, q_sample, exact DDIM with an oracle, timesteps table."""
import math

import pytest
import torch

from anoddpm.model.diffusion import GaussianDiffusion, make_betas, partial_diffusion_reconstruct, timesteps


def test_linear_betas_and_alphas_cumprod_golden():
    betas = make_betas("linear", 1000)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    diffusion = GaussianDiffusion(1000, "linear")
    for t in (0, 1, 249, 999):
        expected = math.prod(1 - (1e-4 + (0.02 - 1e-4) * s / 999) for s in range(t + 1))
        assert diffusion.alphas_cumprod[t].item() == pytest.approx(expected, rel=1e-5)
    assert diffusion.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4)


def test_linear_schedule_scales_with_T():
    assert make_betas("linear", 100)[-1].item() == pytest.approx(0.2)


def test_cosine_betas_golden():
    betas = make_betas("cosine", 1000)
    alpha_bar = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert betas[0].item() == pytest.approx(1 - alpha_bar(1) / alpha_bar(0), rel=1e-9)
    assert betas.max().item() == pytest.approx(0.999)


def test_bad_schedule_names_parameter():
    with pytest.raises(ValueError, match="beta_schedule"):
        make_betas("quadratic", 10)


def test_q_sample_endpoints_and_batched_t():
    diffusion = GaussianDiffusion(1000)
    x, noise = torch.rand(2, 1, 8, 8) * 2 - 1, torch.randn(2, 1, 8, 8)
    # sqrt(1 - abar_0) = sqrt(1e-4) = 0.01
    torch.testing.assert_close(diffusion.q_sample(x, 0, noise), x, atol=0.0101 * noise.abs().max().item(), rtol=0)
    xt = diffusion.q_sample(x, torch.tensor([0, 999]), noise)
    a = diffusion.alphas_cumprod[999]
    torch.testing.assert_close(xt[1], a.sqrt() * x[1] + (1 - a).sqrt() * noise[1])
    torch.testing.assert_close(diffusion.predict_xstart(xt, torch.tensor([0, 999]), noise), x, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "depth,steps,expected",
    [(250, 10, [249, 224, 199, 174, 149, 124, 99, 74, 49, 24]), (1, 1, [0]), (5, 5, [4, 3, 2, 1, 0]),
     (10, 3, [9, 6, 2]), (250, 1, [249])],
)
def test_timesteps_table(depth, steps, expected):
    assert timesteps(depth, steps) == expected


@pytest.mark.parametrize("depth,steps", [(0, 1), (5, 0), (5, 6)])
def test_timesteps_rejects_bad_values(depth, steps):
    with pytest.raises(ValueError):
        timesteps(depth, steps)


class _Oracle(torch.nn.Module):
    """eps model that knows x_start: returns the exact eps of x_t."""

    def __init__(self, diffusion, x_start):
        super().__init__()
        self.diffusion, self.x_start, self.calls = diffusion, x_start, []

    def forward(self, x, t):
        self.calls.append(t.clone())
        ti = t.long()
        a = self.diffusion.alphas_cumprod[ti].view(-1, 1, 1, 1)
        return (x - a.sqrt() * self.x_start) / (1 - a).sqrt()


def test_ddim_with_oracle_reconstructs_exactly():
    diffusion = GaussianDiffusion(1000)
    x_start = torch.rand(2, 1, 16, 16) * 2 - 1
    oracle = _Oracle(diffusion, x_start)
    out = partial_diffusion_reconstruct(oracle, diffusion, x_start, 250, 10, "ddim", torch.randn_like(x_start))
    torch.testing.assert_close(out, x_start, atol=1e-4, rtol=0)
    assert [c[0].item() for c in oracle.calls] == [float(t) for t in timesteps(250, 10)]


def test_ddim_step_to_x0_is_clipped_pred_xstart():
    diffusion = GaussianDiffusion(1000)
    x_t = torch.full((1, 1, 2, 2), 5.0)
    out = diffusion.ddim_step(x_t, torch.zeros_like(x_t), 10, -1)
    assert out.max().item() == 1.0


def test_ancestral_with_oracle_stays_close_and_uses_given_noise():
    diffusion = GaussianDiffusion(1000)
    x_start = torch.rand(1, 1, 16, 16) * 2 - 1
    drawn = []

    def step_noise(t):
        drawn.append(t)
        return torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(t))

    out = partial_diffusion_reconstruct(
        _Oracle(diffusion, x_start), diffusion, x_start, 20, 1, "ancestral", torch.randn_like(x_start), step_noise
    )
    assert drawn == list(range(19, 0, -1))  # no noise at t=0
    torch.testing.assert_close(out, x_start, atol=1e-4, rtol=0)  # oracle x0 is exact, last step returns it


def test_ancestral_step_golden_mean_and_noise():
    diffusion = GaussianDiffusion(1000)
    x_t, eps, noise = torch.full((1, 1, 1, 1), 0.3), torch.full((1, 1, 1, 1), 0.1), torch.ones(1, 1, 1, 1)
    t = 100
    x0 = (x_t / diffusion.alphas_cumprod[t].sqrt() - (1 / diffusion.alphas_cumprod[t] - 1).sqrt() * eps).clamp(-1, 1)
    mean = diffusion.posterior_mean_coef1[t] * x0 + diffusion.posterior_mean_coef2[t] * x_t
    expected = mean + diffusion.posterior_variance[t].sqrt() * noise
    torch.testing.assert_close(diffusion.ancestral_step(x_t, eps, t, noise), expected)


def test_training_loss_zero_for_oracle_and_l1():
    diffusion = GaussianDiffusion(1000)
    x_start, noise = torch.rand(2, 1, 8, 8) * 2 - 1, torch.randn(2, 1, 8, 8)
    t = torch.tensor([5, 700])
    assert diffusion.training_loss(_Oracle(diffusion, x_start), x_start, t, noise).item() < 1e-8
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    assert diffusion.training_loss(zero, x_start, t, noise, "l1").item() == pytest.approx(noise.abs().mean().item())
