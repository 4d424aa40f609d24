"""Adapters to standard benchmark harnesses, each a thin layer over `VARGPTPipeline`.

* `vargpt.integrations.lmms_eval`: the model class lmms-eval calls for understanding tasks (``--model vargpt``).
* `vargpt.integrations.geneval`: GenEval's image folder from its ``evaluation_metadata.jsonl``.
* `vargpt.integrations.dpg_bench`: DPG-Bench's 2x2 grids from its folder of prompt files.

None of them imports its harness: the harnesses score the files (or call the class) themselves. This module holds
what the two image writers share: sampling with one seed per sample index, grids, and crash-safe PNG writes.
"""

from __future__ import annotations

import argparse
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

__all__ = ["add_generation_arguments", "image_grid", "load_pipeline", "save_png", "sample_prompts"]

K = TypeVar("K")


def sample_prompts(pipe: VARGPTPipeline, jobs: Sequence[tuple[K, str]], *, n: int, seed: int, cfg_scale: float | None,
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
            images = pipe.generate([p for _, p in chunk], cfg_scale=cfg_scale, size=size, n=n, generator=generators)
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


def add_generation_arguments(p: argparse.ArgumentParser) -> None:
    """The options both image writers' command lines take: model, sampling, batching, device."""
    p.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: the embedded model)")
    p.add_argument("--seed", type=int, default=0, help="sample k of every prompt uses seed + k")
    p.add_argument("--cfg", type=float, default=None, help="CFG scale (default: the model's)")
    p.add_argument("--size", type=int, default=None, help="image size in pixels (default: the model's)")
    p.add_argument("--batch", type=int, default=1, help="prompts per generation call")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: bf16 on CUDA, fp32 on CPU)")


def load_pipeline(args: argparse.Namespace) -> VARGPTPipeline:
    return VARGPTPipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype, progress=False)
