"""GenEval (github.com/djghosh13/geneval): write its image folder from ``evaluation_metadata.jsonl``.

    python -m vargpt.integrations.geneval --metadata geneval/prompts/evaluation_metadata.jsonl --outdir out/geneval
    # then, in GenEval's environment: python evaluation/evaluate_images.py out/geneval --outfile results.jsonl ...

Layout (GenEval's README): ``OUTDIR/<line index, 5 digits>/metadata.jsonl`` (that line's JSON),
``samples/<k, 4 digits>.png`` for k < n_samples, and ``grid.png`` (optional). Sample k of every prompt uses seed
``seed + k``. Resumable: a prompt whose samples all exist is skipped (its grid is rebuilt if missing).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from PIL import Image

from vargpt.errors import InputError, VargptError
from vargpt.integrations import add_generation_arguments, image_grid, load_pipeline, sample_prompts, save_png
from vargpt.pipeline import VARGPTPipeline

__all__ = ["read_metadata", "write_samples", "main"]


def read_metadata(path: str | Path) -> list[dict[str, Any]]:
    """The records of a GenEval metadata file, one JSON object per line (blank lines skipped), each with a non-empty
    ``prompt``, a ``tag`` and, when present, ``include`` / ``exclude`` lists; `InputError` names the bad line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file; give GenEval's prompts/evaluation_metadata.jsonl") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(rec, dict):
            raise InputError(f"{where}: a JSON {type(rec).__name__}, expected an object with 'prompt' and 'tag'")
        if not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
            raise InputError(f"{where}: missing or empty 'prompt'; each line needs the text to generate")
        if not isinstance(rec.get("tag"), str):
            raise InputError(f"{where}: missing 'tag' (e.g. \"single_object\"); GenEval scores by tag")
        for key in ("include", "exclude"):
            if key in rec and not isinstance(rec[key], list):
                raise InputError(f"{where}: '{key}' must be a list of {{\"class\": ..., \"count\": ...}} objects")
        records.append(rec)
    if not records:
        raise InputError(f"{path}: no prompts in the file")
    return records


def _sample_paths(folder: Path, n_samples: int) -> list[Path]:
    return [folder / "samples" / f"{k:04d}.png" for k in range(n_samples)]


def write_samples(pipe: VARGPTPipeline, metadata: str | Path, outdir: str | Path, *, n_samples: int = 4,
                  seed: int = 0, cfg_scale: float | None = None, size: int | None = None, batch: int = 1,
                  grid: bool = True, progress: bool = True) -> dict[str, Any]:
    """Generate GenEval's folder (module docstring) for every line of ``metadata``; returns a summary
    (prompts, generated, skipped, outdir)."""
    if n_samples < 1:
        raise InputError(f"n_samples = {n_samples}: ask for at least one image per prompt")
    records, outdir = read_metadata(metadata), Path(outdir)
    folders = [outdir / f"{i:05d}" for i in range(len(records))]
    pending = []
    for i, (rec, folder) in enumerate(zip(records, folders, strict=True)):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metadata.jsonl").write_text(json.dumps(rec) + "\n", encoding="utf-8")
        paths = _sample_paths(folder, n_samples)
        if not all(p.is_file() for p in paths):
            pending.append((i, rec["prompt"]))
        elif grid and not (folder / "grid.png").is_file():
            save_png(image_grid([Image.open(p).convert("RGB") for p in paths]), folder / "grid.png")
    for i, images in sample_prompts(pipe, pending, n=n_samples, seed=seed, cfg_scale=cfg_scale, size=size, batch=batch,
                                    desc="geneval", progress=progress):
        for path, image in zip(_sample_paths(folders[i], n_samples), images, strict=True):
            save_png(image, path)
        if grid:
            save_png(image_grid(images), folders[i] / "grid.png")
    return {"prompts": len(records), "generated": len(pending), "skipped": len(records) - len(pending),
            "outdir": str(outdir)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vargpt.integrations.geneval",
                                description="Write GenEval's image folder for its evaluation_metadata.jsonl.")
    p.add_argument("--metadata", type=Path, required=True, help="GenEval's prompts/evaluation_metadata.jsonl")
    p.add_argument("--outdir", type=Path, required=True, help="output folder (GenEval's imagedir)")
    p.add_argument("--n-samples", type=int, default=4, help="images per prompt (GenEval uses 4)")
    p.add_argument("--skip-grid", action="store_true", help="do not write grid.png")
    add_generation_arguments(p)
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        read_metadata(args.metadata)  # a bad file fails before the model loads
        pipe = load_pipeline(args)
        summary = write_samples(pipe, args.metadata, args.outdir, n_samples=args.n_samples, seed=args.seed,
                                cfg_scale=args.cfg, size=args.size, batch=args.batch, grid=not args.skip_grid)
    except VargptError as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
