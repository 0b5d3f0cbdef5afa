"""Training the eps-UNet on good images: `anoddpm train`, single process or under torchrun (DDP).

Resuming reproduces an uninterrupted run exactly on CPU: the data order is a pure function of
(seed, epoch), the position in it is part of the checkpoint, and so are every RNG state (python,
numpy, torch, the noise generator of each rank), the EMA weights, optimizer and scheduler.

Healing training (``train.anomaly_fraction > 0``): that share of samples is noised from a
synthetic-anomaly version of the image while the eps target still points at the clean image,
so the denoiser learns to remove defects rather than reproduce them (draws come from the same
noise generator, so resume stays exact).

With ``head.enabled`` the denoiser gets ``1 - head.budget_fraction`` of the step and minute
budget; the learned scoring head (`anoddpm.model.head`) is then trained on the main process with the
rest, on synthetic anomalies reconstructed by the frozen EMA denoiser's Detector. The checkpoint
covers the denoiser phase: a resumed run re-trains the head from its fixed seed after the last
denoiser step (identical to an uninterrupted run when the head budget is bounded by steps).
Runs whose head share of ``max_steps`` is under ``head.min_steps`` give the denoiser the whole
budget instead, and a head whose fused map does not beat the residual on held-back synthetic
anomalies (`anoddpm.training.head_check`) is left out of the bundle. With ``train.adapt_steps`` a copy of the
backbone is then adapted to the denoiser's reconstructions (`anoddpm.training.adaptation`, after the head, from its
own seed: a resumed run adapts it again) and stored in the bundle. A retrieval-conditioned denoiser
(``model.condition`` 'retrieval') sees, at every step, the good training images nearest each image (never itself;
``anoddpm.training.retrieval_conditions``).
"""
from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from anoddpm.platform.atomic import atomic_torch_save, atomic_write_text, out_folder
from anoddpm.bundle import save_bundle
from anoddpm.training.checkpointing import (CHECKPOINT_FORMAT, StopFlag, acquire_run_lock, load_checkpoint,
                                            release_run_lock, rng_state, weights_digest)
from anoddpm.config import Config
from anoddpm.training.denoiser_step import DenoiserOptimiser
from anoddpm.platform.device import resolve_device
from anoddpm.platform.progress import progress
from anoddpm.model.diffusion import GaussianDiffusion, partial_diffusion_reconstruct
from anoddpm.training.adaptation import adapt_backbone
from anoddpm.training.head_phase import (checked_head, denoiser_steps_before_head, head_is_trained,
                                train_head_phase)
from anoddpm.data.datasets import ImageDataset, load_training_data
from anoddpm.data.imageio import save_png
from anoddpm.model.intensity import model_inputs
from anoddpm.model.unet import bind_condition
from anoddpm.training.run_log import RunLog
from anoddpm.detection.backbone import check_backbone
from anoddpm.detection.calibration import calibrate_bundle
from anoddpm.detection.fewshot import check_folds
from anoddpm.training.finetune import base_weights, with_prior_samples
from anoddpm.training.variations import calibrate_k_shot
from anoddpm.detection.tiling import as_tiles
from anoddpm.training.crops import random_crops, random_tiles
from anoddpm.training.retrieval_conditions import TrainingRetrieval

log = logging.getLogger(__name__)

HASH_ENV = "ANODDPM_WEIGHT_HASH_DIR"  # tests: each rank writes a digest of its final weights here


