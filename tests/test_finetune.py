"""--init fine-tuning (training/finetune.py) and diffusion-made variations (training/variations.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from anoddpm.bundle import save_bundle
from anoddpm.config import Config
from anoddpm.data.datasets import ImageDataset
from anoddpm.model.diffusion import GaussianDiffusion
from anoddpm.model.unet import build_unet
from anoddpm.training.finetune import base_weights, with_prior_samples
from anoddpm.training.variations import TRANSFORMS, diffusion_variations, suited_transforms, variation_depth


def _cfg(channels: int = 1, size: int = 32) -> Config:
    return (Config().override("data", image_size=size, channels=channels).override("model", preset="tiny")
            .override("diffusion", timesteps=100).validate())


def _model(cfg: Config) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_unet(cfg).eval()


def _base(path: Path, cfg: Config) -> Path:
    return save_bundle(path, cfg=cfg, state_dict=_model(cfg).state_dict(), fingerprint={"source": "test", "n": 0})


def _object_shots(n: int) -> list[np.ndarray]:
    """An aligned object: a bright bar in the top-left quadrant, a little noise per shot."""
    rng = np.random.default_rng(1)
    shots = []
    for _ in range(n):
        a = 0.1 + 0.02 * rng.random((1, 32, 32), dtype=np.float32)
        a[:, 2:14, 3:9] = 0.9
        shots.append(a)
    return shots


def test_textures_take_flips_and_turns_aligned_objects_do_not():
    textures = [np.random.default_rng(i).random((1, 32, 32), dtype=np.float32) for i in range(4)]
    assert suited_transforms(textures) == list(TRANSFORMS)
    assert suited_transforms(_object_shots(4)) == []
    assert suited_transforms(textures[:1]) == []  # one shot: no spread to compare with


def test_variations_are_seeded_distinct_and_good_images():
    cfg = _cfg()
    model, diffusion = _model(cfg), GaussianDiffusion.from_config(cfg.diffusion)
    shots = _object_shots(2)
    one = diffusion_variations(model, diffusion, cfg, shots, 3, seed=7, device=torch.device("cpu"))
    again = diffusion_variations(model, diffusion, cfg, shots, 3, seed=7, device=torch.device("cpu"))
    other = diffusion_variations(model, diffusion, cfg, shots, 3, seed=8, device=torch.device("cpu"))
    assert [len(v) for v in one] == [3, 3] and one[0][0].shape == (1, 32, 32)
    assert all(np.array_equal(a, b) for va, vb in zip(one, again) for a, b in zip(va, vb))
    assert not np.array_equal(one[0][0], other[0][0]) and not np.array_equal(one[0][0], one[0][1])
    assert all(v.min() >= 0 and v.max() <= 1 for vs in one for v in vs)
    assert variation_depth(cfg) == 10  # t_max_fraction 0.1 of T = 100


def test_base_weights_load_and_misfits_name_init(tmp_path):
    cfg = _cfg()
    base = _base(tmp_path / "base.pt", cfg)
    weights = base_weights(cfg, base)
    assert all(torch.equal(weights[k], v) for k, v in _model(cfg).state_dict().items())
    with pytest.raises(ValueError, match=r"--init .*channels 1 \(base\) vs 3"):
        base_weights(_cfg(channels=3), base)
    with pytest.raises(ValueError, match=r"--init .*model input side 32 \(base\) vs 64"):
        base_weights(_cfg(size=64), base)
    with pytest.raises(ValueError, match=r"--init .*model.preset tiny \(base\) vs small"):
        base_weights(cfg.override("model", preset="small").validate(), base)
    with pytest.raises(FileNotFoundError, match="--init"):
        base_weights(cfg, tmp_path / "missing.pt")


def test_prior_samples_make_the_asked_share_of_the_stream():
    cfg = _cfg().override("data", variations=2).override("train", prior_fraction=0.5).validate()
    model, diffusion = _model(cfg), GaussianDiffusion.from_config(cfg.diffusion)
    shots = ImageDataset(_object_shots(3), ["a", "b", "c"])
    mixed = with_prior_samples(cfg, shots, model, diffusion, torch.device("cpu"))
    prior = [n for n in mixed.names if "#prior" in n]
    assert len(mixed) == 12 and len(prior) == 6  # 3 shots x 2 repeats + 3 x 2 samples
    quarter = cfg.override("train", prior_fraction=0.25).validate()
    assert sum("#prior" in n for n in with_prior_samples(quarter, shots, model, diffusion, torch.device("cpu")).names) \
        / len(with_prior_samples(quarter, shots, model, diffusion, torch.device("cpu"))) == pytest.approx(0.25)
    assert with_prior_samples(cfg.override("train", prior_fraction=0.0).validate(), shots, model, diffusion,
                              torch.device("cpu")) is shots


def _train_cfg(**data) -> Config:
    return (Config().override("data", image_size=32, channels=1, **data).override("model", preset="tiny")
            .override("detect", depth=50, steps=1)
            .override("train", batch_size=4, max_steps=3, warmup_steps=1, log_every=1, sample_every=10_000,
                      anomaly_fraction=0.0)
            .override("head", enabled=False).override("backbone", image_size=64))


@pytest.mark.usefixtures("one_thread")
def test_k_shot_model_fine_tuned_from_a_base_with_diffusion_variations(tmp_path):
    from anoddpm.bundle import load_bundle
    from anoddpm.data.synth import make_synthetic_dataset
    from anoddpm.training.train import train

    make_synthetic_dataset(tmp_path / "data", "new", size=32, n_train=6, n_test_good=0, n_test_defect=0, seed=2)
    cfg = _train_cfg(shots=2, augment="diffusion", variations=2)
    gen = torch.Generator().manual_seed(5)  # a base far from any fresh initialisation
    base_w = {k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
              for k, v in _model(cfg).state_dict().items()}
    base = save_bundle(tmp_path / "base.pt", cfg=cfg, state_dict=base_w, fingerprint={"source": "test", "n": 0})
    cfg = cfg.override("train", init=str(base)).validate()
    tuned_w = load_bundle(train(cfg, tmp_path / "data", "new", tmp_path / "tuned", device="cpu"))
    torch.manual_seed(0)
    fresh = build_unet(cfg).state_dict()
    moved = sum((tuned_w.state_dict[k] - base_w[k]).norm() for k in base_w)
    assert 0 < moved < 0.1 * sum((fresh[k] - base_w[k]).norm() for k in base_w)  # fine-tuned from the base
    assert tuned_w.cfg.train.init == str(base) and tuned_w.threshold["leave_one_out"]
    assert np.isfinite(tuned_w.threshold["image"])
    one = cfg.override("data", shots=1).validate()  # one shot: its variations make the folds
    assert np.isfinite(load_bundle(train(one, tmp_path / "data", "new", tmp_path / "one", device="cpu"))
                       .threshold["image"])
    with pytest.raises(ValueError, match="--init .*channels"):
        train(cfg.override("data", channels=3).validate(), tmp_path / "data", "new", tmp_path / "bad", device="cpu")
