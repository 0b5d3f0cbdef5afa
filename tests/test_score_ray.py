"""`anoddpm score --engine ray`: same rows, scores, errors, maps and resume as local scoring (local Ray, 2 CPUs)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_score_cli import _rows, _score, setup  # noqa: F401 - the module-scoped tiny bundle and inputs

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_session() -> None:
    """One local Ray for the module, shut down after."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def both(setup: tuple[Path, Path], ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(local out dir, ray out dir) of the same inputs with --save-maps; two unreadable files -> exit 1 each."""
    inputs, model = setup
    tmp = tmp_path_factory.mktemp("ray")
    _score(model, [inputs], tmp / "local", "--save-maps", code=1)
    _score(model, [inputs], tmp / "ray", "--save-maps", "--engine", "ray", "--workers", "2", code=1)
    return tmp / "local", tmp / "ray"


def test_ray_rows_and_scores_match_local(both: tuple[Path, Path]) -> None:
    local, rayed = (_rows(d / "scores.csv") for d in both)
    assert len(rayed) == 18 and [r["path"] for r in rayed] == [r["path"] for r in local]
    for a, b in zip(local, rayed):
        assert abs(float(a["pred_score"]) - float(b["pred_score"])) < 1e-6
        assert a["pred_label"] == b["pred_label"] and a["threshold"] == b["threshold"]


def test_ray_bad_files_and_maps_match_local(both: tuple[Path, Path]) -> None:
    local, rayed = both
    errors = {Path(r["path"]).name for r in _rows(rayed / "errors.csv")}
    assert errors == {"empty.png", "truncated.png", "notes.txt"}
    names = sorted(p.relative_to(rayed / "maps") for p in (rayed / "maps").rglob("*.png"))
    assert len(names) == 18 and names == sorted(p.relative_to(local / "maps") for p in (local / "maps").rglob("*.png"))
    a, b = (np.asarray(Image.open(d / "maps" / "a" / "000.png.png"), dtype=int) for d in both)
    assert np.abs(a - b).max() <= 1


def test_ray_resume_skips_done_rows(setup: tuple[Path, Path], both: tuple[Path, Path], tmp_path: Path) -> None:
    inputs, model = setup
    out = tmp_path / "out"
    shutil.copytree(both[1], out)
    rows = _rows(out / "scores.csv")
    kept = [r for r in rows if "/a/" not in r["path"]]
    text = (out / "scores.csv").read_text().splitlines(keepends=True)
    (out / "scores.csv").write_text(text[0] + "".join(t for t in text[1:] if "/a/" not in t.split(",")[0]))
    marker = "9.99"  # a done row is never rescored: its value survives the resume
    (out / "scores.csv").write_text((out / "scores.csv").read_text().replace(kept[0]["pred_score"], marker, 1))
    again = _score(model, [inputs], out, "--engine", "ray", "--workers", "1", code=0)  # errors.csv rows are done
    assert [r["path"] for r in again] == [r["path"] for r in rows]
    assert next(r for r in again if r["path"] == kept[0]["path"])["pred_score"] == marker
    redone = {r["path"]: r["pred_score"] for r in again if "/a/" in r["path"]}
    assert redone == {r["path"]: r["pred_score"] for r in rows if "/a/" in r["path"]}


def test_missing_ray_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from anoddpm.cli import score_ray

    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name.startswith("ray") else real(name, *a, **k))
    with pytest.raises(ValueError, match=r"pip install 'anoddpm\[ray\]'"):
        score_ray.import_ray()