def batch_indices(seed: int, n: int, start: int, count: int) -> list[int]:
    """Dataset indices at stream positions [start, start+count): epoch e is a permutation seeded by (seed, e)."""
    out: list[int] = []
    pos = start
    while len(out) < count:
        epoch, offset = divmod(pos, n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        take = min(count - len(out), n - offset)
        out.extend(int(i) for i in perm[offset:offset + take])
        pos += take
    return out


class _Dist:
    """Rank, world size and helpers; a no-op single process unless WORLD_SIZE > 1."""

    def __init__(self, device_name: str) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        device = resolve_device(device_name)
        if self.world > 1:
            if device.type == "cuda":
                device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(device)
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
        self.device = device
        self.main = self.rank == 0

    def any(self, flag: bool) -> bool:
        """True on every rank if any rank says True."""
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item() > 0)

    def gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _sample_grid(path: Path, cfg: Config, ema: nn.Module, diffusion: GaussianDiffusion, images: torch.Tensor,
                 condition: torch.Tensor | None) -> None:
    """PNG rows of input as the model sees it | noised (t=depth-1) | EMA reconstruction with a few DDIM steps
    (conditioned on `condition` [B, k * C, S, S] in [0, 1], the retrieved neighbours, when given)."""
    from noise import make_noise

    d, depth = cfg.diffusion, cfg.detect.depth
    gen = torch.Generator(device=images.device).manual_seed(cfg.detect.seed)
    x_start = model_inputs(images, images, cfg.data.intensity)[0]
    t = torch.full((x_start.shape[0],), depth - 1, device=images.device)
    noise = make_noise(cfg.detect.noise, tuple(x_start.shape), t=t, generator=gen, device=images.device,
                       octaves=d.octaves, persistence=d.persistence, frequency=d.frequency, standardise=d.standardise)
    model = bind_condition(ema, condition, cfg)
    with torch.no_grad():
        noised = diffusion.q_sample(x_start, depth - 1, noise)
        recon = partial_diffusion_reconstruct(model, diffusion, x_start, depth, min(5, depth), "ddim", noise)
    cols = [(v.clamp(-1, 1) + 1) / 2 for v in (x_start, noised, recon)]
    grid = torch.cat([torch.cat(list(c), dim=-1) for c in zip(*cols)], dim=-2)  # [C, rows*S, 3*S]
    save_png(path, grid.float().cpu().numpy())


