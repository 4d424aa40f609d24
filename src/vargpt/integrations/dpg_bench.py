"""DPG-Bench (ELLA, github.com/TencentQQGYLab/ELLA): write one 2x2 grid per prompt file for its scorer.

    python -m vargpt.integrations.dpg_bench --prompts ELLA/dpg_bench/prompts --outdir out/dpg --size 512
    # then, in ELLA's environment: bash dpg_bench/dist_eval.sh out/dpg 512   (the tile size)

Each ``<name>.txt`` of the prompt folder (one prompt) becomes ``OUTDIR/<name>.png``: 4 samples of that prompt
(sample k with seed ``seed + k``) tiled 2x2 row-major, each tile the generation size, as the scorer crops them.
Resumable: a prompt whose PNG exists is skipped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from vargpt.errors import InputError, VargptError
from vargpt.integrations import add_generation_arguments, image_grid, load_pipeline, sample_prompts, save_png
from vargpt.pipeline import VARGPTPipeline

__all__ = ["read_prompts", "write_grids", "main"]

SAMPLES = 4  # the scorer crops a 2x2 grid


def read_prompts(folder: str | Path) -> dict[str, str]:
    """``{name: prompt}`` of the ``<name>.txt`` files of a DPG-Bench prompt folder, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder; give DPG-Bench's prompts/ folder (one <name>.txt per prompt)")
    prompts = {}
    for path in sorted(folder.glob("*.txt")):
        text = path.read_text(encoding="utf-8").strip()
        if not text:
            raise InputError(f"{path}: the prompt file is empty; put the prompt text in it or remove the file")
        prompts[path.stem] = text
    if not prompts:
        raise InputError(f"{folder}: no .txt prompt files; give DPG-Bench's prompts/ folder")
    return prompts


def write_grids(pipe: VARGPTPipeline, prompts: str | Path, outdir: str | Path, *, seed: int = 0,
                cfg_scale: float | None = None, size: int | None = None, batch: int = 1,
                progress: bool = True) -> dict[str, Any]:
    """Write ``OUTDIR/<name>.png`` (module docstring) for every prompt file; returns a summary
    (prompts, generated, skipped, outdir)."""
    named, outdir = read_prompts(prompts), Path(outdir)
    pending = [(name, text) for name, text in named.items() if not (outdir / f"{name}.png").is_file()]
    for name, images in sample_prompts(pipe, pending, n=SAMPLES, seed=seed, cfg_scale=cfg_scale, size=size, batch=batch,
                                       desc="dpg-bench", progress=progress):
        save_png(image_grid(images, cols=2), outdir / f"{name}.png")
    return {"prompts": len(named), "generated": len(pending), "skipped": len(named) - len(pending),
            "outdir": str(outdir)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vargpt.integrations.dpg_bench",
                                description="Write DPG-Bench's 2x2 grids (<name>.png) for its prompt folder.")
    p.add_argument("--prompts", type=Path, required=True, help="DPG-Bench's prompts/ folder of <name>.txt files")
    p.add_argument("--outdir", type=Path, required=True, help="output folder (the scorer's image root)")
    add_generation_arguments(p)
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        read_prompts(args.prompts)  # a bad folder fails before the model loads
        pipe = load_pipeline(args)
        summary = write_grids(pipe, args.prompts, args.outdir, seed=args.seed, cfg_scale=args.cfg, size=args.size,
                              batch=args.batch)
    except VargptError as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
