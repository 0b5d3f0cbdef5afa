"""Resumable runs: the checkpoint's RNG state, its validation on --resume, and the stop flag set by SIGINT/SIGTERM."""
from __future__ import annotations

import hashlib
import json
import random
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anoddpm.config import Config

CHECKPOINT_FORMAT = 1
BUDGET_FIELDS = ("max_steps", "max_minutes")  # the only train fields a resume may change


def rng_state(noise_gen: torch.Generator, device: torch.device) -> dict[str, Any]:
    """Every generator a run draws from (python, numpy, torch, the noise generator, CUDA), as builtins and tensors."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)],  # builtins: weights_only loads it
        "torch": torch.get_rng_state(),
        "noise": noise_gen.get_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], noise_gen: torch.Generator, device: torch.device) -> None:
    """Restore what ``rng_state`` saved."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    noise_gen.set_state(state["noise"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _config_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    diffs = []
    for section in sorted(set(saved) | set(current)):
        a, b = saved.get(section, {}), current.get(section, {})
        for key in sorted(set(a) | set(b)):
            if section == "train" and key in BUDGET_FIELDS:
                continue
            if a.get(key) != b.get(key):
                diffs.append(f"{section}.{key} (checkpoint {a.get(key)!r}, now {b.get(key)!r})")
    return diffs


class StopFlag:
    """Set by SIGINT/SIGTERM so the loop saves a checkpoint and exits cleanly."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """Hex SHA-256 of the weights, key by key (DDP tests: every rank ends identical)."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        h.update(k.encode())
        h.update(state_dict[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def load_checkpoint(path: Path, cfg: Config, fingerprint: dict[str, Any], world: int) -> dict[str, Any]:
    """The checkpoint at `path` for a --resume; ValueError naming what differs (config, data, process count)."""
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise ValueError(f"{path} is not a readable checkpoint (truncated or corrupted?): {err}") from err
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} has checkpoint format {ckpt.get('format')!r}; this anoddpm reads {CHECKPOINT_FORMAT}")
    try:  # fields added since the checkpoint was written take their defaults, which keep the old behaviour
        saved = Config.from_dict(ckpt["config"]).to_dict()
    except (ValueError, TypeError) as err:
        raise ValueError(f"--resume: {path} holds a config this anoddpm cannot read: {err}") from err
    diffs = _config_diff(saved, cfg.to_dict())
    if diffs:
        raise ValueError(f"--resume: the config differs from {path} in {'; '.join(diffs)}; only --max-steps and "
                         "--max-minutes may change when resuming (use another --out for a new run)")
    if ckpt["fingerprint"] != json.loads(json.dumps(fingerprint, default=str)):
        raise ValueError(f"--resume: the training data differs from the data {path} was trained on")
    if len(ckpt["rng"]) != world:
        raise ValueError(f"--resume: {path} was written by {len(ckpt['rng'])} process(es), now {world}; "
                         "resume with the same --nproc_per_node")
    return ckpt
