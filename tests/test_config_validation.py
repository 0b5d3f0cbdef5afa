"""Config values checked by type and range at the boundary (anoddpm.config.checks), the field named."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from anoddpm.cli import main
from anoddpm.config import Config, load_config_file
from anoddpm.config.checks import check_ranges, check_types


@pytest.mark.parametrize("data, message", [
    ({"data": {"val_fraction": 7}}, r"data\.val_fraction=7 must be in \[0\.0, 1\.0\)"),
    ({"data": {"image_size": "128"}}, r"data\.image_size='128' must be an integer"),
    ({"train": {"batch_size": -3}}, r"train\.batch_size=-3 must be at least 1"),
    ({"train": {"max_steps": 0}}, r"train\.max_steps=0 must be at least 1"),
    ({"train": {"lr": "1e-3"}}, r"train\.lr='1e-3' must be a number \(YAML reads 1e-3 as text"),
    ({"train": {"max_minutes": -1.0}}, r"train\.max_minutes=-1\.0 must be greater than 0"),
    ({"train": {"seed": -1}}, r"train\.seed=-1 must be at least 0"),
    ({"head": {"enabled": "yes"}}, r"head\.enabled='yes' must be true or false"),
    ({"model": {"channel_mults": [1, "2"]}}, r"model\.channel_mults=\[1, '2'\] must be a list of integers or null"),
    ({"detect": {"threshold_quantile": 1.5}}, r"detect\.threshold_quantile=1\.5 must be in \[0\.0, 1\.0\]"),
    ({"diffusion": {"frequency": float("nan")}}, r"diffusion\.frequency=nan"),
    ({"data": "big"}, r"data must be a mapping"),
])
def test_bad_values_name_the_field(data: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Config.from_dict(data).validate()


def test_allowed_values_pass() -> None:
    cfg = Config.from_dict({"train": {"max_minutes": None, "lr": 1, "max_steps": 1},
                            "model": {"channel_mults": [1, 2], "base_channels": None}}).validate()
    assert cfg.train.lr == 1 and cfg.model.channel_mults == (1, 2)


def test_a_field_added_later_is_checked_without_a_table_entry() -> None:
    @dataclass(frozen=True)
    class BackboneConfig:
        name: str = "none"
        layers: tuple[int, ...] = (2, 3)
        feature_weight: float = 1.0
        tile_size: int | None = None

    with pytest.raises(ValueError, match=r"backbone\.tile_size='64' must be an integer or null"):
        check_types(BackboneConfig, {"tile_size": "64"}, "backbone")
    with pytest.raises(ValueError, match=r"backbone\.layers=\['a'\] must be a list of integers"):
        check_types(BackboneConfig, {"layers": ["a"]}, "backbone")
    with pytest.raises(ValueError, match=r"backbone\.feature_weight=-0\.5 must be at least 0"):
        check_ranges("backbone", BackboneConfig(feature_weight=-0.5))
    check_types(BackboneConfig, {"tile_size": 64, "layers": [1], "feature_weight": 2}, "backbone")


def test_cli_and_config_file_errors_are_one_line_before_training(synth_root: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    common = ["train", "--data", str(synth_root), "--category", "synthetic", "--out", str(tmp_path / "run")]
    for extra, field_name in ((["--max-steps", "0"], "train.max_steps"), (["--max-steps", "-5"], "train.max_steps"),
                              (["--batch-size", "-3"], "train.batch_size")):
        assert main([*common, *extra]) == 2
        err = capsys.readouterr().err
        assert field_name in err and len(err.strip().splitlines()) == 1
    config = tmp_path / "cfg.yaml"
    config.write_text("train:\n  batch_size: -3\n")
    with pytest.raises(ValueError, match="train.batch_size=-3"):
        load_config_file(config).validate()
    assert main([*common, "--config", str(config)]) == 2
    assert not (tmp_path / "run" / "model.pt").exists()


@pytest.mark.parametrize("yaml_text, message", [
    ("backbone:\n  name: resnet18\n", r"backbone\.name='resnet18' is not known; choose one of efficientnet_lite0"),
    ("backbone:\n  layers: [3, 9]\n", r"backbone\.layers=\[3, 9\] must be stages of efficientnet_lite0 in 1\.\.7"),
    ("backbone:\n  layers: [5, 5]\n", r"backbone\.layers=\[5, 5\] must be stages .* each once"),
    ("backbone:\n  weights: {missing}\n", r"backbone weights not found: .*missing\.pth \(backbone\.weights\)"),
    ("backbone:\n  weights: {foreign}\n", r"foreign\.pth does not hold efficientnet_lite0 weights"),
    ("train: !!python/object/apply:os.system ['touch {sentinel}']\n", r"cfg\.yaml is not plain YAML"),
    ("data: [1, 2\n", r"cfg\.yaml is not plain YAML"),
])
def test_the_whole_config_is_checked_before_the_first_training_step(synth_root: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture, yaml_text: str,
                                                                    message: str) -> None:
    """An unknown backbone, bad layers, a missing or foreign weights file, a YAML tag: one line, before any work."""
    foreign = tmp_path / "foreign.pth"
    torch.save({"conv.weight": torch.zeros(1)}, foreign)
    sentinel = tmp_path / "executed"
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml_text.format(missing=tmp_path / "missing.pth", foreign=foreign, sentinel=sentinel))
    run = tmp_path / "run"
    assert main(["train", "--data", str(synth_root), "--category", "synthetic", "--out", str(run),
                 "--config", str(config), "--max-steps", "1", "--channels", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and re.search(message, err), err
    assert not run.exists() and not sentinel.exists()  # nothing trained, nothing written, nothing executed


def test_the_training_api_checks_the_backbone_first(synth_root: Path, tmp_path: Path) -> None:
    from anoddpm.training.train import train

    cfg = Config().override("backbone", weights=str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match=r"backbone weights not found: .*missing\.pth"):
        train(cfg, synth_root, "synthetic", tmp_path / "run")
    assert not (tmp_path / "run").exists()
