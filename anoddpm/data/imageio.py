"""Image reading and the single ``preprocess()`` shared by training, scoring, export and runtime.

numpy + Pillow only (no torch): the ONNX line runtime imports this module.

Conventions:
* Images are float32 ``[H, W, C]`` in [0, 1] after ``read_image`` and float32 ``[C, S, S]`` in
  [0, 1] after ``preprocess``. 8-bit data is divided by 255, 16-bit (``I;16``/``I``) by 65535;
  float TIFFs (``F``) are clipped to [0, 1]; a NaN or infinite pixel is refused (ValueError naming the file).
* A PNG that ends before its IEND chunk, or a JPEG without an EOI marker after its last scan, is a
  ``TruncatedImageError`` (a ValueError): cut short, or still being written (the hot folder waits for it).
* EXIF orientation is applied. Palette, ``1``, ``LA``, ``RGBA``, ``CMYK``, ``YCbCr`` are converted;
  alpha is dropped (not composited). Grey -> RGB replicates the channel; RGB -> grey uses the
  ITU-R 601 luminance (0.299 R + 0.587 G + 0.114 B), computed in float.
* Resampling: Pillow ``BILINEAR`` on float32 (mode ``F``) planes, one channel at a time. Pillow
  widens the filter support when shrinking, so downscaling averages like an area filter.
* Resize policies (``S`` = ``image_size``):
  ``resize`` squashes to S x S; ``crop`` scales the short side to S and centre-crops;
  ``pad`` scales the long side to S and pads the short side with **edge replication**
  (``numpy.pad(mode="edge")``: reflect is undefined for pads longer than the image, and a
  constant border would look like a defect to the model). Masks get the same geometry with
  nearest-neighbour resampling and the same edge padding. ``crop`` can cut a defect out of view
  (magnetic_tile at 128 px: 69 of 185 defect masks become empty); prefer ``pad`` for long parts.
"""
from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from anoddpm.data.truncation import TruncatedImageError, check_complete

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_MAX_PIXELS = 50_000_000  # decompression-bomb guard; a 7k x 7k image is allowed
RESIZE_POLICIES = ("resize", "crop", "pad")
MIN_SCALED_SIDE = 8  # px: tiling refuses an image that tile_scale shrinks below this on either side
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _open(path: Path, max_pixels: int) -> Image.Image:
    if not path.exists():
        raise FileNotFoundError(f"image not found: {path}")
    if not path.is_file():
        raise ValueError(f"{path} is not a file")
    data = path.read_bytes()
    if not data:
        raise ValueError(f"{path} is empty (0 bytes)")
    check_complete(path, data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ValueError(f"{path} has {w}x{h} = {w * h} pixels, more than max_pixels={max_pixels}")
            img.load()
            return ImageOps.exif_transpose(img)
    except Image.DecompressionBombError as err:
        raise ValueError(f"{path} is too large to decode safely: {err}") from err
    except UnidentifiedImageError as err:
        raise ValueError(f"{path} is not a readable image") from err
    except (OSError, SyntaxError) as err:
        kind = TruncatedImageError if "truncated" in str(err) else ValueError
        raise kind(f"{path} is corrupt or truncated: {err}") from err


def image_hw(path: str | Path) -> tuple[int, int]:
    """(height, width) after EXIF orientation, read from the header without decoding the pixels."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            w, h = img.size
            swapped = img.getexif().get(0x0112) in (5, 6, 7, 8)  # EXIF orientations that rotate by 90
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"{path} is not a readable image: {err}") from err
    return (w, h) if swapped else (h, w)


def _to_float(img: Image.Image, where: str) -> np.ndarray:
    """PIL image of any mode -> float32 [H, W, C] in [0, 1], C in {1, 3}; ValueError naming `where` for a float
    image holding NaN or infinite pixels (clipping would hide them: the squashed and tiled paths refuse alike)."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return (np.asarray(img, dtype=np.float32) / 65535.0).clip(0.0, 1.0)[..., None]
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        if bad:
            raise ValueError(f"{where} holds {bad} pixel value(s) that are not finite numbers (NaN or infinity); "
                             "fix the image source")
        return arr.clip(0.0, 1.0)[..., None]
    if mode in ("1", "L", "LA", "La"):
        img = img.convert("L")
    elif mode != "RGB":
        # P (with or without transparency), RGBA, CMYK, YCbCr, LAB, HSV, RGBX ...: alpha dropped
        img = img.convert("RGBA" if mode == "P" else "RGB").convert("RGB")
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return arr[..., None] if arr.ndim == 2 else arr


def _to_channels(arr: np.ndarray, channels: int) -> np.ndarray:
    """float32 [H, W, 1 or 3] -> [H, W, channels]: grey replicated, RGB to ITU-R 601 luminance."""
    if channels not in (1, 3):
        raise ValueError(f"channels={channels} is not allowed; choose 1 or 3")
    if arr.shape[2] == channels:
        return np.ascontiguousarray(arr)
    if channels == 3:
        return np.repeat(arr, 3, axis=2)
    return (arr @ _LUMA)[..., None].astype(np.float32)


def read_image(path: str | Path, channels: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file -> float32 [H, W, channels] in [0, 1] (EXIF-rotated, mode-converted)."""
    if channels not in (1, 3):
        raise ValueError(f"channels={channels} is not allowed; choose 1 or 3")
    path = Path(path)
    with _open(path, max_pixels) as img:
        arr = _to_float(img, str(path))
    return _to_channels(arr, channels)


def array_image(image: np.ndarray, channels: int) -> np.ndarray:
    """An in-memory image -> float32 [H, W, channels] in [0, 1], converted like a file's pixels.

    Accepts [H, W] or [H, W, C] with C in {1, 3, 4} (alpha dropped): uint8 (/255), uint16 (/65535), bool,
    or float in [0, 1]; anything else raises ValueError.
    """
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or min(arr.shape[:2]) < 1:
        raise ValueError(f"image array must be [H, W] or [H, W, C] with C = 1, 3 or 4, got shape {arr.shape}")
    return _to_channels(_unit_range(arr[..., :3]), channels)


def _unit_range(arr: np.ndarray, slack: float = 0.0) -> np.ndarray:
    """uint8 (/255), uint16 (/65535), bool or float in [0, 1] (+- slack) -> float32; anything else ValueError."""
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.floating):
        if arr.size and (not np.all(np.isfinite(arr)) or arr.min() < -slack or arr.max() > 1.0 + slack):
            raise ValueError(f"float image values must be finite and in [0, 1], got [{np.nanmin(arr):.4g}, "
                             f"{np.nanmax(arr):.4g}] (divide 8-bit data by 255, or pass it as uint8)")
        return arr.astype(np.float32, copy=False)
    raise ValueError(f"image array dtype {arr.dtype} is not allowed; use uint8, uint16, bool or float in [0, 1]")


def pil_image(image: Image.Image, channels: int) -> np.ndarray:
    """A PIL image of any mode -> float32 [H, W, channels] in [0, 1], converted like a file's pixels."""
    return _to_channels(_to_float(image, f"the PIL image (mode {image.mode})"), channels)


def _geometry(h: int, w: int, size: int, policy: str) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """(resized (h, w), (top, bottom, left, right)): positive = pad, negative = crop."""
    if policy not in RESIZE_POLICIES:
        raise ValueError(f"resize_policy={policy!r} is not allowed; choose one of {', '.join(RESIZE_POLICIES)}")
    if size < 1:
        raise ValueError(f"image_size={size} must be positive")
    if policy == "resize":
        return (size, size), (0, 0, 0, 0)
    scale = size / (min(h, w) if policy == "crop" else max(h, w))
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if policy == "crop":
        nh, nw = max(nh, size), max(nw, size)
    dh, dw = size - nh, size - nw  # >= 0 for pad, <= 0 for crop
    top, left = (dh // 2, dw // 2) if policy == "pad" else (-((-dh) // 2), -((-dw) // 2))
    return (nh, nw), (top, dh - top, left, dw - left)


def _resize(arr: np.ndarray, hw: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """[H, W, C] -> [h, w, C], one channel plane at a time."""
    if arr.shape[:2] == hw:
        return arr
    planes = [np.asarray(Image.fromarray(np.ascontiguousarray(arr[..., c])).resize((hw[1], hw[0]), resample))
              for c in range(arr.shape[2])]
    return np.stack(planes, axis=-1)


def _apply(arr: np.ndarray, size: int, policy: str, resample: Image.Resampling) -> np.ndarray:
    """[H, W, C] -> [S, S, C] with one geometry for images and masks."""
    h, w = arr.shape[:2]
    (nh, nw), (top, bottom, left, right) = _geometry(h, w, size, policy)
    arr = _resize(arr, (nh, nw), resample)
    if policy == "pad":
        arr = np.pad(arr, ((top, bottom), (left, right), (0, 0)), mode="edge")
    elif policy == "crop":
        arr = arr[-top:-top + size, -left:-left + size]
    assert arr.shape[:2] == (size, size), arr.shape
    return arr


def preprocess(image: np.ndarray, image_size: int, resize_policy: str) -> np.ndarray:
    """[H, W, C] float in [0, 1] (or uint8 / uint16 / bool, scaled like a file's pixels) -> float32 [C, S, S]
    in [0, 1] (S = image_size), bilinear; other dtypes or values outside [0, 1] raise ValueError."""
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise ValueError(f"image must be [H, W] or [H, W, C], got shape {image.shape}")
    image = _unit_range(np.asarray(image), slack=1e-3)  # rounding may leave a float a hair outside [0, 1]
    out = _apply(image, image_size, resize_policy, Image.Resampling.BILINEAR)
    return np.ascontiguousarray(out.transpose(2, 0, 1).clip(0.0, 1.0), dtype=np.float32)


def read_any(image: str | Path | np.ndarray | Image.Image, channels: int) -> np.ndarray:
    """A file path, a PIL image or an array (see ``array_image``) -> float32 [H, W, channels] in [0, 1]."""
    if isinstance(image, (str, Path)):
        return read_image(image, channels)
    if isinstance(image, Image.Image):
        return pil_image(image, channels)
    if isinstance(image, np.ndarray):
        return array_image(image, channels)
    raise ValueError(f"cannot read an image from a {type(image).__name__}; pass a path, a PIL image or a numpy array")


def as_image_list(images: object) -> list:
    """One image (path, PIL image, [H, W(, C)] array) -> [it]; a list/tuple or a [B, H, W, C] array -> its items."""
    if isinstance(images, (str, Path, Image.Image)) or (isinstance(images, np.ndarray) and images.ndim <= 3):
        return [images]
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    if isinstance(images, (list, tuple)):
        return list(images)
    raise ValueError(f"images must be a path, a PIL image, a numpy array or a list of these, "
                     f"got {type(images).__name__}")


def restore_map(amap: np.ndarray, hw: tuple[int, int], resize_policy: str) -> np.ndarray:
    """A model-size map float [S, S] -> float32 [h, w] over the original image, bilinear: the inverse of
    preprocess()'s geometry (``pad``: the padding is cut off; ``crop``: pixels cropped away get 0)."""
    amap = np.asarray(amap, dtype=np.float32)
    if amap.ndim != 2 or amap.shape[0] != amap.shape[1]:
        raise ValueError(f"map must be [S, S], got shape {amap.shape}")
    size = amap.shape[0]
    (nh, nw), (top, bottom, left, right) = _geometry(hw[0], hw[1], size, resize_policy)
    if resize_policy == "pad":
        amap = amap[top:size - bottom, left:size - right]
    elif resize_policy == "crop":
        canvas = np.zeros((nh, nw), np.float32)
        canvas[-top:-top + size, -left:-left + size] = amap
        amap = canvas
    return _resize(amap[..., None], (int(hw[0]), int(hw[1])), Image.Resampling.BILINEAR)[..., 0]


def load_image(path: str | Path, channels: int, image_size: int, resize_policy: str,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """read_image + preprocess: a file -> float32 [channels, S, S] in [0, 1]."""
    return preprocess(read_image(path, channels, max_pixels), image_size, resize_policy)


def scaled_hw(height: int, width: int, scale: float) -> tuple[int, int]:
    """(h, w) of a height x width image scaled by `scale` (rounded); ValueError when a side would be under
    MIN_SCALED_SIDE px (nothing left to inspect) or the scale is not a positive finite number."""
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"tile_scale={scale} must be a positive number")
    hw = round(height * scale), round(width * scale)
    if min(hw) < MIN_SCALED_SIDE:
        raise ValueError(f"a {height}x{width} image scaled by tile_scale={scale:g} is {hw[0]}x{hw[1]} px, under "
                         f"the {MIN_SCALED_SIDE} px minimum; raise data.tile_scale (--tile-scale) to at least "
                         f"{MIN_SCALED_SIDE / min(height, width):.3g}")
    return hw


def _rescale(arr: np.ndarray, scale: float, resample: Image.Resampling) -> np.ndarray:
    """[H, W, C] -> [h, w, C] scaled by `scale`, aspect ratio kept."""
    return _resize(arr, scaled_hw(arr.shape[0], arr.shape[1], scale), resample)


def rescale(image: np.ndarray, scale: float) -> np.ndarray:
    """float [H, W, C] in [0, 1] -> float32 [C, h, w] in [0, 1] scaled by `scale` (bilinear), for tiling."""
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise ValueError(f"image must be [H, W] or [H, W, C], got shape {image.shape}")
    image = _unit_range(np.asarray(image), slack=1e-3)  # refused exactly when preprocess() refuses it
    out = _rescale(image, scale, Image.Resampling.BILINEAR)
    return np.ascontiguousarray(out.transpose(2, 0, 1).clip(0.0, 1.0), dtype=np.float32)


def rescale_mask(mask: np.ndarray, scale: float) -> np.ndarray:
    """bool [H, W] -> bool [h, w] with the geometry of rescale() (nearest)."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be [H, W], got shape {mask.shape}")
    return _rescale(mask.astype(np.uint8)[..., None] * 255, scale, Image.Resampling.NEAREST)[..., 0] > 127


def model_image(image: np.ndarray, image_size: int, resize_policy: str, tile_size: int = 0,
                tile_scale: float = 1.0) -> np.ndarray:
    """float [H, W, C] in [0, 1] as the model sees it: float32 [C, S, S] (tile_size 0: preprocess) or
    [C, h, w] rescaled by tile_scale (tiling)."""
    if tile_size:
        return rescale(image, tile_scale)
    return preprocess(image, image_size, resize_policy)


def model_mask(mask: np.ndarray, image_size: int, resize_policy: str, tile_size: int = 0,
               tile_scale: float = 1.0) -> np.ndarray:
    """bool [H, W] with the geometry of model_image()."""
    if tile_size:
        return rescale_mask(mask, tile_scale)
    return preprocess_mask(mask, image_size, resize_policy)


def load_model_image(path: str | Path, channels: int, image_size: int, resize_policy: str, tile_size: int = 0,
                     tile_scale: float = 1.0, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """read_image + model_image: a file -> float32 [C, S, S] or, tiling, [C, h, w]; errors name the file."""
    image = read_image(path, channels, max_pixels)
    try:
        return model_image(image, image_size, resize_policy, tile_size, tile_scale)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def resize_map(amap: np.ndarray, height: int, width: int) -> np.ndarray:
    """float [h, w] -> float32 [height, width] (bilinear): a map of a rescaled image back at the file's size."""
    return _resize(np.asarray(amap, dtype=np.float32)[..., None], (height, width), Image.Resampling.BILINEAR)[..., 0]


def read_mask(path: str | Path, nonzero: bool = False) -> np.ndarray:
    """Read a defect mask -> bool [H, W] (True where the grey value is > 127, or > 0 with `nonzero`)."""
    grey = read_image(path, channels=1)[..., 0]
    return grey > 0.0 if nonzero else grey > 127.5 / 255.0


def preprocess_mask(mask: np.ndarray, image_size: int, resize_policy: str) -> np.ndarray:
    """bool [H, W] -> bool [S, S] with nearest resampling and the same geometry as preprocess()."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be [H, W], got shape {mask.shape}")
    out = _apply(mask.astype(np.uint8)[..., None] * 255, image_size, resize_policy, Image.Resampling.NEAREST)
    return out[..., 0] > 127


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """[H, W] or [C, H, W] float in [0, 1] (or bool) -> uint8 [H, W] or [H, W, C] (channels last)."""
    arr = np.asarray(arr)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.float32)
    if arr.ndim == 3:
        arr = arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)
    if arr.ndim not in (2, 3):
        raise ValueError(f"expected [H, W] or [C, H, W], got shape {arr.shape}")
    return np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)


def save_png(path: str | Path, arr: np.ndarray) -> None:
    """Write [H, W] or [C, H, W] (C = 1 or 3) float [0, 1] / bool, or uint8 [H, W(, C)], as 8-bit PNG."""
    arr = np.asarray(arr)
    data = arr if arr.dtype == np.uint8 else to_uint8(arr)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(data).save(path, format="PNG")
