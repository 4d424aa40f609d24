"""Folders of training images as square uint8 tensors: the VAE trainer's data and the VAE evaluation's.

``find_images`` lists a folder's .png/.jpg files, ``ImageSet`` resizes (shorter side, bicubic) and centre-crops
them to one size and keeps them in memory when they fit, ``resolve_data`` turns ``shapesworld:N`` into a folder
of generated scenes. Pillow does the decoding (`vargpt.imageio.load_image`: any mode to 8-bit RGB, or a one-line
error naming the file).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from vargpt.errors import InputError
from vargpt.imageio import load_image as read_image

IMAGE_EXTS = (".png", ".jpg", ".jpeg")
PRELOAD_LIMIT_BYTES = 2 << 30  # decode every image once and keep it in memory below this size


def find_images(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"data directory {root} does not exist; pass a folder of .png/.jpg images "
                         "or shapesworld:N")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not paths:
        raise InputError(f"no .png/.jpg images under {root}; pass a folder of images or shapesworld:N")
    return paths


def load_image(path: Path, size: int) -> Tensor:
    """uint8 [3, size, size]: shorter side resized to ``size`` (bicubic), centre crop."""
    im = read_image(path)  # any mode -> 8-bit RGB, or a one-line InputError
    w, h = im.size
    if (w, h) != (size, size):
        s = size / min(w, h)
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)


class ImageSet:
    """Images of a folder at one square size; decoded once and cached when they fit in memory."""

    def __init__(self, paths: list[Path], size: int) -> None:
        self.paths, self.size = paths, size
        self.cache: Tensor | None = None
        if len(paths) * 3 * size * size <= PRELOAD_LIMIT_BYTES:
            self.cache = torch.stack([load_image(p, size) for p in paths])

    def __len__(self) -> int:
        return len(self.paths)

    def batch(self, idx: Tensor) -> Tensor:
        """uint8 [B, 3, size, size]."""
        if self.cache is not None:
            return self.cache[idx]
        return torch.stack([load_image(self.paths[i], self.size) for i in idx.tolist()])


def to_unit(x_uint8: Tensor, device: torch.device) -> Tensor:
    return x_uint8.to(device, non_blocking=True).float() / 127.5 - 1


def resolve_data(spec: str, out_dir: Path, size: int, *, split: str = "train", seed: int = 0) -> Path:
    """A folder of images for ``spec``: the folder itself, or ``shapesworld:N`` generated under ``out_dir``."""
    if not spec.startswith("shapesworld:"):
        return Path(spec)
    try:
        n = int(spec.split(":", 1)[1])
    except ValueError:
        raise InputError(f"bad data spec {spec!r}; use shapesworld:N, e.g. shapesworld:2000") from None
    try:
        from vargpt.data.shapesworld import write_dataset
    except ImportError:
        raise InputError("ShapesWorld is not available in this install; pass --data DIR (a folder of images)") from None
    target = out_dir / f"shapesworld_{split}_{n}_{size}px_seed{seed}"
    if not (target / "records.jsonl").is_file():
        write_dataset(target, n=n, split=split, size=size, seed=seed)
    return target
