"""Config: round trips, file loading, flag overrides, validation errors, docs/usage.md reference table."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from anoddpm.cli.parser import build_parser, resolve_train_config
from anoddpm.config import Config, load_config_file
from anoddpm.config.reference import reference_markdown

USAGE = Path(__file__).resolve().parents[1] / "docs" / "usage.md"


def test_dict_round_trip_and_json():
    cfg = Config().override("model", preset="tiny", channel_mults=[1, 2]).override("detect", depth=50)
    again = Config.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert again.model.channel_mults == (1, 2)


def test_unknown_keys_are_named():
    with pytest.raises(ValueError, match="detect.*deepth"):
        Config.from_dict({"detect": {"deepth": 3}})


@pytest.mark.parametrize("section, field, value, pattern", [
    ("data", "channels", 2, "data.channels"),
    ("data", "image_size", 100, "data.image_size"),
    ("data", "train_crop", 12, "data.train_crop"),
    ("data", "train_crop", 136, "data.train_crop"),
    ("detect", "depth", 0, "detect.depth"),
    ("detect", "steps", 300, "detect.steps"),
    ("detect", "sampler", "euler", "detect.sampler"),
    ("model", "preset", "huge", "model.preset"),
    ("diffusion", "t_min_fraction", 0.1, "diffusion.t_min_fraction"),
    ("diffusion", "t_min_fraction", -0.01, "diffusion.t_min_fraction"),
])
def test_validation_names_the_field(section, field, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        Config().override(section, **{field: value}).validate()


def test_config_file_then_flags_override(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("data:\n  image_size: 64\ntrain:\n  lr: 0.001\n  seed: 5\n")
    assert load_config_file(path).data.image_size == 64
    args = build_parser().parse_args(["train", "--data", "x", "--out", "y", "--config", str(path), "--seed", "7"])
    cfg = resolve_train_config(args)
    assert (cfg.data.image_size, cfg.train.lr, cfg.train.seed) == (64, 0.001, 7)
    assert not cfg.head.enabled  # the default, which neither the file nor a flag changed


@pytest.mark.parametrize("flag, enabled", [(["--head"], True), (["--no-head"], False), ([], False)])
def test_head_flag_overrides_the_config_file(tmp_path, flag, enabled):
    path = tmp_path / "cfg.yaml"
    path.write_text("head:\n  enabled: false\n")
    args = build_parser().parse_args(["train", "--data", "x", "--out", "y", "--config", str(path), *flag])
    assert resolve_train_config(args).head.enabled is enabled


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_config_file(tmp_path / "nope.json")


def test_usage_reference_table_matches_dataclasses():
    assert reference_markdown() in USAGE.read_text(), (
        "docs/usage.md configuration table is out of date: paste `python -m anoddpm.config.reference`")
