"""Loading user images: every image a user may hand us becomes 8-bit RGB, anything else a one-line error.

`load_image(path_or_file)` is the one door for image files and bytes (CLI, server, UI, training data): it returns a
fully decoded, upright (EXIF orientation applied), 8-bit RGB `PIL.Image`, or raises `InputError` naming the file,
the problem and the fix: missing or empty file, not an image, truncated or corrupt data, zero-sized, or more than
`MAX_IMAGE_PIXELS` pixels (checked from the header, before anything is decoded: a small PNG can decode to
gigabytes). `to_rgb(image)` is the conversion alone, for images that are already open (the Python API).

Conversions, as transformers' image processors do them (users feed such files every day): grey (1, L), palette
(P), YCbCr, HSV and CMYK (Pillow's naive conversion; no ICC profile is applied) -> RGB; LAB through Pillow's CMS;
16-bit grey (I;16*, and I when its values fit 16 bits) scaled to 8 bits (v >> 8); alpha (RGBA, LA, PA, P or RGB
with a transparent colour) composited over white, as ShapesWorld's backgrounds are light. Float images (F) are
refused: their value range is unknown. Pillow already reads 16-bit RGB(A) PNGs as 8-bit RGB(A).
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vargpt.errors import InputError

__all__ = ["MAX_IMAGE_PIXELS", "load_image", "to_rgb"]

MAX_IMAGE_PIXELS = 8192 * 8192  # 64 Mpx: a 48 Mpx photo fits; its RGB decode is 192 MiB
# Pillow's own decompression-bomb guard, set explicitly here and nowhere else: it refuses images over twice this
# in `Image.open` (and warns between once and twice it); `load_image` refuses anything over `max_pixels` itself.
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

_ALPHA = {"RGBA", "LA", "PA", "RGBa", "La"}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}


def load_image(source: str | Path | BinaryIO, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """The image at ``source`` (a path or a binary file object) as upright 8-bit RGB, fully decoded.

    ``max_pixels``: refuse larger images before decoding them (default `MAX_IMAGE_PIXELS`; Pillow itself refuses
    more than twice `MAX_IMAGE_PIXELS` whatever ``max_pixels`` says).
    """
    name, data = _read(source)
    if not data:
        raise InputError(f"{name}: the file is empty; give a PNG or JPEG image")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        size = _png_size(data)
        if size is not None and 0 in size:  # Pillow answers a zero-sized PNG with "unidentified"
            w, h = size
            raise InputError(f"{name}: the image is {w}x{h} pixels (empty); give a picture with pixels") from None
        raise InputError(f"{name}: not an image (or a format Pillow cannot read); give a PNG or JPEG") from None
    except Image.DecompressionBombError as e:  # over twice Pillow's limit: it gives the pixel count only
        found = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(found[1]):,} pixels" if found else "too large"
        raise InputError(_too_large(name, size, max_pixels)) from None
    except Exception as e:  # a decoder's own error on a damaged header (OSError, SyntaxError, struct.error, ...)
        raise InputError(f"{name}: the image header is corrupt ({e}); re-export the file") from None
    width, height = img.size
    if width == 0 or height == 0:
        raise InputError(f"{name}: the image is {width}x{height} pixels (empty); give a picture with pixels")
    if width * height > max_pixels:
        raise InputError(_too_large(name, f"{width}x{height} = {width * height:,} pixels", max_pixels))
    try:
        img.load()
    except Exception as e:  # OSError "image file is truncated", zlib errors, a decoder's own errors
        raise InputError(f"{name}: the image data is truncated or corrupt ({e}); re-export the file") from None
    try:
        return to_rgb(img)
    except InputError as e:
        raise InputError(f"{name}: {e}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as upright 8-bit RGB (module docstring: which modes convert how); `InputError` for float images."""
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # a damaged EXIF block: the pixels are still fine, keep them as stored
        orientation = 1
    img = ImageOps.exif_transpose(img) if orientation != 1 else img
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in _SIXTEEN_BIT or mode == "I":
        return _sixteen_bit_to_rgb(img)
    if mode == "F":
        raise InputError("a floating-point (mode F) image has no known value range; re-save it as an 8-bit "
                         "RGB PNG or JPEG")
    if mode == "LAB":
        from PIL import ImageCms

        lab_to_srgb = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"),
                                              "LAB", "RGB")
        return ImageCms.applyTransform(img, lab_to_srgb)
    if mode in _ALPHA or "transparency" in img.info:
        rgba = img.convert("RGBA") if mode != "La" else img.convert("LA").convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError:
        raise InputError(f"image mode {mode} cannot be converted to RGB; re-save it as an 8-bit RGB PNG or "
                         "JPEG") from None


def _sixteen_bit_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit grey (I;16*, or I whose values fit 16 bits) -> 8-bit RGB by v >> 8; I with values up to 255 as is."""
    arr = np.asarray(img).astype(np.int64)
    top = int(arr.max()) if arr.size else 0
    if int(arr.min(initial=0)) < 0 or top > 65535:
        raise InputError(f"a 32-bit integer image with values {int(arr.min())}..{top} has no known range; re-save "
                         "it as an 8-bit or 16-bit PNG")
    if img.mode in _SIXTEEN_BIT or top > 255:
        arr = arr >> 8
    return Image.fromarray(arr.astype(np.uint8)).convert("RGB")


def _too_large(name: str, size: str, limit: int) -> str:
    raise_it = " (in Python, load_image(..., max_pixels=N) raises it)" if limit == MAX_IMAGE_PIXELS else ""
    return (f"{name}: the image is {size}, over the limit of {limit:,} pixels (a guard against decompression "
            f"bombs); downscale it first{raise_it}")


def _png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR, or None when ``data`` is no PNG."""
    if not data.startswith(_PNG_SIGNATURE) or len(data) < 24:
        return None
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _read(source: str | Path | BinaryIO) -> tuple[str, bytes]:
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            return str(path), path.read_bytes()
        except FileNotFoundError:
            raise InputError(f"{path}: no such file") from None
        except IsADirectoryError:
            raise InputError(f"{path}: is a directory, not an image file") from None
        except PermissionError:
            raise InputError(f"{path}: permission denied; check the file's permissions") from None
    return str(getattr(source, "name", "<image>")), source.read()
