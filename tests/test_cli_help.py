"""CLI consistency: every --model/--out says what it is, metavars read as values, info takes --model or PATH."""
from __future__ import annotations

import argparse
import json

import pytest

from anoddpm.cli import main
from anoddpm.cli.parser import build_parser


def _verbs() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_model_and_out_option_has_help():
    for verb, parser in _verbs().items():
        for action in parser._actions:
            if {"--model", "--out", "--data"} & set(action.option_strings):
                assert action.help and len(action.help) > 10, f"{verb} {action.option_strings} has no help"


def test_train_batch_size_metavar_and_evaluate_data_help():
    verbs = _verbs()
    assert "--batch-size N" in verbs["train"].format_help() and "TRAIN_BATCH_SIZE" not in verbs["train"].format_help()
    data = next(a for a in verbs["evaluate"]._actions if "--data" in a.option_strings)
    assert "labelled test set" in data.help and "folder of good images" not in data.help


def test_info_takes_model_or_path(tmp_path, capsys):
    from test_evaluate_cli import make_bundle

    model = make_bundle(tmp_path / "model.pt", tmp_path, "x")
    assert main(["info", "--model", str(model)]) == 0
    by_flag = json.loads(capsys.readouterr().out)
    assert main(["info", str(model)]) == 0
    assert json.loads(capsys.readouterr().out) == by_flag and by_flag["kind"] == "bundle"
    assert main(["info"]) == 2 and "--model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["info", "--model"])