def train(cfg: Config, data_root: str | Path, category: str | None, out_dir: str | Path,
          resume: bool = False, device: str = "auto", logger: str = "none") -> Path:
    """Train on good images of ROOT[/category]; writes RUN_DIR/{config.json,log.jsonl,checkpoint.pt,model.pt}.

    Returns the bundle path. Under DDP rank 0 alone trains the head, writes and calibrates the bundle;
    the other ranks return when the denoiser phase ends. cfg.train.batch_size is per process; under
    DDP the global batch is batch_size * WORLD_SIZE. max_steps counts the run's total optimizer steps
    (including resumed ones). `logger` 'tensorboard' mirrors log.jsonl and the calibration to
    RUN_DIR/tensorboard (``anoddpm.training.run_log``).

    One training at a time per RUN_DIR (RUN_DIR/train.lock, removed at the end; the lock of a killed run is taken
    over). A loss that is not a finite number stops the run with a ValueError (checked every ``train.log_every``
    steps and before every checkpoint): no bundle is written and checkpoint.pt keeps the last good step.
    """
    check_backbone(cfg.validate())  # the whole config, backbone weights included, before any work
    base = base_weights(cfg, cfg.train.init) if cfg.train.init else None  # --init: checked before any work too
    out = Path(out_dir)
    dist = _Dist(device)
    run_log: RunLog | None = None
    lock: Path | None = None
    try:
        lock = _lock_run_folder(out, dist)
        tc = cfg.train
        max_steps, max_minutes = tc.max_steps, tc.max_minutes
        if head_is_trained(cfg):  # the denoiser's share of the budget; the head gets the rest
            max_steps = denoiser_steps_before_head(cfg)
            max_minutes = None if tc.max_minutes is None else tc.max_minutes * (1 - cfg.head.budget_fraction)
        ckpt_path = out / "checkpoint.pt"
        _prepare_run_folder(out, resume, dist.main)
        run_log = RunLog(out, logger) if dist.main else None
        if dist.main:
            log.info("config:\n%s", json.dumps(cfg.to_dict(), indent=2))
        dist.barrier()

        random.seed(tc.seed)
        np.random.seed(tc.seed)
        torch.manual_seed(tc.seed)
        train_ds, val_ds, fingerprint = load_training_data(cfg, data_root, category, tc.seed)
        if cfg.data.shots:  # a K-shot model: no held-back split, calibrated leave-one-out on the shots
            check_folds(len(train_ds), cfg.data.variations if cfg.data.augment == "diffusion" else 0)
            val_ds = ImageDataset(train_ds.arrays, train_ds.names)  # the shots unaugmented: previews, head check
        elif len(train_ds) == 0 or len(val_ds) == 0:
            raise ValueError(f"{data_root}: {fingerprint['n_files']} good image(s) leave {len(train_ds)} to train "
                             f"on and {len(val_ds)} held back to calibrate the threshold; give at least 2 good "
                             "images (and data.val_fraction > 0)")
        state = DenoiserOptimiser(cfg, dist.device, dist.rank, dist.world)
        retrieval = TrainingRetrieval(cfg, train_ds.arrays, dist.device) if cfg.model.condition == "retrieval" else None
        stream = train_ds  # what the denoiser trains on: with --init, the good images and the base model's samples
        if base is not None:
            state.start_from(base)
            stream = with_prior_samples(cfg, train_ds, state.ema, state.diffusion, dist.device)
        for name in ("train_crop", "tile_size"):
            if getattr(cfg.data, name) % state.model.size_multiple:
                raise ValueError(f"data.{name}={getattr(cfg.data, name)} must be a multiple of "
                                 f"{state.model.size_multiple} for model.preset={cfg.model.preset}")
        step = _resume(ckpt_path, cfg, fingerprint, state, dist) if resume else 0
        if dist.main:  # only once a resume was accepted: a refused one leaves the run's config.json as it was
            atomic_write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
        start_time, start_step = time.perf_counter(), step
        step, interrupted = _denoiser_loop(cfg, state, dist, stream, val_ds, fingerprint, out, step,
                                           max_steps, max_minutes, run_log, retrieval)
        if os.environ.get(HASH_ENV):
            atomic_write_text(Path(os.environ[HASH_ENV]) / f"rank{dist.rank}.txt",
                              weights_digest(state.model.state_dict()))
        bundle = out / "model.pt"
        if dist.main:
            elapsed = time.perf_counter() - start_time
            log.info("trained %d steps in %.1f s (%.2f steps/s)", step - start_step, elapsed,
                     (step - start_step) / max(elapsed, 1e-9))
            head_state = None
            if head_is_trained(cfg) and not interrupted:
                head_minutes = None if tc.max_minutes is None else max(0.0, tc.max_minutes - elapsed / 60)
                head = train_head_phase(cfg, state.ema, state.diffusion, as_tiles(train_ds, cfg), dist.device,
                                        tc.max_steps - max_steps, head_minutes, run_log)
                head_state = checked_head(cfg, state.ema, state.diffusion, head, as_tiles(val_ds, cfg), dist.device,
                                          run_log)
            adapted = (adapt_backbone(cfg, state.ema, state.diffusion, train_ds, dist.device, run_log)
                       if tc.adapt_steps and not interrupted else None)
            save_bundle(bundle, cfg=cfg, state_dict=state.ema.state_dict(), fingerprint=fingerprint,
                        head_state_dict=head_state, adapted_backbone=adapted)
            log.info("bundle: %s", bundle)
        if interrupted:
            if dist.main:
                log.warning("interrupted at step %d; checkpoint saved, continue with --resume", step)
            raise KeyboardInterrupt
        if dist.main:
            calibration_start = time.perf_counter()
            threshold = (calibrate_k_shot(bundle, cfg, state.ema, state.diffusion, train_ds.arrays, dist.device)
                         if cfg.data.shots
                         else calibrate_bundle(bundle, val_ds, dist.device, train_ds))
            log.info("calibrated in %.1f s (after the training budget: --max-minutes covers the training steps)",
                     time.perf_counter() - calibration_start)
            run_log.scalars("calibration", step, {k: threshold[k] for k in ("image", "pixel", "n_good")
                                                  if threshold.get(k) is not None})
        # no barrier here: the other ranks would wait through the head phase, longer than NCCL's timeout
        return bundle
    finally:
        if run_log is not None:
            run_log.close()
        if lock is not None:
            release_run_lock(lock)
        dist.close()


