"""How a model answers "relative" questions ("Is the circle to the left of the square?"): accuracy by the number of
objects in the picture, and how often it says "no" (63.7% of the answers on val: a model that always says "no"
scores that).

    python benchmarks/vqa_relative.py MODEL [MODEL ...] [--n 1500] [--split val]

Asks every single-question "relative" record among the first ``--n`` records of the split (ShapesWorld, 64 px).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from vargpt.data.shapesworld import make_record
from vargpt.eval.checker import normalise_answer, score_answer
from vargpt.pipeline import VARGPTPipeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", type=Path, nargs="+")
    ap.add_argument("--n", type=int, default=1500)
    ap.add_argument("--split", default="val")
    args = ap.parse_args()

    cases = []
    for i in range(args.n):
        rec, images = make_record(i, split=args.split, tasks=("vqa",))
        if rec["meta"]["qtype"] == "relative":
            cases.append((rec["messages"][0]["content"].removeprefix("<image>\n"), rec["messages"][1]["content"],
                          next(iter(images.values())), len(rec["scene"]["objects"])))
    print(json.dumps({"split": args.split, "questions": len(cases),
                      "truth_no": round(sum(c[1] == "no" for c in cases) / len(cases), 3)}))
    for model in args.models:
        pipe = VARGPTPipeline.from_pretrained(model, device="cpu")
        right, said_no = defaultdict(list), 0
        for question, truth, image, n_objects in cases:
            pred = pipe.chat(question, image, max_new_tokens=4)
            said_no += normalise_answer(pred) == "no"
            right[n_objects].append(score_answer(pred, truth))
        every = [r for v in right.values() for r in v]
        print(json.dumps({"model": str(model), "accuracy": round(sum(every) / len(every), 3),
                          "said_no": round(said_no / len(cases), 3),
                          "by_objects": {k: f"{int(sum(v))}/{len(v)}" for k, v in sorted(right.items())}}))


if __name__ == "__main__":
    main()
