"""Crash-safe training checkpoints: atomic writes, keep-last-N, resume from the newest complete one.

Layout under a run directory::

    RUN/checkpoints/step_00000100/   model.safetensors  optimizer.pt  state.json  config.json  COMPLETE

A checkpoint is written into a hidden temporary directory beside its final place, every file fsynced,
``COMPLETE`` written last, then the directory is renamed into place (atomic on POSIX) and the parent
fsynced. A crash leaves either the previous checkpoints untouched or a ``.tmp-*`` directory that is ignored
and cleaned up on the next save. Only complete checkpoints are resumed from or counted for keep-last-N.

Generic: the model is any ``state_dict`` (saved as safetensors), the optimiser/scheduler/RNG state any
picklable object (``torch.save``), ``state`` and ``config`` any JSON-able dicts. The VAE trainer and the
main trainer share it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vargpt.errors import CheckpointError

_STEP_DIR = re.compile(r"^step_(\d{8,})$")
MODEL_FILE, OPTIM_FILE, STATE_FILE, CONFIG_FILE, DONE_FILE = (
    "model.safetensors", "optimizer.pt", "state.json", "config.json", "COMPLETE")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory, fsync, rename, fsync the directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def save_model_dir(out: str | Path, state_dict: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """An exported model: ``model.safetensors`` + ``config.json``, written atomically (directory rename)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        save_file(_contiguous(state_dict), tmp / MODEL_FILE)
        _fsync_file(tmp / MODEL_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        _fsync_file(tmp / CONFIG_FILE)
        _fsync_dir(tmp)
        if out.exists():
            old = out.parent / f".old-{out.name}-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(out.parent)
    return out


def load_model_dir(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, config) of a directory written by `save_model_dir` or `save_checkpoint`."""
    path = Path(path)
    if not (path / MODEL_FILE).is_file() or not (path / CONFIG_FILE).is_file():
        raise CheckpointError(f"{path} is not a model directory (needs {MODEL_FILE} and {CONFIG_FILE}); "
                              "pass the --out directory of a training run or its model/ subdirectory")
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / CONFIG_FILE} is not valid JSON ({e.msg}); re-export the model") from None
    return load_file(path / MODEL_FILE), config


@dataclass
class Checkpoint:
    """A complete checkpoint on disk (lazy: read the parts you need)."""

    path: Path
    step: int

    def model_state(self) -> dict[str, torch.Tensor]:
        return load_file(self.path / MODEL_FILE)

    def optimizer_state(self, map_location: str | torch.device = "cpu") -> Any:
        f = self.path / OPTIM_FILE
        return torch.load(f, map_location=map_location, weights_only=False) if f.is_file() else None

    def state(self) -> dict[str, Any]:
        return json.loads((self.path / STATE_FILE).read_text())

    def config(self) -> dict[str, Any]:
        return json.loads((self.path / CONFIG_FILE).read_text())


def list_checkpoints(run_dir: str | Path) -> list[Checkpoint]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir() and (d / DONE_FILE).is_file():
            out.append(Checkpoint(d, int(m.group(1))))
    return sorted(out, key=lambda c: c.step)


def latest_checkpoint(run_dir: str | Path) -> Checkpoint | None:
    """The newest complete checkpoint, or None."""
    cks = list_checkpoints(run_dir)
    return cks[-1] if cks else None


def save_checkpoint(run_dir: str | Path, step: int, *, model_state: dict[str, torch.Tensor],
                    optimizer_state: Any = None, state: dict[str, Any] | None = None,
                    config: dict[str, Any] | None = None, keep_last: int = 3) -> Checkpoint:
    """Write checkpoint ``step`` atomically, then delete all but the newest ``keep_last`` complete ones."""
    if keep_last < 1:
        raise CheckpointError(f"keep_last must be >= 1, got {keep_last}")
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # leftovers of a crashed save
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        save_file(_contiguous(model_state), tmp / MODEL_FILE)
        _fsync_file(tmp / MODEL_FILE)
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / OPTIM_FILE)
            _fsync_file(tmp / OPTIM_FILE)
        for name, obj in ((STATE_FILE, {"step": step, **(state or {})}), (CONFIG_FILE, config or {})):
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
            _fsync_file(tmp / name)
        (tmp / DONE_FILE).write_text("ok\n")
        _fsync_file(tmp / DONE_FILE)
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step: replace
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old.path, ignore_errors=True)
    return Checkpoint(final, step)