def _lock_run_folder(out: Path, dist: _Dist) -> Path | None:
    """The main rank creates RUN_DIR and takes its lock (-> its path; None on the other ranks); every rank raises
    the same one-line ValueError when another training holds it."""
    lock, refused = None, None
    if dist.main:
        try:
            out_folder(out).mkdir(parents=True, exist_ok=True)
            lock = acquire_run_lock(out)
        except ValueError as err:
            refused = err
    if dist.any(refused is not None):
        raise refused or ValueError(f"{out} is in use by another training (see {out / 'train.lock'})")
    return lock


def _prepare_run_folder(out: Path, resume: bool, main: bool) -> None:
    """Refuse a run folder that holds a checkpoint unless resuming (checked on every rank, so none is left
    waiting); on the main rank create it and drop temporary files of a process killed mid-write."""
    out_folder(out)
    if (out / "checkpoint.pt").exists() and not resume:
        raise ValueError(f"{out} already holds a checkpoint; pass --resume to continue it or choose another --out")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".*.tmp"):  # the target itself is intact
            stale.unlink(missing_ok=True)


def _resume(ckpt_path: Path, cfg: Config, fingerprint: dict, state: DenoiserOptimiser, dist: _Dist) -> int:
    """Load a checkpoint the run may continue into `state` -> its step."""
    ckpt = load_checkpoint(ckpt_path, cfg, fingerprint, dist.world)
    try:
        state.load_state_dict(ckpt, ckpt["rng"][dist.rank])
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ValueError(f"--resume: {ckpt_path} holds weights or states that do not fit this run ({first}); start "
                         "a new run with another --out") from err
    step = ckpt["step"]
    if ckpt["sampler"]["position"] != step * cfg.train.batch_size * dist.world:
        raise ValueError(f"{ckpt_path}: sampler position does not match step {step}")
    if dist.main:
        log.info("resuming from %s at step %d", ckpt_path, step)
    return step


def _save_checkpoint(path: Path, cfg: Config, state: DenoiserOptimiser, dist: _Dist, step: int, n_train: int,
                     fingerprint: dict) -> None:
    """Write the checkpoint of `step` (every rank's RNG state gathered; the main rank writes, atomically)."""
    rng = dist.gather(rng_state(state.noise_gen, dist.device))
    if dist.main:
        atomic_torch_save({
            "format": CHECKPOINT_FORMAT, "config": cfg.to_dict(), "step": step, **state.state_dict(),
            "sampler": {"position": step * cfg.train.batch_size * dist.world, "epoch_size": n_train},
            "rng": rng, "fingerprint": json.loads(json.dumps(fingerprint, default=str)),
        }, path)


