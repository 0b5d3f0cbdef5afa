"""Is an image file complete? A PNG ends with its IEND chunk and a JPEG with an EOI marker after its last scan;
a file that stops before them is cut short or still being written (a decoder may still read most of it).

No numpy, no Pillow: bytes in, ``TruncatedImageError`` out (``imageio`` raises it; the hot folder waits on it).
"""
from __future__ import annotations

from pathlib import Path


class TruncatedImageError(ValueError):
    """An image file that ends before its format's end marker: truncated, or still being written."""


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_complete(data: bytes) -> bool | None:
    """True when the PNG chunks run to a whole IEND chunk, False when they stop early, None when they
    are not PNG chunks at all (corrupt, not truncated)."""
    pos = len(_PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        if not kind.isalpha() or length > 2**31 - 1:
            return None
        pos += 12 + length
        if kind == b"IEND":
            return pos <= len(data)
    return False


def check_complete(path: Path, data: bytes) -> None:
    """TruncatedImageError naming `path` when its bytes are a PNG that lacks its IEND chunk, or a JPEG without an
    EOI marker after its last scan (SOS); other formats are left to the decoder."""
    if data.startswith(_PNG_SIGNATURE):
        complete, marker = _png_complete(data), "IEND chunk"
    elif data.startswith(b"\xff\xd8"):
        complete, marker = data.rfind(b"\xff\xd9") > max(1, data.rfind(b"\xff\xda")), "EOI marker"
    else:
        return
    if complete is False:
        raise TruncatedImageError(f"{path} ends before its {marker}: truncated, or still being written")
