"""Two torchrun launches on one host act as two nodes (c10d rendezvous, gloo on CPU): lockstep training, a killed
node fails the run cleanly, and `--resume` on both nodes finishes it with the uninterrupted run's weights."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from anoddpm.bundle import load_bundle
from anoddpm.config import Config
from anoddpm.data.synth import make_synthetic_dataset
from anoddpm.training.train import HASH_ENV

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup(tmp_path: Path, max_steps: int) -> Path:
    make_synthetic_dataset(tmp_path / "data", "syn", size=32, n_train=12, n_test_good=0, n_test_defect=0, seed=1)
    cfg = (Config().override("data", image_size=32, min_val_images=2, val_fraction=0.2)
           .override("model", preset="tiny").override("detect", depth=20, steps=2)
           .override("train", batch_size=2, max_steps=max_steps, warmup_steps=2, log_every=1, checkpoint_every=2)
           .override("head", enabled=False))
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    return tmp_path / "cfg.json"


def _launch(tmp_path: Path, run: Path, port: int, hashes: Path, *extra: str) -> list[subprocess.Popen]:
    """Start node 0 and node 1 (each its own torchrun and process group) on the same shared run folder."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), HASH_ENV: str(hashes)}
    nodes = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
               f"--node-rank={node}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
               "--rdzv-id=multinode-test", "-m", "anoddpm.cli", "train", "--data", str(tmp_path / "data"),
               "--category", "syn", "--out", str(run), "--config", str(tmp_path / "cfg.json"), "--device", "cpu",
               *extra]
        nodes.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True))
    return nodes


def _wait(nodes: list[subprocess.Popen]) -> list[tuple[int, str]]:
    outs = [p.communicate(timeout=300)[0] for p in nodes]
    return [(p.returncode, out) for p, out in zip(nodes, outs)]


@pytest.mark.slow  # two torchrun agents + two workers start torch: ~30-60 s on the shared box
def test_two_nodes_train_in_lockstep_and_write_one_bundle(tmp_path):
    _setup(tmp_path, max_steps=6)
    hashes = tmp_path / "hashes"
    outs = _wait(_launch(tmp_path, tmp_path / "run", _free_port(), hashes))
    assert all(rc == 0 for rc, _ in outs), "\n".join(o[-3000:] for _, o in outs)
    rank0, rank1 = ((hashes / f"rank{r}.txt").read_text() for r in (0, 1))
    assert len(rank0) == 64 and rank0 == rank1
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 6 and len(ckpt["rng"]) == 2
    assert ckpt["sampler"]["position"] == 6 * 2 * 2  # global batch = per-rank batch x nodes
    assert load_bundle(tmp_path / "run" / "model.pt").threshold is not None
    assert not (tmp_path / "run" / "train.lock").exists()


@pytest.mark.slow  # three two-node launches: ~2-3 min on the shared box
def test_killed_node_fails_cleanly_and_resume_matches_uninterrupted(tmp_path):
    _setup(tmp_path, max_steps=16)
    ref_hashes, hashes = tmp_path / "ref_hashes", tmp_path / "hashes"
    outs = _wait(_launch(tmp_path, tmp_path / "ref", _free_port(), ref_hashes))
    assert all(rc == 0 for rc, _ in outs), "\n".join(o[-3000:] for _, o in outs)

    run = tmp_path / "run"
    nodes = _launch(tmp_path, run, _free_port(), hashes)
    deadline = time.monotonic() + 240
    while not (run / "checkpoint.pt").exists():
        assert time.monotonic() < deadline and nodes[0].poll() is None, "no checkpoint before the deadline"
        time.sleep(0.2)
    os.killpg(nodes[1].pid, signal.SIGKILL)  # node 1 dies: its agent and its worker
    outs = _wait(nodes)
    assert outs[0][0] != 0, outs[0][1][-3000:]  # node 0 fails instead of hanging or finishing alone
    if (run / "model.pt").exists():  # torchrun's SIGTERM takes the interrupt path: weights kept, never a threshold
        assert load_bundle(run / "model.pt").threshold is None
    step = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    assert 2 <= step < 16

    outs = _wait(_launch(tmp_path, run, _free_port(), hashes, "--resume"))
    assert all(rc == 0 for rc, _ in outs), "\n".join(o[-3000:] for _, o in outs)
    assert (hashes / "rank0.txt").read_text() == (hashes / "rank1.txt").read_text()
    assert (hashes / "rank0.txt").read_text() == (ref_hashes / "rank0.txt").read_text()  # bit-exact
    assert load_bundle(run / "model.pt").threshold is not None
