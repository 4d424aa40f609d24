"""Published vs consistent unconditional CFG branch, scored on ShapesWorld test prompts.

The published branch (``compat.published_uncond_branch=True``) re-runs the LLM per scale on that scale's tokens
alone and cross-attends to raw ``cfg_uncond`` rows; the consistent one runs the model on the null prompt with its
own KV cache (see `vargpt.models.vargpt`). Both are sampled with the same seeds and scored with the
deterministic checker (`vargpt.eval.checker.score_prompt`). Meaningful only for a trained model.

    python benchmarks/uncond_branch.py --model DIR --n 64 --json uncond_branch.json [--size 64] [--cfg 3]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from vargpt.config import SamplingConfig
from vargpt.data.shapesworld import make_record
from vargpt.eval.checker import score_prompt
from vargpt.models.vargpt import VARGPT
from vargpt.pipeline import to_pil


def test_prompts(n: int, seed: int) -> list[tuple[str, str]]:
    """(prompt, category) of the first ``n`` text-to-image records of the test split."""
    out = []
    for i in range(n):
        rec, _ = make_record(i, split="test", seed=seed, size=64, tasks=("t2i",))
        out.append((rec["messages"][0]["content"], rec["meta"]["category"]))
    return out


def run(model_dir: Path, n: int, size: int | None, cfg: float | None, batch: int, seed: int) -> dict:
    model = VARGPT.from_pretrained(model_dir)
    prompts = test_prompts(n, seed)
    base = model.config.sampling
    sampling = SamplingConfig(cfg=base.cfg if cfg is None else cfg, tau=base.tau, top_k=base.top_k, top_p=base.top_p)
    report: dict = {"model": str(model_dir), "n": n, "size": size or model.config.image_size,
                    "sampling": vars(sampling), "branches": {}}
    for name, published in (("published", True), ("consistent", False)):
        model.config.compat.published_uncond_branch = published
        scores, by_cat = [], defaultdict(list)
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            chunk = prompts[i:i + batch]
            out = model.generate_images([p for p, _ in chunk], size=size, sampling=sampling, seed=seed + i)
            for (p, cat), img in zip(chunk, to_pil(out.images), strict=True):
                s = score_prompt(img, p).score
                scores.append(s)
                by_cat[cat].append(s)
        report["branches"][name] = {
            "score": sum(scores) / len(scores),
            "by_category": {c: sum(v) / len(v) for c, v in sorted(by_cat.items())},
            "seconds": round(time.perf_counter() - t0, 2),
        }
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--cfg", type=float, default=None)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=Path("uncond_branch.json"))
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    report = run(args.model, args.n, args.size, args.cfg, args.batch, args.seed)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v["score"] for k, v in report["branches"].items()}))


if __name__ == "__main__":
    main()
