"""How often the ShapesWorld checker recovers the exact scene from a rendered test-split image.

For each of N test-split records (all tasks; the record's first image and its scene), at each size, under three
conditions: clean PNG, JPEG quality 75, Gaussian noise (sigma 0.05 on the [0, 1] scale, seeded, clipped).
"Exact scene" is `vargpt.eval.checker.scenes_match`: same background, same number of objects, one-to-one equal
(shape, colour, size, grid cell) and centres within 0.02 of the image side (1.3 px at 64 px).

    python benchmarks/checker_accuracy.py --n 2000 --sizes 64 128 --json benchmarks/checker_accuracy.json

Not a test: writes a JSON report (accuracy per size and condition, failure kinds, timing).
"""

from __future__ import annotations

import argparse
import io
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from vargpt.data.scene import Scene
from vargpt.data.shapesworld import make_record
from vargpt.eval.checker import parse_scene, scenes_match

CONDITIONS = ("clean", "jpeg75", "noise0.05")


def degrade(image: Image.Image, condition: str, rng: np.random.Generator) -> Image.Image:
    if condition == "clean":
        return image
    if condition == "jpeg75":
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=75)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    x = np.asarray(image, np.float64) / 255 + rng.normal(0.0, 0.05, (image.height, image.width, 3))
    return Image.fromarray(np.round(np.clip(x, 0, 1) * 255).astype(np.uint8))


def failure_kind(truth: Scene, parsed: Scene) -> str:
    if truth.background != parsed.background:
        return "background"
    if len(truth.objects) != len(parsed.objects):
        return "object count"
    by_cell = {o.cell: o for o in parsed.objects}
    for o in truth.objects:
        p = by_cell.get(o.cell)
        if p is None:
            return "cell"
        for attr in ("shape", "colour", "size"):
            if getattr(o, attr) != getattr(p, attr):
                return f"{attr} {getattr(o, attr)}->{getattr(p, attr)}"
    return "position"


def centre_errors_px(truth: Scene, parsed: Scene, size: int) -> list[float]:
    """Per object of a matched scene: the larger of |dx|, |dy| to its parsed twin, in pixels."""
    by_cell = {o.cell: o for o in parsed.objects}
    return [max(abs(o.cx - by_cell[o.cell].cx), abs(o.cy - by_cell[o.cell].cy)) * size for o in truth.objects]


def run(n: int, sizes: list[int], seed: int) -> dict:
    report: dict = {"n": n, "split": "test", "seed": seed, "definition": __doc__.split("\n\n")[1].strip(),
                    "results": {}}
    for size in sizes:
        stats = {c: {"exact": 0, "failures": Counter(), "errors": []} for c in CONDITIONS}
        t0 = time.perf_counter()
        for i in range(n):
            rec, images = make_record(i, split="test", seed=seed, size=size)
            truth = Scene.from_dict(rec["scene"])
            image = images[rec["images"][0]]
            for condition in CONDITIONS:
                parsed = parse_scene(degrade(image, condition, np.random.default_rng([seed, size, i])))
                if scenes_match(truth, parsed):
                    stats[condition]["exact"] += 1
                    stats[condition]["errors"] += centre_errors_px(truth, parsed, size)
                else:
                    stats[condition]["failures"][failure_kind(truth, parsed)] += 1
        seconds = time.perf_counter() - t0
        report["results"][str(size)] = {
            c: {"accuracy": s["exact"] / n, "failures": dict(s["failures"].most_common()),
                "centre_error_px": {"mean": round(float(np.mean(s["errors"])), 3),
                                    "max": round(float(np.max(s["errors"])), 3)}}
            for c, s in stats.items()}
        report["results"][str(size)]["seconds"] = round(seconds, 1)
        print(f"{size:4d} px  " + "  ".join(f"{c} {stats[c]['exact'] / n:.4f}" for c in CONDITIONS)
              + f"  ({seconds:.0f} s)")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/checker_accuracy.json"))
    args = parser.parse_args()
    report = run(args.n, args.sizes, args.seed)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
