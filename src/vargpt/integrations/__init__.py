"""Adapters to standard benchmark harnesses, each a thin layer over `VARGPTPipeline`.

* `vargpt.integrations.lmms_eval`: the model class lmms-eval calls for understanding tasks (``--model vargpt``).
* `vargpt.integrations.geneval`: GenEval's image folder from its ``evaluation_metadata.jsonl``.
* `vargpt.integrations.dpg_bench`: DPG-Bench's 2x2 grids from its folder of prompt files.

None of them imports its harness: the harnesses score the files (or call the class) themselves. This module holds
what the two image writers share: sampling with one seed per sample index, grids, and crash-safe PNG writes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import torch
from PIL import Image
from tqdm.auto import tqdm

from vargpt.errors import InputError
from vargpt.pipeline import VARGPTPipeline

__all__ = ["image_grid", "save_png", "sample_prompts"]

K = TypeVar("K")


def sample_prompts(pipe: VARGPTPipeline, jobs: Sequence[tuple[K, str]], *, n: int, seed: int, cfg: float | None,
                   size: int | None, batch: int, desc: str, progress: bool = True
                   ) -> Iterator[tuple[K, list[Image.Image]]]:
    """(key, its ``n`` images) for each (key, prompt) of ``jobs``, ``batch`` prompts per generation call.

    Sample k of every prompt is drawn with seed ``seed + k`` (GenEval's reference reseeds per prompt the same way),
    so a prompt's images do not depend on which other prompts ran or were skipped on resume.
    """
    if batch < 1:
        raise InputError(f"batch = {batch}: generate at least one prompt per call")
    bar = tqdm(total=len(jobs), desc=desc, unit="prompt", disable=not progress, dynamic_ncols=True)
    try:
        for i in range(0, len(jobs), batch):
            chunk = jobs[i:i + batch]
            generators = [torch.Generator().manual_seed(seed + k) for _ in chunk for k in range(n)]
            images = pipe.generate([p for _, p in chunk], cfg=cfg, size=size, n=n, generator=generators)
            for j, (key, _) in enumerate(chunk):
                yield key, images[j * n:(j + 1) * n]
                bar.update(1)
    finally:
        bar.close()


def image_grid(images: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    """Images of one size tiled row-major, no padding; ``cols`` defaults to ceil(sqrt(count))."""
    cols = cols or math.ceil(math.sqrt(len(images)))
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, math.ceil(len(images) / cols) * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def save_png(image: Image.Image, path: Path) -> None:
    """Write ``path`` through a temporary file, so an interrupted run never leaves a truncated PNG behind (resuming
    skips files that exist)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
