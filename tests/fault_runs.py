"""Kill-and-resume runs of the trainer (tests/test_faults.py and benchmarks/kill_resume.py).

A toy run (tests/toy_model.py, 0.04 s a step, training noise from the global RNG that a resume must replay) is
started with ``--resume`` semantics in a child process, SIGKILLed at a random point (`kill_and_resume`), started
again, ..., then let finish. Children come from a `multiprocessing` forkserver: it imports torch and the trainer
once, then each child is a fork of that clean, single-threaded process (starting in milliseconds; a fork of the
pytest process itself could inherit OpenMP threads and locks). The checkpoint fsyncs are slowed in the children so
that kills land inside checkpoint writes too, not only between them.

After every kill `damage(run_dir)` lists what is wrong on disk (an unreadable checkpoint, a metrics.csv that does
not parse or whose steps are not 1..n); at the end `steps_lost_and_repeated` compares metrics.csv with 1..N and
the final weights are compared with an uninterrupted run's.
"""

from __future__ import annotations

import csv
import multiprocessing
import os
import random
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent


def toy_recipe(data_dir: Path, out_dir: Path, *, steps: int, every: int = 2, keep_last: int = 2) -> dict[str, Any]:
    return {"name": "toy", "stage": "sft_mixed", "model": {"factory": "toy_model:build_noisy_paced", "preset": None},
            "data": {"sources": [{"path": str(data_dir), "format": "shapesworld"}], "image_size": 64},
            "trainable": "all", "optim": {"lr": 0.01}, "batch_size": 2, "max_steps": steps, "log_every": 1,
            "checkpoint": {"every": every, "keep_last": keep_last}, "out_dir": str(out_dir), "progress": False}


def _train_child(recipe: dict[str, Any], log_path: str, fsync_delay_s: float) -> None:
    """The child: stdout/stderr to ``log_path``, slow fsyncs, ``train(recipe, resume=True)``."""
    import torch

    from vargpt.training import checkpoint
    from vargpt.training.recipe import recipe_from_dict
    from vargpt.training.trainer import train

    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    torch.set_num_threads(1)
    fsync = checkpoint._fsync_file

    def slow_fsync(path: Path) -> None:
        time.sleep(fsync_delay_s)
        fsync(path)

    checkpoint._fsync_file = slow_fsync
    train(recipe_from_dict(recipe), resume=True, device="cpu")


def context() -> multiprocessing.context.BaseContext:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "accelerate", "tqdm", "matplotlib.pyplot", "vargpt.training.trainer",
                               "vargpt.training.plots", "vargpt.data.records", "toy_model", "fault_runs"])
    return ctx


def start(ctx: Any, recipe: dict[str, Any], log_path: Path, fsync_delay_s: float = 0.02) -> Any:
    proc = ctx.Process(target=_train_child, args=(recipe, str(log_path), fsync_delay_s), daemon=True)
    proc.start()
    return proc


def metrics_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    with path.open() as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


def damage(run_dir: Path) -> list[str]:
    """What is unreadable or inconsistent in a run directory (empty: nothing)."""
    from vargpt.training.checkpoint import list_checkpoints

    problems = []
    for ck in list_checkpoints(run_dir):
        try:
            ck.model_state()
            blob = ck.optimizer_state()
            state = ck.state()
            ck.config()
        except Exception as e:  # anything unreadable is what we look for
            problems.append(f"{ck.path.name}: {type(e).__name__}: {e}")
            continue
        if state["step"] != ck.step or not {"optimizer", "scheduler", "rng"} <= set(blob):
            problems.append(f"{ck.path.name}: state says step {state['step']}, keys {sorted(blob)}")
    try:
        steps = metrics_steps(run_dir)
    except (ValueError, KeyError, csv.Error) as e:
        return problems + [f"metrics.csv: {type(e).__name__}: {e}"]
    if steps != list(range(1, len(steps) + 1)):
        problems.append(f"metrics.csv steps {steps}")
    return problems


def steps_lost_and_repeated(run_dir: Path, total: int) -> tuple[int, int]:
    steps = metrics_steps(run_dir)
    return len(set(range(1, total + 1)) - set(steps)), len(steps) - len(set(steps))


