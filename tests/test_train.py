"""Trainer: loss falls, resume is bit-identical, config changes are refused, kills never corrupt checkpoints."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from anoddpm.bundle import load_bundle
from anoddpm.config import Config
from anoddpm.data.synth import make_synthetic_dataset
from anoddpm.training.crops import random_crops
from anoddpm.training.train import batch_indices, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_synthetic_dataset(root, "syn", size=32, n_train=14, n_test_good=0, n_test_defect=0, seed=0)
    return root


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _cfg(max_steps: int, **train_fields) -> Config:
    fields = dict(batch_size=4, max_steps=max_steps, warmup_steps=5, lr=1e-3, log_every=1,
                  checkpoint_every=4, sample_every=10_000)
    fields.update(train_fields)
    fields = {"anomaly_fraction": 0.0, **fields}  # plain AnoDDPM denoiser unless a test asks for healing
    return (Config().override("data", image_size=32, min_val_images=2, val_fraction=0.15)
            .override("model", preset="tiny").override("detect", depth=50, steps=2).override("train", **fields)
            .override("head", enabled=False).override("backbone", image_size=64))  # default scorer, small backbone input


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def test_batch_indices_are_epoch_permutations_and_position_independent():
    whole = batch_indices(seed=3, n=7, start=0, count=21)
    for epoch in range(3):
        assert sorted(whole[7 * epoch:7 * epoch + 7]) == list(range(7))
    assert whole[:7] != whole[7:14]  # a new order each epoch
    pieces = [i for s in range(0, 21, 5) for i in batch_indices(3, 7, s, min(5, 21 - s))]
    assert pieces == whole
    assert batch_indices(4, 7, 0, 7) != whole[:7]


def test_random_crops_are_slices_fixed_by_seed_step_and_rank():
    images = torch.arange(3 * 2 * 32 * 32, dtype=torch.float32).view(3, 2, 32, 32)
    crops = random_crops(images, 16, seed=0, step=5, rank=0)
    assert crops.shape == (3, 2, 16, 16)
    for img, crop in zip(images, crops):
        y, x = divmod(int(crop[0, 0, 0]) % (32 * 32), 32)  # the crop's first value gives its offset
        assert torch.equal(crop, img[:, y:y + 16, x:x + 16])
    assert torch.equal(crops, random_crops(images, 16, seed=0, step=5, rank=0))
    others = [random_crops(images, 16, seed=0, step=6, rank=0), random_crops(images, 16, seed=0, step=5, rank=1)]
    assert all(not torch.equal(crops, other) for other in others)
    assert random_crops(images, 0, 0, 0, 0) is images and random_crops(images, 32, 0, 0, 0) is images


def test_train_crop_must_fit_the_unet(data_root, tmp_path):
    cfg = _cfg(2).override("data", train_crop=24).override("model", preset="base")  # base halves the side 4 times
    with pytest.raises(ValueError, match="train_crop=24 must be a multiple of 16"):
        train(cfg, data_root, "syn", tmp_path / "run", device="cpu")


def test_loss_falls_and_run_dir_is_complete(data_root, tmp_path):
    cfg = _cfg(40, sample_every=40).override("diffusion", noise="gaussian")
    bundle_path = train(cfg, data_root, "syn", tmp_path / "run", device="cpu")
    losses = _losses(tmp_path / "run")
    assert len(losses) == 40
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.7 * first, (first, last)
    bundle = load_bundle(bundle_path)
    assert bundle.cfg == cfg
    assert bundle.threshold is not None and bundle.threshold["image"] > 0
    assert bundle.threshold["detect"] == cfg.to_dict()["detect"]
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == cfg.to_dict()
    assert (tmp_path / "run" / "samples" / "step_0000040.png").stat().st_size > 0


def test_resume_reproduces_an_uninterrupted_run_bit_for_bit(data_root, tmp_path):
    # augmentation, crops and simplex noise must be restored too
    cfg = _cfg(10).override("data", augment="texture", train_crop=16)
    train(cfg.override("train", max_steps=10), data_root, "syn", tmp_path / "whole", device="cpu")
    train(cfg.override("train", max_steps=6), data_root, "syn", tmp_path / "split", device="cpu")
    train(cfg, data_root, "syn", tmp_path / "split", resume=True, device="cpu")
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 10
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert _losses(tmp_path / "whole") == _losses(tmp_path / "split")
    whole, split = (load_bundle(tmp_path / r / "model.pt").state_dict for r in ("whole", "split"))
    assert all(torch.equal(whole[k], split[k]) for k in whole)


def test_resume_with_another_config_or_without_flag_is_refused(data_root, tmp_path):
    run = tmp_path / "run"
    train(_cfg(2), data_root, "syn", run, device="cpu")
    with pytest.raises(ValueError, match=r"train\.lr \(checkpoint 0\.001, now 0\.002\)"):
        train(_cfg(4, lr=2e-3), data_root, "syn", run, resume=True, device="cpu")
    assert json.loads((run / "config.json").read_text())["train"]["lr"] == 1e-3  # the refused settings not written
    with pytest.raises(ValueError, match="already holds a checkpoint; pass --resume"):
        train(_cfg(4), data_root, "syn", run, device="cpu")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(_cfg(4), data_root, "syn", tmp_path / "fresh", resume=True, device="cpu")


def test_checkpoint_from_before_a_config_field_existed_resumes(data_root, tmp_path):
    """A field added later (here detect.residual_norm) is missing from an older checkpoint: it takes its
    default, which keeps the old behaviour, so the run resumes instead of being refused as a config change."""
    run = tmp_path / "run"
    train(_cfg(2), data_root, "syn", run, device="cpu")
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    del ckpt["config"]["detect"]["residual_norm"]
    torch.save(ckpt, run / "checkpoint.pt")
    train(_cfg(3), data_root, "syn", run, resume=True, device="cpu")
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 3
    ckpt["config"]["detect"]["future_field"] = 1
    torch.save(ckpt, run / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"cannot read: unknown key\(s\) in config.detect: future_field"):
        train(_cfg(4), data_root, "syn", run, resume=True, device="cpu")


def _cli_train(data_root: Path, run: Path, cfg_file: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "anoddpm.cli", "train", "--data", str(data_root), "--category", "syn",
           "--out", str(run), "--config", str(cfg_file), "--device", "cpu", *extra]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigterm_saves_a_checkpoint_and_resume_finishes(data_root, tmp_path):
    run = tmp_path / "run"

    def stop_after_three_steps() -> None:
        deadline = time.time() + 60
        while time.time() < deadline and not ((run / "log.jsonl").exists() and len(_losses(run)) >= 3):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=stop_after_three_steps, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(1000, checkpoint_every=1000), data_root, "syn", run, device="cpu")
    step = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    assert 3 <= step < 1000
    assert signal.getsignal(signal.SIGTERM) is before  # handler restored
    train(_cfg(step + 2, checkpoint_every=1000), data_root, "syn", run, resume=True, device="cpu")
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == step + 2
    assert load_bundle(run / "model.pt").threshold is not None


@pytest.mark.slow
def test_sigkill_never_leaves_a_half_written_checkpoint(data_root, tmp_path):
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(_cfg(1000, checkpoint_every=1, log_every=1).to_dict()))
    run = tmp_path / "run"
    for delay in (0.7, 1.9, 3.1):
        proc = _cli_train(data_root, run, cfg_file, *(["--resume"] if (run / "checkpoint.pt").exists() else []))
        deadline = time.time() + 60
        while time.time() < deadline and not (run / "checkpoint.pt").exists():
            time.sleep(0.05)
        time.sleep(delay)  # checkpoints are written every step, so this lands mid-write sometimes
        proc.kill()
        proc.communicate()
        ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
        assert ckpt["step"] >= 1
    logged = len(_losses(run))
    term = _cli_train(data_root, run, cfg_file, "--resume")
    deadline = time.time() + 60
    while time.time() < deadline and len(_losses(run)) < logged + 2:  # handlers are installed by then
        time.sleep(0.05)
    term.send_signal(signal.SIGTERM)
    _, err = term.communicate(timeout=120)
    assert term.returncode == 130 and "continue with --resume" in err, err
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    done = _cli_train(data_root, run, cfg_file, "--resume", "--max-steps", str(ckpt["step"] + 2))
    _, err = done.communicate(timeout=120)
    assert done.returncode == 0, err
    assert not list(run.glob(".*.tmp"))
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == ckpt["step"] + 2


def test_training_draws_t_from_the_configured_range(data_root, tmp_path, monkeypatch):
    from anoddpm.model.diffusion import GaussianDiffusion

    drawn: list[torch.Tensor] = []
    plain_loss = GaussianDiffusion.training_loss

    def recording_loss(self, model, x_start, t, noise, loss="l2"):
        drawn.append(t.clone())
        return plain_loss(self, model, x_start, t, noise, loss)

    monkeypatch.setattr(GaussianDiffusion, "training_loss", recording_loss)
    cfg = _cfg(6).override("diffusion", t_min_fraction=0.04, t_max_fraction=0.06)
    train(cfg, data_root, "syn", tmp_path / "run", device="cpu")
    t = torch.cat(drawn)
    assert t.numel() == 6 * 4
    assert int(t.min()) >= 40 and int(t.max()) < 60
    assert len(set(t.tolist())) > 5  # drawn across the range, not one value


def test_healing_loss_points_at_the_clean_image():
    from anoddpm.model.diffusion import GaussianDiffusion
    from anoddpm.training.denoiser_step import healing_loss

    diffusion = GaussianDiffusion.from_config(Config().diffusion)
    g = torch.Generator().manual_seed(0)
    clean, noise = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1, torch.randn(4, 1, 8, 8, generator=g)
    damaged = clean.clone()
    damaged[:2, :, 2:5, 2:5] = 1.0
    t = torch.tensor([3, 600, 10, 700])

    class Oracle(torch.nn.Module):  # predicts the eps that leads from x_t back to the clean image
        def forward(self, x_t, t_float):
            abar = diffusion.alphas_cumprod[t_float.long()].view(-1, 1, 1, 1)
            return (x_t - abar.sqrt() * clean) / (1 - abar).sqrt()

    assert healing_loss(Oracle(), diffusion, clean, damaged, t, noise).item() < 1e-8
    zero = torch.nn.Module()
    zero.forward = lambda x_t, t_float: torch.zeros_like(x_t)
    plain = diffusion.training_loss(zero, clean, t, noise)
    torch.testing.assert_close(healing_loss(zero, diffusion, clean, clean, t, noise), plain)
    # a damaged sample at small t (SNR ~ 3000) is weighted down to snr_cap / SNR: its loss stays O(1)
    assert healing_loss(zero, diffusion, clean[:1], damaged[:1], t[:1], noise[:1]).item() < 10


def test_healing_resume_is_exact_and_head_lands_in_the_bundle(data_root, tmp_path):
    from anoddpm.detection.detector import Detector

    cfg = _cfg(8, anomaly_fraction=0.5).override("head", enabled=True, budget_fraction=0.25, batch_size=2,
                                                   base_channels=8, min_steps=2)
    train(cfg, data_root, "syn", tmp_path / "whole", device="cpu")
    train(cfg.override("train", max_steps=4), data_root, "syn", tmp_path / "split", device="cpu")
    train(cfg, data_root, "syn", tmp_path / "split", resume=True, device="cpu")
    logs = [json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs if "phase" not in r] == list(range(1, 7))  # 6 denoiser steps
    assert [r["step"] for r in logs if r.get("phase") == "head"] == [1, 2]
    whole, split = (load_bundle(tmp_path / r / "model.pt") for r in ("whole", "split"))
    assert all(torch.equal(whole.state_dict[k], split.state_dict[k]) for k in whole.state_dict)
    assert whole.head_state_dict is not None
    assert all(torch.equal(whole.head_state_dict[k], split.head_state_dict[k]) for k in whole.head_state_dict)
    assert whole.threshold["detect"]["scorer"] == "auto"
    det = Detector.from_bundle(whole, "cpu")
    assert det.head is not None and det.components == ("residual", "head", "feature_memory")  # auto, with the head


def test_short_runs_skip_the_head_and_a_head_that_fails_its_check_is_left_out(data_root, tmp_path, monkeypatch):
    import anoddpm.training.head_check
    from anoddpm.detection.detector import Detector

    cfg = _cfg(8).override("head", enabled=True, budget_fraction=0.25, batch_size=2, base_channels=8, min_steps=3)
    train(cfg, data_root, "syn", tmp_path / "short", device="cpu")  # head share 2 steps < 3: the denoiser gets all 8
    logs = [json.loads(line) for line in (tmp_path / "short" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == list(range(1, 9))
    assert load_bundle(tmp_path / "short" / "model.pt").head_state_dict is None

    monkeypatch.setattr(anoddpm.training.head_check, "head_earns_its_place", lambda check: False)
    cfg = cfg.override("head", min_steps=2).override("data", min_val_images=4)
    train(cfg, data_root, "syn", tmp_path / "dropped", device="cpu")
    logs = [json.loads(line) for line in (tmp_path / "dropped" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs if r.get("phase") == "head"] == [1, 2]
    check = next(r for r in logs if "head_check" in r)
    assert check["head_kept"] is False and check["head_check"]["n_good"] == 4
    assert 0 <= check["head_check"]["fused"]["pixel_auroc"] <= 1
    bundle = load_bundle(tmp_path / "dropped" / "model.pt")
    assert bundle.head_state_dict is None and Detector.from_bundle(bundle, "cpu").components == ("residual", "feature_memory")


def test_a_second_training_into_the_same_out_is_refused_and_a_dead_runs_lock_is_taken_over(data_root, tmp_path):
    """Issue 30: one training per --out (RUN_DIR/train.lock); names with a newline or non-UTF-8 bytes train."""
    import shutil
    import socket

    from anoddpm.training.checkpointing import LOCK_NAME, _process_start

    data = tmp_path / "data"
    shutil.copytree(data_root, data)
    good = sorted((data / "syn" / "train" / "good").iterdir())
    os.rename(good[0], good[0].with_name("line\nbreak.png"))
    os.rename(good[1], os.path.join(os.fsencode(good[1].parent), b"caf\xe9.png"))  # Latin-1, not UTF-8
    run = tmp_path / "run"
    run.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / LOCK_NAME).write_text(f"{other.pid} {socket.gethostname()} {_process_start(other.pid)}\n")
        with pytest.raises(ValueError, match=rf"{run} is in use by another training \(process {other.pid} "):
            train(_cfg(2), data, "syn", run, device="cpu")
        assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]  # nothing of the refused run
    finally:
        other.kill()
        other.wait()
    bundle = train(_cfg(2), data, "syn", run, device="cpu")  # the killed run's lock is stale: taken over
    assert load_bundle(bundle).fingerprint["n_files"] == 14
    assert not (run / LOCK_NAME).exists()


@pytest.fixture(scope="module")
def diverged(data_root, tmp_path_factory) -> tuple[Path, str]:
    """A run whose loss turns NaN (lr 1e6) after its step-2 checkpoint: (run folder, the error it stopped with)."""
    run = tmp_path_factory.mktemp("diverged") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the one_thread fixture
    try:
        with pytest.raises(ValueError) as err:
            train(_cfg(12, lr=1e6, warmup_steps=1, log_every=3, checkpoint_every=2), data_root, "syn", run,
                  device="cpu")
    finally:
        torch.set_num_threads(threads)
    return run, str(err.value)


def test_a_loss_that_turns_nan_stops_training_at_once_keeping_the_last_good_checkpoint(diverged):
    run, message = diverged
    assert "stopped being finite numbers (at step 3)" in message and "no bundle was written" in message
    assert "keeps step 2" in message
    assert "\n" not in message
    assert not (run / "model.pt").exists() and not (run / "train.lock").exists()
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for part in ("model", "ema") for v in ckpt[part].values())


def test_a_malformed_checkpoint_is_refused_with_one_line_on_resume(data_root, diverged, tmp_path):
    cfg = _cfg(12, lr=1e6, warmup_steps=1, log_every=3, checkpoint_every=2)
    good = torch.load(diverged[0] / "checkpoint.pt", weights_only=True)
    first = next(iter(good["model"]))
    cases = [(["not", "a", "checkpoint"], "it holds a list"),
             ({"format": 1, "config": cfg.to_dict()}, "lacks 'step' entry"),
             ({**good, "sampler": {"position": "0"}}, "malformed 'sampler.position' entry"),
             ({**good, "rng": "seeds"}, "malformed 'rng' entry"),
             ({**good, "model": {**good["model"], first: torch.zeros(3)}}, "do not fit this run")]
    for k, (content, expected) in enumerate(cases):
        run = tmp_path / f"run{k}"
        run.mkdir()
        torch.save(content, run / "checkpoint.pt")
        with pytest.raises(ValueError, match=expected) as err:
            train(cfg, data_root, "syn", run, resume=True, device="cpu")
        assert "\n" not in str(err.value)
