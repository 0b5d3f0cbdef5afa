"""Training the eps-UNet on good images: `anoddpm train`, single process or under torchrun (DDP).

Resuming reproduces an uninterrupted run exactly on CPU: the data order is a pure function of
(seed, epoch), the position in it is part of the checkpoint, and so are every RNG state (python,
numpy, torch, the noise generator of each rank), the EMA weights, optimizer and scheduler.

Healing training (``train.anomaly_fraction > 0``): that share of samples is noised from a
synthetic-anomaly version of the image while the eps target still points at the clean image,
so the denoiser learns to remove defects rather than reproduce them (draws come from the same
noise generator, so resume stays exact).

With ``head.enabled`` the denoiser gets ``1 - head.budget_fraction`` of the step and minute
budget; the learned scoring head (`anoddpm.head`) is then trained on the main process with the
rest, on synthetic anomalies reconstructed by the frozen EMA denoiser's Detector. The checkpoint
covers the denoiser phase: a resumed run re-trains the head from its fixed seed after the last
denoiser step (identical to an uninterrupted run when the head budget is bounded by steps).
Runs whose head share of ``max_steps`` is under ``head.min_steps`` give the denoiser the whole
budget instead, and a head whose fused map does not beat the residual on held-back synthetic
anomalies (`anoddpm.head_check`) is left out of the bundle.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from anoddpm.anomalies import synthesize_anomalies
from anoddpm.atomic import atomic_torch_save, atomic_write_text, out_folder
from anoddpm.bundle import save_bundle
from anoddpm.checkpointing import (CHECKPOINT_FORMAT, StopFlag, load_checkpoint, rng_state, set_rng_state,
                                   weights_digest)
from anoddpm.config import Config
from anoddpm.device import resolve_device
from anoddpm.diffusion import GaussianDiffusion, partial_diffusion_reconstruct
from anoddpm.head_phase import (calibrate_bundle, checked_head, denoiser_steps_before_head, head_is_trained,
                                train_head_phase)
from anoddpm.imageio import save_png
from anoddpm.intensity import model_inputs
from anoddpm.run_log import RunLog
from anoddpm.tiled import as_tiles, random_tiles
from anoddpm.unet import build_unet

log = logging.getLogger(__name__)

HASH_ENV = "ANODDPM_WEIGHT_HASH_DIR"  # tests: each rank writes a digest of its final weights here


def random_crops(images: Tensor, side: int, seed: int, step: int, rank: int) -> Tensor:
    """A random side x side crop of each image [B, C, S, S] (same dtype/device); offsets are a pure function
    of (seed, step, rank), so a resumed run sees the same crops."""
    size = images.shape[-1]
    if side <= 0 or side >= size:
        return images
    offsets = np.random.default_rng([seed, step, rank, 1]).integers(0, size - side + 1, size=(images.shape[0], 2))
    return torch.stack([img[:, y:y + side, x:x + side] for img, (y, x) in zip(images, offsets.tolist())])


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


def _sample_grid(path: Path, cfg: Config, ema: nn.Module, diffusion: GaussianDiffusion, images: torch.Tensor) -> None:
    """PNG rows of input as the model sees it | noised (t=depth-1) | EMA reconstruction with a few DDIM steps."""
    from noise import make_noise

    d, depth = cfg.diffusion, cfg.detect.depth
    gen = torch.Generator(device=images.device).manual_seed(cfg.detect.seed)
    x_start = model_inputs(images, images, cfg.data.intensity)[0]
    t = torch.full((x_start.shape[0],), depth - 1, device=images.device)
    noise = make_noise(cfg.detect.noise, tuple(x_start.shape), t=t, generator=gen, device=images.device,
                       octaves=d.octaves, persistence=d.persistence, frequency=d.frequency, standardise=d.standardise)
    with torch.no_grad():
        noised = diffusion.q_sample(x_start, depth - 1, noise)
        recon = partial_diffusion_reconstruct(ema, diffusion, x_start, depth, min(5, depth), "ddim", noise)
    cols = [(v.clamp(-1, 1) + 1) / 2 for v in (x_start, noised, recon)]
    grid = torch.cat([torch.cat(list(c), dim=-1) for c in zip(*cols)], dim=-2)  # [C, rows*S, 3*S]
    save_png(path, grid.float().cpu().numpy())


def healing_loss(model: nn.Module, diffusion: GaussianDiffusion, x_clean: Tensor, x_input: Tensor, t: Tensor,
                 noise: Tensor, loss: str = "l2", snr_cap: float = 5.0) -> Tensor:
    """eps loss of x_t = q_sample(x_input, t, noise) against the eps that leads back to x_clean; scalar.

    x_clean, x_input, noise [B, C, H, W] in [-1, 1], t [B] long. Samples whose input differs from
    the clean image are weighted min(1, snr_cap / SNR_t) (min-SNR weighting): their eps target
    grows like sqrt(SNR_t) * (x_input - x_clean), which would otherwise swamp the loss at small t.
    """
    x_t = diffusion.q_sample(x_input, t, noise)
    abar = diffusion.alphas_cumprod[t].view(-1, 1, 1, 1).to(x_t.dtype)
    target = (x_t - abar.sqrt() * x_clean) / (1 - abar).sqrt()
    eps = model(x_t, t.float())
    err = (eps - target) ** 2 if loss == "l2" else (eps - target).abs()
    healed = (x_input != x_clean).flatten(1).any(dim=1)
    snr = abar.view(-1) / (1 - abar.view(-1))
    weight = torch.where(healed, (snr_cap / snr).clamp(max=1.0), torch.ones_like(snr))
    return (err.mean(dim=(1, 2, 3)) * weight).mean()


def train(cfg: Config, data_root: str | Path, category: str | None, out_dir: str | Path,
          resume: bool = False, device: str = "auto", logger: str = "none") -> Path:
    """Train on good images of ROOT[/category]; writes RUN_DIR/{config.json,log.jsonl,checkpoint.pt,model.pt}.

    Returns the bundle path. Under DDP rank 0 alone trains the head, writes and calibrates the bundle;
    the other ranks return when the denoiser phase ends. cfg.train.batch_size is per process; under
    DDP the global batch is batch_size * WORLD_SIZE. max_steps counts the run's total optimizer steps
    (including resumed ones). `logger` 'tensorboard' mirrors log.jsonl and the calibration to
    RUN_DIR/tensorboard (``anoddpm.run_log``).
    """
    from anoddpm.data import load_training_data
    from noise import make_noise

    cfg.validate()
    out = Path(out_dir)
    dist = _Dist(device)
    run_log: RunLog | None = None
    try:
        dev, tc, dc = dist.device, cfg.train, cfg.diffusion
        max_steps, max_minutes = tc.max_steps, tc.max_minutes
        with_head = head_is_trained(cfg)
        if with_head:  # the denoiser's share of the budget; the head gets the rest
            max_steps = denoiser_steps_before_head(cfg)
            max_minutes = None if tc.max_minutes is None else tc.max_minutes * (1 - cfg.head.budget_fraction)
        ckpt_path = out / "checkpoint.pt"
        out_folder(out)
        if ckpt_path.exists() and not resume:  # checked on every rank so none is left waiting
            raise ValueError(f"{out} already holds a checkpoint; pass --resume to continue it or choose another --out")
        run_log = RunLog(out, logger) if dist.main else None
        if dist.main:
            log.info("config:\n%s", json.dumps(cfg.to_dict(), indent=2))
            out.mkdir(parents=True, exist_ok=True)
            for stale in out.glob(".*.tmp"):  # left by a process killed mid-write; the target itself is intact
                stale.unlink(missing_ok=True)
        dist.barrier()

        random.seed(tc.seed)
        np.random.seed(tc.seed)
        torch.manual_seed(tc.seed)
        train_ds, val_ds, fingerprint = load_training_data(cfg, data_root, category, tc.seed)
        n = len(train_ds)
        if n == 0 or len(val_ds) == 0:
            raise ValueError(f"{data_root}: {fingerprint['n_files']} good image(s) leave {n} to train on and "
                             f"{len(val_ds)} held back to calibrate the threshold; give at least 2 good images "
                             "(and data.val_fraction > 0)")
        model = build_unet(cfg).to(dev)
        for name in ("train_crop", "tile_size"):
            if getattr(cfg.data, name) % model.size_multiple:
                raise ValueError(f"data.{name}={getattr(cfg.data, name)} must be a multiple of {model.size_multiple} "
                                 f"for model.preset={cfg.model.preset}")
        ema = copy.deepcopy(model).requires_grad_(False).eval()
        diffusion = GaussianDiffusion.from_config(dc).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, tc.warmup_steps)))
        amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if dev.type == "cuda" else None
        scaler = torch.amp.GradScaler(dev.type, enabled=amp_dtype == torch.float16)
        noise_gen = torch.Generator(device=dev).manual_seed((tc.seed + 1) * 1_000_003 + dist.rank)
        step = 0
        if resume:
            ckpt = load_checkpoint(ckpt_path, cfg, fingerprint, dist.world)
            model.load_state_dict(ckpt["model"])
            ema.load_state_dict(ckpt["ema"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            scaler.load_state_dict(ckpt["scaler"])
            set_rng_state(ckpt["rng"][dist.rank], noise_gen, dev)
            step = ckpt["step"]
            if ckpt["sampler"]["position"] != step * tc.batch_size * dist.world:
                raise ValueError(f"{ckpt_path}: sampler position does not match step {step}")
            if dist.main:
                log.info("resuming from %s at step %d", ckpt_path, step)
        if dist.main:  # only once a resume was accepted: a refused one leaves the run's config.json as it was
            atomic_write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
        net = model
        if dist.world > 1:
            net = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

        def save_checkpoint() -> None:
            rng = dist.gather(rng_state(noise_gen, dev))
            if dist.main:
                atomic_torch_save({
                    "format": CHECKPOINT_FORMAT, "config": cfg.to_dict(), "step": step,
                    "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                    "sampler": {"position": step * tc.batch_size * dist.world, "epoch_size": n},
                    "rng": rng, "fingerprint": json.loads(json.dumps(fingerprint, default=str)),
                }, ckpt_path)

        def batches() -> Iterator[torch.Tensor]:
            s = step
            while True:
                start = (s * dist.world + dist.rank) * tc.batch_size
                idx = batch_indices(tc.seed, n, start, tc.batch_size)
                if getattr(train_ds, "transform", None) is not None:  # augmentation as a pure function of the step
                    train_ds.transform.set_random_seed(int(np.random.SeedSequence([tc.seed, s, dist.rank]).generate_state(1)[0]))
                items = [torch.as_tensor(train_ds[i]) for i in idx]
                if cfg.data.tile_size:  # native resolution: images differ in size, each gives one random tile
                    images = random_tiles(items, cfg.data.tile_size, tc.seed, s, dist.rank)
                else:
                    images = random_crops(torch.stack(items), cfg.data.train_crop, tc.seed, s, dist.rank)
                yield images.to(dev, non_blocking=True)
                s += 1

        preview_set = as_tiles(val_ds, cfg)
        preview = torch.stack([torch.as_tensor(preview_set[i]) for i in range(min(4, len(preview_set)))]).to(dev)
        t_max = max(1, int(dc.t_max_fraction * dc.timesteps))
        t_min = min(int(dc.t_min_fraction * dc.timesteps), t_max - 1)  # both fractions may round to one t
        autocast = torch.autocast(dev.type, dtype=amp_dtype) if amp_dtype else nullcontext()
        start_time, start_step, loss_sum, loss_count = time.perf_counter(), step, torch.zeros((), device=dev), 0
        interrupted = False
        bar = tqdm(total=max_steps, initial=step, unit="step", mininterval=1.0, dynamic_ncols=True,
                   disable=not (dist.main and sys.stderr.isatty()))
        with StopFlag() as flag:
            data = batches()
            while step < max_steps:
                minutes = (time.perf_counter() - start_time) / 60
                stop = flag.signal is not None or (max_minutes is not None and minutes >= max_minutes)
                # ranks agree on stopping every log_every steps: one collective, not a host sync per step
                if (dist.world == 1 or step % tc.log_every == 0) and dist.any(stop):
                    interrupted = dist.any(flag.signal is not None)
                    break
                images = next(data)
                t = torch.randint(t_min, t_max, (images.shape[0],), generator=noise_gen, device=dev)
                noise = make_noise(dc.noise, tuple(images.shape), t=t, generator=noise_gen, device=dev,
                                   octaves=dc.octaves, persistence=dc.persistence, frequency=dc.frequency,
                                   standardise=dc.standardise)
                with autocast:
                    if tc.anomaly_fraction > 0:
                        damaged = synthesize_anomalies(images, noise_gen, clean_fraction=1 - tc.anomaly_fraction)[0]
                        x_start, x_input = model_inputs(images, damaged, cfg.data.intensity)
                        loss = healing_loss(net, diffusion, x_start, x_input, t, noise, dc.loss, tc.heal_snr_cap)
                    else:
                        x_start = model_inputs(images, images, cfg.data.intensity)[0]
                        loss = diffusion.training_loss(net, x_start, t, noise, dc.loss)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                scaler.step(opt)
                scaler.update()
                sched.step()
                step += 1
                decay = min(tc.ema_decay, (1 + step) / (10 + step))
                with torch.no_grad():
                    for e, p in zip(ema.parameters(), model.parameters()):
                        e.lerp_(p, 1 - decay)
                    for e, b in zip(ema.buffers(), model.buffers()):
                        e.copy_(b)
                loss_sum += loss.detach().float()
                loss_count += 1
                bar.update(1)
                if step % tc.log_every == 0 or step == max_steps:
                    elapsed = time.perf_counter() - start_time
                    record = {"step": step, "loss": loss_sum.item() / loss_count, "lr": sched.get_last_lr()[0],
                              "images_per_s": (step - start_step) * tc.batch_size * dist.world / max(elapsed, 1e-9),
                              "elapsed": elapsed}
                    loss_sum.zero_()
                    loss_count = 0
                    if dist.main:
                        run_log(record)
                        bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.1f}")
                if step % tc.checkpoint_every == 0:
                    save_checkpoint()
                if dist.main and step % tc.sample_every == 0:
                    _sample_grid(out / "samples" / f"step_{step:07d}.png", cfg, ema, diffusion, preview)
            bar.close()
            if step % tc.checkpoint_every != 0 or interrupted:
                save_checkpoint()
        if os.environ.get(HASH_ENV):
            atomic_write_text(Path(os.environ[HASH_ENV]) / f"rank{dist.rank}.txt", weights_digest(model.state_dict()))
        bundle = out / "model.pt"
        if dist.main:
            elapsed = time.perf_counter() - start_time
            log.info("trained %d steps in %.1f s (%.2f steps/s)", step - start_step, elapsed,
                     (step - start_step) / max(elapsed, 1e-9))
            head_state = None
            if with_head and not interrupted:
                head_minutes = None if tc.max_minutes is None else max(0.0, tc.max_minutes - elapsed / 60)
                log_fn = run_log
                head = train_head_phase(cfg, ema, diffusion, as_tiles(train_ds, cfg), dev, tc.max_steps - max_steps,
                                         head_minutes, log_fn)
                head_state = checked_head(cfg, ema, diffusion, head, as_tiles(val_ds, cfg), dev, log_fn)
            save_bundle(bundle, cfg=cfg, state_dict=ema.state_dict(), fingerprint=fingerprint,
                        head_state_dict=head_state)
            log.info("bundle: %s", bundle)
        if interrupted:
            if dist.main:
                log.warning("interrupted at step %d; checkpoint saved, continue with --resume", step)
            raise KeyboardInterrupt
        if dist.main:
            threshold = calibrate_bundle(bundle, val_ds, dev, train_ds)
            run_log.scalars("calibration", step, {k: threshold[k] for k in ("image", "pixel", "n_good")
                                                  if threshold.get(k) is not None})
        # no barrier here: the other ranks would wait through the head phase, longer than NCCL's timeout
        return bundle
    finally:
        if run_log is not None:
            run_log.close()
        dist.close()


def train_command(args: argparse.Namespace) -> int:
    """CLI handler of `anoddpm train`."""
    from anoddpm.cli import resolve_train_config
    from anoddpm.data import infer_channels

    cfg = resolve_train_config(args)
    if args.channels is None and args.config is None:
        channels = infer_channels(args.data, args.category, cfg)
        log.info("channels: %d (from the training images; set --channels to override)", channels)
        cfg = cfg.override("data", channels=channels).validate()
    train(cfg, args.data, args.category, args.out, resume=args.resume, device=args.device,
          logger=getattr(args, "logger", "none"))
    return 0
