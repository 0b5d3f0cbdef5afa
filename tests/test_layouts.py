"""anoddpm.data.layouts: tiny MVTec AD / AD 2 / LOCO / VisA / folder instances, detected and read end to end."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anoddpm.cli import main
from anoddpm.cli.parser import build_parser, resolve_train_config
from anoddpm.config import Config
from anoddpm.data.datasets import infer_channels, load_test_set, load_training_data
from anoddpm.data.layouts import discover

CFG = Config().override("data", image_size=16, channels=1, min_val_images=1).validate()


def _img(path: Path, seed: int, size: tuple[int, int] = (20, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(60, 200, size, dtype=np.uint8)).save(path)
    return path


def _mask(path: Path, box: tuple[slice, slice], value: int = 255, size: tuple[int, int] = (20, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros(size, np.uint8)
    arr[box] = value
    Image.fromarray(arr).save(path)
    return path


def _goods(folder: Path, n: int, seed: int = 0) -> None:
    for i in range(n):
        _img(folder / f"{i:03d}.png", seed + i)


def test_mvtec_ad_defect_type_without_masks_gives_image_labels_only(tmp_path):
    cat = tmp_path / "mvtec" / "bottle"
    _goods(cat / "train" / "good", 6)
    _goods(cat / "test" / "good", 2, 50)
    _img(cat / "test" / "crack" / "000.png", 60)
    _mask(cat / "ground_truth" / "crack" / "000_mask.png", (slice(0, 10), slice(0, 12)))
    _img(cat / "test" / "stain" / "000.png", 61)  # no ground_truth/stain folder
    layout = discover(tmp_path / "mvtec", "bottle")
    assert layout.kind == "mvtec" and len(layout.train) == 6 and not layout.validation
    samples = {s.name: s for s in load_test_set(CFG, tmp_path / "mvtec", "bottle")}
    assert set(samples) == {"good/000", "good/001", "crack/000", "stain/000"}
    assert samples["stain/000"].label == 1 and not samples["stain/000"].has_mask and not samples["stain/000"].mask.any()
    assert samples["crack/000"].has_mask and samples["crack/000"].mask.mean() == pytest.approx(0.25, abs=0.05)
    train, val, fp = load_training_data(CFG, tmp_path / "mvtec", "bottle", 0)  # train does not trip over it
    assert (len(train), len(val), fp["kind"]) == (5, 1, "mvtec")


def test_mvtec_ad2_reads_test_public_and_its_validation_split(tmp_path):
    cat = tmp_path / "can"
    _goods(cat / "train" / "good", 5)
    _goods(cat / "validation" / "good", 3, 20)
    _goods(cat / "test_public" / "good", 2, 40)
    _img(cat / "test_public" / "bad" / "000_regular.png", 60)
    _mask(cat / "test_public" / "ground_truth" / "bad" / "000_regular_mask.png", (slice(5, 15), slice(0, 24)))
    _img(cat / "test_private" / "000.png", 70)  # unlabelled: ignored
    train, val, fp = load_training_data(CFG, cat, None, 0)
    assert (len(train), len(val), fp["kind"]) == (5, 3, "mvtec_ad2")
    assert fp["val_files"] == [f"validation/good/{i:03d}.png" for i in range(3)]
    samples = load_test_set(CFG, cat, None)
    assert [(s.defect_type, s.label) for s in samples] == [("bad", 1), ("good", 0), ("good", 0)]
    assert samples[0].mask.mean() == pytest.approx(0.5, abs=0.07)


def test_mvtec_loco_ors_the_masks_of_each_image(tmp_path):
    cat = tmp_path / "loco" / "juice_bottle"
    _goods(cat / "train" / "good", 4)
    _goods(cat / "validation" / "good", 2, 10)
    _goods(cat / "test" / "good", 1, 30)
    _img(cat / "test" / "logical_anomalies" / "000.png", 40)
    gt = cat / "ground_truth" / "logical_anomalies" / "000"
    _mask(gt / "000.png", (slice(0, 10), slice(0, 12)), value=254)  # LOCO masks are not all 255
    _mask(gt / "001.png", (slice(10, 20), slice(12, 24)), value=1)
    _img(cat / "test" / "structural_anomalies" / "000.png", 41)
    (cat / "ground_truth" / "structural_anomalies").mkdir()
    with pytest.raises(FileNotFoundError, match=r"structural_anomalies/000_mask.png.*structural_anomalies/000.png"):
        load_test_set(CFG, tmp_path / "loco", "juice_bottle")  # its type has a mask folder, its own mask is missing
    _mask(cat / "ground_truth" / "structural_anomalies" / "000" / "000.png", (slice(0, 2), slice(0, 2)))
    layout = discover(tmp_path / "loco", "juice_bottle")
    assert layout.kind == "mvtec_loco" and len(layout.validation) == 2
    logical = next(s for s in load_test_set(CFG, tmp_path / "loco", "juice_bottle") if s.name == "logical_anomalies/000")
    assert logical.mask.mean() == pytest.approx(0.5, abs=0.07)  # both quarters, the value-1 one included
    train, val, _ = load_training_data(CFG, tmp_path / "loco", "juice_bottle", 0)
    assert (len(train), len(val)) == (4, 2)


def _jpeg(path: Path, seed: int) -> str:
    """A grey image saved as an RGB JPEG, as VisA ships them; -> its path relative to the VisA root."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(60, 200, (20, 24), dtype=np.uint8)
    Image.fromarray(pixels).convert("RGB").save(path)
    return path.relative_to(path.parents[4]).as_posix()


