"""`anoddpm export`: a bundle's inspection path as one ONNX file (``deploy.export``)."""
from __future__ import annotations

import argparse

from deploy.export import export_onnx
from deploy.triton import write_triton_repo


def export_command(args: argparse.Namespace) -> int:
    """`anoddpm export --model model.pt --out model.onnx [--steps K] [--with-reconstruction] [--quantize int8]
    [--triton DIR]`."""
    path = export_onnx(args.model, args.out, steps=args.steps, with_reconstruction=args.with_reconstruction,
                       quantize=args.quantize)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if args.triton:
        print(f"wrote Triton model repository {write_triton_repo(path, args.triton)}")
    return 0
