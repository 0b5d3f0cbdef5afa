"""The eps-predicting UNet: residual blocks with a sinusoidal timestep embedding, GroupNorm and
self-attention at chosen feature-map sides.

Only simple ops (conv, GroupNorm, matmul, softmax, nearest upsampling) and no data-dependent
control flow, so ``torch.onnx.export`` traces it; the timestep input is a float tensor.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from anoddpm.config import Config
from anoddpm.model.intensity import condition_inputs


@dataclass(frozen=True)
class Preset:
    """Architecture of one named UNet size; attention sides are feature-map sides in pixels."""

    base_channels: int
    channel_mults: tuple[int, ...]
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]


# Sizes measured with benchmarks/presets.py (128 px, batch 8, 1 channel): tiny 0.27M params /
# 1.0 GMAC per image forward (tests, 32 px), small 3.9M / 2.9 GMAC (~1500 CPU steps in 30 min),
# base 18M / 9.3 GMAC (GPU).
PRESETS: dict[str, Preset] = {
    "tiny": Preset(16, (1, 2, 2), 1, (8,)),
    "small": Preset(16, (1, 2, 4, 8), 2, (16,)),
    "base": Preset(32, (1, 2, 4, 4, 8), 2, (16, 8)),
    # AnoDDPM (Wyatt et al. 2022) at 256 px: ~131M parameters.
    "paper": Preset(128, (1, 1, 2, 2, 4, 4), 2, (32, 16, 8)),
}


def _norm(channels: int) -> nn.GroupNorm:
    # >= 4 channels per group: with one channel per group the norm would erase the timestep shift
    return nn.GroupNorm(math.gcd(32, max(channels // 4, 1)), channels)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding of float timesteps t [B] -> [B, dim] (dim even)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, timestep embedding added in between, 1x1 skip if channels change."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.in_layers = nn.Sequential(_norm(in_channels), nn.SiLU(), conv)
        self.emb_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))
        out_conv = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(out_conv.weight)
        nn.init.zeros_(out_conv.bias)
        self.out_layers = nn.Sequential(_norm(out_channels), nn.SiLU(), nn.Dropout(dropout), out_conv)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x [B, Cin, H, W], emb [B, E] -> [B, Cout, H, W]."""
        h = self.in_layers(x) + self.emb_proj(emb)[:, :, None, None]
        return self.skip(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, residual."""

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"model.num_heads={num_heads} must divide the channel count {channels}")
        self.num_heads = num_heads
        self.head_dim = channels // num_heads
        self.norm = _norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = nn.Conv1d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, C, H, W] -> [B, C, H, W]."""
        _, c, h, w = x.shape
        head_dim = self.head_dim
        qkv = self.qkv(self.norm(x).reshape(-1, c, h * w))
        q, k, v = qkv.reshape(-1, self.num_heads, 3 * head_dim, h * w).split(head_dim, dim=2)
        weights = torch.softmax(q.transpose(2, 3) @ k * head_dim**-0.5, dim=-1)  # [B, heads, HW, HW]
        out = (v @ weights.transpose(2, 3)).reshape(-1, c, h * w)
        return x + self.proj(out).reshape(-1, c, h, w)


class Downsample(nn.Module):
    """Strided 3x3 conv halving H and W."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest x2 upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """A ResBlock optionally followed by attention."""

    def __init__(self, res: ResBlock, attn: AttentionBlock | None) -> None:
        super().__init__()
        self.res = res
        self.attn = attn if attn is not None else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.attn(self.res(x, emb))


class UNet(nn.Module):
    """eps-prediction UNet for square images whose side is divisible by 2**(len(channel_mults)-1)."""

    def __init__(
        self,
        in_channels: int,
        base_channels: int,
        channel_mults: tuple[int, ...],
        num_res_blocks: int,
        attention_resolutions: tuple[int, ...],
        image_size: int,
        num_heads: int = 4,
        dropout: float = 0.0,
        condition_channels: int = 0,
    ) -> None:
        super().__init__()
        factor = 2 ** (len(channel_mults) - 1)
        if image_size % factor:
            raise ValueError(
                f"data.image_size={image_size} must be divisible by {factor} for model.channel_mults={channel_mults}"
            )
        self.in_channels = in_channels
        self.condition_channels = condition_channels  # channels of the conditioning images concatenated to the input
        self.size_multiple = factor  # input sides must be multiples of this
        self.base_channels = base_channels
        emb_dim = 4 * base_channels
        self.time_embed = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.input_conv = nn.Conv2d(in_channels + condition_channels, base_channels, 3, padding=1)

        def attn(ch: int, side: int) -> AttentionBlock | None:
            return AttentionBlock(ch, num_heads) if side in attention_resolutions else None

        self.down = nn.ModuleList()
        skip_channels = [base_channels]
        ch, side = base_channels, image_size
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                out_ch = base_channels * mult
                self.down.append(_Level(ResBlock(ch, out_ch, emb_dim, dropout), attn(out_ch, side)))
                ch = out_ch
                skip_channels.append(ch)
            if level < len(channel_mults) - 1:
                self.down.append(Downsample(ch))
                skip_channels.append(ch)
                side //= 2
        self.mid_res1 = ResBlock(ch, ch, emb_dim, dropout)
        self.mid_attn = AttentionBlock(ch, num_heads)
        self.mid_res2 = ResBlock(ch, ch, emb_dim, dropout)

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(num_res_blocks + 1):
                out_ch = base_channels * mult
                self.up.append(_Level(ResBlock(ch + skip_channels.pop(), out_ch, emb_dim, dropout), attn(out_ch, side)))
                ch = out_ch
            if level > 0:
                self.up.append(Upsample(ch))
                side *= 2
        out_conv = nn.Conv2d(ch, in_channels, 3, padding=1)
        nn.init.zeros_(out_conv.weight)
        nn.init.zeros_(out_conv.bias)
        self.out = nn.Sequential(_norm(ch), nn.SiLU(), out_conv)

    def forward(self, x: Tensor, t: Tensor, condition: Tensor | None = None) -> Tensor:
        """x [B, C, H, W] in [-1, 1], t [B] float timesteps, condition [B, condition_channels, H, W] in [-1, 1]
        (a conditioned UNet only) -> predicted eps [B, C, H, W]."""
        if (condition is None) != (self.condition_channels == 0):
            raise ValueError(f"this UNet takes {self.condition_channels} conditioning channels; "
                             f"got {'none' if condition is None else condition.shape[1]}")
        emb = self.time_embed(timestep_embedding(t, self.base_channels))
        h = self.input_conv(x if condition is None else torch.cat([x, condition], dim=1))
        skips = [h]
        for block in self.down:
            h = block(h, emb)
            skips.append(h)
        h = self.mid_res2(self.mid_attn(self.mid_res1(h, emb)), emb)
        for block in self.up:
            h = block(h if isinstance(block, Upsample) else torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


def resolve_architecture(cfg: Config) -> Preset:
    """The preset named by cfg.model.preset with every explicitly set field overriding it."""
    if cfg.model.preset not in PRESETS:
        raise ValueError(f"model.preset={cfg.model.preset!r} is not allowed; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[cfg.model.preset]
    m = cfg.model
    return Preset(
        base_channels=m.base_channels if m.base_channels is not None else preset.base_channels,
        channel_mults=tuple(m.channel_mults) if m.channel_mults is not None else preset.channel_mults,
        num_res_blocks=m.num_res_blocks if m.num_res_blocks is not None else preset.num_res_blocks,
        attention_resolutions=(
            tuple(m.attention_resolutions) if m.attention_resolutions is not None else preset.attention_resolutions
        ),
    )


def build_unet(cfg: Config) -> UNet:
    """UNet for cfg.data (channels, image_size) with the cfg.model preset plus explicit overrides."""
    arch = resolve_architecture(cfg)
    return UNet(
        in_channels=cfg.data.channels,
        base_channels=arch.base_channels,
        channel_mults=arch.channel_mults,
        num_res_blocks=arch.num_res_blocks,
        attention_resolutions=arch.attention_resolutions,
        image_size=cfg.data.input_side,
        num_heads=cfg.model.num_heads,
        dropout=cfg.model.dropout,
        condition_channels=condition_channels(cfg),
    )


def condition_channels(cfg: Config) -> int:
    """Input channels the UNet of cfg takes besides the image: k neighbour images of data.channels each when
    model.condition is 'retrieval', else 0."""
    return cfg.model.retrieval_neighbours * cfg.data.channels if cfg.model.condition == "retrieval" else 0


def bind_condition(model: Callable[..., Tensor], condition: Tensor | None, cfg: Config) -> Callable[..., Tensor]:
    """`model` (x, t) -> eps bound to the retrieved neighbours `condition` [B, k * C, S, S] in [0, 1], mapped to the
    model's space (``intensity.condition_inputs``); `model` itself when `condition` is None."""
    if condition is None:
        return model
    return functools.partial(model, condition=condition_inputs(condition, cfg.data.channels, cfg.data.intensity))
