"""synth: MVTec layout, determinism, exact masks."""
import hashlib
import time

import numpy as np
import pytest
from PIL import Image

from anoddpm.cli import main
from anoddpm.data.synth import DEFECTS, make_synthetic_dataset


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.png")):
        h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_layout_and_masks(synth_root):
    cat = synth_root / "synthetic"
    assert len(list((cat / "train" / "good").glob("*.png"))) == 12
    assert len(list((cat / "test" / "good").glob("*.png"))) == 4
    assert sorted(p.name for p in (cat / "test").iterdir()) == sorted(["good", *DEFECTS])
    for kind in DEFECTS:
        images = sorted((cat / "test" / kind).glob("*.png"))
        assert len(images) == 2 and images[0].name == "000.png"
        for img in images:
            mask = np.asarray(Image.open(cat / "ground_truth" / kind / f"{img.stem}_mask.png"))
            assert Image.open(img).mode == "L" and mask.dtype == np.uint8 and mask.shape == (32, 32)
            assert set(np.unique(mask)) == {0, 255}
            assert 0 < (mask > 0).mean() < 0.3


def test_mask_is_exactly_the_changed_pixels(tmp_path):
    """Rebuild each defect's good image from the same generator state and compare pixel by pixel."""
    from anoddpm.data import synth

    root = make_synthetic_dataset(tmp_path, "c", size=48, n_train=1, n_test_good=0, n_test_defect=8, seed=3)
    seeds = np.random.SeedSequence([3, synth.zlib.crc32(b"c")]).spawn(4)
    params = synth._family_params(np.random.default_rng(seeds[0]), 48)
    rng = np.random.default_rng(seeds[3])
    for i in range(8):
        kind = DEFECTS[i % 4]
        good = synth._to_u8(synth._texture(rng, 48, params))
        while True:  # replay the generator exactly like make_synthetic_dataset
            bad = synth._to_u8(synth._defect(rng, kind, good.astype(np.float64) / 255.0)[0])
            if (bad != good).any():
                break
        stored = np.asarray(Image.open(root / "test" / kind / f"{i // 4:03d}.png"))
        mask = np.asarray(Image.open(root / "ground_truth" / kind / f"{i // 4:03d}_mask.png")) > 0
        np.testing.assert_array_equal(stored, bad)
        np.testing.assert_array_equal(mask, stored != good)
        assert abs(stored[mask].astype(float) - good[mask]).mean() > 20  # visible: mean change > 20 grey levels


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    kwargs = dict(size=32, n_train=3, n_test_good=2, n_test_defect=4)
    a = make_synthetic_dataset(tmp_path / "a", "x", seed=5, **kwargs)
    b = make_synthetic_dataset(tmp_path / "b", "x", seed=5, **kwargs)
    c = make_synthetic_dataset(tmp_path / "c", "x", seed=6, **kwargs)
    assert _digest(a) == _digest(b) != _digest(c)


def test_good_images_are_consistent(synth_root):
    cat = synth_root / "synthetic"
    goods = np.stack([np.asarray(Image.open(p), float) for p in sorted((cat / "train" / "good").glob("*.png"))])
    means = goods.mean(axis=(1, 2))
    assert means.std() < 10 and 60 < means.mean() < 200


def test_cli_default_sizes_are_fast(tmp_path, capsys):
    start = time.perf_counter()
    assert main(["synth", "--out", str(tmp_path), "--category", "cli", "--seed", "1"]) == 0
    assert time.perf_counter() - start < 15
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "60 train/good" in out
    assert len(list((tmp_path / "cli" / "test").rglob("*.png"))) == 50


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="size"):
        make_synthetic_dataset(tmp_path, "x", size=8)
    make_synthetic_dataset(tmp_path, "x", size=16, n_train=1, n_test_good=0, n_test_defect=0)
    with pytest.raises(ValueError, match="already"):
        make_synthetic_dataset(tmp_path, "x", size=16, n_train=1)
