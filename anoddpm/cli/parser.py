"""The `anoddpm` argument parser: one verb per step of the flow, and the mapping of flags onto the config.

Each verb names its handler as a string (``module:function``), imported only when it runs, so `anoddpm inspect` and
`anoddpm info` on an ONNX file work on a line PC that has only deploy/requirements.txt (no torch).
"""
from __future__ import annotations

import argparse
import math

from anoddpm.version import __version__
from anoddpm.config import (AUGMENTATIONS, CONDITIONS, FUSIONS, INTENSITY_MODES, MAP_REFERENCES, NOISE_KINDS, PRESETS,
                            RESIDUAL_NORMS, RESIDUALS, SAMPLERS, SCORE_REDUCTIONS, COMPONENTS, Config, load_config_file)
from anoddpm.training.run_log import LOGGERS

DEBUG_ENV = "ANODDPM_DEBUG"  # set to 1 for tracebacks instead of one-line errors (like --debug)


def _add_data_args(p: argparse.ArgumentParser, data_help: str) -> None:
    p.add_argument("--data", required=True, metavar="ROOT", help=data_help)
    p.add_argument("--category", metavar="NAME",
                   help="category folder under ROOT (omit when ROOT is itself a category or image folder)")
    g = p.add_argument_group("folder layout (instead of a detected MVTec / LOCO / AD 2 / VisA layout)")
    g.add_argument("--normal-dir", metavar="DIR", help="folder of good images under ROOT")
    g.add_argument("--abnormal-dir", metavar="DIR",
                   help="folder of defect images under ROOT (sub-folders = defect types)")
    g.add_argument("--mask-dir", metavar="DIR",
                   help="folder of masks under ROOT, same relative path as each defect image (X.png or X_mask.png); "
                        "without it the defect images give image metrics only")
    g.add_argument("--normal-test-dir", metavar="DIR",
                   help="folder of good test images under ROOT (default: the held-back validation images)")


def layout_overrides(args: argparse.Namespace) -> dict:
    """DataConfig folder-layout fields given on the command line (None = keep the config's)."""
    return {name: getattr(args, name, None) for name in ("normal_dir", "abnormal_dir", "mask_dir", "normal_test_dir")}


