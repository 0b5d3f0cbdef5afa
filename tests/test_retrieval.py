"""The retrieval-conditioned denoiser (model.condition retrieval): what it retrieves, that the reconstruction uses it,
that the database is a sealed fitted state `calibrate --data` swaps, and the ONNX graph agrees."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from anoddpm.bundle import load_bundle, save_bundle
from anoddpm.cli import main
from anoddpm.config import Config
from anoddpm.data.synth import make_synthetic_dataset
from anoddpm.detection.detector import Detector
from anoddpm.detection.retrieval import nearest_entries
from anoddpm.model.unet import build_unet
from anoddpm.training.retrieval_conditions import TrainingRetrieval
from deploy.export import export_onnx
from deploy.runtime import Inspector
from test_evaluate_cli import tiny_config


def _cfg(**detect) -> Config:
    return (tiny_config().override("model", condition="retrieval", retrieval_neighbours=2)
            .override("backbone", image_size=64).override("detect", **detect).validate())


@pytest.fixture(scope="module")
def conditioned(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A calibrated random-weight tiny conditioned bundle (scorer residual+feature_memory)."""
    from anoddpm.data.datasets import load_training_data

    cfg = _cfg(scorer="residual+feature_memory")
    torch.manual_seed(0)
    unet = build_unet(cfg)
    for p in unet.parameters():  # zero-initialised output convs would hide the conditioning
        p.data.add_(0.05 * torch.randn_like(p))
    _, _, fingerprint = load_training_data(cfg, synth_root, "synthetic", 0)
    path = save_bundle(tmp_path_factory.mktemp("cond") / "model.pt", cfg=cfg, state_dict=unet.state_dict(),
                       fingerprint=fingerprint)
    assert main(["calibrate", "--model", str(path), "--batch-size", "4", "-q"]) == 0
    return path


def test_nearest_entries_orders_by_distance_and_never_returns_the_query_itself():
    keys = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.6, 0.8]]), dim=1)
    assert nearest_entries(keys[:1], keys, 2).tolist() == [[1, 3]]  # itself (row 0) excluded
    query = torch.nn.functional.normalize(torch.tensor([[0.1, 1.0]]), dim=1)
    assert nearest_entries(query, keys, 3).tolist() == [[2, 3, 1]]


def test_the_conditioned_unet_uses_its_condition_and_refuses_to_run_without_it():
    cfg = _cfg()
    torch.manual_seed(0)
    unet = build_unet(cfg)
    for p in unet.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    x, t = torch.rand(2, 1, 32, 32), torch.full((2,), 10.0)
    a = unet(x, t, torch.zeros(2, 2, 32, 32))
    b = unet(x, t, torch.ones(2, 2, 32, 32))
    assert unet.condition_channels == 2 and (a - b).abs().max() > 1e-3
    with pytest.raises(ValueError, match="2 conditioning channels"):
        unet(x, t)


def test_training_neighbours_are_other_images(synth_root):
    from anoddpm.data.datasets import load_training_data

    cfg = _cfg()
    train_ds, _, _ = load_training_data(cfg, synth_root, "synthetic", 0)
    retrieval = TrainingRetrieval(cfg, train_ds.arrays, torch.device("cpu"))
    table = retrieval.table
    assert table.shape == (len(train_ds), 2)
    assert all(i not in row for i, row in enumerate(table.tolist()))  # never itself
    condition = retrieval.of_indices([0, 3])
    assert condition.shape == (2, 2, 32, 32)
    stored = retrieval.database.images[table[3, 0]].float() / 255
    assert torch.allclose(condition[1, 0], stored[0])


def test_the_reconstruction_depends_on_the_database_and_onnx_agrees(conditioned, synth_root, tmp_path, one_thread):
    bundle = load_bundle(conditioned)
    assert bundle.retrieval is not None and bundle.retrieval["images"].dtype == torch.uint8
    detector = Detector.from_bundle(bundle)
    images = torch.stack([torch.rand(1, 32, 32, generator=torch.Generator().manual_seed(s)) for s in range(3)])
    with torch.inference_mode():
        amap, score, recon = detector(images)
        alone = detector(images[1:2])[1]
        swapped = Detector.from_bundle(bundle)
        swapped.retrieval.load_fitted_state({"embeddings": bundle.retrieval["embeddings"],
                                             "images": 255 - bundle.retrieval["images"]})
        other = swapped(images)[2]
    assert torch.isfinite(score).all() and abs(float(alone[0]) - float(score[1])) < 1e-5  # batch-invariant
    assert (other - recon).abs().max() > 1e-3  # other neighbours, another reconstruction
    onnx_path = export_onnx(conditioned, tmp_path / "model.onnx")
    o_map, o_score = Inspector(onnx_path).run(images.numpy())
    assert np.abs(o_map - amap[:, 0].numpy()).max() < 1e-4 and np.abs(o_score - score.numpy()).max() < 1e-4


def test_the_database_is_sealed_with_the_calibration(conditioned, tmp_path):
    raw = torch.load(conditioned, weights_only=True)
    raw["retrieval"] = {**raw["retrieval"], "images": raw["retrieval"]["images"].flip(0)}
    torch.save(raw, tmp_path / "swapped.pt")
    with pytest.raises(ValueError, match="calibration does not belong to its weights"):
        load_bundle(tmp_path / "swapped.pt")
    raw["retrieval"] = {**raw["retrieval"], "images": raw["retrieval"]["images"].float()}
    torch.save(raw, tmp_path / "float.pt")
    with pytest.raises(ValueError, match="retrieval images must be a uint8 tensor"):
        load_bundle(tmp_path / "float.pt")


