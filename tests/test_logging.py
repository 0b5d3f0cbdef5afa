"""Logging through `logging` (-q / -v) and the optional TensorBoard mirror of the run log."""
from __future__ import annotations

import json
import logging
import sys
import types

import pytest

from anoddpm.cli.app import configure_logging, main
from anoddpm.training.run_log import RunLog


@pytest.mark.parametrize("flags, shown", [({}, {"info", "warning"}), ({"quiet": True}, {"warning"}),
                                          ({"verbose": True}, {"debug", "info", "warning"})])
def test_verbosity_flags_choose_what_reaches_stderr(capsys, flags, shown):
    configure_logging(**flags)
    configure_logging(**flags)  # idempotent: one handler, each message once
    log = logging.getLogger("anoddpm.somewhere")
    log.debug("debug line")
    log.info("info line")
    log.warning("warning line")
    err = capsys.readouterr().err
    assert {level for level in ("debug", "info", "warning") if f"{level} line" in err} == shown
    assert err.count("warning line") == 1 and "warning: warning line" in err
    configure_logging()


def test_cli_parses_q_and_v_on_every_verb():
    from anoddpm.cli.parser import build_parser

    parser = build_parser()
    assert parser.parse_args(["info", "-q", "m.pt"]).quiet is True
    assert parser.parse_args(["score", "--model", "m", "--input", "i", "--out", "o", "-v"]).verbose is True
    with pytest.raises(SystemExit):
        parser.parse_args(["info", "-q", "-v", "m.pt"])


class _FakeWriter:
    def __init__(self, log_dir: str) -> None:
        self.log_dir, self.scalars, self.closed = log_dir, [], False

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_tensorboard_mirrors_the_run_log(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=_FakeWriter))
    run_log = RunLog(tmp_path, "tensorboard")
    run_log({"step": 10, "loss": 0.5, "lr": 1e-4})
    run_log({"phase": "head", "step": 2, "loss": 0.25})
    run_log({"head_check": {"fused": {"pixel_auroc": 0.75}, "n_good": 4}, "head_kept": True})
    run_log.scalars("calibration", 10, {"image": 0.125, "pixel": 0.0625})
    run_log.close()
    writer = run_log.writer
    assert writer.log_dir == str(tmp_path / "tensorboard") and writer.closed
    assert writer.scalars == [("train/loss", 0.5, 10), ("train/lr", 1e-4, 10), ("head/loss", 0.25, 2),
                              ("train/head_check/fused/pixel_auroc", 0.75, 0), ("train/head_check/n_good", 4.0, 0),
                              ("calibration/image", 0.125, 10), ("calibration/pixel", 0.0625, 10)]
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r.get("step") for r in lines] == [10, 2, None]  # calibration scalars stay out of log.jsonl


def test_tensorboard_without_the_package_is_a_clear_error_before_training(tmp_path, monkeypatch, capsys, synth_root):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as when not installed
    with pytest.raises(ValueError, match="pip install tensorboard"):
        RunLog(tmp_path, "tensorboard")
    code = main(["train", "--data", str(synth_root), "--category", "synthetic", "--out", str(tmp_path / "run"),
                 "--preset", "tiny", "--image-size", "32", "--max-steps", "1", "--logger", "tensorboard"])
    assert code == 2 and "tensorboard package" in capsys.readouterr().err
    assert not (tmp_path / "run" / "log.jsonl").exists()
