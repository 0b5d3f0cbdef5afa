"""Choosing the torch device from a user string."""
from __future__ import annotations

import torch


def resolve_device(name: str | None = "auto") -> torch.device:
    """'auto' -> CUDA when available else CPU; otherwise the named device (ValueError if unusable)."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r} is not a device name (auto, cpu, cuda, cuda:N)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r} asked for CUDA but torch sees no CUDA device")
    return device