def test_calibrate_data_swaps_the_database_without_training(conditioned, tmp_path, capsys):
    other = tmp_path / "other"
    make_synthetic_dataset(other, "synthetic", size=32, n_train=16, n_test_good=4, n_test_defect=4, seed=7)
    before = load_bundle(conditioned).retrieval
    copy = tmp_path / "model.pt"
    copy.write_bytes(conditioned.read_bytes())
    assert main(["calibrate", "--model", str(copy), "--data", str(other), "--category", "synthetic",
                 "--batch-size", "4", "-q"]) == 0
    after = load_bundle(copy)
    assert after.state_dict["input_conv.weight"].equal(load_bundle(conditioned).state_dict["input_conv.weight"])
    assert after.retrieval["images"].shape[0] != before["images"].shape[0]  # 14 training images there, not 10
    capsys.readouterr()
    assert main(["info", str(copy)]) == 0
    info = json.loads(capsys.readouterr().out)["retrieval"]
    assert info["neighbours"] == 2 and info["images"] == after.retrieval["images"].shape[0] and info["megabytes"] > 0


def test_an_uncalibrated_conditioned_model_says_to_calibrate(synth_root):
    cfg = _cfg(scorer="residual")
    detector = Detector.from_config(cfg).eval()
    with pytest.raises(ValueError, match="retrieval database is not fitted"):
        detector(torch.rand(1, 1, 32, 32))


def test_train_condition_retrieval_end_to_end(synth_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(synth_root), "--category", "synthetic", "--out", str(out), "--preset", "tiny",
                 "--image-size", "32", "--max-steps", "6", "--batch-size", "4", "--condition", "retrieval",
                 "--retrieval-neighbours", "3", "-q"]) == 0
    bundle = load_bundle(out / "model.pt")
    assert bundle.cfg.model.condition == "retrieval" and bundle.threshold is not None
    assert bundle.state_dict["input_conv.weight"].shape[1] == 1 + 3  # the image and its 3 neighbours
    assert bundle.retrieval["embeddings"].shape == (bundle.retrieval["images"].shape[0], 152)
    assert main(["evaluate", "--model", str(out / "model.pt"), "--data", str(synth_root), "--category", "synthetic",
                 "--out", str(tmp_path / "eval"), "-q"]) == 0
    assert 0.0 <= json.loads((tmp_path / "eval" / "metrics.json").read_text())["image_auroc"] <= 1.0  # NaN fails


@pytest.mark.parametrize("flags, message", [
    (["--tile-size", "16"], "does not work with data.tile_size"),
    (["--head"], "does not work with head.enabled"),
    (["--shots", "3"], "--shots 3 \\(data.shots\\) .* give --shots 4 or more"),
])
def test_unsupported_retrieval_runs_are_one_line_errors(synth_root, tmp_path, capsys, flags, message):
    code = main(["train", "--data", str(synth_root), "--category", "synthetic", "--out", str(tmp_path / "r"),
                 "--preset", "tiny", "--image-size", "32", "--max-steps", "2", "--condition", "retrieval", "-q",
                 *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and re.search(message, err[0]), err


def test_calibrate_shots_makes_a_base_model_inspect_a_new_product_from_k_images(conditioned, tmp_path, capsys):
    other = tmp_path / "other"
    make_synthetic_dataset(other, "synthetic", size=32, n_train=16, n_test_good=4, n_test_defect=4, seed=7)
    before = conditioned.read_bytes()
    out = tmp_path / "fewshot.pt"
    assert main(["calibrate", "--model", str(conditioned), "--data", str(other), "--category", "synthetic",
                 "--shots", "4", "--shots-seed", "1", "--out", str(out), "-q"]) == 0
    assert conditioned.read_bytes() == before  # --out: the base is left as it was
    bundle = load_bundle(out)
    assert bundle.retrieval["images"].shape[0] == 4 and bundle.threshold["leave_one_out"]
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    few = json.loads(capsys.readouterr().out)["few_shot"]
    assert few["shots"] == 4 and len(few["shot_files"]) == 4 and few["trained_on_shots"] is False
    assert main(["calibrate", "--model", str(conditioned), "--data", str(other), "--category", "synthetic",
                 "--shots", "2", "--out", str(tmp_path / "two.pt"), "-q"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--shots 2" in err[0] and "--shots 4 or more" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fewshot.pt", "other"]  # nothing left at a failed --out


def test_guidance_and_every_scorer_run_on_a_conditioned_model(conditioned):
    images = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    bundle = load_bundle(conditioned)
    with torch.inference_mode():
        plain = Detector.from_bundle(bundle)(images)[2]
        guided = Detector.from_bundle(bundle, guidance=2.0, scorer="residual")  # not calibrated: the database alone
        guided.retrieval.load_fitted_state(bundle.retrieval)
        both = Detector.from_bundle(bundle, scorer="residual+feature_residual")
        both.retrieval.load_fitted_state(bundle.retrieval)
        amap = both(images)[0]
        guided = guided(images)[2]
    assert (guided - plain).abs().max() > 1e-4 and torch.isfinite(amap).all()
