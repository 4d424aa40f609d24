"""What each training stage of the tiny chain bought, measured with the ShapesWorld checker on held-out records.

For the runs of `scripts/build_embedded_default.sh` under ROOT:
* loss: mean of the first and of the last ``--window`` logged losses of every stage (does each stage's loss fall?);
  DPO also reports its reward accuracy and margin at the start and at the end;
* DPO: edit success (its preference pairs are the editing model's own edits) and GenEval-style text-to-image score
  before (the model DPO started from, its recipe's model.checkpoint) and after (dpo), one score per sampling seed,
  with mean and spread;
* editing SFT: edit success and text-to-image score before (the model its first stage started from) and after (its
  last stage: the latest of edit12, ..., edit2 the chain has, else edit), per seed; and each later editing stage
  against the one it started from;
* understanding: VQA accuracy of every understanding stage the chain has and of the final model (the last stage):
  what the later stages keep of it.
All at ``--size`` (default 64, the resolution every stage trains at), on the test split. A chain continued from a
given model (the build's CONTINUE_FROM) reports what its own stages bought: the given stages have no loss log.

    python benchmarks/stage_gains.py --root runs/tiny --n 64 --seeds 0 1 2 --json benchmarks/stage_gains.json
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

import torch

from vargpt.engine import Engine
from vargpt.eval import tasks
from vargpt.models.vargpt import VARGPT
from vargpt.pipeline import VARGPTPipeline
from vargpt.training.recipe import load_recipe

# the chain's order; the last is shipped
LATER_EDITS = tuple(f"edit{i}" for i in range(2, 13))  # edit2 .. edit12
STAGES = ("understanding", "understanding2", "understanding3", "gen", "edit", *LATER_EDITS, "dpo")


def loss_trend(run: Path, window: int) -> dict:
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    first, last = rows[:window], rows[-window:]

    def mean(part: list[dict], key: str) -> float:
        return statistics.fmean(float(r[key]) for r in part)

    out = {"steps": int(rows[-1]["step"]), "loss_first": mean(first, "loss"), "loss_last": mean(last, "loss"),
           "seconds": float(rows[-1]["elapsed_s"])}
    for key in ("bit_loss", "text_loss", "rewards_accuracy", "rewards_margin"):
        if key in rows[0]:
            out[f"{key}_first"], out[f"{key}_last"] = mean(first, key), mean(last, key)
    return out


def _start_stage(run: Path) -> str:
    """The stage whose model a stage's run started from (the ``model.checkpoint`` of its saved recipe)."""
    ckpt = Path(load_recipe(run / "recipe.yaml").model.checkpoint)
    if ckpt.name != "model" or ckpt.parent.name not in STAGES:
        raise SystemExit(f"{run}: started from {ckpt}, not from a stage of this chain {STAGES}")
    return ckpt.parent.name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("runs/tiny"))
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--window", type=int, default=5, help="logged rows averaged at each end of a loss curve")
    ap.add_argument("--json", type=Path, default=Path("stage_gains.json"))
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    stages = [s for s in STAGES if (args.root / s / "model").is_dir()]
    trained = [s for s in stages if (args.root / s / "metrics.csv").is_file()]  # not given (CONTINUE_FROM)
    if not trained:
        raise SystemExit(f"{args.root}: no trained stage of a build_embedded_default.sh chain")
    model_dir = {s: args.root / s / "model" for s in stages}
    report: dict = {"root": str(args.root), "n": args.n, "seeds": args.seeds, "size": args.size,
                    "loss": {s: loss_trend(args.root / s, args.window) for s in trained}}

    def t2i(stage: str) -> dict:
        rep = tasks.evaluate_t2i(Engine(VARGPT.from_pretrained(model_dir[stage])), tasks.t2i_cases(args.n),
                                 seeds=args.seeds, size=args.size, batch=args.batch)
        rep.pop("images")
        return rep

    def edit(stage: str) -> dict:
        rep = tasks.evaluate_edit(Engine(VARGPT.from_pretrained(model_dir[stage])),
                                  tasks.edit_cases(args.n, size=args.size),
                                  seeds=args.seeds, size=args.size, batch=args.batch)
        rep.pop("images")
        return rep

    later = [s for s in LATER_EDITS if s in trained]
    last_edit = [s for s in ("edit", *LATER_EDITS) if s in stages][-1]
    start = {s: _start_stage(args.root / s) for s in ("dpo", "edit", *later) if s in trained}
    report["start"] = start
    wanted = [*(("edit", start[s]) for s in later), *(("edit", s) for s in later)]  # (task, stage) pairs
    if "dpo" in start:
        wanted += [("t2i", start["dpo"]), ("t2i", "dpo"), ("edit", start["dpo"]), ("edit", "dpo")]
    if "edit" in start:
        wanted += [("edit", start["edit"]), ("edit", last_edit), ("t2i", start["edit"]), ("t2i", last_edit)]
    scores = {(task, stage): (t2i if task == "t2i" else edit)(stage) for task, stage in dict.fromkeys(wanted)}
    if "dpo" in start:
        report["dpo"] = {"before": scores["t2i", start["dpo"]], "after": scores["t2i", "dpo"],
                         "edit_before": scores["edit", start["dpo"]], "edit_after": scores["edit", "dpo"]}
    if "edit" in start:
        report["edit_sft"] = {"before": scores["edit", start["edit"]], "after": scores["edit", last_edit],
                              "t2i_before": scores["t2i", start["edit"]], "t2i_after": scores["t2i", last_edit]}
    for s in later:
        report[s] = {"before": scores["edit", start[s]], "after": scores["edit", s]}
    vqa_cases = tasks.vqa_cases(args.n, size=args.size)
    report["vqa"] = {s: tasks.evaluate_vqa(VARGPTPipeline.from_pretrained(model_dir[s], progress=False), vqa_cases)
                     for s in (*(s for s in stages if s.startswith("understanding")), stages[-1])}
    report["vqa_final"] = report["vqa"][stages[-1]]
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    def fmt(score: dict) -> str:
        return f"{score['mean']:.3f} (seeds {score['min']:.3f}..{score['max']:.3f})"

    summary = {
        "loss first -> last": {s: f"{v['loss_first']:.4f} -> {v['loss_last']:.4f}" for s, v in report["loss"].items()},
        "vqa by stage": {s: v["accuracy"] for s, v in report["vqa"].items()},
    }
    if "dpo" in report:
        summary["dpo t2i before/after"] = [fmt(report["dpo"][k]["score"]) for k in ("before", "after")]
        summary["dpo edit before/after"] = [fmt(report["dpo"][k]["score"]) for k in ("edit_before", "edit_after")]
    if "edit_sft" in report:
        summary["edit before/after"] = [fmt(report["edit_sft"][k]["score"]) for k in ("before", "after")]
        summary["edit-sft t2i before/after"] = [fmt(report["edit_sft"][k]["score"]) for k in ("t2i_before",
                                                                                              "t2i_after")]
    for s in LATER_EDITS:
        if s in report:
            summary[f"{s} before/after"] = [fmt(report[s][k]["score"]) for k in ("before", "after")]
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
