"""Crash-safe training checkpoints: atomic writes, keep-last-N, resume from the newest complete one.

Layout under a run directory::

    RUN/checkpoints/step_00000100/   model.safetensors  optimizer.pt  state.json  config.json  COMPLETE

A checkpoint is written into a hidden temporary directory beside its final place, every file fsynced,
``COMPLETE`` written last, then the directory is renamed into place (atomic on POSIX) and the parent
fsynced. A crash leaves either the previous checkpoints untouched or a ``.tmp-*`` directory that is ignored
and cleaned up on the next save; a write that fails (a full disk: ENOSPC) removes its temporary directory and
raises `CheckpointError` saying so, the earlier checkpoints untouched. Only complete checkpoints are resumed from
or counted for keep-last-N.

Generic: the model is any ``state_dict`` (saved as safetensors, read back through `vargpt.weights`: damaged files
and NaN/inf weights are `CheckpointError`s naming the file and tensor), the optimiser/scheduler/RNG state any
nesting of dicts, lists and tuples of tensors, numbers, strings and None (``torch.save``; checked before writing
and read back with ``torch.load(weights_only=True)``: nothing in a checkpoint is unpickled as code), ``state`` and
``config`` any JSON-able dicts. The VAE trainer and the main trainer share it.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from vargpt.errors import CheckpointError, VargptError
from vargpt.weights import load_state_dict_files

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
    """Write ``data`` to ``path`` via a temp file in the same directory, fsync, rename, fsync the directory; a
    failed write (a full disk) leaves the old file and raises `VargptError` saying so."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as e:
        raise VargptError(f"cannot write {path}: {e.strerror or e}; free disk space or choose another directory") \
            from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise VargptError(f"cannot write {path}: {e.strerror or e}; the previous version is intact: free disk "
                              "space (a training run then continues with --resume)") from None
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


_PLAIN = (torch.Tensor, int, float, bool, str, bytes, type(None))
# numpy's RNG state (an ndarray) in the optimiser files of earlier versions: plain arrays of numbers, the numpy
# names `torch.load(weights_only=True)` needs for them (as numpy 2 and numpy 1 pickle them) and nothing else
_reconstruct = (np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct
_LEGACY_NUMPY = (_reconstruct, (_reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype,
                 np.dtypes.UInt32DType)


def check_plain(obj: Any, where: str = "optimizer_state") -> None:
    """`CheckpointError` naming the first entry of ``obj`` that ``torch.load(weights_only=True)`` would refuse."""
    if type(obj) in (dict, OrderedDict):
        for k, v in obj.items():
            check_plain(k, f"{where} key")
            check_plain(v, f"{where}[{k!r}]")
    elif type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN):
        raise CheckpointError(f"{where} is a {type(obj).__module__}.{type(obj).__name__}; checkpoints store only "
                              "tensors, numbers, strings, None and dicts/lists/tuples of them (convert it first)")


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
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE} is not valid JSON ({getattr(e, 'msg', e)}); re-export the "
                              "model") from None
    return load_state_dict_files(path / MODEL_FILE), config


def _write_error(final: Path, e: OSError) -> CheckpointError:
    return CheckpointError(f"cannot write checkpoint {final}: {e.strerror or e}; the earlier checkpoints are intact: "
                           "free disk space (or lower checkpoint.keep_last) and continue with --resume")


@dataclass
class Checkpoint:
    """A complete checkpoint on disk (lazy: read the parts you need)."""

    path: Path
    step: int

    def model_state(self) -> dict[str, torch.Tensor]:
        return load_state_dict_files(self.path / MODEL_FILE)

    def optimizer_state(self, map_location: str | torch.device = "cpu") -> Any:
        """The optimiser/scheduler/RNG state, read with ``weights_only=True`` (None when the checkpoint has none)."""
        f = self.path / OPTIM_FILE
        if not f.is_file():
            return None
        try:
            with torch.serialization.safe_globals(list(_LEGACY_NUMPY)):
                return torch.load(f, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            what = found[1] if found else "an object that is not plain data"
            raise CheckpointError(f"{f}: holds {what}, which a safe load (weights_only) refuses; this checkpoint "
                                  "was not written by vargpt's trainers, resume from another one") from None
        except (RuntimeError, EOFError, OSError) as e:
            raise CheckpointError(f"{f}: damaged ({str(e).splitlines()[0]}); delete {self.path} to resume from "
                                  "the checkpoint before it") from None

    def state(self) -> dict[str, Any]:
        return _read_json(self.path / STATE_FILE)

    def config(self) -> dict[str, Any]:
        return _read_json(self.path / CONFIG_FILE)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e}); delete {path.parent} to resume from the checkpoint before "
                              "it") from None


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
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    except OSError as e:
        raise _write_error(final, e) from None
    try:
        save_file(_contiguous(model_state), tmp / MODEL_FILE)
        _fsync_file(tmp / MODEL_FILE)
        if optimizer_state is not None:
            check_plain(optimizer_state)
            torch.save(optimizer_state, tmp / OPTIM_FILE)
            _fsync_file(tmp / OPTIM_FILE)
        for name, obj in ((STATE_FILE, {"step": step, **(state or {})}), (CONFIG_FILE, config or {})):
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
            _fsync_file(tmp / name)
        (tmp / DONE_FILE).write_text("ok\n")
        _fsync_file(tmp / DONE_FILE)
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step: replace
            _remove(final)
        os.replace(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # a full disk, a quota, a read-only or vanished file system
            raise _write_error(final, e) from None
        raise
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        _remove(old.path)
    return Checkpoint(final, step)


def _remove(checkpoint_dir: Path) -> None:
    """Delete a checkpoint so that no crash leaves it half-deleted under its own name (still marked COMPLETE):
    rename it to a ``.tmp-*`` name first (atomic), then delete that (a crash leaves it to the next save)."""
    doomed = checkpoint_dir.parent / f".tmp-old-{checkpoint_dir.name}-{uuid.uuid4().hex[:8]}"
    os.replace(checkpoint_dir, doomed)
    shutil.rmtree(doomed, ignore_errors=True)