def _batches(cfg: Config, train_ds: Any, dist: _Dist, step: int,
             retrieval: TrainingRetrieval | None) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Training batches from `step` on, each a pure function of (seed, step, rank): ([B, C, S, S] on the device,
    the images' retrieved neighbours [B, k * C, S, S] when the denoiser is conditioned, else None)."""
    tc, n = cfg.train, len(train_ds)
    while True:
        idx = batch_indices(tc.seed, n, (step * dist.world + dist.rank) * tc.batch_size, tc.batch_size)
        if getattr(train_ds, "transform", None) is not None:  # augmentation as a pure function of the step
            train_ds.transform.set_random_seed(int(np.random.SeedSequence([tc.seed, step, dist.rank]).generate_state(1)[0]))
        items = [torch.as_tensor(train_ds[i]) for i in idx]
        if cfg.data.tile_size:  # native resolution: images differ in size, each gives one random tile
            images = random_tiles(items, cfg.data.tile_size, tc.seed, step, dist.rank)
        else:
            images = random_crops(torch.stack(items), cfg.data.train_crop, tc.seed, step, dist.rank)
        condition = None if retrieval is None else retrieval.of_indices(idx).to(dist.device)
        yield images.to(dist.device, non_blocking=True), condition
        step += 1


class _FiniteLoss:
    """Stops the run at the first check that finds a loss that is not a finite number (NaN, inf: the weights are
    lost from that step on), before it reaches a checkpoint, a log line or the bundle."""

    def __init__(self, ckpt: Path, step: int, lr: float, resumed: bool) -> None:
        self.ckpt, self.checked, self.lr = ckpt, step, lr
        self.saved: int | None = step if resumed else None  # step of the last checkpoint written

    def check(self, loss_sum: Tensor, dist: _Dist, step: int, *weights: nn.Module) -> None:
        """ValueError when the losses summed since the last check, or any of `weights` (before a checkpoint),
        are not finite (every rank agrees)."""
        finite = bool(torch.isfinite(loss_sum)) and all(bool(torch.isfinite(p).all()) for m in weights
                                                         for p in m.parameters())
        if dist.any(not finite):
            when = f"at step {step}" if self.checked + 1 >= step else f"between steps {self.checked + 1} and {step}"
            kept = f"{self.ckpt} keeps step {self.saved}" if self.saved is not None else "no checkpoint was written"
            raise ValueError(f"training stopped: the loss or the weights stopped being finite numbers ({when}); no "
                             f"bundle was written and {kept}; lower train.lr (--lr, now {self.lr:g}) and train into "
                             "another --out")
        self.checked = step


def _denoiser_loop(cfg: Config, state: DenoiserOptimiser, dist: _Dist, train_ds: Any, val_ds: Any,
                   fingerprint: dict, out: Path, step: int, max_steps: int, max_minutes: float | None,
                   run_log: RunLog | None, retrieval: TrainingRetrieval | None) -> tuple[int, bool]:
    """Denoiser steps from `step` until max_steps, max_minutes or a stop signal, logging, checkpointing and
    sampling on the way -> (last step, interrupted by a signal)."""
    tc = cfg.train
    preview_set = as_tiles(val_ds, cfg)
    preview = torch.stack([torch.as_tensor(preview_set[i]) for i in range(min(4, len(preview_set)))]).to(dist.device)
    preview_condition = None if retrieval is None else retrieval.of_images(preview)
    start_time, start_step, loss_sum, loss_count = time.perf_counter(), step, torch.zeros((), device=dist.device), 0
    interrupted = False
    ckpt = out / "checkpoint.pt"
    guard = _FiniteLoss(ckpt, step, cfg.train.lr, resumed=step > 0)
    bar = progress(total=max_steps, initial=step, desc="train", unit="step", mininterval=1.0, dynamic_ncols=True,
                   disable=not dist.main)
    with StopFlag() as flag:
        data = _batches(cfg, train_ds, dist, step, retrieval)
        while step < max_steps:
            minutes = (time.perf_counter() - start_time) / 60
            stop = flag.signal is not None or (max_minutes is not None and minutes >= max_minutes)
            # ranks agree on stopping every log_every steps: one collective, not a host sync per step
            if (dist.world == 1 or step % tc.log_every == 0) and dist.any(stop):
                interrupted = dist.any(flag.signal is not None)
                break
            images, condition = next(data)
            loss_sum += state.step(images, step + 1, condition)
            step += 1
            loss_count += 1
            bar.update(1)
            if step % tc.log_every == 0 or step == max_steps:
                guard.check(loss_sum, dist, step)
                elapsed = time.perf_counter() - start_time
                record = {"step": step, "loss": loss_sum.item() / loss_count, "lr": state.sched.get_last_lr()[0],
                          "images_per_s": (step - start_step) * tc.batch_size * dist.world / max(elapsed, 1e-9),
                          "elapsed": elapsed}
                loss_sum.zero_()
                loss_count = 0
                if dist.main:
                    run_log(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.1f}")
            if step % tc.checkpoint_every == 0:
                guard.check(loss_sum, dist, step, state.model, state.ema)
                _save_checkpoint(ckpt, cfg, state, dist, step, len(train_ds), fingerprint)
                guard.saved = step
            if dist.main and step % tc.sample_every == 0:
                _sample_grid(out / "samples" / f"step_{step:07d}.png", cfg, state.ema, state.diffusion, preview,
                             preview_condition)
        bar.close()
        if step % tc.checkpoint_every != 0 or interrupted:
            guard.check(loss_sum, dist, step, state.model, state.ema)
            _save_checkpoint(ckpt, cfg, state, dist, step, len(train_ds), fingerprint)
    return step, interrupted
