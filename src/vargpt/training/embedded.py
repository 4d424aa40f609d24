"""Pieces of the embedded default's build chain (`scripts/build_embedded_default.sh`) that no CLI command covers.

* `train_tiny_tokenizer`: the tiny preset's byte-level BPE tokenizer, trained on ShapesWorld text (captions,
  questions, answers, generation prompts, edit instructions and the chat template around them) from ``n`` records
  of each split, so the held-out combinations of val/test are covered too. Deterministic: same ``n`` and ``seed``,
  same ``tokenizer.json``. Recipes point ``model.tokenizer`` at the directory it writes.
* `check_model`: a few generations, answers and edits of a model on ShapesWorld val records, scored with the
  deterministic checker (`vargpt.eval.checker`); the chain's final check.

Command line::

    python -m vargpt.training.embedded tokenizer --out runs/tokenizer_tiny [--n 2000] [--seed 0]
    python -m vargpt.training.embedded check --model DIR --data64 VAL64 --data128 VAL128 --json OUT.json [--n 16]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable
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


def check_model(model: str | Path, data64: str | Path, data128: str | Path, *, n: int = 16, device: str = "auto",
                out_json: str | Path | None = None) -> dict[str, Any]:
    """Mean checker scores of ``model`` on the first ``n`` val records of each kind: text-to-image (prompts of
    ``data128``, generated at the model's size), VQA (``data64``) and edits (``data128``). Writes ``out_json``."""
    from vargpt.data.shapesworld import read_records
    from vargpt.eval.checker import check_image, score_answer, score_edit
    from vargpt.imageio import load_image
    from vargpt.pipeline import VARGPTPipeline

    pipe = VARGPTPipeline.from_pretrained(Path(model), device=device, dtype="fp32", progress=False)

    def first(root: str | Path, task: str) -> list[tuple[dict[str, Any], list[Path]]]:
        recs = [r for r in read_records(root) if r["task"] == task][:n]
        if not recs:
            raise InputError(f"{root}: no {task} records; write it with `vargpt data shapesworld --split val`")
        return [(r, [Path(root) / p for p in r["images"]]) for r in recs]

    def user_text(rec: dict[str, Any]) -> str:
        return rec["messages"][0]["content"].replace(IMAGE_PLACEHOLDER, "").strip()

    t0 = time.perf_counter()
    scores: dict[str, list[float]] = {"t2i": [], "vqa": [], "edit": []}
    errors: list[str] = []
    for i, (rec, _) in enumerate(first(data128, "t2i")):
        prompt = user_text(rec)
        image = pipe.generate(prompt, seed=i)[0]
        scores["t2i"].append(_safe(errors, rec["id"], lambda im, p: check_image(im, p)["score"], image, prompt))
    for rec, paths in first(data64, "vqa"):
        answer = pipe.chat(rec["messages"][0]["content"], [load_image(paths[0])], max_new_tokens=16)
        scores["vqa"].append(score_answer(answer, rec["messages"][1]["content"]))
    for i, (rec, paths) in enumerate(first(data128, "edit")):
        source, instruction = load_image(paths[0]), user_text(rec)
        edited = pipe.edit(source, instruction, seed=i)
        scores["edit"].append(_safe(errors, rec["id"], lambda *a: score_edit(*a).score, source, instruction, edited))
    report = {"model": str(model), "n": n, **{k: sum(v) / len(v) for k, v in scores.items()},
              "unscorable": errors, "seconds": round(time.perf_counter() - t0, 1)}
    if out_json is not None:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _safe(errors: list[str], rid: str, score: Callable[..., float], *args: Any) -> float:
    """``score(*args)``, or 0 when the checker cannot score the picture at all (noted in ``errors``)."""
    try:
        return float(score(*args))
    except VargptError as e:
        errors.append(f"{rid}: {e}")
        return 0.0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m vargpt.training.embedded", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tokenizer", help="train the tiny tokenizer on ShapesWorld text; writes OUT/tokenizer.json")
    t.add_argument("--out", required=True, type=Path)
    t.add_argument("--n", type=int, default=2000, help="records per split (train, val, test)")
    t.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("check", help="score a model with the ShapesWorld checker on val records")
    c.add_argument("--model", required=True, type=Path)
    c.add_argument("--data64", required=True, type=Path, help="val split at 64 px (VQA)")
    c.add_argument("--data128", required=True, type=Path, help="val split at 128 px (prompts, edits)")
    c.add_argument("--n", type=int, default=16, help="records of each kind")
    c.add_argument("--device", default="auto")
    c.add_argument("--json", required=True, type=Path)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "tokenizer":
            print(json.dumps({"tokenizer": str(train_tiny_tokenizer(args.out, n=args.n, seed=args.seed))}))
        else:
            print(json.dumps(check_model(args.model, args.data64, args.data128, n=args.n, device=args.device,
                                         out_json=args.json)))
    except VargptError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
