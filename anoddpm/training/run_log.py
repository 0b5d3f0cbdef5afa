"""A training run's scalar log: RUN_DIR/log.jsonl, mirrored to TensorBoard with ``--logger tensorboard``.

Every record goes to log.jsonl as it is (one strict JSON line, fsynced; a number that is not finite is written as
``null``). With TensorBoard its numeric fields
become scalars ``<phase>/<field>`` at the record's ``step`` (phase ``train`` unless the record names one,
e.g. ``head``); nested dicts are flattened (``train/head_check/fused/pixel_auroc``). ``scalars`` writes
TensorBoard-only figures (the calibration: ``calibration/image``, ``calibration/pixel``, ...). The event files go to
RUN_DIR/tensorboard (``tensorboard --logdir RUN_DIR``). TensorBoard is optional: asking for it without the
``tensorboard`` package installed is a ValueError saying so, before training starts.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

from anoddpm.platform.atomic import append_jsonl

LOGGERS = ("none", "tensorboard")


def _tensorboard_writer(log_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # torch.utils.tensorboard needs the separate tensorboard package
        raise ValueError("--logger tensorboard needs the tensorboard package, which is not installed "
                         "(pip install tensorboard), or use --logger none") from err
    return SummaryWriter(log_dir=str(log_dir))


def _strict(value: Any) -> Any:
    """`value` with every float that is not finite replaced by None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def _scalars(record: dict[str, Any], prefix: str) -> Iterator[tuple[str, float]]:
    for key, value in record.items():
        if isinstance(value, dict):
            yield from _scalars(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            yield f"{prefix}{key}", float(value)


class RunLog:
    """Append records to RUN_DIR/log.jsonl (and TensorBoard when `logger` is 'tensorboard')."""

    def __init__(self, run_dir: str | Path, logger: str = "none") -> None:
        if logger not in LOGGERS:
            raise ValueError(f"--logger {logger!r} is not allowed; choose one of {', '.join(LOGGERS)}")
        self.path = Path(run_dir) / "log.jsonl"
        self.writer = _tensorboard_writer(Path(run_dir) / "tensorboard") if logger == "tensorboard" else None

    def __call__(self, record: dict[str, Any]) -> None:
        """Write one record (a dict of JSON values; ``step`` int and ``phase`` str optional)."""
        append_jsonl(self.path, _strict(record))
        if self.writer is not None:
            phase, step = str(record.get("phase", "train")), int(record.get("step", 0))
            fields = {k: v for k, v in record.items() if k != "phase"}
            for tag, value in _scalars(fields, f"{phase}/"):
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()

    def scalars(self, phase: str, step: int, values: dict[str, Any]) -> None:
        """TensorBoard only (log.jsonl keeps one line per optimizer step): e.g. the calibration figures."""
        if self.writer is not None:
            for tag, value in _scalars(values, f"{phase}/"):
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()

    def close(self) -> None:
        """Flush and close the TensorBoard writer, if any."""
        if self.writer is not None:
            self.writer.close()
