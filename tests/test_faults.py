"""Faults during training: random SIGKILLs resume from the newest complete checkpoint with no step lost or repeated
and no damaged file; a full disk (ENOSPC) during a checkpoint write leaves the earlier checkpoints intact and says
so in one line. benchmarks/kill_resume.py runs the kill loop longer."""

from __future__ import annotations

import errno
import io
import os
import random
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import fault_runs  # noqa: E402
from vargpt.data.shapesworld import write_dataset  # noqa: E402
from vargpt.errors import CheckpointError  # noqa: E402
from vargpt.training import checkpoint  # noqa: E402
from vargpt.training.checkpoint import list_checkpoints, save_checkpoint  # noqa: E402
from vargpt.training.recipe import recipe_from_dict  # noqa: E402
from vargpt.training.trainer import train  # noqa: E402

TOTAL = 20


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults") / "sw"
    write_dataset(root, n=12, size=64, tasks=("t2i", "caption"), progress=False)
    return root


def test_random_sigkills_resume_without_lost_or_repeated_steps(data, tmp_path):
    seed = int(time.time())  # other kill points on every run; the seed is in every failure message
    ctx = fault_runs.context()
    reference = fault_runs.toy_recipe(data, tmp_path / "reference", steps=TOTAL)
    child = fault_runs.start(ctx, reference, tmp_path / "reference.log")  # uninterrupted, beside the killed one

    recipe = fault_runs.toy_recipe(data, tmp_path / "run", steps=TOTAL)
    report = fault_runs.kill_and_resume(ctx, recipe, kills=4, rng=random.Random(seed))
    run = tmp_path / "run"
    child.join(120)
    assert child.exitcode == 0, (tmp_path / "reference.log").read_text()[-3000:]
    assert report.damage == [] and report.wrong_resumes == [], (seed, report)
    assert report.kills == 4 and report.survived == 4 and report.finished_early == 0, (seed, report)
    assert fault_runs.steps_lost_and_repeated(run, TOTAL) == (0, 0), (seed, fault_runs.metrics_steps(run))
    a, b = (load_file(d / "model" / "model.safetensors") for d in (tmp_path / "reference", run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), seed  # as if never killed
    assert not list((run / "checkpoints").glob(".tmp-*"))


def _disk_full_after(monkeypatch, n_bytes: int = 100) -> None:
    """Checkpoint weight writes put ``n_bytes`` on disk, then fail as a full disk does."""
    def write(tensors, path, *args, **kwargs):
        Path(path).write_bytes(b"\0" * n_bytes)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", write)


def test_disk_full_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    good = save_checkpoint(tmp_path, 10, model_state={"w": torch.arange(3.0)}, optimizer_state={"m": 1})
    files = {p.name: p.read_bytes() for p in good.path.iterdir()}
    _disk_full_after(monkeypatch)
    with pytest.raises(CheckpointError) as e:
        save_checkpoint(tmp_path, 20, model_state={"w": torch.zeros(3)}, keep_last=1)
    message = str(e.value)
    assert "step_00000020: No space left on device; the earlier checkpoints are intact" in message
    assert "\n" not in message
    assert [c.step for c in list_checkpoints(tmp_path)] == [10]
    assert {p.name: p.read_bytes() for p in good.path.iterdir()} == files
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000010"]  # no temporary left


def test_trainer_stops_on_a_full_disk_and_resumes_after_space_is_freed(data, tmp_path, monkeypatch, capsys):
    recipe = recipe_from_dict({**fault_runs.toy_recipe(data, tmp_path / "run", steps=6),
                               "model": {"factory": "toy_model:build", "preset": None}})
    saves = []
    real = checkpoint.save_file

    def fills_up(tensors, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 2:  # the disk fills during the second checkpoint (step 4)
            _disk_full_after(monkeypatch)
            checkpoint.save_file(tensors, path)
        real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", fills_up)
    with pytest.raises(CheckpointError, match="step_00000004: No space left on device"):
        train(recipe, device="cpu")
    assert [c.step for c in list_checkpoints(recipe.run_dir)] == [2]
    assert fault_runs.damage(recipe.run_dir) == []
    monkeypatch.setattr(checkpoint, "save_file", real)  # space freed
    res = train(recipe, resume=True, device="cpu")
    assert res.steps == 6 and fault_runs.metrics_steps(recipe.run_dir) == [1, 2, 3, 4, 5, 6]
    assert "resumed from" in capsys.readouterr().out


def test_disk_full_while_rewriting_metrics_keeps_the_old_file(tmp_path, monkeypatch):
    from vargpt.errors import VargptError

    path = tmp_path / "metrics.csv"
    checkpoint.atomic_write_bytes(path, b"step,loss\n1,0.5\n")

    class Full(io.BytesIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fdopen", lambda fd, mode: (os.close(fd), Full())[1])
    with pytest.raises(VargptError, match=r"metrics.csv: No space left on device; the previous version is intact"):
        checkpoint.atomic_write_bytes(path, b"step,loss\n1,0.5\n2,0.4\n")
    assert path.read_bytes() == b"step,loss\n1,0.5\n" and [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]
