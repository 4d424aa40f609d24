"""Image files users hand us, good and bad, as bytes (shared by the tests and benchmarks/bad_inputs.py).

`CONVERTIBLE`: files in modes that must load as 8-bit RGB, with the pixel they must give at (0, 0).
`BROKEN`: files that must be refused, with a word the one-line error must contain.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_by_hand(width: int, height: int, *, bit_depth: int = 8, colour_type: int = 2, rows: bytes | None = None
                ) -> bytes:
    """A PNG written chunk by chunk: any header (zero or huge sizes, 16-bit RGB), with ``rows`` as its pixel data
    (default: one tiny row of zeros, enough for the header to parse)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(rows or b"\0" * 8))
            + _chunk(b"IEND", b""))


def sixteen_bit_rgb_png(value: int = 0x8000, size: int = 4) -> bytes:
    row = b"\0" + struct.pack(">HHH", value, value // 2, 0) * size
    return png_by_hand(size, size, bit_depth=16, colour_type=2, rows=row * size)


def rotated_jpeg() -> bytes:
    """A 4x2 JPEG (left half red) whose EXIF says 'rotate 90 degrees': upright it is 2x4."""
    arr = np.zeros((2, 4, 3), np.uint8)
    arr[:, :2] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.fromarray(arr), "JPEG", exif=exif, quality=100)


def _palette_with_transparency() -> bytes:
    img = Image.new("P", (4, 4), 0)
    img.putpalette([10, 20, 30] + [0] * 765)
    return encode(img, "PNG", transparency=0)


# mode -> (file bytes, expected RGB at (0, 0))
CONVERTIBLE: dict[str, tuple[bytes, tuple[int, int, int]]] = {
    "RGB": (encode(Image.new("RGB", (4, 4), (200, 30, 30))), (200, 30, 30)),
    "CMYK JPEG": (encode(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG", quality=100), (255, 0, 0)),
    "P (palette)": (encode(Image.new("RGB", (4, 4), (0, 0, 255)).convert("P")), (0, 0, 255)),
    "P + transparency": (_palette_with_transparency(), (255, 255, 255)),
    "I;16 (16-bit grey PNG)": (encode(Image.fromarray(np.full((4, 4), 0x8000, np.uint16))), (128, 128, 128)),
    "I (32-bit TIFF)": (encode(Image.new("I", (4, 4), 0x8000), "TIFF"), (128, 128, 128)),
    "16-bit RGB PNG": (sixteen_bit_rgb_png(), (128, 64, 0)),
    "L (grey)": (encode(Image.new("L", (4, 4), 80)), (80, 80, 80)),
    "1 (bilevel)": (encode(Image.new("1", (4, 4), 1)), (255, 255, 255)),
    "LA (grey + alpha)": (encode(Image.new("LA", (4, 4), (0, 0))), (255, 255, 255)),
    "RGBA (transparent)": (encode(Image.new("RGBA", (4, 4), (255, 0, 0, 0))), (255, 255, 255)),
    "RGBA (half alpha)": (encode(Image.new("RGBA", (4, 4), (0, 0, 0, 128))), (127, 127, 127)),
    "PA (TIFF)": (encode(Image.new("PA", (4, 4), (0, 0)), "TIFF"), (255, 255, 255)),
    "EXIF-rotated JPEG": (rotated_jpeg(), (254, 0, 0)),
}


def _truncated() -> bytes:
    good = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)))
    return good[: len(good) // 2]


# name -> (file bytes, a word the error must contain)
BROKEN: dict[str, tuple[bytes, str]] = {
    "empty file": (b"", "empty"),
    "text file": (b"just some notes\n", "not an image"),
    "truncated PNG": (_truncated(), "truncated"),
    "PNG signature only": (b"\x89PNG\r\n\x1a\n", "not an image"),
    "zero-sized PNG (0x0)": (png_by_hand(0, 0), "0x0"),
    "decompression bomb (100000x100000 PNG header)": (png_by_hand(100_000, 100_000), "limit"),
    "over the limit (9000x9000 PNG header)": (png_by_hand(9000, 9000), "limit"),
    "float (mode F) TIFF": (encode(Image.new("F", (4, 4), 0.5), "TIFF"), "mode F"),
}
