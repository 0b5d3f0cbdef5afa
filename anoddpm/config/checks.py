"""Generic checks of config values by type and range, derived from the dataclass fields of anoddpm.config.

Types come from each field's annotation (int, float, bool, str, ``X | None``, ``tuple[int, ...]``), so a
field added later is checked without touching this module. Every number must be finite and >= 0 (no
field of the config means anything negative); ``RANGES`` tightens that for the fields that need it.
Cross-field rules (steps <= depth, tile_stride <= tile_size, ...) stay in ``Config.validate``.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Mapping

# "section.field": (low, high, bounds), bounds "[]" / "[)" / "(]" / "()"; high None = no upper end
RANGES: dict[str, tuple[float, float | None, str]] = {
    "data.val_fraction": (0.0, 1.0, "[)"),
    "model.base_channels": (1, None, "[)"),
    "model.num_res_blocks": (1, None, "[)"),
    "model.num_heads": (1, None, "[)"),
    "model.dropout": (0.0, 1.0, "[)"),
    "model.retrieval_neighbours": (1, 16, "[]"),
    "model.retrieval_images": (2, None, "[)"),
    "diffusion.timesteps": (1, None, "[)"),
    "diffusion.octaves": (1, None, "[)"),
    "diffusion.frequency": (0.0, None, "()"),
    "train.batch_size": (1, None, "[)"),
    "train.lr": (0.0, None, "()"),
    "train.max_steps": (1, None, "[)"),
    "train.max_minutes": (0.0, None, "()"),
    "train.ema_decay": (0.0, 1.0, "[]"),
    "train.prior_fraction": (0.0, 1.0, "[)"),
    "train.adapt_lambda": (0.0, 100.0, "[]"),
    "train.log_every": (1, None, "[)"),
    "train.checkpoint_every": (1, None, "[)"),
    "train.sample_every": (1, None, "[)"),
    "detect.topk": (1, None, "[)"),
    "detect.guidance": (0.0, 100.0, "[]"),
    "detect.memory_size": (1, None, "[)"),
    "detect.threshold_quantile": (0.0, 1.0, "[]"),
    "head.base_channels": (1, None, "[)"),
    "head.batch_size": (1, None, "[)"),
    "head.lr": (0.0, None, "()"),
}


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    if _is_union(hint):
        return " or ".join(_type_name(a) for a in args)
    if typing.get_origin(hint) is tuple:
        return "a list of " + {int: "integers", float: "numbers", str: "texts", bool: "booleans"}.get(args[0], "values")
    return {int: "an integer", float: "a number", bool: "true or false", str: "text", type(None): "null"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _fits(value: Any, hint: Any) -> bool | None:
    """Whether `value` has the annotated type; None when the annotation is one this module does not know."""
    if _is_union(hint):
        verdicts = [_fits(value, a) for a in typing.get_args(hint)]
        return True if True in verdicts else (None if None in verdicts else False)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        return isinstance(value, (list, tuple)) and all(_fits(v, item) is not False for v in value)
    return None


def check_types(cls: type, data: Mapping[str, Any], where: str) -> None:
    """ValueError naming the first field of `data` (a section `where` of the config) whose value does not
    have its annotated type; fields are named as in config files (data.image_size)."""
    hints = typing.get_type_hints(cls)
    prefix = "" if where == "config" else where.removeprefix("config.") + "."
    for name, value in data.items():
        hint = hints.get(name)
        if hint is None:
            continue
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            if value is not None and not isinstance(value, Mapping):
                raise ValueError(f"{prefix}{name} must be a mapping of its fields, got {value!r}")
            continue
        if _fits(value, hint) is False:
            hint_text = " (YAML reads 1e-3 as text: write 1.0e-3)" if hint is float and isinstance(value, str) else ""
            raise ValueError(f"{prefix}{name}={value!r} must be {_type_name(hint)}{hint_text}")


def _in_range(value: float, low: float, high: float | None, bounds: str) -> bool:
    above = value >= low if bounds[0] == "[" else value > low
    below = high is None or (value <= high if bounds[1] == "]" else value < high)
    return above and below


def check_ranges(section_name: str, section: Any) -> None:
    """ValueError naming the first number of a config section that is negative, not finite, or outside RANGES."""
    for f in dataclasses.fields(section):
        value, name = getattr(section, f.name), f"{section_name}.{f.name}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        low, high, bounds = RANGES.get(name, (0, None, "[)"))
        if not math.isfinite(value) or not _in_range(value, low, high, bounds):
            upper = "" if high is None else f", {high}{bounds[1]}"
            allowed = f"at least {low}" if high is None and bounds[0] == "[" else (
                f"greater than {low}" if high is None else f"in {bounds[0]}{low}{upper}")
            raise ValueError(f"{name}={value!r} must be {allowed}")
