"""`vargpt.imageio`: every image mode users feed becomes 8-bit RGB (alpha over white); broken, empty, zero-sized and
oversized files are one-line `InputError`s; every interface opens user images through it."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bad_files import BROKEN, CONVERTIBLE, encode
from vargpt.errors import InputError
from vargpt.imageio import MAX_IMAGE_PIXELS, load_image, to_rgb

SRC = Path(__file__).resolve().parents[1] / "src" / "vargpt"
# Pillow warns about images between its limit and twice it before load_image refuses them
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


@pytest.mark.parametrize("kind", sorted(CONVERTIBLE))
def test_every_mode_loads_as_8_bit_rgb(kind):
    data, pixel = CONVERTIBLE[kind]
    img = load_image(io.BytesIO(data))
    assert img.mode == "RGB" and np.asarray(img).dtype == np.uint8
    assert np.abs(np.subtract(img.getpixel((0, 0)), pixel)).max() <= 2, img.getpixel((0, 0))


def test_exif_orientation_is_applied_once():
    img = load_image(io.BytesIO(CONVERTIBLE["EXIF-rotated JPEG"][0]))
    assert img.size == (2, 4) and to_rgb(img).size == (2, 4)  # stored 4x2; the processor's to_rgb keeps it


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_files_are_one_line_errors_naming_the_file(tmp_path, kind):
    data, word = BROKEN[kind]
    path = tmp_path / "upload.png"
    path.write_bytes(data)
    with pytest.raises(InputError) as e:
        load_image(path)
    message = str(e.value)
    assert message.startswith(str(path)) and word in message and "\n" not in message


def test_the_pixel_limit_is_pillows_too_and_can_be_lowered():
    assert Image.MAX_IMAGE_PIXELS == MAX_IMAGE_PIXELS  # set explicitly, in one place
    with pytest.raises(InputError, match=f"limit of {MAX_IMAGE_PIXELS:,} pixels.*max_pixels"):
        load_image(io.BytesIO(BROKEN["decompression bomb (100000x100000 PNG header)"][0]))
    small = io.BytesIO(encode(Image.new("RGB", (20, 20))))
    with pytest.raises(InputError, match=r"20x20 = 400 pixels, over the limit of 100 pixels") as e:
        load_image(small, max_pixels=100)
    assert "max_pixels" not in str(e.value)  # a caller's own limit: no hint about the library default


def test_to_rgb_composites_open_images_on_white_and_refuses_float():
    out = to_rgb(Image.new("RGBA", (2, 2), (0, 0, 255, 0)))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(InputError, match="mode F"):
        to_rgb(Image.new("F", (2, 2), 0.5))


def test_processor_converts_images_and_refuses_nan_pixels():
    from vargpt.config import tiny_config
    from vargpt.processing import ByteTokenizer, VARGPTProcessor

    cfg = tiny_config()
    proc = VARGPTProcessor(ByteTokenizer(cfg.tokens), cfg)
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 0))
    white = Image.new("RGB", (32, 32), (255, 255, 255))
    assert torch.equal(proc.preprocess_images([rgba])["pixel_values"], proc.preprocess_images([white])["pixel_values"])
    nan = torch.full((32, 32, 3), float("nan"))
    with pytest.raises(InputError, match="NaN"):
        proc.preprocess_images([nan])
    with pytest.raises(InputError, match="NaN"):
        proc.preprocess_images([nan.numpy()])
    with pytest.raises(InputError, match="uint8"):
        proc.preprocess_images([torch.zeros(32, 32, 3, dtype=torch.bfloat16)])
    with pytest.raises(InputError, match="0x4"):
        proc.preprocess_images([Image.new("RGB", (0, 4))])


def test_user_images_are_opened_only_through_imageio():
    """Every interface (CLI, server, UI, training data, VAE training) reads image files with `load_image`; the only
    other `Image.open`s read our own outputs or a header for bucketing."""
    allowed = {"imageio.py", "data/records.py", "integrations/geneval.py"}
    opened = {str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if re.search(r"Image\.open\(", p.read_text())}
    assert opened <= allowed, opened - allowed
