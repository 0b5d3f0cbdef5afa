"""`anoddpm train`: flags -> config -> ``anoddpm.training.train.train``."""
from __future__ import annotations

import argparse
import logging
import os
import time

from anoddpm.bundle import load_bundle
from anoddpm.cli.parser import resolve_train_config
from anoddpm.data.datasets import infer_channels, training_files
from anoddpm.data.shots import check_shots
from anoddpm.training.train import train

log = logging.getLogger(__name__)


def train_command(args: argparse.Namespace) -> int:
    """CLI handler of `anoddpm train`; the bundle path and its threshold go to stdout (kept by -q)."""
    start = time.perf_counter()
    shots = getattr(args, "shots", None)
    if shots is not None and shots < 1:  # data.shots 0 means "all images": on the command line it is a mistake
        cfg = resolve_train_config(argparse.Namespace(**{**vars(args), "shots": None}))
        _, folder, files, _ = training_files(cfg, args.data, args.category)
        check_shots(shots, len(files), folder)
    cfg = resolve_train_config(args)
    if args.channels is None and args.config is None:
        channels = infer_channels(args.data, args.category, cfg)
        log.info("channels: %d (from the training images; set --channels to override)", channels)
        cfg = cfg.override("data", channels=channels).validate()
    bundle = train(cfg, args.data, args.category, args.out, resume=args.resume, device=args.device,
                   logger=getattr(args, "logger", "none"))
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun rank 0 alone writes and calibrates the bundle
        return 0
    threshold = load_bundle(bundle).threshold or {}
    image = threshold.get("image")
    good = "leave-one-out" if threshold.get("leave_one_out") else "held-back"
    print(f"trained {bundle}: image threshold {'n/a' if image is None else f'{image:.6g}'} "
          f"({threshold.get('n_good', 0)} {good} good images), {(time.perf_counter() - start) / 60:.1f} min in all "
          "(training and calibration)")
    return 0
