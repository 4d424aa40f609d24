"""Safe loading: weights only from safetensors (pickles refused, never run), NaN/inf weights named, trainer state
read with ``weights_only=True``, no ``trust_remote_code`` anywhere."""

from __future__ import annotations

import io
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_cli
from vargpt.errors import CheckpointError
from vargpt.pipeline import default_model_dir
from vargpt.training.checkpoint import OPTIM_FILE, latest_checkpoint, save_checkpoint
from vargpt.weights import count_nonfinite, load_state_dict_files

SRC = Path(__file__).resolve().parents[1] / "src" / "vargpt"


class _Trap:
    """Unpickling this runs ``Path(marker).touch()``: what a malicious checkpoint would do with a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def _trap_bytes(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"weight": torch.zeros(2), "payload": _Trap(marker)}, buf)
    return buf.getvalue()


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_pickled_weights_are_refused_and_never_unpickled(tmp_path, name):
    marker = tmp_path / "pwned"
    (tmp_path / name).write_bytes(_trap_bytes(marker))
    for target in (tmp_path, tmp_path / name):
        with pytest.raises(CheckpointError, match=rf"{name}: a pickled PyTorch file; vargpt reads weights only from "
                                                  "safetensors"):
            load_state_dict_files(target)
    assert not marker.exists()


def test_trainer_state_is_read_weights_only(tmp_path):
    marker = tmp_path / "pwned"
    ck = save_checkpoint(tmp_path, 1, model_state={"w": torch.zeros(2)}, optimizer_state={"m": 1})
    (ck.path / OPTIM_FILE).write_bytes(_trap_bytes(marker))
    with pytest.raises(CheckpointError, match=r"optimizer.pt: holds \S+, which a safe load \(weights_only\)"):
        latest_checkpoint(tmp_path).optimizer_state()
    assert not marker.exists()
    (ck.path / OPTIM_FILE).write_bytes(b"\x80\x02garbage")
    with pytest.raises(CheckpointError, match="optimizer.pt"):
        latest_checkpoint(tmp_path).optimizer_state()


def test_real_optimizer_scheduler_and_rng_state_round_trip_weights_only(tmp_path):
    from vargpt.training.trainer import _rng_state, _set_rng_state

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step()
    blob = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": [_rng_state()], "ref_cache": {
        "0:a": (1.5, -2.0)}}
    save_checkpoint(tmp_path, 5, model_state=model.state_dict(), optimizer_state=blob)
    back = latest_checkpoint(tmp_path).optimizer_state()
    assert back["ref_cache"] == {"0:a": (1.5, -2.0)} and back["scheduler"]["last_epoch"] == 1
    torch.testing.assert_close(back["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    expected = (random.random(), np.random.rand(), torch.rand(1))
    _set_rng_state(back["rng"][0])  # every generator replays from the saved state
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_earlier_checkpoints_with_numpy_rng_state_still_resume(tmp_path):
    ck = save_checkpoint(tmp_path, 1, model_state={"w": torch.zeros(2)}, optimizer_state={"m": 1})
    torch.save({"rng": [{"numpy": np.random.get_state()}]}, ck.path / OPTIM_FILE)  # as earlier versions wrote it
    state = latest_checkpoint(tmp_path).optimizer_state()["rng"][0]["numpy"]
    assert state[0] == "MT19937" and np.array_equal(state[1], np.random.get_state()[1])


def test_state_that_would_not_load_weights_only_is_refused_before_writing(tmp_path):
    with pytest.raises(CheckpointError, match=r"optimizer_state\['rng'\]\[0\] is a numpy.ndarray; checkpoints "
                                              "store only tensors"):
        save_checkpoint(tmp_path, 1, model_state={"w": torch.zeros(2)}, optimizer_state={"rng": [np.zeros(3)]})
    assert latest_checkpoint(tmp_path) is None and not list((tmp_path / "checkpoints").iterdir())


@pytest.fixture
def broken_model(tmp_path):
    """A copy of the shipped tiny model; the test writes bad values into one of its tensors."""
    out = tmp_path / "model"
    shutil.copytree(default_model_dir(), out)
    return out


def test_nan_or_inf_weights_are_named_through_python_and_cli(broken_model, capsys):
    from vargpt.models.vargpt import VARGPT

    sd = load_file(broken_model / "model.safetensors")
    nan_key, inf_key = sorted(sd)[len(sd) // 2], sorted(sd)[-1]
    sd[nan_key].view(-1)[0] = float("nan")
    save_file(sd, broken_model / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"tensor {re.escape(nan_key)} holds 1 NaN/inf value\(s\)"):
        VARGPT.from_pretrained(broken_model)
    sd[nan_key].view(-1)[0] = 0.0
    sd[inf_key].view(-1)[-1] = float("inf")
    save_file(sd, broken_model / "model.safetensors")
    code, out, err = run_cli(capsys, "generate", "a red circle", "--out", str(broken_model / "x.png"), "--model",
                             str(broken_model), "--device", "cpu")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and inf_key in err


def test_count_nonfinite_is_exact_and_not_fooled_by_overflowing_sums():
    assert count_nonfinite(torch.full((1000,), 60000.0, dtype=torch.float16)) == 0  # its sum overflows fp16
    x = torch.zeros(10, dtype=torch.bfloat16)
    x[[2, 7]] = torch.tensor([float("nan"), -float("inf")], dtype=torch.bfloat16)
    assert count_nonfinite(x) == 2 and count_nonfinite(torch.arange(5)) == 0


def test_no_unsafe_loading_anywhere_in_the_package():
    """``trust_remote_code`` is never set, every ``torch.load`` is weights-only, nothing calls pickle."""
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        assert "trust_remote_code" not in text, path
        assert not re.search(r"\bpickle\.loads?\(|\bdill\b|\bjoblib\.load", text), path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)
