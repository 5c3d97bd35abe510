"""Encoded image bytes -> RGB uint8, robust to what real image folders hold, and cheap for the common JPEG.

Two entry points:
- `decode(data)`: the whole picture, upright, RGB uint8 HWC (sources' `__getitem__`, the converter, predict).
- `decode_crop(data, plan, out_size)`: only what a training/eval view needs. `plan(width, height)` returns the
  crop box in the upright full-resolution picture; JPEGs are decoded by libjpeg-turbo directly (simplejpeg, when
  installed; ~25% cheaper than Pillow's chunked decoder), at 1/2, 1/4 or 1/8 DCT scale when the box still keeps
  `out_size` pixels at that scale, and just the box is resampled straight to `out_size`
  (`Image.resize(box=...)`) instead of resizing the whole picture and then cropping. On ImageNet-sized JPEGs
  that is ~1.3x less CPU per image than the plain Pillow open/resize/crop loop (`python -m alexnet_jax.bench
  pipeline`); on large photos the DCT scaling saves much more.

What comes out is always upright RGB: EXIF orientation is applied; grey, palette, CMYK, YCbCr, LAB and HSV are
converted; alpha (RGBA, LA, PA, palette or grey with a transparent colour) is composited onto white, as a viewer
shows it; 16-bit and 32-bit grey are scaled to 8 bits (Pillow's own conversion would clip them to 255).

Anything that cannot be decoded -- empty, truncated, not an image, or over `MAX_PIXELS` (the decompression-bomb
guard: checked from the header, before any pixel memory is allocated) -- raises `BadImageError`. Pillow raises a
zoo of exception types on malformed files (OSError, SyntaxError, ValueError, struct.error, IndexError, ...), so
every `Exception` from decoding becomes `BadImageError`; callers decide what a bad file means.
"""

import contextlib
import io
import math
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

try:  # optional: Pillow (with its own libjpeg-turbo) does everything when it is missing, ~25% slower on JPEGs
    import simplejpeg
except ImportError:  # pragma: no cover - exercised only where the wheel is missing
    simplejpeg = None

# Pillow's own default (~89 MP, ~270 MB as RGB): far above any ImageNet photo, far below what would exhaust a host
# running 8+ workers, and at or below the point where Pillow itself starts warning. Checked from the header.
MAX_PIXELS = 89_478_485

# EXIF orientation tag value -> the transpose that makes the picture upright (as ImageOps.exif_transpose).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION_TAG = 0x0112
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")

Box = tuple[float, float, float, float]  # (left, top, right, bottom) in upright full-resolution pixels


class BadImageError(ValueError):
    """The bytes are not a decodable image (empty, truncated, not an image, or too large)."""


