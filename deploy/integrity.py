"""An exported model.onnx binds its metadata to its graph: ``integrity_sha256`` (written by `anoddpm export`) is a
SHA-256 over the serialized graph (nodes and constants: the weights, references, feature memory, detection noise)
and the metadata a verdict depends on (BOUND_METADATA: threshold, config with its detection settings and score
mode, preprocessing with resize policy and tile size / stride / scale, steps). The runtime and `anoddpm info`
recompute it and refuse a file whose metadata was edited or copied from another model.

Standard library only: the graph's bytes are read from the file's protobuf fields (ModelProto field 7), so a line
PC needs neither torch nor the onnx package.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Mapping

log = logging.getLogger(__name__)

INTEGRITY_KEY = "integrity_sha256"
BOUND_METADATA = ("anoddpm_format_version", "config", "threshold", "preprocessing", "steps")
_GRAPH_FIELD = 7  # onnx.proto: ModelProto.graph
_warned: set[str] = set()


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated protobuf varint")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def graph_bytes(model: bytes) -> bytes:
    """The serialized graph of an ONNX file's bytes (every ModelProto field 7 in order); ValueError when the bytes
    are not a protobuf message."""
    out, pos = [], 0
    while pos < len(model):
        key, pos = _varint(model, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(model, pos)
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        elif wire == 2:
            size, pos = _varint(model, pos)
            if field == _GRAPH_FIELD:
                out.append(model[pos:pos + size])
            pos += size
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
    if pos != len(model) or not out:
        raise ValueError("no complete ONNX graph")
    return b"".join(out)


def integrity_hash(graph: bytes, metadata: Mapping[str, str]) -> str:
    """Hex SHA-256 of the serialized `graph` and the BOUND_METADATA strings of `metadata` (absent ones included
    as null)."""
    digest = hashlib.sha256(b"anoddpm onnx integrity v1\0")
    digest.update(hashlib.sha256(graph).digest())
    digest.update(json.dumps([[key, metadata.get(key)] for key in BOUND_METADATA]).encode())
    return digest.hexdigest()


def check_integrity(path: str | Path, metadata: Mapping[str, str]) -> None:
    """ValueError naming `path` when its recorded INTEGRITY_KEY is not the hash of its graph and metadata. A file
    exported before the hash existed is used as before, with one warning per file and process."""
    path = Path(path)
    recorded = metadata.get(INTEGRITY_KEY)
    if recorded is None:
        if str(path) not in _warned:
            _warned.add(str(path))
            log.warning("%s carries no integrity hash (exported by an older anoddpm): its metadata cannot be checked "
                        "against its graph; re-export it to have it checked", path)
        return
    try:
        actual = integrity_hash(graph_bytes(path.read_bytes()), metadata)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} cannot be checked ({err}); copy it again or re-export it") from err
    if actual != recorded:
        raise ValueError(f"{path}: its metadata (threshold, detection settings or preprocessing) does not belong to "
                         "its graph (the integrity hash does not match: edited, or copied from another model); "
                         "re-export it with `anoddpm export`")
