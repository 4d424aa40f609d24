"""Kill-and-resume soak of the trainer: N random SIGKILLs of a resumable toy run, then the summary the issue asks for
(kills survived, steps lost or repeated, damaged files, wrong resumes) as JSON.

Each round is a fresh toy run (tests/toy_model.py: training noise from the global RNG that a resume must replay)
killed ``--kills-per-run`` times at random points (during start-up, or shortly after a random step; checkpoint
fsyncs are slowed so that kills also land inside checkpoint writes), then let finish; its metrics.csv must hold
steps 1..N once each and its final weights must equal an uninterrupted run's bit for bit. The machinery is
tests/fault_runs.py (shared with tests/test_faults.py).

    python benchmarks/kill_resume.py --kills 30 [--kills-per-run 6] [--steps 32] [--seed S] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import fault_runs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=30, help="SIGKILLs in total")
    ap.add_argument("--kills-per-run", type=int, default=6)
    ap.add_argument("--steps", type=int, default=32, help="optimiser steps of each run (a checkpoint every 2)")
    ap.add_argument("--seed", type=int, default=None, help="kill-timing seed (default: the clock)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch
    from safetensors.torch import load_file

    from vargpt.data.shapesworld import write_dataset

    seed = args.seed if args.seed is not None else int(time.time())
    rng = random.Random(seed)
    ctx = fault_runs.context()
    totals = {"seed": seed, "runs": 0, "kills": 0, "survived": 0, "inside_checkpoint_writes": 0,
              "resumes_checked": 0, "finished_before_kill": 0, "steps_lost": 0, "steps_repeated": 0,
              "final_weights_equal_uninterrupted": 0, "damage": [], "wrong_resumes": [], "kill_checkpoint_steps": []}
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_dataset(root / "sw", n=12, size=64, tasks=("t2i", "caption"), progress=False)
        reference = fault_runs.toy_recipe(root / "sw", root / "reference", steps=args.steps)
        child = fault_runs.start(ctx, reference, root / "reference.log")
        child.join(600)
        if child.exitcode != 0:
            sys.exit(f"the uninterrupted run failed:\n{(root / 'reference.log').read_text()[-3000:]}")
        ref = load_file(root / "reference" / "model" / "model.safetensors")
        while totals["kills"] < args.kills:
            run = root / f"run{totals['runs']}"
            recipe = fault_runs.toy_recipe(root / "sw", run, steps=args.steps)
            rep = fault_runs.kill_and_resume(ctx, recipe, kills=min(args.kills_per_run, args.kills - totals["kills"]),
                                             rng=rng)
            lost, repeated = fault_runs.steps_lost_and_repeated(run, args.steps)
            final = load_file(run / "model" / "model.safetensors")
            totals["runs"] += 1
            totals["kills"] += rep.kills
            totals["survived"] += rep.survived
            totals["inside_checkpoint_writes"] += rep.inside_writes
            totals["resumes_checked"] += rep.resumes_checked
            totals["finished_before_kill"] += rep.finished_early
            totals["steps_lost"] += lost
            totals["steps_repeated"] += repeated
            totals["final_weights_equal_uninterrupted"] += all(torch.equal(ref[k], final[k]) for k in ref)
            totals["damage"] += rep.damage
            totals["wrong_resumes"] += rep.wrong_resumes
            totals["kill_checkpoint_steps"] += rep.kill_steps
            print(f"run {totals['runs']}: {rep.kills} kills, {rep.survived} survived, {rep.inside_writes} inside "
                  f"checkpoint writes, lost {lost}, repeated {repeated}", flush=True)
    steps = totals.pop("kill_checkpoint_steps")
    totals["newest_checkpoint_at_kill"] = {str(k): steps.count(k) for k in sorted(set(steps), key=lambda s: s or 0)}
    totals["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(totals, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(totals, indent=2) + "\n")
    ok = (totals["survived"] == totals["kills"] and not totals["damage"] and not totals["wrong_resumes"]
          and totals["steps_lost"] == totals["steps_repeated"] == 0
          and totals["final_weights_equal_uninterrupted"] == totals["runs"])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
