"""Published vs consistent unconditional CFG branch, scored on held-out ShapesWorld prompts over several seeds.

The published branch (``compat.published_uncond_branch=True``) re-runs the LLM per scale on that scale's tokens
alone and cross-attends to raw ``cfg_uncond`` rows; the consistent one runs the model on the null prompt with its
own KV cache (see `vargpt.models.vargpt`). Both are sampled with the same seeds and scored with the checker by
`vargpt.eval.tasks.evaluate_t2i`. Meaningful only for a trained model.

    python benchmarks/uncond_branch.py --model DIR --n 64 --seeds 0 1 2 --json uncond_branch.json [--size 64]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vargpt.config import SamplingConfig
from vargpt.engine import Engine
from vargpt.eval.tasks import evaluate_t2i, t2i_cases
from vargpt.models.vargpt import VARGPT


def run(model_dir: Path, n: int, size: int | None, cfg: float | None, batch: int, seeds: list[int]) -> dict:
    model = VARGPT.from_pretrained(model_dir)
    base = model.config.sampling
    sampling = SamplingConfig(cfg_scale=base.cfg_scale if cfg is None else cfg, tau=base.tau, top_k=base.top_k,
                              top_p=base.top_p)
    cases = t2i_cases(n)
    report: dict = {"model": str(model_dir), "branches": {}}
    for name, published in (("published", True), ("consistent", False)):
        model.config.compat.published_uncond_branch = published
        rep = evaluate_t2i(Engine(model), cases, seeds=seeds, size=size, sampling=sampling, batch=batch)
        rep.pop("images")
        report["branches"][name] = rep
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--cfg", type=float, default=None)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--json", type=Path, default=Path("uncond_branch.json"))
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    report = run(args.model, args.n, args.size, args.cfg, args.batch, args.seeds)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v["score"] for k, v in report["branches"].items()}))


if __name__ == "__main__":
    main()