def _open(data: bytes) -> tuple[Image.Image, int]:
    """Lazily opened image (header parsed, no pixels yet) and its EXIF orientation (1 = upright)."""
    if not data:
        raise BadImageError("empty file")
    image = Image.open(io.BytesIO(data))
    width, height = image.size
    if width <= 0 or height <= 0:
        raise BadImageError(f"degenerate size {width}x{height}")
    if width * height > MAX_PIXELS:
        raise BadImageError(f"{width}x{height} = {width * height} pixels exceeds the {MAX_PIXELS}-pixel limit"
                            " (decompression-bomb guard)")
    try:
        orientation = int(image.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except Exception:  # a broken EXIF block should not cost us the picture
        orientation = 1
    return image, orientation if orientation in _ORIENTATION else 1


def upright_size(image: Image.Image, orientation: int) -> tuple[int, int]:
    width, height = image.size
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _sixteen_bit_to_8(array: np.ndarray) -> np.ndarray:
    if array.dtype.kind == "f":
        scale = 255.0 if np.nanmax(array, initial=0.0) <= 1.0 else 1.0
        return np.clip(np.nan_to_num(array) * scale, 0, 255).round().astype(np.uint8)
    array = array.astype(np.int64)
    if array.max(initial=0) > 255:  # 16-bit range (PNG/TIFF grey); Pillow's "I" mode does not say the depth
        return np.clip((array + 128) // 257, 0, 255).astype(np.uint8)
    return np.clip(array, 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB, keeping what a person sees (see the module docstring)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        gray = Image.fromarray(_sixteen_bit_to_8(np.asarray(image)), "L")
        return gray.convert("RGB")
    if mode in _ALPHA_MODES or (mode in ("P", "L") and "transparency" in image.info):
        if mode == "La":
            image = image.convert("LA")
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _decode_reduced(data: bytes, image: Image.Image, orientation: int, shrink: float) -> Image.Image:
    """The upright RGB picture, decoded at a JPEG DCT scale of at most 1/`shrink` (exact scale not promised:
    callers read it back from the returned size)."""
    if image.format == "JPEG":
        # Only power-of-two DCT scales: libjpeg-turbo's 1/2, 1/4, 1/8 IDCTs are cheaper than the full one, but its
        # other M/8 scales are slower than decoding at full size (measured: 6/8 costs ~1.35x full).
        scale = next((s for s in (8, 4, 2) if shrink >= s), 1)  # shrink < 1: upscaling, decode at full size
        min_w, min_h = math.ceil(image.size[0] / scale), math.ceil(image.size[1] / scale)
        if simplejpeg is not None and image.mode in ("RGB", "L"):
            try:  # libjpeg-turbo without Pillow's chunked decoder: ~25% faster at full size
                array = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=min_h, min_width=min_w)
                rgb = Image.fromarray(array, "RGB")
                return rgb.transpose(_ORIENTATION[orientation]) if orientation != 1 else rgb
            except Exception:  # e.g. an unusual JPEG flavour libjpeg-turbo's fast path rejects: Pillow decides
                pass
        if scale > 1:
            image.draft("RGB" if image.mode in ("RGB", "YCbCr") else image.mode, (min_w, min_h))
    image.load()
    if orientation != 1:
        image = image.transpose(_ORIENTATION[orientation])
    return to_rgb(image)


def decode(data: bytes) -> np.ndarray:
    """Encoded bytes -> the whole upright picture, RGB uint8 (H, W, 3). Raises BadImageError."""
    with _bad_image_on_error():
        image, orientation = _open(data)
        return np.asarray(_decode_reduced(data, image, orientation, 1.0))


def decode_crop(data: bytes, plan: Callable[[int, int], Box], out_size: tuple[int, int]) -> np.ndarray:
    """Encoded bytes -> the `plan(width, height)` box of the upright picture resampled to `out_size` (w, h),
    RGB uint8 (h, w, 3), decoding no more pixels than the box needs. Raises BadImageError."""
    with _bad_image_on_error():
        image, orientation = _open(data)
        width, height = upright_size(image, orientation)
        box = plan(width, height)
        return resample_box(image, box, out_size, data=data, orientation=orientation)


def decode_resized(data: bytes, short_side: int, enlarge: bool = False) -> np.ndarray:
    """The whole upright picture with its short side brought down to `short_side` (up too with `enlarge`; 0
    keeps the size), RGB uint8. Raises BadImageError."""
    with _bad_image_on_error():
        image, orientation = _open(data)
        width, height = upright_size(image, orientation)
        if short_side <= 0 or min(width, height) == short_side or (min(width, height) < short_side and not enlarge):
            return np.asarray(_decode_reduced(data, image, orientation, 1.0))
        scale = short_side / min(width, height)
        out = (max(short_side, round(width * scale)), max(short_side, round(height * scale)))
        return resample_box(image, (0, 0, width, height), out, data=data, orientation=orientation)


@contextlib.contextmanager
def _bad_image_on_error():
    try:
        yield
    except BadImageError:
        raise
    except Exception as error:
        raise BadImageError(_describe(error)) from error


def resample_box(image: Image.Image, box: Box, out_size: tuple[int, int], *, data: bytes | None = None,
                 orientation: int = 1) -> np.ndarray:
    """The `box` of an image (lazily opened from `data`, or already decoded) resampled to `out_size`, bilinear
    with Pillow's antialiasing. A box that is already `out_size` on the pixel grid is cut, not resampled."""
    out_w, out_h = out_size
    left, top, right, bottom = box
    if data is not None:
        width, height = upright_size(image, orientation)
        shrink = min((right - left) / out_w, (bottom - top) / out_h)
        image = _decode_reduced(data, image, orientation, shrink)
        sx, sy = image.width / width, image.height / height
        left, top, right, bottom = left * sx, top * sy, right * sx, bottom * sy
    else:
        image = to_rgb(image)
    if (right - left, bottom - top) == (out_w, out_h) and all(float(v).is_integer() for v in (left, top)):
        crop = image.crop((int(left), int(top), int(right), int(bottom)))
    else:
        crop = image.resize((out_w, out_h), Image.Resampling.BILINEAR, box=(left, top, right, bottom))
    return np.asarray(crop)


def _describe(error: Exception) -> str:
    if isinstance(error, UnidentifiedImageError):
        return "not an image file Pillow can identify"
    text = str(error) or type(error).__name__
    return text if isinstance(error, OSError) else f"{type(error).__name__}: {text}"


def check(data: bytes) -> str | None:
    """None if `data` decodes, else why not (one line)."""
    try:
        decode(data)
    except BadImageError as error:
        return str(error)
    return None
