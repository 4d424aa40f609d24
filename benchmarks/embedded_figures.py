"""The README's pictures of a model: the red-circle strip (one prompt, seeds 0-9, checked) and a VQA transcript.

    python benchmarks/embedded_figures.py --model src/vargpt/assets/tiny --out docs

writes ``OUT/embedded_red_circle.png`` (failures framed red, verdicts in the ``.txt`` beside it) and prints how many
of the seeds pass and the first ``--questions`` held-out test questions with the model's answers. The sample grids of
held-out prompts and edits are the sheets `vargpt eval` writes beside its report (``report_t2i.png``,
``report_edit.png``), copied to ``docs/embedded_t2i.png`` and ``docs/embedded_edit.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vargpt.eval import tasks
from vargpt.eval.checker import check_image, score_answer
from vargpt.pipeline import VARGPTPipeline

PROMPT = "A red circle to the left of a blue square."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model directory (default: the embedded one)")
    ap.add_argument("--out", type=Path, default=Path("docs"))
    ap.add_argument("--seeds", type=int, default=10, help="the prompt is drawn with seeds 0..N-1")
    ap.add_argument("--questions", type=int, default=8)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    pipe = VARGPTPipeline.from_pretrained(args.model, progress=False)
    images = pipe.generate([PROMPT], n=args.seeds, seed=0)
    verdicts = [check_image(im, PROMPT) for im in images]
    tiles = [(im, v["score"] > 0, f"seed {i}: {json.dumps(v)}") for i, (im, v) in enumerate(zip(images, verdicts,
                                                                                                   strict=True))]
    path = tasks.sample_sheet(tiles, args.out / "embedded_red_circle.png", per_row=args.seeds)
    print(f"{PROMPT!r}: {sum(ok for _, ok, _ in tiles)} of seeds 0-{args.seeds - 1} pass the checker -> {path}")
    rep = tasks.evaluate_vqa(pipe, tasks.vqa_cases(args.questions), progress=False)
    for a in rep["answers"]:
        wrong = "" if score_answer(a["predicted"], a["answer"]) else "wrong"
        print(f"{a['question']:<50}{a['predicted']:<13}{'(truth: ' + a['answer'] + ')':<20}{wrong}".rstrip())


if __name__ == "__main__":
    main()
