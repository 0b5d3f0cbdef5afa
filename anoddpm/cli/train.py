"""`anoddpm train`: flags -> config -> ``anoddpm.training.train.train``."""
from __future__ import annotations

import argparse
import logging

from anoddpm.cli.parser import resolve_train_config
from anoddpm.data.datasets import infer_channels
from anoddpm.training.train import train

log = logging.getLogger(__name__)


def train_command(args: argparse.Namespace) -> int:
    """CLI handler of `anoddpm train`."""
    cfg = resolve_train_config(args)
    if args.channels is None and args.config is None:
        channels = infer_channels(args.data, args.category, cfg)
        log.info("channels: %d (from the training images; set --channels to override)", channels)
        cfg = cfg.override("data", channels=channels).validate()
    train(cfg, args.data, args.category, args.out, resume=args.resume, device=args.device,
          logger=getattr(args, "logger", "none"))
    return 0
