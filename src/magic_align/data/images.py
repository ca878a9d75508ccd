"""Safe image loading: whatever a dataset holds comes out as an upright 8-bit RGB PIL image, or as a
`BadImageError` that names the file (and CSV row) and says what is wrong.

Handled: EXIF orientation; grayscale, 1-bit, palette (with transparency), RGBA/LA (composited on white),
CMYK, 16-bit and 32-bit integer and float images; a pixel limit checked from the header, before decoding,
against decompression bombs. Missing, truncated and non-image files raise `BadImageError`.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from magic_align.errors import MagicError


class BadImageError(MagicError, ValueError):
    """An image that cannot be used; the message names the file, the CSV row when known, and the reason."""

    def __init__(self, path: Path | str, reason: str, row: int | None = None, source: str | None = None):
        self.path = Path(path)
        self.reason = reason
        self.row = row
        self.source = source
        where = f" ({source + ' ' if source else 'CSV '}row {row})" if row else ""
        super().__init__(f"{self.path}{where}: {reason}")


def open_checked(path: Path | str, max_pixels: int, row: int | None = None, source: str | None = None,
                 reduced: bool = False) -> Image.Image:
    """Open and fully decode an image, checking its size from the header first; no mode conversion.

    `reduced` lets a JPEG decode at 1/8 scale: every byte is still read, so truncation is still caught,
    at a fraction of the cost (used to check whole datasets).
    """
    path = Path(path)
    if not path.exists():
        raise BadImageError(path, "file not found", row, source)
    if not path.is_file():
        raise BadImageError(path, "not a file", row, source)
    if path.stat().st_size == 0:
        raise BadImageError(path, "empty file (0 bytes)", row, source)
    try:
        with warnings.catch_warnings():
            # Pillow warns between its own limit and twice that; our own limit below is the one that counts.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
        width, height = image.size
        if width * height > max_pixels:
            raise BadImageError(
                path, f"{width} x {height} = {width * height} pixels is over the limit of {max_pixels} "
                "(data.max_image_pixels; a guard against decompression bombs)", row, source)
        if reduced and image.format == "JPEG":
            image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
        image.load()  # decodes the whole file: a truncated file fails here, not later in a worker
    except BadImageError:
        raise
    except Image.DecompressionBombError as error:
        raise BadImageError(path, f"over Pillow's pixel limit ({error})", row, source) from None
    except UnidentifiedImageError:
        size = path.stat().st_size
        raise BadImageError(path, f"not an image file that Pillow can read ({size} bytes)", row, source) from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        text = str(error) or type(error).__name__
        if "truncated" in text:
            text = f"truncated or corrupt image data ({text})"
        raise BadImageError(path, text, row, source) from None
    return image


def load_image(path: Path | str, max_pixels: int = 89_478_485, row: int | None = None,
               source: str | None = None) -> Image.Image:
    """Load an image as upright 8-bit RGB (raises `BadImageError` naming the file and row)."""
    image = open_checked(path, max_pixels, row, source)
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block must not cost the pixels; keep the stored orientation
        pass
    try:
        return to_rgb(image)
    except ValueError as error:
        raise BadImageError(path, str(error), row, source) from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. Transparency is composited on white (the usual page background)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}:
        return Image.fromarray(scale_to_uint8(np.asarray(image), mode)).convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in {"RGBA", "LA", "PA", "RGBa", "La"}:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise ValueError(f"image mode {mode!r} cannot be converted to RGB ({error})") from None


def scale_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """High bit-depth pixels -> 0..255.

    16-bit modes use their full range (65535 -> 255). Mode 'I' is 32-bit, but in practice holds 8- or
    16-bit data: its range is taken from the largest value (<= 255: as is, <= 65535: 16-bit, else min-max).
    Mode 'F' in [0, 1] is scaled by 255; any other float range is stretched min-max.
    """
    array = values.astype(np.float64)
    if mode.startswith("I;16"):
        scaled = array / 65535.0 * 255.0
    elif mode == "I":
        top = float(array.max()) if array.size else 0.0
        if array.size and array.min() >= 0 and top <= 255:
            scaled = array
        elif array.size and array.min() >= 0 and top <= 65535:
            scaled = array / 65535.0 * 255.0
        else:
            scaled = _stretch(array)
    else:  # F
        finite = array[np.isfinite(array)]
        if finite.size and finite.min() >= 0 and finite.max() <= 1:
            scaled = np.nan_to_num(array, nan=0.0) * 255.0
        else:
            scaled = _stretch(np.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _stretch(array: np.ndarray) -> np.ndarray:
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if high <= low:
        return np.zeros_like(array)
    return (array - low) / (high - low) * 255.0


def encode_png(image: Image.Image) -> bytes:
    """RGB PNG bytes with no metadata at all (no EXIF, text, ICC profile or time chunks).

    The pixels are copied into a fresh image so nothing from the original's `info` can leak into the file;
    the same pixels always give the same bytes.
    """
    rgb = to_rgb(image)
    clean = Image.frombytes("RGB", rgb.size, rgb.tobytes())
    buffer = io.BytesIO()
    clean.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def sha256_file(path: Path | str, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (images can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
