"""Checkpoint weights: safetensors I/O, the released-layout <-> in-memory key mapping, low-memory loading.

Contract
--------
* On disk our layout IS the released one: top-level prefixes ``visual.``, ``model.``, ``lm_head.``,
  ``vae_local.``, ``vargpt_gen.``, ``image_gen_projector.``, ``image_gen_projector_out.``,
  ``sos_embedding.``; a released checkpoint loads without conversion. Files are ``model.safetensors`` or
  HF-style shards ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``.
* In memory the understanding side is transformers' Qwen2-VL, whose parameters are named
  ``model.visual.*``, ``model.language_model.*`` and ``lm_head.*``; `released_to_vlm_keys` /
  `vlm_to_released_keys` translate. Other components (VAE, decoder, projectors) keep the released names
  below their own prefix: use `select_prefix` / `add_prefix`.
* `load_into` loads with ``assign=True``: a module built on the meta device takes the loaded tensors as
  its parameters, with no second copy. Key or shape mismatches raise `CheckpointError` naming the keys.
* `save_state_dict` writes shards and index under temporary names and renames them into place, index last,
  so an interrupted save never leaves a half-written file under a final name.

Nothing here knows about model classes; the functions serve every component. The published code instead
loads through ``from_pretrained`` of its own subclass and has no separate mapping.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from vargpt.errors import CheckpointError

__all__ = [
    "SINGLE_FILE",
    "INDEX_FILE",
    "RELEASED_TO_VLM",
    "released_to_vlm_keys",
    "vlm_to_released_keys",
    "select_prefix",
    "add_prefix",
    "load_state_dict_files",
    "load_into",
    "LoadReport",
    "save_state_dict",
    "parse_size",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Released prefix -> transformers Qwen2-VL prefix, most specific first.
RELEASED_TO_VLM: tuple[tuple[str, str], ...] = (
    ("visual.", "model.visual."),
    ("model.", "model.language_model."),
    ("lm_head.", "lm_head."),
)
_SHOW = 5  # keys named in one error message


def _rename(state_dict: Mapping[str, torch.Tensor], pairs: Iterable[tuple[str, str]]) -> dict[str, torch.Tensor]:
    pairs = list(pairs)
    out = {}
    for key, value in state_dict.items():
        for src, dst in pairs:
            if key.startswith(src):
                out[dst + key[len(src):]] = value
                break
    return out


def released_to_vlm_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``visual.*``, ``model.*``, ``lm_head.*`` entries of a released-layout dict, renamed for Qwen2-VL.

    Keys of other components are left out (same tensors, no copies).
    """
    return _rename(state_dict, RELEASED_TO_VLM)


def vlm_to_released_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `released_to_vlm_keys`: a Qwen2-VL state dict in released names."""
    return _rename(state_dict, [(dst, src) for src, dst in RELEASED_TO_VLM])


def select_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Entries under ``prefix`` (e.g. ``"vae_local."``) with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def add_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Every key with ``prefix`` prepended (inverse of `select_prefix`)."""
    return {prefix + k: v for k, v in state_dict.items()}


# ----------------------------------------------------------------------------------------------- reading


def _shard_files(path: Path) -> dict[Path, list[str] | None]:
    """Files to read -> their keys per the index (None = all keys of that file)."""
    if path.is_file():
        return {path: None}
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map' object); "
                                  "re-save the checkpoint") from None
        files: dict[Path, list[str]] = {}
        for key, name in weight_map.items():
            files.setdefault(path / name, []).append(key)
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: shard listed in {INDEX_FILE} is missing; download or copy it "
                                      "into the checkpoint directory")
        return dict(files)
    if (path / SINGLE_FILE).is_file():
        return {path / SINGLE_FILE: None}
    found = sorted(path.glob("*.safetensors"))
    if len(found) == 1:
        return {found[0]: None}
    raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} found"
                          + (f" (and {len(found)} other .safetensors files, which is ambiguous)" if found else "")
                          + "; point at a checkpoint directory")


