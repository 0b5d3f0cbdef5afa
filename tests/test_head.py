"""Learned scoring head: shapes, loss, learning a tiny task, train_head plumbing, ONNX export."""
import math

import numpy as np
import pytest
import torch

from anoddpm.config import Config
from anoddpm.model.head import ScoringHead, build_head
from anoddpm.training.head_training import head_loss, train_head


def _square_task(b: int, size: int, g: torch.Generator):
    """Textured images with one bright square; the 'reconstruction' is the same image without it."""
    recon = 0.3 + 0.1 * torch.rand(b, 1, size, size, generator=g)
    masks = torch.zeros(b, 1, size, size)
    corner = torch.randint(0, size - 6, (b, 2), generator=g)
    for i, (y, x) in enumerate(corner.tolist()):
        masks[i, :, y:y + 6, x:x + 6] = 1
    return recon + 0.4 * masks, recon, masks


def test_shapes_and_size():
    head = build_head(Config())
    assert 0.3e6 < sum(p.numel() for p in head.parameters()) < 0.7e6
    x = torch.rand(2, 3, 32, 32)
    assert ScoringHead(3, 8)(x, x).shape == (2, 1, 32, 32)
    prob = ScoringHead(3, 8).eval().anomaly_map(x, x)
    assert prob.min() >= 0 and prob.max() <= 1


def test_loss_rewards_right_masks():
    masks = (torch.rand(2, 1, 16, 16) > 0.8).float()
    good = head_loss(20 * (2 * masks - 1), masks)
    bad = head_loss(-20 * (2 * masks - 1), masks)
    assert good < 0.01 and bad > 0.9


def test_head_learns_tiny_task():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    head = ScoringHead(1, 8)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        x, r, m = _square_task(4, 32, g)
        loss = head_loss(head(x, r), m)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.4 * np.mean(losses[:5])


def test_train_head_runs_on_a_dataset():
    cfg = Config().override("head", base_channels=8, batch_size=2)
    images = [torch.rand(1, 32, 32) for _ in range(5)]
    head = build_head(cfg.override("data", image_size=32))
    logs = []
    stats = train_head(head, lambda x: x, images, cfg, torch.Generator().manual_seed(0), max_steps=3,
                       max_minutes=None, device=torch.device("cpu"), log_fn=logs.append)
    assert stats["steps"] == 3 and np.isfinite(stats["loss"]) and not head.training
    assert logs and logs[-1]["step"] == 3
    with pytest.raises(ValueError, match="max_steps"):
        train_head(head, lambda x: x, images, cfg, torch.Generator(), 0, None, torch.device("cpu"))


def test_head_learning_rate_decays_to_zero_over_its_step_budget():
    cfg = Config().override("head", base_channels=8, batch_size=2).override("train", log_every=1)
    images = [torch.rand(1, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    head = build_head(cfg.override("data", image_size=32))
    records = []
    train_head(head, lambda x: x, images, cfg, torch.Generator().manual_seed(0), max_steps=8, max_minutes=60.0,
               device=torch.device("cpu"), log_fn=records.append)
    lrs = [r["lr"] for r in records]
    assert lrs[0] == pytest.approx(cfg.head.lr) and all(a > b for a, b in zip(lrs, lrs[1:]))
    assert lrs[-1] == pytest.approx(cfg.head.lr * 0.5 * (1 + math.cos(math.pi * 7 / 8)), rel=1e-6)


def test_onnx_export_matches_torch(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    head = ScoringHead(3, 8).eval()
    x, r = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    path = tmp_path / "head.onnx"
    torch.onnx.export(head, (x, r), str(path), dynamo=False, opset_version=17, input_names=["images", "recon"],
                      output_names=["logits"], dynamic_axes={"images": {0: "b"}, "recon": {0: "b"}, "logits": {0: "b"}})
    onnx.checker.check_model(onnx.load(str(path)))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x1, r1 = torch.rand(3, 3, 32, 32), torch.rand(3, 3, 32, 32)
    got = sess.run(None, {"images": x1.numpy(), "recon": r1.numpy()})[0]
    with torch.no_grad():
        want = head(x1, r1).numpy()
    assert np.abs(got - want).max() < 1e-4


def test_train_head_with_a_spent_time_budget_returns_without_steps():
    cfg = Config().override("head", base_channels=8, batch_size=2)
    images = [torch.rand(1, 32, 32) for _ in range(3)]
    head = build_head(cfg.override("data", image_size=32))
    stats = train_head(head, lambda x: x, images, cfg, torch.Generator().manual_seed(0), max_steps=5,
                       max_minutes=0.0, device=torch.device("cpu"))
    assert stats["steps"] == 0 and np.isnan(stats["loss"]) and not head.training
