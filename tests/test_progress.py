"""anoddpm.platform.progress: bars on a terminal, a line every LOG_EVERY_S seconds elsewhere, silence with -q."""
from __future__ import annotations

import io
import logging

import pytest
from tqdm import tqdm

from anoddpm.platform import progress as P


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def info_logging(caplog):
    caplog.set_level(logging.INFO, logger="anoddpm.progress")
    return caplog


def test_off_a_terminal_a_long_loop_logs_a_line_every_interval_and_at_the_end(monkeypatch, info_logging):
    clock = _Clock()
    monkeypatch.setattr(P.time, "monotonic", clock)
    monkeypatch.setattr(P.sys, "stderr", io.StringIO())  # a log file, not a terminal
    bar = P.progress(range(100), desc="train", unit="step")
    assert isinstance(bar, P.LogProgress)
    for i in bar:
        clock.now += 1.0  # one step a second: a line at steps 30, 60, 90, then the last one
        bar.set_postfix(loss=0.5)
    lines = [r.getMessage() for r in info_logging.records]
    assert len(lines) == 4
    assert lines[0] == "train: 30/100 step (30 %), 1 step/s, 1:10 left, loss 0.5"
    assert lines[-1] == "train: 100/100 step (100 %), 1 step/s, 1:40 elapsed, loss 0.5"


def test_a_short_loop_off_a_terminal_logs_nothing(monkeypatch, info_logging):
    monkeypatch.setattr(P.sys, "stderr", io.StringIO())
    with P.progress(total=5, desc="calibrate") as bar:
        bar.update(5)
    assert info_logging.records == []


def test_a_terminal_gets_a_bar_and_quiet_gets_nothing(monkeypatch, caplog):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(P.sys, "stderr", Tty())
    caplog.set_level(logging.INFO, logger="anoddpm")
    assert isinstance(P.progress(total=3), tqdm) and not P.progress(total=3).disable
    caplog.set_level(logging.WARNING, logger="anoddpm")
    assert P.progress(total=3).disable  # -q: no bar either
