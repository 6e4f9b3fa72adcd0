"""Robust image loading: EXIF orientation, every common pixel mode to RGB, clear errors."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageLoadError(ValueError):
    """An image could not be read; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


ORIENTATION = 274  # the EXIF tag


def to_rgb(image: Image.Image, *, orient: bool = True) -> Image.Image:
    """An 8-bit RGB picture of ``image``, the one conversion every input goes through (files,
    uploads, and PIL images given to the Python API): 16/32-bit and float greyscale scaled to 0-255
    (not clipped), palette/alpha/CMYK/greyscale to RGB; with ``orient``, EXIF orientation applied
    (for files and uploads; a PIL image in memory is taken as its pixels stand, as torchvision and
    transformers do, since Pillow copies stale EXIF through convert() and friends)."""
    if orient and image.getexif().get(ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit greyscale: PIL's convert("RGB") would clip everything above 255 to white.
        array = np.asarray(image).astype(np.float64)
        peak = 65535.0 if mode.startswith("I;16") or array.max() > 255 else 255.0
        array = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if mode == "F":
        array = np.asarray(image)
        lo, hi = float(np.nanmin(array)), float(np.nanmax(array))
        scaled = (array - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(array)
        return Image.fromarray(np.nan_to_num(scaled).astype(np.uint8), mode="L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # avoids PIL's warning about palette transparency
    # RGBA/LA/PA: alpha is dropped (colour kept), as torchvision's decoders do; CMYK, YCbCr, L, 1, P.
    return image.convert("RGB")


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) as :func:`load_image` will see it (EXIF orientation applied; values 5-8 swap
    width and height), from the header only."""
    with Image.open(path) as image:
        width, height = image.size
        if image.getexif().get(ORIENTATION) in (5, 6, 7, 8):
            width, height = height, width
    return width, height


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image as an upright RGB ``PIL.Image``.

    EXIF orientation is applied (phone photos), and greyscale, palette, RGBA, CMYK and 16-bit
    images become 8-bit RGB. A missing, empty, truncated or non-image file raises
    :class:`ImageLoadError` naming the file and the reason.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageLoadError(path, "file not found") from None
    except OSError as e:
        raise ImageLoadError(path, f"cannot access file ({e.strerror or e})") from None
    if path.is_dir():
        raise ImageLoadError(path, "is a directory, not an image")
    if size == 0:
        raise ImageLoadError(path, "empty file (0 bytes)")
    return decode_image(path, path)


def decode_image(source: str | os.PathLike | IO[bytes], name: str | os.PathLike) -> Image.Image:
    """:func:`load_image` for a path or an open binary file (an upload); ``name`` is what errors say."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                image.load()  # decode now, so truncated data fails here and not later
                return to_rgb(image)
    except UnidentifiedImageError:
        raise ImageLoadError(name, "not an image (unrecognised file format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(name, f"too many pixels ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError(name, f"truncated or corrupt image data ({e})") from None
