"""How many different pictures a model draws for one prompt: held-out prompts x sampling seeds, each picture parsed
by the ShapesWorld checker into a scene signature (background; per object shape, colour, size and 3x3 cell), and
the number of distinct signatures per prompt counted. A model that draws one picture per prompt (1 distinct scene
for every prompt) is a lookup table of layouts; the checker's score says nothing about that.

    python benchmarks/variety.py [--model DIR] [--n 20] [--seeds 10] [--split test] [--json out/variety.json]

Also reports, per prompt, the checker's pass rate over the seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from vargpt.eval import tasks
from vargpt.eval.checker import parse_scene, score_prompt
from vargpt.pipeline import VARGPTPipeline


def signature(image) -> tuple:
    scene = parse_scene(image)
    return (scene.background, tuple(sorted((o.shape, o.colour, o.size, o.cell) for o in scene.objects)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: the embedded default)")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--split", default="test")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    pipe = VARGPTPipeline.from_pretrained(args.model, device="cpu", progress=False)
    rows = []
    for case in tasks.t2i_cases(args.n, split=args.split):
        images = pipe.generate(case.prompt, seed=0, n=args.seeds)  # image k uses seed k
        sigs = [signature(im) for im in images]
        passed = [score_prompt(im, case.prompt).score for im in images]
        rows.append({"prompt": case.prompt, "category": case.category, "distinct_scenes": len(set(sigs)),
                     "distinct_layouts": len({tuple((o[3], o[2]) for o in s[1]) for s in sigs}),
                     "pass_rate": sum(passed) / len(passed)})
    report = {"model": str(args.model or "embedded default"), "split": args.split, "prompts": args.n,
              "seeds": args.seeds, "mean_distinct_scenes": statistics.fmean(r["distinct_scenes"] for r in rows),
              "prompts_with_one_scene": sum(r["distinct_scenes"] == 1 for r in rows),
              "mean_pass_rate": statistics.fmean(r["pass_rate"] for r in rows), "per_prompt": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "per_prompt"}, indent=1))


if __name__ == "__main__":
    main()
