"""Subprocess runs: 2 CPU processes (gloo) = 1 process with doubled accumulation; SIGKILL + --resume = no kill.

Both use the toy model (tests/toy_model.py) through ``model.factory`` and the real CLI (``python -m vargpt train``),
single-threaded so that float results do not depend on thread scheduling.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vargpt.data.shapesworld import write_dataset
from vargpt.training.checkpoint import list_checkpoints

TESTS = Path(__file__).resolve().parent
TIMEOUT = 240


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp")
    write_dataset(root / "sw", n=16, size=64, tasks=("t2i", "caption"), progress=False)
    recipe = root / "toy.yaml"
    recipe.write_text(f"""
name: toy
stage: sft_mixed
model: {{factory: "toy_model:build", preset: null}}
data: {{sources: [{{path: {root / 'sw'}, format: shapesworld}}], image_size: 64}}
trainable: all
optim: {{lr: 0.01}}
batch_size: 2
log_every: 1
progress: false
""")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return root, recipe, env


def _cmd(recipe, *overrides, launcher=()):
    return [sys.executable, *launcher, "-m", "vargpt", "train", "--recipe", str(recipe), "--device", "cpu",
            *overrides]


def _weights(run):
    return load_file(run / "model" / "model.safetensors")


def test_two_processes_equal_one_with_double_accumulation(setup):
    root, recipe, env = setup
    common = ("max_steps=4", "checkpoint.every=4")
    two = subprocess.run(_cmd(recipe, *common, "grad_accum=1", f"out_dir={root / 'two'}",
                              launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")),
                         env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es)" in two.stdout
    one = subprocess.run(_cmd(recipe, *common, "grad_accum=2", f"out_dir={root / 'one'}"), env=env,
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = _weights(root / "two"), _weights(root / "one")
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= 1e-6, f"2 processes vs 1 process x 2 accumulation: max |dw| = {diff}"  # measured: 0.0
    assert list_checkpoints(root / "two")[-1].state()["world_size"] == 2


def test_sigkill_then_resume_equals_uninterrupted(setup):
    root, recipe, env = setup
    common = ("max_steps=12", "checkpoint.every=3", "checkpoint.keep_last=2", "model.factory=toy_model:build_noisy")
    full = subprocess.Popen(_cmd(recipe, *common, f"out_dir={root / 'full'}"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed_dir = root / "killed"
    slow = "model.factory=toy_model:build_noisy_slow"  # same math, 0.15 s per step: time to kill it mid-run
    victim = subprocess.Popen(_cmd(recipe, *common, f"out_dir={killed_dir}", slow), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + TIMEOUT
    while not list_checkpoints(killed_dir) and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=30) == -signal.SIGKILL
    done = list_checkpoints(killed_dir)
    assert done and done[-1].step < 12 and not (killed_dir / "model").exists()  # killed mid-run

    resumed = subprocess.run(_cmd(recipe, *common, f"out_dir={killed_dir}", "--resume"), env=env,
                             capture_output=True, text=True, timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {done[-1].path}" in resumed.stdout
    assert full.wait(timeout=TIMEOUT) == 0, full.stderr.read()[-3000:]
    a, b = _weights(root / "full"), _weights(killed_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical
    steps = [line.split(",")[0] for line in (killed_dir / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == [str(s) for s in range(1, 13)]
