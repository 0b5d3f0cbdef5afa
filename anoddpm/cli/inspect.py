"""`anoddpm inspect`: line inspection with an exported ONNX model, files once or a hot folder (``deploy.inspect``);
no torch is imported."""
from __future__ import annotations

import argparse
import sys
import threading

from anoddpm.data.listing import list_images
from anoddpm.platform.atomic import out_folder
from deploy.inspect import Recorder, inspect_paths, stop_on_signals, watch
from deploy.runtime import Inspector


def inspect_command(args: argparse.Namespace) -> int:
    """`anoddpm inspect --model model.onnx (--input PATH... | --watch DIR) --out DIR`; 1 if any file failed."""
    inspector = Inspector(args.model, providers=args.providers)
    recorder = Recorder(inspector, out_folder(args.out), sort=args.sort, save_maps=args.save_maps)
    print(f"model {inspector.path} on {inspector.provider}; threshold {inspector.image_threshold:.6g}; "
          f"log {recorder.log_path}", file=sys.stderr)
    if args.watch:
        stop = threading.Event()
        print(f"watching {args.watch} every {args.poll_interval} s (Ctrl-C to stop)", file=sys.stderr)
        with stop_on_signals(stop):
            watch(recorder, args.watch, args.poll_interval, stop)
    else:
        paths, skipped = list_images(args.input, exclude=args.out)
        for path, why in skipped:
            print(f"skipped {path}: {why}", file=sys.stderr)
        if not paths:
            raise FileNotFoundError(f"no images found in --input {' '.join(args.input)}")
        inspect_paths(recorder, paths)
    c = recorder.counts
    print(f"inspected {c['ok'] + c['ng']} image(s): {c['ok']} ok, {c['ng']} ng, {c['error']} unreadable",
          file=sys.stderr)
    return 1 if c["error"] and not args.watch else 0
