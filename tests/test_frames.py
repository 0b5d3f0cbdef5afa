"""`anoddpm synth --frame-size`: large frames with small defects and thin lines, exact masks, same seed same bytes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from anoddpm.cli import main
from anoddpm.data.frames import FRAME_DEFECTS, make_frame_dataset, parse_frame_size


def _grey(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_frames_have_the_size_small_defects_and_exact_masks(tmp_path: Path) -> None:
    assert main(["synth", "--out", str(tmp_path), "--category", "f", "--frame-size", "320x200", "--n-train", "1",
                 "--n-test-good", "1", "--n-test-defect", "8"]) == 0
    cat = tmp_path / "f"
    assert _grey(cat / "train" / "good" / "000.png").shape == (200, 320)
    for kind in FRAME_DEFECTS:
        for mask_path in sorted((cat / "ground_truth" / kind).glob("*_mask.png")):
            mask = _grey(mask_path) > 127
            assert mask.shape == (200, 320) and mask.any()
            ys, xs = np.nonzero(mask)
            extent = max(np.ptp(ys), np.ptp(xs)) + 1
            if kind in ("spot", "stain"):
                assert 2 <= extent <= 21, (kind, extent)
            else:  # lines and cracks are long and thin: no pixel lies more than 2.5 px inside them (<= 3 px wide)
                assert extent > 20 and ndimage.distance_transform_edt(mask).max() <= 2.5, kind


def test_same_seed_same_bytes_and_bad_sizes(tmp_path: Path) -> None:
    a = make_frame_dataset(tmp_path / "a", "x", (80, 96), n_train=1, n_test_good=0, n_test_defect=2, seed=4)
    b = make_frame_dataset(tmp_path / "b", "x", (80, 96), n_train=1, n_test_good=0, n_test_defect=2, seed=4)
    for path in sorted(a.rglob("*.png")):
        assert path.read_bytes() == (b / path.relative_to(a)).read_bytes()
    assert parse_frame_size("2048x1536") == (2048, 1536)
    with pytest.raises(ValueError, match="--frame-size '2048'"):
        parse_frame_size("2048")
    with pytest.raises(ValueError, match="at least 64"):
        parse_frame_size("32x2048")
