"""Two CPU processes under torchrun (gloo) train in lockstep and end with identical weights."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from anoddpm.bundle import load_bundle
from anoddpm.config import Config
from anoddpm.data.synth import make_synthetic_dataset
from anoddpm.training.train import HASH_ENV

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # 28 s alone, ~40 s on the shared box: three Python/torch start-ups
def test_two_process_ddp_ranks_end_identical(tmp_path):
    make_synthetic_dataset(tmp_path / "data", "syn", size=32, n_train=12, n_test_good=0, n_test_defect=0, seed=1)
    cfg = (Config().override("data", image_size=32, min_val_images=2, val_fraction=0.2)
           .override("model", preset="tiny").override("detect", depth=20, steps=2)
           .override("train", batch_size=2, max_steps=8, warmup_steps=2, log_every=1, checkpoint_every=2)
           .override("head", enabled=True, min_steps=2, batch_size=2, base_channels=8))  # 6 denoiser steps, then 2 head steps on rank 0
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    hashes = tmp_path / "hashes"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), HASH_ENV: str(hashes)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           "-m", "anoddpm.cli", "train", "--data", str(tmp_path / "data"), "--category", "syn",
           "--out", str(tmp_path / "run"), "--config", str(tmp_path / "cfg.json"), "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = ((hashes / f"rank{r}.txt").read_text() for r in (0, 1))
    assert len(rank0) == 64 and rank0 == rank1
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 6 and len(ckpt["rng"]) == 2
    assert ckpt["sampler"]["position"] == 6 * 2 * 2  # global batch = per-rank batch x ranks
    assert not torch.equal(ckpt["rng"][0]["noise"], ckpt["rng"][1]["noise"])  # ranks draw different noise
    logs = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in logs]
    assert [r["step"] for r in records if "phase" not in r] == [1, 2, 3, 4, 5, 6]  # only rank 0 logs
    assert [r["step"] for r in records if r.get("phase") == "head"] == [1, 2]
    bundle = load_bundle(tmp_path / "run" / "model.pt")
    assert bundle.threshold is not None and bundle.head_state_dict is not None