@dataclass
class KillReport:
    kills: int = 0  # SIGKILLs sent to a running child
    survived: int = 0  # kills after which the run dir was undamaged and the next start resumed correctly
    resumes_checked: int = 0  # restarts whose "resumed from" line named the newest complete checkpoint
    finished_early: int = 0  # children that completed before their kill came
    inside_writes: int = 0  # kills that left a half-written checkpoint (a .tmp-* directory) behind
    damage: list[str] = field(default_factory=list)
    wrong_resumes: list[str] = field(default_factory=list)
    kill_steps: list[int | None] = field(default_factory=list)  # newest complete checkpoint at each kill


def _wait_for_step(proc: Any, run_dir: Path, step: int, since_ns: int, timeout_s: float) -> None:
    """Until the child has logged ``step`` (in a metrics.csv it wrote itself, not the one it found) or ended."""
    path, deadline = run_dir / "metrics.csv", time.monotonic() + timeout_s
    while proc.is_alive() and time.monotonic() < deadline:
        try:
            if path.stat().st_mtime_ns >= since_ns and max(metrics_steps(run_dir), default=0) >= step:
                return
        except (OSError, ValueError, KeyError):  # not written yet, or replaced while we read it
            pass
        time.sleep(0.005)


def kill_and_resume(ctx: Any, recipe: dict[str, Any], *, kills: int, rng: random.Random, startup_share: float = 0.25,
                    fsync_delay_s: float = 0.02, timeout_s: float = 120) -> KillReport:
    """SIGKILL ``kills`` children of the resumable run ``recipe`` at random points, then let one finish.

    Each kill point: with probability ``startup_share`` a random moment in the first 0.4 s (loading, resuming);
    otherwise 0-100 ms after the child logs a random step past the checkpoint it resumed from, drawn so that the
    kills left spread over the steps left (every kill lands in a step, a metrics write, a checkpoint write or the
    final model write, before the run ends on its own).
    """
    from vargpt.training.checkpoint import latest_checkpoint

    run_dir = Path(recipe["out_dir"])
    log = run_dir.parent / f"{run_dir.name}.log"
    report = KillReport()
    launches = 0
    while True:
        before = latest_checkpoint(run_dir)
        leftovers = set((run_dir / "checkpoints").glob(".tmp-*"))
        mark = log.stat().st_size if log.exists() else 0
        launched_ns = time.time_ns()
        proc = start(ctx, recipe, log, fsync_delay_s)
        launches += 1
        last = report.kills >= kills
        if not last:
            if rng.random() < startup_share:
                proc.join(rng.uniform(0.0, 0.4))
            else:
                done = before.step if before else 0  # spread the kills left over the steps left
                target = done + rng.randint(1, max(1, (recipe["max_steps"] - done) // (kills - report.kills)))
                _wait_for_step(proc, run_dir, target, launched_ns, timeout_s)
                proc.join(rng.uniform(0.0, 0.1))
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
                proc.join(timeout_s)
            if proc.exitcode == -signal.SIGKILL:
                report.kills += 1
                ck = latest_checkpoint(run_dir)
                report.kill_steps.append(ck.step if ck else None)
                report.inside_writes += bool(set((run_dir / "checkpoints").glob(".tmp-*")) - leftovers)
            else:  # it finished first (or in the instant before the signal): nothing left to kill
                report.finished_early += 1
                last = True
        proc.join(timeout_s)
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
            raise RuntimeError(f"a training child hung for {timeout_s} s; see {log}")
        text = log.read_text()[mark:] if log.exists() else ""
        found = re.search(r"resumed from (\S+) \(step (\d+)\)", text)
        if found and before is not None:
            report.resumes_checked += 1
            if int(found[2]) != before.step:
                report.wrong_resumes.append(f"launch {launches}: resumed at {found[2]}, newest was {before.step}")
        problems = damage(run_dir)
        report.damage += [f"after launch {launches}: {p}" for p in problems]
        if proc.exitcode == -signal.SIGKILL and not problems:
            report.survived += 1
        if last:
            if proc.exitcode != 0:
                raise RuntimeError(f"the final run failed (exit {proc.exitcode}); see {log}:\n{text[-3000:]}")
            return report
        if proc.exitcode not in (0, -signal.SIGKILL):
            raise RuntimeError(f"a training child failed (exit {proc.exitcode}); see {log}:\n{text[-3000:]}")