def load_state_dict_files(path: str | Path, *, prefixes: Iterable[str] | None = None,
                          device: torch.device | str = "cpu",
                          dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Read a safetensors checkpoint (one file, or a directory: single file or sharded with an index).

    ``prefixes``: keep only keys starting with one of them (others are never read).
    ``dtype``: cast floating tensors while reading (one tensor at a time, so the peak stays one checkpoint).
    """
    keep = tuple(prefixes) if prefixes is not None else None
    out: dict[str, torch.Tensor] = {}
    for file, keys in _shard_files(Path(path)).items():
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                names = f.keys() if keys is None else keys
                for key in names:
                    if keep is not None and not key.startswith(keep):
                        continue
                    t = f.get_tensor(key)
                    out[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: cannot read as safetensors ({e}); the file is damaged or "
                                  "incomplete, re-download it") from None
    return out


# ----------------------------------------------------------------------------------------------- loading


@dataclass
class LoadReport:
    """What `load_into` left out (only non-empty with ``strict=False``)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def _names(keys: Iterable[str]) -> str:
    keys = list(keys)
    more = f" (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def load_into(module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True,
              device: torch.device | str | None = None) -> LoadReport:
    """Load ``state_dict`` into ``module`` by assignment (meta-built modules get the tensors themselves).

    Each tensor is cast to the dtype the module was built with and moved to ``device`` (default: the
    module's own device, or where the tensors are when the module is on the meta device). Non-persistent
    buffers follow to that device. Raises `CheckpointError` on shape mismatches, and with ``strict`` on
    missing or unexpected keys; a module left with meta tensors is an error too.
    """
    expected = module.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    bad_shape = [f"{k} {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items()
                 if k in state_dict and state_dict[k].shape != v.shape]
    if bad_shape:
        raise CheckpointError(f"checkpoint shapes do not match the model for {len(bad_shape)} key(s): "
                              f"{_names(bad_shape)}; the config does not describe these weights")
    if strict and (missing or unexpected):
        parts = ([f"missing {len(missing)}: {_names(missing)}"] if missing else []) + (
            [f"unexpected {len(unexpected)}: {_names(unexpected)}"] if unexpected else [])
        raise CheckpointError(f"checkpoint keys do not match the model ({'; '.join(parts)}); check that the "
                              "config and the checkpoint belong together")
    was_meta = any(t.is_meta for t in expected.values())
    if device is None and was_meta and state_dict:
        device = next(iter(state_dict.values())).device
    target = {}
    for key, ref in expected.items():
        if key in state_dict:
            t = state_dict[key]
            dtype = ref.dtype if t.is_floating_point() and ref.is_floating_point() else t.dtype
            dev = device if device is not None else ref.device
            target[key] = t.to(device=dev, dtype=dtype)
    module.load_state_dict(target, strict=False, assign=True)
    if device is not None:  # non-persistent buffers (rotary tables, masks) follow the weights
        for sub in module.modules():
            for name, buf in sub.named_buffers(recurse=False):
                if buf is not None and not buf.is_meta and buf.device != torch.device(device):
                    setattr(sub, name, buf.to(device))
    still_meta = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if still_meta:
        raise CheckpointError(f"{len(still_meta)} tensor(s) of the meta-built model got no weights: "
                              f"{_names(still_meta)}; the checkpoint lacks them (load it with all components)")
    return LoadReport(missing_keys=missing, unexpected_keys=unexpected)


# ----------------------------------------------------------------------------------------------- writing


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like ``"5GB"``, ``"500MB"``, ``"2GiB"``."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?", size.strip().upper())
    if not m:
        raise CheckpointError(f"shard size {size!r} is not understood; write e.g. 5GB, 500MB or a byte count")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** "_KMGT".index(m.group(2) or "_"))


def _shards(state_dict: Mapping[str, torch.Tensor], limit: int) -> list[list[str]]:
    """Keys grouped greedily, in order, into shards of at most ``limit`` bytes (a larger tensor stands alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, t in state_dict.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += n
    return shards


def save_state_dict(directory: str | Path, state_dict: Mapping[str, torch.Tensor], *,
                    max_shard_size: int | str = "5GB", metadata: Mapping[str, str] | None = None) -> list[Path]:
    """Write ``state_dict`` as safetensors into ``directory`` (created if needed); returns the files written.

    One shard -> ``model.safetensors``; more -> ``model-0000i-of-0000n.safetensors`` + the HF index. Files are
    written under temporary names and renamed into place, index last; weight files of an earlier save that
    the new one does not use are removed afterwards.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards = _shards(state_dict, parse_size(max_shard_size))
    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    tag = f".tmp-{uuid.uuid4().hex[:8]}-"
    meta = {"format": "pt", **(metadata or {})}
    seen: set[int] = set()  # storages already written: safetensors refuses tensors sharing memory
    tmp_paths = []
    try:
        for name, keys in zip(names, shards, strict=True):
            tensors = {}
            for k in keys:
                t = state_dict[k].detach()
                if t.is_meta:
                    raise CheckpointError(f"cannot save {k}: it is on the meta device (load weights first)")
                storage = t.untyped_storage().data_ptr()
                if storage in seen or not t.is_contiguous():
                    t = t.clone(memory_format=torch.contiguous_format)
                seen.add(storage)
                tensors[k] = t
            tmp = directory / (tag + name)
            tmp_paths.append(tmp)
            save_file(tensors, str(tmp), metadata=meta)
        index_tmp = None
        if n > 1:
            total = sum(t.numel() * t.element_size() for t in state_dict.values())
            weight_map = {k: name for name, keys in zip(names, shards, strict=True) for k in keys}
            index_tmp = directory / (tag + INDEX_FILE)
            index_tmp.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                            indent=2) + "\n")
        for tmp, name in zip(tmp_paths, names, strict=True):
            os.replace(tmp, directory / name)
        if index_tmp is not None:
            os.replace(index_tmp, directory / INDEX_FILE)
        elif (directory / INDEX_FILE).exists():
            (directory / INDEX_FILE).unlink()
    finally:
        for tmp in directory.glob(tag + "*"):
            tmp.unlink()
    written = [directory / name for name in names]
    for old in [directory / SINGLE_FILE, *directory.glob("model-*-of-*.safetensors")]:
        if old not in written and old.is_file():
            old.unlink()
    return written + ([directory / INDEX_FILE] if n > 1 else [])
