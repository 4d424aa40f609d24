"""Loading user images with one-line errors.

`load_image(path_or_file)` returns an 8-bit RGB `PIL.Image` or raises `InputError` naming the file, the problem
and the fix: missing file, not an image, truncated or corrupt data, or a mode we refuse. Modes that convert
without guessing are converted: L, 1, P, I;8 -> RGB; RGBA, LA, PA and P with transparency are composited over
white. CMYK and high-bit-depth images (16-bit PNGs, I;16, I, F) are refused rather than converted: the colour
conversion needs a profile or a tone curve we would have to guess, and the checker's palette depends on it.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

from vargpt.errors import InputError

_CONVERTIBLE = {"RGB", "L", "1", "P", "RGBA", "LA", "PA", "YCbCr", "RGBX", "RGBa", "La"}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def load_image(source: str | Path | BinaryIO) -> Image.Image:
    """The image at `source` (a path or a binary file object) as 8-bit RGB, fully decoded."""
    name, data = _read(source)
    if not data:
        raise InputError(f"{name}: the file is empty; give a PNG or JPEG image")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InputError(f"{name}: not an image (or a format Pillow cannot read); give a PNG or JPEG") from None
    except Image.DecompressionBombError:
        raise InputError(f"{name}: the image is too large to decode safely; downscale it first") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{name}: the image header is corrupt ({e}); re-export the file") from None
    if data.startswith(_PNG_SIGNATURE) and len(data) > 24 and data[24] == 16:
        raise InputError(f"{name}: 16-bit PNG is not supported; re-save it as an 8-bit RGB PNG")
    if img.mode == "CMYK":
        raise InputError(f"{name}: CMYK image is not supported; convert it to 8-bit RGB (sRGB) first")
    if img.mode not in _CONVERTIBLE:
        raise InputError(f"{name}: image mode {img.mode} (high bit depth or float) is not supported; "
                         "re-save it as an 8-bit RGB PNG or JPEG")
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{name}: the image data is truncated or corrupt ({e}); re-export the file") from None
    return _to_rgb(img)


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


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")
