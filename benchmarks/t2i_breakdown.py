"""Where a text-to-image model fails inside one GenEval category: position prompts by relation, counting prompts by
count, with the checker's parse of the first failures.

    python benchmarks/t2i_breakdown.py --model runs/tiny/gen/model --category position --split test --records 1500

The first ``--records`` text-to-image records of the split are read and those of ``--category`` kept (about one in
six); image i is drawn with seed i at the model's sampling settings. Prints one JSON line (pass rate per relation or
count, and overall) and the failures. This is how session 16 found that a text-to-image stage drew "A below B" as
"A above B" (docs/training.md, "Session 15's chain").
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter

import torch

from vargpt.engine import to_pil
from vargpt.eval.checker import parse_scene, score_prompt
from vargpt.eval.tasks import t2i_cases
from vargpt.pipeline import VARGPTPipeline

RELATION = re.compile(r"(to the left of|to the right of|above|below)")


def group_of(case, category: str) -> str:
    if category == "position":
        return RELATION.search(case.prompt).group(1)
    if category == "counting":
        return f"count {len(case.target['objects'])}"
    return category


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model directory (default: the embedded one)")
    ap.add_argument("--category", default="position", choices=["position", "counting", "color_attr", "two_object"])
    ap.add_argument("--split", default="test")
    ap.add_argument("--records", type=int, default=1500, help="text-to-image records of the split to read")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--show", type=int, default=10, help="failures to print")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = VARGPTPipeline.from_pretrained(args.model, device="cpu", progress=False).engine
    cases = [c for c in t2i_cases(args.records, split=args.split) if c.category == args.category]
    total, passed, failures = Counter(), Counter(), []
    for start in range(0, len(cases), args.batch):
        chunk = cases[start:start + args.batch]
        images = engine.generate_images([c.prompt for c in chunk], seed=start).images  # image i: seed start + i
        for case, image in zip(chunk, to_pil(images), strict=True):
            scene = parse_scene(image)
            ok = score_prompt(scene, case.prompt).score
            for key in (group_of(case, args.category), "all"):
                total[key] += 1
                passed[key] += ok
            if not ok and len(failures) < args.show:
                failures.append((case.prompt, [(o.shape, o.colour, round(o.cx, 2), round(o.cy, 2))
                                               for o in scene.objects]))
    print(json.dumps({"model": args.model or "embedded default", "split": args.split, "category": args.category,
                      "pass_rate": {k: round(passed[k] / total[k], 3) for k in sorted(total)},
                      "n": dict(sorted(total.items()))}))
    for prompt, objects in failures:
        print(f"FAIL {prompt!r}: parsed {objects}")


if __name__ == "__main__":
    main()
