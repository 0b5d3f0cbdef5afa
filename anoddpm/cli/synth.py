"""`anoddpm synth`: write a generated dataset (``anoddpm.data.synth``, or large frames: ``anoddpm.data.frames``)."""
from __future__ import annotations

import argparse
import time

from anoddpm.data.synth import DEFECTS, make_synthetic_dataset


def synth_command(args: argparse.Namespace) -> int:
    """CLI handler of `anoddpm synth`; prints a one-line summary."""
    start = time.perf_counter()
    if args.frame_size:
        from anoddpm.data.frames import make_frame_dataset, parse_frame_size

        width, height = parse_frame_size(args.frame_size)
        root = make_frame_dataset(args.out, args.category, (height, width), args.n_train, args.n_test_good,
                                  args.n_test_defect, args.seed)
        print(f"synth: wrote {args.n_train} train/good, {args.n_test_good} test/good, {args.n_test_defect} defect "
              f"frames of {width}x{height} px to {root} in {time.perf_counter() - start:.1f} s")
        return 0
    root = make_synthetic_dataset(args.out, args.category, args.size, args.n_train, args.n_test_good,
                                  args.n_test_defect, args.seed)
    counts = {k: len(list((root / "test" / k).glob("*.png"))) for k in DEFECTS if (root / "test" / k).is_dir()}
    kinds = ", ".join(f"{k} {n}" for k, n in counts.items())
    print(f"synth: wrote {args.n_train} train/good, {args.n_test_good} test/good, {args.n_test_defect} defect "
          f"images ({kinds}) of {args.size}x{args.size} px to {root} in {time.perf_counter() - start:.1f} s")
    return 0
