"""Checks a model.pt passes before anything in it is used: the right kind of file, intact bytes, weights
that are a mapping of tensors. ValueError/FileNotFoundError naming the file and what to do."""
from __future__ import annotations

import zipfile
import zlib
from pathlib import Path
from typing import Any, Mapping

import torch


def check_bundle_file(path: Path) -> None:
    """Refuse a folder, a missing file, an ONNX export or any non-zip file, and a zip whose CRC-32 checksums
    do not match its bytes (a bundle corrupted on disk or in transfer: torch.load does not check them)."""
    if path.is_dir():
        raise ValueError(f"{path} is a folder; pass the bundle file in it, e.g. {path / 'model.pt'}")
    if not path.is_file():
        raise FileNotFoundError(f"model bundle not found: {path}")
    if not zipfile.is_zipfile(path):
        if path.suffix.lower() == ".onnx":
            raise ValueError(f"{path} is an exported ONNX model, not an anoddpm bundle; give the model.pt it was "
                             "exported from (ONNX files are for `anoddpm inspect` and `anoddpm info`)")
        raise ValueError(f"{path} is not a readable anoddpm bundle (truncated or corrupted?): it is not the zip file "
                         "`anoddpm train` writes; copy it again from its run folder")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, ValueError) as err:
        raise ValueError(f"{path} is corrupted (its zip structure cannot be read: {err}); copy it again") from err
    if damaged is not None:
        raise ValueError(f"{path} is corrupted: the checksum of {damaged} does not match its bytes; copy the bundle "
                         "again from its run folder (nothing in it was used)")


def check_weights(path: Path, raw: Mapping[str, Any]) -> None:
    """Refuse state dicts that are not a mapping of names to tensors (a hand-edited or foreign file)."""
    for key in ("state_dict", "head_state_dict"):
        weights = raw.get(key)
        if weights is None and key == "head_state_dict":
            continue
        if not isinstance(weights, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in weights.items()):
            raise ValueError(f"{path}: its {key} is not a mapping of weight names to tensors "
                             f"(got {type(weights).__name__}); this file was not written by anoddpm train")
