"""How a model's "where" answers fail: by the number of objects in the picture, and whether a wrong answer names
another object's cell (the look-up found the wrong object) or an empty one (a place between objects).

    python benchmarks/vqa_where.py MODEL [--n 600] [--split val] [--json PATH]

Asks every single-question "where" record among the first ``--n`` records of the split (ShapesWorld, 64 px).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from vargpt.data.scene import CELL_NAMES, Scene
from vargpt.data.shapesworld import make_record
from vargpt.eval.checker import score_answer
from vargpt.pipeline import VARGPTPipeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--split", default="val")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    pipe = VARGPTPipeline.from_pretrained(args.model, device="cpu")
    outcome: Counter[tuple[str, str]] = Counter()
    for i in range(args.n):
        rec, images = make_record(i, split=args.split, tasks=("vqa",))
        if rec["meta"]["qtype"] != "where":
            continue
        question = rec["messages"][0]["content"].removeprefix("<image>\n")
        truth = rec["messages"][1]["content"]
        pred = pipe.chat(question, next(iter(images.values())), max_new_tokens=8)
        scene = Scene.from_dict(rec["scene"])
        objects = "one object" if len(scene.objects) == 1 else "two or more"
        if score_answer(pred, truth):
            kind = "right"
        else:
            kind = "another object's cell" if pred in {CELL_NAMES[o.cell] for o in scene.objects} else "another cell"
        outcome[(objects, kind)] += 1
    report = {f"{objects}: {kind}": n for (objects, kind), n in sorted(outcome.items())}
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "split": args.split, "n": args.n, **report},
                                        indent=1))


if __name__ == "__main__":
    main()