def _visa(root: Path) -> Path:
    rows = ["object,split,label,image,mask"]
    for i in range(4):
        rel = _jpeg(root / "candle" / "Data" / "Images" / "Normal" / f"{i:04d}.JPG", i)
        rows.append(f"candle,{'train' if i < 3 else 'test'},normal,{rel},")
    rel, mask = _jpeg(root / "candle" / "Data" / "Images" / "Anomaly" / "000.JPG", 9), "candle/Data/Masks/Anomaly/000.png"
    _mask(root / mask, (slice(0, 20), slice(0, 6)), value=1)  # VisA masks hold small label values
    rows += [f"candle,test,anomaly,{rel},{mask}", "capsules,train,normal,capsules/Data/Images/Normal/0000.JPG,"]
    (root / "split_csv").mkdir()
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    return root


def test_visa_as_distributed_from_its_split_csv(tmp_path):
    root = _visa(tmp_path / "VisA")
    for data, category in ((root, "candle"), (root / "candle", None)):
        layout = discover(data, category)
        assert layout.kind == "visa" and len(layout.train) == 3
    samples = load_test_set(CFG, root, "candle")
    assert [(s.defect_type, s.has_mask) for s in samples] == [("good", True), ("bad", True)]
    assert samples[1].mask.mean() == pytest.approx(0.25, abs=0.07)
    assert infer_channels(root, "candle") == 1  # grey pixels saved as RGB JPEGs
    with pytest.raises(ValueError, match="lists no images of object 'pcb9'"):
        discover(root, "pcb9")


def test_visa_converted_layout_with_stem_masks(tmp_path):
    cat = tmp_path / "visa_pytorch" / "candle"
    _goods(cat / "train" / "good", 3)
    _img(cat / "test" / "bad" / "012.png", 5)
    _mask(cat / "ground_truth" / "bad" / "012.png", (slice(0, 20), slice(0, 12)))
    samples = load_test_set(CFG, tmp_path / "visa_pytorch", "candle")
    assert samples[0].has_mask and samples[0].mask.mean() == pytest.approx(0.5, abs=0.07)


def test_folder_layout_with_named_folders(tmp_path):
    root = tmp_path / "line3"
    _goods(root / "ok", 8)
    _img(root / "ng" / "scratch" / "a.png", 30)
    _img(root / "ng" / "dent" / "b.png", 31)
    _mask(root / "masks" / "scratch" / "a_mask.png", (slice(0, 4), slice(0, 4)))
    _mask(root / "masks" / "dent" / "b.png", (slice(0, 4), slice(0, 4)))
    cfg = CFG.override("data", normal_dir="ok", abnormal_dir="ng", mask_dir="masks")
    train, val, fp = load_training_data(cfg, root, None, 0)
    assert (len(train), len(val), fp["kind"]) == (7, 1, "folder")
    samples = load_test_set(cfg, root, None)  # test goods = the held-back validation image
    assert sorted(s.name for s in samples) == ["dent/dent/b", "good/ok/" + Path(fp["val_files"][0]).stem,
                                               "scratch/scratch/a"]
    assert all(s.has_mask for s in samples) and sum(s.mask.any() for s in samples) == 2
    _goods(root / "ok_test", 2, 90)
    no_masks = cfg.override("data", mask_dir="", normal_test_dir="ok_test")
    samples = load_test_set(no_masks, root, None)
    assert [s.has_mask for s in samples] == [True, True, False, False]
    with pytest.raises(FileNotFoundError, match="--abnormal-dir"):
        load_test_set(cfg.override("data", abnormal_dir="nope"), root, None)


def test_folder_flags_reach_the_config():
    args = build_parser().parse_args(["train", "--data", "R", "--out", "O", "--normal-dir", "ok",
                                      "--abnormal-dir", "ng", "--mask-dir", "m", "--normal-test-dir", "t"])
    d = resolve_train_config(args).data
    assert (d.normal_dir, d.abnormal_dir, d.mask_dir, d.normal_test_dir) == ("ok", "ng", "m", "t")


def test_evaluate_without_any_mask_reports_pixel_metrics_as_absent(tmp_path, capsys):
    from test_evaluate_cli import make_bundle, tiny_config

    cat = tmp_path / "data" / "cat"
    _goods(cat / "train" / "good", 10)
    _goods(cat / "test" / "good", 3, 40)
    for i in range(3):
        _img(cat / "test" / "bad" / f"{i:03d}.png", 60 + i)
    model = make_bundle(tmp_path / "model.pt", tmp_path / "data", "cat", tiny_config())
    out = tmp_path / "report"
    assert main(["evaluate", "--model", str(model), "--data", str(tmp_path / "data"), "--category", "cat",
                 "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["image_auroc"] is not None and metrics["n_defect_without_mask"] == 3
    assert all(metrics[k] is None for k in ("pixel_auroc", "aupro", "pixel_f1_max", "dice", "iou"))
    assert "per_type_pixel_auroc" not in metrics
    shutil.rmtree(out)
