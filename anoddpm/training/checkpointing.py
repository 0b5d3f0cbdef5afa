"""Resumable runs: the checkpoint's RNG state, its validation on --resume, the stop flag set by SIGINT/SIGTERM, and
the run folder's lock (one training per --out)."""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anoddpm.config import Config

CHECKPOINT_FORMAT = 1
BUDGET_FIELDS = ("max_steps", "max_minutes")  # the only train fields a resume may change
LOCK_NAME = "train.lock"  # RUN_DIR/train.lock: "<pid> <host> <process start>" of the training that runs there
_CHECKPOINT_ENTRIES = {"config": dict, "step": int, "model": dict, "ema": dict, "optimizer": dict, "scheduler": dict,
                       "scaler": dict, "sampler": dict, "rng": list, "fingerprint": dict}


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
    """The checkpoint at `path` for a --resume; ValueError naming what differs (config, data, process count) or
    what is malformed."""
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise ValueError(f"{path} is not a readable checkpoint (truncated or corrupted?): {err}") from err
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} is not a checkpoint written by `anoddpm train` (it holds a {type(ckpt).__name__})")
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} has checkpoint format {ckpt.get('format')!r}; this anoddpm reads {CHECKPOINT_FORMAT}")
    _check_structure(path, ckpt)
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


def _check_structure(path: Path, ckpt: dict[str, Any]) -> None:
    """ValueError naming the first entry of a checkpoint that is missing or of the wrong kind."""
    for key, kind in _CHECKPOINT_ENTRIES.items():
        value = ckpt.get(key)
        if key == "sampler" and isinstance(value, dict):
            value = value.get("position")
            key, kind = "sampler.position", int
        if value is None or not isinstance(value, kind) or isinstance(value, bool):
            problem = "lacks" if value is None else "has a malformed"
            raise ValueError(f"--resume: {path} {problem} {key!r} entry; it is not a complete `anoddpm train` "
                             "checkpoint (start a new run with another --out)")


def _process_start(pid: int) -> str:
    """A token that tells a process from a later one with the same id (Linux: its start time), '' elsewhere."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _lock_is_stale(text: str, age_s: float) -> bool:
    """True when the lock's process is gone (same host: no such pid, or a pid reused by a later process)."""
    parts = text.split()
    if len(parts) < 2:
        return age_s > 10.0  # a writer killed between creating the file and writing it; a fresh one is still busy
    if parts[1] != socket.gethostname() or not parts[0].isdigit():
        return False  # another machine's process: it cannot be checked from here
    pid = int(parts[0])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return len(parts) > 2 and parts[2] != _process_start(pid)


def acquire_run_lock(out: Path) -> Path:
    """Create RUN_DIR/train.lock for this process -> its path; ValueError naming the holder when another training
    runs into the same folder. The lock of a process that is gone (killed) is taken over."""
    lock = out / LOCK_NAME
    me = f"{os.getpid()} {socket.gethostname()} {_process_start(os.getpid())}\n"
    for _ in range(5):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                text, age_s = lock.read_text(errors="replace"), time.time() - lock.stat().st_mtime
            except FileNotFoundError:
                continue  # released meanwhile
            if not _lock_is_stale(text, age_s):
                holder = " ".join(text.split()[:2]) or "a starting process"
                raise ValueError(f"{out} is in use by another training (process {holder}, {lock}); wait for it, "
                                 f"choose another --out, or delete {lock} if no training runs there")
            if lock.read_text(errors="replace") == text:  # still the stale one, not a fresh lock of another run
                lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(me)
            handle.flush()
            os.fsync(handle.fileno())
        return lock
    raise ValueError(f"{out}: could not take the run folder's lock {lock} (other trainings keep starting there)")


def release_run_lock(lock: Path) -> None:
    """Remove a lock taken by ``acquire_run_lock`` (only if it is still this process's)."""
    try:
        if lock.read_text(errors="replace").split()[:1] == [str(os.getpid())]:
            lock.unlink()
    except (FileNotFoundError, IndexError):
        pass
