"""Native resolution: the tile grid and stitching (eval.tiling), tiled training crops, the TiledDetector, ragged
metrics, and train -> evaluate -> score -> export -> runtime end to end on images of different sizes."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anoddpm.cli import main
from anoddpm.config import Config
from anoddpm.detection.detector import Detector
from anoddpm.data.synth import make_synthetic_dataset
from anoddpm.detection.tiling import GridTiles, TiledDetector
from anoddpm.training.crops import random_tiles
from eval import metrics as M
from anoddpm.detection.maps import image_score as torch_image_score
from eval.tiling import Stitcher, image_score, tile_batches, tile_grid

TILE = 16
SIZES = ((48, 40), (32, 48), (40, 12))  # (h, w) of the generated images, in turn; 12 < TILE gets padded


@pytest.mark.parametrize("length, tile, stride, expected", [
    (40, 16, 8, [0, 8, 16, 24]),
    (37, 16, 8, [0, 8, 16, 21]),  # the last tile shifted inward to end at the border
    (16, 16, 8, [0]),
    (10, 16, 8, [0]),  # shorter than a tile: one (padded) tile
    (40, 16, 16, [0, 16, 24]),
])
def test_tile_grid_starts(length: int, tile: int, stride: int, expected: list[int]) -> None:
    assert [x for _, x in tile_grid(tile, length, tile, stride)] == expected
    assert [y for y, _ in tile_grid(length, tile, tile, stride)] == expected


def test_stride_zero_is_half_a_tile_and_bad_strides_are_refused() -> None:
    assert tile_grid(40, 16, 16, 0) == tile_grid(40, 16, 16, 8)
    with pytest.raises(ValueError, match="tile stride 17"):
        tile_grid(40, 40, 16, 17)


@pytest.mark.parametrize("shape", [(2, 37, 53), (1, 10, 40), (1, 7, 9)])
def test_stitching_tiles_of_an_image_gives_the_image_back(shape: tuple[int, int, int]) -> None:
    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    stitcher = Stitcher(shape[0], shape[1], shape[2], TILE)
    n_tiles = 0
    for tiles, offsets in tile_batches(image, TILE, 8, batch_size=3):
        assert tiles.shape[0] <= 3 and tiles.shape[1:] == (shape[0], TILE, TILE)
        stitcher.add(tiles, offsets)
        n_tiles += len(offsets)
    np.testing.assert_allclose(stitcher.result(), image, atol=1e-6)
    assert n_tiles == len(tile_grid(shape[1], shape[2], TILE, 8))


def test_overlaps_are_averaged() -> None:
    stitcher = Stitcher(1, 16, 24, TILE)
    stitcher.add(np.full((2, 1, TILE, TILE), [[[[1.0]]], [[[3.0]]]], np.float32), [(0, 0), (0, 8)])
    row = stitcher.result()[0, 0]
    assert row[:8].tolist() == [1.0] * 8 and row[8:16].tolist() == [2.0] * 8 and row[16:].tolist() == [3.0] * 8


@pytest.mark.parametrize("reduction, topk", [("max", 1), ("topk", 5), ("topk", 10_000)])
def test_numpy_image_score_matches_torch(reduction: str, topk: int) -> None:
    amap = np.random.default_rng(1).random((23, 31), dtype=np.float32)
    expected = torch_image_score(torch.from_numpy(amap)[None, None], reduction, topk).item()
    assert image_score(amap, reduction, topk) == pytest.approx(expected, abs=1e-6)


def test_random_tiles_are_deterministic_padded_and_inside_the_image() -> None:
    images = [torch.rand(1, 40, 30), torch.rand(1, 10, 50)]
    a, b = random_tiles(images, TILE, 0, 5, 0), random_tiles(images, TILE, 0, 5, 0)
    assert a.shape == (2, 1, TILE, TILE) and torch.equal(a, b)
    assert not torch.equal(a, random_tiles(images, TILE, 0, 6, 0))
    assert torch.equal(a[1, :, 10:], a[1, :, 9:10].expand(1, TILE - 10, TILE))  # edge-padded rows, not enlarged


def test_ragged_metrics_equal_the_stacked_ones_and_count_every_pixel() -> None:
    rng = np.random.default_rng(2)
    maps = rng.random((4, 12, 10)).astype(np.float32)
    masks = np.zeros((4, 12, 10), bool)
    masks[1, 2:5, 3:6] = masks[3, 7:9, 1:4] = True
    maps[masks] += 0.5
    scores, labels = rng.random(4), np.array([0, 1, 0, 1])
    stacked = M.compute_metrics(scores, labels, maps, masks, image_threshold=0.9)
    ragged = M.compute_metrics(scores, labels, list(maps), list(masks), image_threshold=0.9)
    for key in ("pixel_auroc", "aupro", "pixel_f1_max", "dice", "iou"):
        assert ragged[key] == pytest.approx(stacked[key], abs=1e-12), key
    cut_maps = [maps[0], maps[1][:, :7], maps[2][:5], maps[3]]
    cut_masks = [masks[0], masks[1][:, :7], masks[2][:5], masks[3]]
    flat_maps = np.concatenate([m.ravel() for m in cut_maps])[None, None]
    flat_masks = np.concatenate([m.ravel() for m in cut_masks])[None, None]
    assert M.pixel_auroc(cut_maps, cut_masks) == pytest.approx(M.pixel_auroc(flat_maps, flat_masks), abs=1e-12)
    types = ["good", "a", "good", "b"]
    assert M.defect_pixel_share(cut_masks, types) == pytest.approx({"a": 9 / 15, "b": 6 / 15})
    assert set(M.per_type_pixel_auroc(cut_maps, cut_masks, types)) == {"a", "b"}


def _tiny_tiled_config(**data: object) -> Config:
    cfg = Config().override("data", image_size=32, channels=1, min_val_images=2, tile_size=TILE, **data)
    cfg = cfg.override("model", preset="tiny").override("diffusion", timesteps=100)
    return cfg.override("detect", depth=40, steps=2, smoothing_sigma=1.0, map_reference="none", scorer="residual").validate()


def test_tiled_detector_maps_have_the_image_size_whatever_the_batch() -> None:
    torch.manual_seed(0)
    detector = Detector.from_config(_tiny_tiled_config()).eval()
    image = np.random.default_rng(3).random((1, 30, 45), dtype=np.float32)
    one = TiledDetector(detector, batch_size=1).score_image(image, torch.device("cpu"), keep_reconstruction=True)
    many = TiledDetector(detector, batch_size=7).score_image(image, torch.device("cpu"))
    assert one[0].shape == (30, 45) and one[2].shape == (1, 30, 45)
    np.testing.assert_allclose(one[0], many[0], atol=1e-6)
    assert one[1] == pytest.approx(many[1], abs=1e-6) == pytest.approx(float(one[0].max()), abs=1e-6)
    assert len(GridTiles([image[0:1]], TILE)) == len(tile_grid(30, 45, TILE))


def test_good_mean_reference_is_the_mean_map_of_the_training_tiles() -> None:
    from anoddpm.detection.scoring_loop import score_component_maps
    from anoddpm.detection.calibration import fit_and_score_good
    from eval.threshold import reference_map

    torch.manual_seed(0)
    detector = Detector.from_config(_tiny_tiled_config().override("detect", map_reference="good_mean")).eval()
    rng = np.random.default_rng(4)
    images = [rng.random((1, 40, 48), dtype=np.float32), rng.random((1, 24, 20), dtype=np.float32)]
    tiles = GridTiles(images, TILE)
    assert len(tiles) == 20 + 4  # 4 x 5 tiles, then 2 x 2 (starts 0, 8 down and 0, 4 across)
    fit_and_score_good(TiledDetector(detector), images, torch.device("cpu"), batch_size=8, bank_images=images)
    components, _ = score_component_maps(detector, [tiles[j] for j in range(len(tiles))], torch.device("cpu"))
    assert detector.reference.has_map_reference and tuple(detector.reference.map_reference.shape) == (1, 1, TILE, TILE)
    np.testing.assert_allclose(detector.reference.map_reference[0, 0].numpy(), reference_map(components[:, 0]), rtol=1e-5)


def test_config_refuses_bad_tile_settings() -> None:
    with pytest.raises(ValueError, match="data.tile_size=20"):
        _tiny_tiled_config().override("data", tile_size=20).validate()
    with pytest.raises(ValueError, match="data.tile_scale=1.5"):
        _tiny_tiled_config(tile_scale=1.5)
    with pytest.raises(ValueError, match="exclude each other"):
        _tiny_tiled_config(train_crop=16)


def _ragged_dataset(root: Path) -> Path:
    """A generated MVTec category whose images (and masks) are cut to the sizes of SIZES, in turn."""
    make_synthetic_dataset(root, "cat", size=48, n_train=8, n_test_good=2, n_test_defect=3, seed=1)
    cat = root / "cat"
    for i, path in enumerate(sorted(p for p in cat.rglob("*.png") if "ground_truth" not in p.parts)):
        h, w = SIZES[i % len(SIZES)]
        Image.fromarray(np.asarray(Image.open(path))[:h, :w]).save(path)
        mask = cat / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
        if mask.is_file():
            Image.fromarray(np.asarray(Image.open(mask))[:h, :w]).save(mask)
    return cat


@pytest.fixture(scope="module")
def tiled_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("tiled")
    cat = _ragged_dataset(tmp / "data")
    config = tmp / "config.json"
    config.write_text(json.dumps(_tiny_tiled_config().override("detect", map_reference="nearest_good").to_dict()))
    assert main(["train", "--data", str(cat), "--out", str(tmp / "run"), "--config", str(config),
                 "--tile-size", str(TILE), "--max-steps", "4", "--batch-size", "4", "--no-head", "--device", "cpu"]) == 0
    return cat, tmp / "run" / "model.pt"


def test_tiled_evaluate_compares_masks_at_native_size(tiled_run: tuple[Path, Path], tmp_path: Path) -> None:
    cat, model = tiled_run
    assert main(["evaluate", "--model", str(model), "--data", str(cat), "--out", str(tmp_path), "--device", "cpu"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["threshold_source"] == "bundle" and metrics["n_images"] == 5
    assert metrics["resolution"]["tile_size"] == TILE and metrics["resolution"]["tile_stride"] == TILE // 2
    assert 0.0 <= metrics["pixel_auroc"] <= 1.0 and (tmp_path / "grid.png").is_file()


def test_tiled_score_maps_and_runtime_match_pytorch(tiled_run: tuple[Path, Path], tmp_path: Path) -> None:
    from anoddpm.bundle import load_bundle
    from anoddpm.data.imageio import image_hw, load_model_image
    from deploy.runtime import Inspector

    cat, model = tiled_run
    files = sorted((cat / "test").rglob("*.png"))
    assert main(["score", "--model", str(model), "--input", str(cat / "test"), "--out", str(tmp_path / "s"),
                 "--save-maps", "--device", "cpu"]) == 0
    with open(tmp_path / "s" / "scores.csv") as handle:
        scores = {Path(r["path"]).resolve(): float(r["pred_score"]) for r in csv.DictReader(handle)}
    assert len(scores) == len(files)
    for path in files:
        saved = Image.open(tmp_path / "s" / "maps" / path.parent.name / f"{path.name}.png")
        assert saved.size[::-1] == image_hw(path)  # maps of each file's own size
    onnx_path = tmp_path / "model.onnx"
    assert main(["export", "--model", str(model), "--out", str(onnx_path)]) == 0
    inspector = Inspector(onnx_path, batch_size=3)
    bundle = load_bundle(model)
    tiled = TiledDetector(Detector.from_bundle(bundle), batch_size=5)
    for path in files:
        image = load_model_image(path, 1, 32, "resize", TILE, 1.0)
        torch_map, torch_score, _, _ = tiled.score_image(image, torch.device("cpu"))
        onnx_map, onnx_score = inspector.score_image(image)
        np.testing.assert_allclose(onnx_map, torch_map, atol=1e-4)
        assert onnx_score == pytest.approx(torch_score, abs=1e-4)
        assert scores[path.resolve()] == pytest.approx(torch_score, abs=1e-4)
    results = inspector.inspect(files[:2])
    assert [r["anomaly_map"].shape for r in results] == [image_hw(p) for p in files[:2]]
    import anoddpm

    for backend in (model, onnx_path):  # the Python API: both backends tile, maps at the file's size
        predictions = anoddpm.load(backend, device="cpu").predict(files[:2])
        assert [p.anomaly_map.shape for p in predictions] == [image_hw(p) for p in files[:2]]
        assert [p.pred_score for p in predictions] == pytest.approx([r["pred_score"] for r in results], abs=1e-4)