def _positive_seconds(text: str) -> float:
    """An argparse type: a finite number of seconds > 0 (NaN or infinity would stop a watcher from ever polling)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive finite number of seconds")
    return value


def _add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N")


def _add_detect_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("detection (defaults come from the bundle)")
    g.add_argument("--depth", type=int, help="partial-diffusion depth lambda, in steps of T")
    g.add_argument("--steps", type=int, help="K deterministic strided reverse steps (fast path)")
    g.add_argument("--guidance", type=float, metavar="W",
                   help="input guidance: each reverse step's noise estimate is pulled toward the input noised to the "
                        "same level with weight W (DDAD); 0 = unguided")
    g.add_argument("--samples", type=int, help="reconstructions averaged per image")
    g.add_argument("--sampler", choices=SAMPLERS, help="ddim = fast path, ancestral = the paper's path")
    g.add_argument("--detect-noise", choices=NOISE_KINDS, help="noise kind used at detection")
    g.add_argument("--residual", choices=RESIDUALS, help="how the residual becomes an anomaly map")
    g.add_argument("--residual-norm", choices=RESIDUAL_NORMS,
                   help="brightness = residual relative to the local grey level (textures under varying exposure; "
                        "hurts objects on dark backgrounds)")
    g.add_argument("--score", choices=SCORE_REDUCTIONS, help="image score from the map: max or top-k mean")
    g.add_argument("--scorer", metavar="SCORER",
                   help="component maps combined by --fusion, each over its good-image reference: "
                        f"auto (the default components), fused (residual+head), or one or more of {', '.join(COMPONENTS)} "
                        "joined by '+' (feature_* use the pretrained backbone)")
    g.add_argument("--fusion", choices=FUSIONS,
                   help="how a scorer's component maps combine: geometric = per-pixel geometric mean (every component "
                        "must agree), max = per-pixel maximum, each in units of its typical good-image maximum "
                        "(calibrate fits them; any component may flag), mean = per-pixel mean in those units (DDAD's "
                        "sum of the pixel and feature maps)")
    g.add_argument("--memory-size", type=int, metavar="M",
                   help="patch features kept in the feature_memory bank (greedy coreset; calibrate fits it)")
    g.add_argument("--map-reference", choices=MAP_REFERENCES,
                   help="divide the map by a good-image reference fitted by calibrate: nearest_good = the mean map of "
                        "the training images nearest in a grey thumbnail, good_mean = the mean map of held-back "
                        "good images")
    g.add_argument("--reference-neighbours", type=int, metavar="K",
                   help="training images a nearest_good reference averages")
    g.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")


def detect_overrides(args: argparse.Namespace) -> dict:
    """DetectConfig fields given on the command line (None = keep the bundle's value)."""
    return {
        "depth": getattr(args, "depth", None),
        "steps": getattr(args, "steps", None),
        "guidance": getattr(args, "guidance", None),
        "samples": getattr(args, "samples", None),
        "sampler": getattr(args, "sampler", None),
        "noise": getattr(args, "detect_noise", None),
        "residual": getattr(args, "residual", None),
        "residual_norm": getattr(args, "residual_norm", None),
        "score": getattr(args, "score", None),
        "scorer": getattr(args, "scorer", None),
        "map_reference": getattr(args, "map_reference", None),
        "reference_neighbours": getattr(args, "reference_neighbours", None),
        "memory_size": getattr(args, "memory_size", None),
        "fusion": getattr(args, "fusion", None),
    }


def resolve_train_config(args: argparse.Namespace) -> Config:
    """Defaults <- config file <- flags; validated."""
    cfg = load_config_file(args.config) if args.config else Config()
    cfg = cfg.override("data", image_size=args.image_size, channels=args.channels, augment=args.augment,
                       train_crop=args.train_crop, intensity=args.intensity, tile_size=args.tile_size,
                       tile_scale=args.tile_scale, tile_stride=args.tile_stride, shots=getattr(args, "shots", None),
                       shots_seed=getattr(args, "shots_seed", None), **layout_overrides(args))
    cfg = cfg.override("model", preset=args.preset, condition=getattr(args, "condition", None),
                       retrieval_neighbours=getattr(args, "retrieval_neighbours", None))
    cfg = cfg.override("diffusion", noise=args.noise)
    cfg = cfg.override("train", batch_size=args.train_batch_size, lr=args.lr, max_steps=args.max_steps,
                       max_minutes=args.max_minutes, seed=args.seed, init=getattr(args, "init", None),
                       adapt_steps=getattr(args, "adapt_steps", None))
    cfg = cfg.override("head", enabled=args.head)
    return cfg.validate()


def build_parser() -> argparse.ArgumentParser:
    """The full parser; every verb's flags are a contract other tools rely on."""
    parser = argparse.ArgumentParser(
        prog="anoddpm",
        description="Visual anomaly detection with partial diffusion and simplex noise (AnoDDPM). "
        "Flow: synth/train -> calibrate -> evaluate/score -> export -> inspect.",
    )
    parser.add_argument("--version", action="version", version=f"anoddpm {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of an error instead of one line (also {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("synth", help="write a synthetic MVTec-layout defect dataset",
                       description="Write procedural textures with exact defect masks in the MVTec layout.")
    p.add_argument("--out", required=True, metavar="ROOT", help="dataset root to write")
    p.add_argument("--category", default="synthetic", help="category folder name (default synthetic)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--n-train", type=int, default=60, help="train/good images (default 60)")
    p.add_argument("--n-test-good", type=int, default=20, help="test/good images (default 20)")
    p.add_argument("--n-test-defect", type=int, default=30, help="defective test images (default 30)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")
    p.add_argument("--frame-size", metavar="WxH",
                   help="write large line-camera frames of W x H px instead (e.g. 2048x1536) with small 6-20 px "
                        "defects and thin 1-3 px lines (anoddpm.data.frames); --size is then unused")
    p.set_defaults(handler="anoddpm.cli.synth:synth_command")

    p = sub.add_parser("train", help="train the denoiser on good images",
                       description="Train the eps-UNet on good images; writes RUN_DIR/model.pt "
                       "(config, EMA weights, threshold, data fingerprint). Works under torchrun for DDP.")
    _add_data_args(p, "dataset root (MVTec AD / LOCO / AD 2, VisA; detected), a category folder, or a folder of "
                      "good images")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder (checkpoints, log, model.pt)")
    p.add_argument("--image-size", type=int, help="model input side in pixels (default 128)")
    p.add_argument("--channels", type=int, choices=(1, 3),
                   help="1 = grey, 3 = RGB (default: 3 when the first training image has colour, else 1)")
    p.add_argument("--preset", choices=PRESETS, help="UNet size (default small)")
    p.add_argument("--condition", choices=CONDITIONS,
                   help="retrieval: the denoiser also sees the good training images nearest its input (frozen "
                        "backbone's global embedding; RDM), which `calibrate --data` can swap without training "
                        "(default none; docs/retrieval.md)")
    p.add_argument("--retrieval-neighbours", type=int, metavar="K",
                   help="good images a --condition retrieval denoiser sees, nearest first (default 2)")
    p.add_argument("--noise", choices=NOISE_KINDS, help="training noise (default gaussian; simplex = the paper's)")
    p.add_argument("--augment", choices=AUGMENTATIONS,
                   help="training augmentation: flips keeps the texture's orientation, texture adds quarter turns; "
                        "diffusion (with --shots): diffusion-made variations of each shot, plus the flips and turns "
                        "that suit the product, for the feature memory, references and calibration (default none)")
    p.add_argument("--intensity", choices=INTENSITY_MODES,
                   help="per_image: normalise each image's brightness and contrast before the model (default none)")
    p.add_argument("--train-crop", type=int, metavar="PX",
                   help="train on random square crops of this side (multiple of 8; default 0 = whole images)")
    p.add_argument("--tile-size", type=int, metavar="T",
                   help="native resolution: train on random T x T crops and inspect with overlapping T x T tiles "
                        "stitched into maps of the original image size (multiple of 8; default 0 = squash every "
                        "image to --image-size)")
    p.add_argument("--tile-scale", type=float, metavar="F",
                   help="scale every image by F in (0, 1] before tiling: less resolution, fewer tiles (default 1)")
    p.add_argument("--tile-stride", type=int, metavar="PX",
                   help="step between inspection tiles (default 0 = half a tile)")
    p.add_argument("--head", action=argparse.BooleanOptionalAction, default=None,
                   help="train the learned scoring head on synthetic anomalies after the denoiser, with "
                   "head.budget_fraction of the budget; scorer auto then adds its map (default: off; skipped "
                   "when its share of --max-steps is under head.min_steps, dropped when it does not beat the "
                   "residual on held-back synthetic anomalies; docs/quality.md)")
    p.add_argument("--shots", type=int, metavar="K",
                   help="a K-shot model: train on K good images drawn with --shots-seed (K >= 1), hold none back, and "
                        "calibrate the threshold leave-one-out (each shot scored against states fitted on the others); "
                        "info shows K and the files (default: all good images, held-back split; docs/fewshot.md)")
    p.add_argument("--shots-seed", type=int, metavar="S",
                   help="seed of the draw of the --shots images: the same seed gives the same files, and a larger K "
                        "keeps a smaller K's shots (default 0)")
    p.add_argument("--init", metavar="BASE_MODEL_PT",
                   help="start the denoiser from this bundle (another product's, or a base model) and fine-tune it "
                        "with prior preservation: train.prior_fraction of the stream is the base model's own samples "
                        "(same channels, image size, preset and backbone as this run; docs/fewshot.md)")
    p.add_argument("--adapt-steps", type=int, metavar="N",
                   help="after the denoiser, fine-tune a copy of the backbone for N steps so that good images and "
                        "their reconstructions have the same features (DDAD's domain adaptation); the "
                        "feature_residual scorer then compares in it (default 0 = none; docs/reconstruction.md)")
    p.add_argument("--batch-size", dest="train_batch_size", type=int, metavar="N", help="images per step (default 8)")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default 2e-4)")
    p.add_argument("--max-steps", type=int, help="total optimizer steps of the run (default 10000)")
    p.add_argument("--max-minutes", type=float,
                   help="wall-clock budget of the training steps; stops cleanly and saves (the calibration after it "
                        "is extra: its time is logged and the final line gives the whole command's time)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR's last checkpoint")
    p.add_argument("--seed", type=int, help="seed for weights, data order and noise (default 0)")
    p.add_argument("--config", metavar="FILE", help="YAML or JSON config; flags override it")
    p.add_argument("--logger", choices=LOGGERS, default="none",
                   help="also write loss, learning rate and calibration scalars for TensorBoard into RUN_DIR/tensorboard "
                        "(needs the tensorboard package; default none: RUN_DIR/log.jsonl only)")
    _add_device_arg(p)
    p.set_defaults(handler="anoddpm.cli.train:train_command")

    p = sub.add_parser("calibrate", help="calibrate the threshold and write it into the bundle",
                       description="Score held-back good images (and labelled defects if given) and store "
                       "the threshold in the bundle. Detection flags given here (e.g. --scorer residual, "
                       "--depth) become the bundle's detection settings, used by score, evaluate and export.")
    p.add_argument("--model", required=True, metavar="MODEL_PT", help="bundle to calibrate (updated in place)")
    p.add_argument("--data", metavar="ROOT", help="dataset root (default: the training data in the bundle)")
    p.add_argument("--category", metavar="NAME")
    p.add_argument("--quantile", type=float, help="quantile of good scores used as threshold (default 0.99)")
    p.add_argument("--method", choices=("quantile", "f1"), default="quantile",
                   help="quantile of good scores (default), or F1-optimal on the labelled test/ set of --data")
    p.add_argument("--shots", type=int, metavar="K",
                   help="no training: fit every state on K good images of --data drawn with --shots-seed and take the "
                        "threshold leave-one-out; a --condition retrieval base model retrieves from them "
                        "(docs/fewshot.md)")
    p.add_argument("--shots-seed", type=int, default=0, metavar="S", help="seed of the draw of the --shots images "
                   "(default 0; the same as train --shots-seed)")
    p.add_argument("--out", metavar="MODEL_PT", help="write the calibrated bundle here and leave --model as it is "
                   "(default: --model is updated in place)")
    _add_detect_args(p)
    _add_device_arg(p)
    p.set_defaults(handler="anoddpm.cli.calibrate:calibrate_command")

    p = sub.add_parser("evaluate", help="metrics and an HTML report on a labelled test set",
                       description="Score test/<type> images, compare with ground_truth masks, write "
                       "metrics.json, per_image.csv, plots and index.html into REPORT_DIR.")
    p.add_argument("--model", required=True, metavar="MODEL_PT", help="trained bundle (model.pt) to evaluate")
    _add_data_args(p, "dataset root with a labelled test set (MVTec AD / LOCO / AD 2, VisA; detected), its "
                      "category folder, or ROOT of --normal-dir/--abnormal-dir folders")
    p.add_argument("--out", required=True, metavar="REPORT_DIR",
                   help="report folder (metrics.json, per_image.csv, plots, index.html)")
    _add_detect_args(p)
    _add_device_arg(p)
    p.set_defaults(handler="anoddpm.cli.evaluate:evaluate_command")

    p = sub.add_parser("score", help="score image files and folders into scores.csv",
                       description="Score files and folders (a file named several ways is scored once); bad files "
                       "(unreadable, non-finite pixels or scores) are reported in errors.csv and skipped, and the "
                       "exit code is then 1 (0 when every image was scored; files of other suffixes are skipped "
                       "without failing). Under torchrun the inputs are sharded across ranks and merged.")
    p.add_argument("--model", required=True, metavar="MODEL_PT", help="trained bundle (model.pt) to score with")
    p.add_argument("--input", required=True, nargs="+", metavar="PATH", help="image files and/or folders")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder: scores.csv, errors.csv, maps/, overlays/")
    p.add_argument("--save-maps", action="store_true",
                   help="also write anomaly-map PNGs: DIR/maps/<file name>.png (part.jpg -> part.jpg.png)")
    p.add_argument("--save-overlays", action="store_true",
                   help="also write DIR/overlays/<file name>.png: the map over the image, colour scale tied to the "
                        "pixel threshold, predicted region outlined (needs a calibrated bundle)")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: this process (default); ray: Ray Data model actors (needs `pip install .[ray]`)")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="with --engine ray: cluster to join (e.g. ray://head:10001 or auto; default: a local Ray)")
    p.add_argument("--workers", type=int, default=2, metavar="N",
                   help="with --engine ray: model actors, each loads the bundle once (default 2)")
    _add_detect_args(p)
    _add_device_arg(p)
    p.set_defaults(handler="anoddpm.cli.score:score_command")

    p = sub.add_parser("export", help="export the inspection path to one ONNX file",
                       description="Bundle -> model.onnx: preprocessed image batch -> reconstruction -> "
                       "anomaly_map, pred_score; threshold and config in the metadata.")
    p.add_argument("--model", required=True, metavar="MODEL_PT", help="calibrated bundle (model.pt) to export")
    p.add_argument("--out", required=True, metavar="ONNX", help="ONNX file to write (e.g. model.onnx)")
    p.add_argument("--steps", type=int, help="K fast-path steps baked into the graph (default: bundle's)")
    p.add_argument("--with-reconstruction", action="store_true", help="also output the reconstruction")
    p.add_argument("--quantize", choices=("none", "int8"), default="none",
                   help="int8: static INT8 convolutions calibrated on the held-back good images, with the threshold "
                   "recalibrated on the INT8 graph's own scores (faster on CPUs; default none)")
    p.add_argument("--triton", metavar="DIR", help="also write a Triton model repository DIR/anoddpm/")
    p.set_defaults(handler="anoddpm.cli.export:export_command")

    p = sub.add_parser("inspect", help="production-line inspection with an ONNX model (no torch needed)",
                       description="Inspect files/folders once, or watch a hot folder; appends one JSON line "
                       "per image to DIR/inspections.jsonl.")
    p.add_argument("--model", required=True, metavar="ONNX", help="exported model (.onnx, from `anoddpm export`)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", metavar="PATH", help="image files and/or folders")
    src.add_argument("--watch", metavar="DIR", help="hot folder to watch until Ctrl-C/SIGTERM")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder: inspections.jsonl, ok/, ng/, maps/")
    p.add_argument("--sort", action="store_true", help="move inspected files into DIR/ok and DIR/ng")
    p.add_argument("--save-maps", action="store_true", help="also write anomaly-map PNGs")
    p.add_argument("--poll-interval", type=_positive_seconds, default=0.5,
                   help="seconds between folder scans (watch), a positive number")
    p.add_argument("--providers", nargs="+", help="onnxruntime providers to try, in order (default: best)")
    p.set_defaults(handler="anoddpm.cli.inspect:inspect_command")

    p = sub.add_parser("info", help="print what a bundle or ONNX file contains",
                       description="Config, threshold, versions and training-data fingerprint of a file.")
    p.add_argument("path", metavar="PATH", nargs="?", help="model.pt bundle or .onnx file (same as --model)")
    p.add_argument("--model", metavar="MODEL", help="model.pt bundle or .onnx file")
    p.set_defaults(handler="anoddpm.cli.info:info_command")
    for verb_parser in sub.choices.values():
        _add_verbosity_args(verb_parser)
    return parser


def _add_verbosity_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true", help="print warnings and errors only")
    g.add_argument("-v", "--verbose", action="store_true", help="also print debug messages")
