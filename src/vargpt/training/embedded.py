"""Pieces of the embedded default's build chain (`scripts/build_embedded_default.sh`) that no CLI command covers.

* `train_tiny_tokenizer`: the tiny preset's byte-level BPE tokenizer, trained on ShapesWorld text (captions,
  questions, answers, generation prompts, edit instructions and the chat template around them) from ``n`` records
  of each split, so the held-out combinations of val/test are covered too. Deterministic: same ``n`` and ``seed``,
  same ``tokenizer.json``. Recipes point ``model.tokenizer`` at the directory it writes.
* ``vision`` (`vargpt.training.vision`): dense pretraining of the vision tower on ShapesWorld scene labels.
* `check_model`: a few generations, edits and answers of a model on held-out ShapesWorld records, scored with the
  deterministic checker (`vargpt.eval.tasks`); the chain's final check.

Command line::

    python -m vargpt.training.embedded tokenizer --out runs/tokenizer_tiny [--n 2000] [--seed 0]
    python -m vargpt.training.embedded check --model DIR --json OUT.json [--n 16]
    python -m vargpt.training.embedded vision --recipe recipes/tiny/understanding.yaml --out DIR [--steps 1500]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from vargpt.config import get_preset
from vargpt.errors import InputError, VargptError
from vargpt.processing import (
    IMAGE_GEN_PLACEHOLDER,
    IMAGE_PLACEHOLDER,
    BPETokenizer,
    render_inference_prompt,
    special_tokens,
    train_bpe_tokenizer,
)

__all__ = ["check_model", "shapesworld_texts", "train_tiny_tokenizer"]


def shapesworld_texts(n: int = 2000, *, seed: int = 0) -> list[str]:
    """The text the tiny model reads and writes, from records ``0..n-1`` of every ShapesWorld split: each record's
    chat (default system prompt included) rendered with the Qwen2-VL template, cut at special tokens and image
    placeholders (those become special ids, never BPE pieces), plus the closed vocabulary's words."""
    from vargpt.data import scene
    from vargpt.data.shapesworld import NUMBERS, SPLITS, TASKS, make_record

    cuts = [*special_tokens(get_preset("tiny").tokens), IMAGE_PLACEHOLDER, IMAGE_GEN_PLACEHOLDER]
    cut = re.compile("|".join(re.escape(c) for c in sorted(cuts, key=len, reverse=True)))
    texts: list[str] = []
    for split in SPLITS:
        for i in range(n):
            rec, _ = make_record(i, split=split, seed=seed, size=64, tasks=TASKS)
            chat = render_inference_prompt(rec["messages"], add_generation_prompt=rec["task"] == "dpo")
            texts += [piece for piece in cut.split(chat) if piece]
    words = [*scene.COLOURS, *scene.SHAPES, *scene.PLURALS.values(), *scene.SIZES, *scene.CELL_NAMES,
             *scene.BACKGROUNDS, *NUMBERS]
    texts.append(" ".join(words))
    return texts


def train_tiny_tokenizer(out: str | Path, *, n: int = 2000, seed: int = 0) -> Path:
    """Train the tiny preset's tokenizer on `shapesworld_texts` and write ``out/tokenizer.json``; returns its path."""
    if n < 1:
        raise InputError(f"--n must be at least 1 (got {n})")
    cfg = get_preset("tiny")
    tok: BPETokenizer = train_bpe_tokenizer(shapesworld_texts(n, seed=seed), cfg.llm.vocab_size, cfg.tokens)
    return tok.save(out)


def check_model(model: str | Path, *, n: int = 16, seeds: tuple[int, ...] = (0,), device: str = "auto",
                out_json: str | Path | None = None) -> dict[str, Any]:
    """Checker scores of ``model`` on the first ``n`` held-out (test split) prompts, edits (at the model's own
    image size) and questions (64 px pictures) with `vargpt.eval.tasks`. Writes ``out_json``."""
    from vargpt.eval import tasks
    from vargpt.pipeline import VARGPTPipeline

    pipe = VARGPTPipeline.from_pretrained(Path(model), device=device, dtype="fp32", progress=False)
    size = pipe.model.config.image_size
    t0 = time.perf_counter()
    t2i = tasks.evaluate_t2i(pipe.engine, tasks.t2i_cases(n), seeds=seeds, progress=False)
    edit = tasks.evaluate_edit(pipe.engine, tasks.edit_cases(n, size=size), seeds=seeds, progress=False)
    vqa = tasks.evaluate_vqa(pipe, tasks.vqa_cases(n), progress=False)  # 64 px, as the understanding stage
    report = {"model": str(model), "n": n, "seeds": list(seeds), "size": size, "t2i": t2i["score"]["mean"],
              "t2i_by_category": t2i["by_group"], "edit": edit["score"]["mean"], "edit_satisfied":
              edit["satisfied"]["mean"], "edit_preserved": edit["preserved"]["mean"],
              "t2i_object_recall": t2i["object_recall"]["mean"], "vqa": vqa["accuracy"],
              "vqa_by_kind": vqa["by_group"], "seconds": round(time.perf_counter() - t0, 1)}
    if out_json is not None:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m vargpt.training.embedded", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tokenizer", help="train the tiny tokenizer on ShapesWorld text; writes OUT/tokenizer.json")
    t.add_argument("--out", required=True, type=Path)
    t.add_argument("--n", type=int, default=2000, help="records per split (train, val, test)")
    t.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("check", help="score a model with the ShapesWorld checker on val records")
    c.add_argument("--model", required=True, type=Path)
    c.add_argument("--n", type=int, default=16, help="records of each kind")
    c.add_argument("--device", default="auto")
    c.add_argument("--json", required=True, type=Path)
    v = sub.add_parser("vision", help="pretrain the vision tower of a recipe's model on dense ShapesWorld labels")
    v.add_argument("--recipe", required=True, type=Path, help="the understanding recipe (its model is built)")
    v.add_argument("--out", required=True, type=Path)
    v.add_argument("--steps", type=int, default=1500)
    v.add_argument("--batch-size", type=int, default=32)
    v.add_argument("--lr", type=float, default=1e-3)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--place-heads", action="store_true", help="also teach every token its grid row and column")
    v.add_argument("overrides", nargs="*", help="recipe overrides key=value, e.g. model.tokenizer=DIR")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "vision":
            from vargpt.training.vision import VisionPretrainConfig, pretrain_vision

            cfg = VisionPretrainConfig(recipe=str(args.recipe), out=str(args.out), overrides=tuple(args.overrides),
                                       steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                       place_heads=args.place_heads)
            print(json.dumps({"model": str(pretrain_vision(cfg))}))
        elif args.cmd == "tokenizer":
            print(json.dumps({"tokenizer": str(train_tiny_tokenizer(args.out, n=args.n, seed=args.seed))}))
        else:
            print(json.dumps(check_model(args.model, n=args.n, device=args.device, out_json=args.json)))
    except VargptError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
