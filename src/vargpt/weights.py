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
* Only safetensors are read: pickled ``.bin/.pt`` files are refused with the one-line conversion, and a tensor
  holding NaN or inf is a `CheckpointError` naming it.
* `save_state_dict` writes shards and index under temporary names and renames them into place, index last,
  so an interrupted save never leaves a half-written file under a final name.

* Model checkpoints (a directory: ``config.json`` + weights + tokenizer/processor files): `read_config` (ours, or
  the released format), `released_hf_config`, `load_checkpoint` (config + state dict + tokenizer, in the dtype and
  on the device asked), `save_checkpoint` (either layout) and `convert_checkpoint` (released <-> ours, weights
  untouched: the key layout is the same). `VARGPT.from_pretrained` / ``save_pretrained`` are thin calls of these.

Nothing here knows about model classes; the functions serve every component. The published code instead
loads through ``from_pretrained`` of its own subclass and has no separate mapping.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from vargpt.config import VARGPTConfig, from_released_hf_config
from vargpt.errors import CheckpointError, ConfigError, InputError
from vargpt.processing import VARGPTProcessor, load_tokenizer
from vargpt.runtime import resolve_device, resolve_dtype

__all__ = [
    "SINGLE_FILE",
    "INDEX_FILE",
    "RELEASED_TO_VLM",
    "released_to_vlm_keys",
    "vlm_to_released_keys",
    "select_prefix",
    "add_prefix",
    "count_nonfinite",
    "load_state_dict_files",
    "load_into",
    "LoadReport",
    "save_state_dict",
    "parse_size",
    "CONFIG_FILE",
    "Checkpoint",
    "Layout",
    "read_config",
    "released_hf_config",
    "load_checkpoint",
    "load_checkpoint_into",
    "save_checkpoint",
    "convert_checkpoint",
]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # refused: unpickling runs code
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


def _refuse_pickle(path: Path) -> None:
    raise CheckpointError(f"{path}: a pickled PyTorch file; vargpt reads weights only from safetensors (unpickling "
                          "can run code). Convert it once, where you trust it: safetensors.torch.save_file("
                          "torch.load(path, weights_only=True), 'model.safetensors')")


def _shard_files(path: Path) -> dict[Path, list[str] | None]:
    """Files to read -> their keys per the index (None = all keys of that file)."""
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            _refuse_pickle(path)
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
    pickled = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not found and pickled:
        _refuse_pickle(pickled[0])
    raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} found"
                          + (f" (and {len(found)} other .safetensors files, which is ambiguous)" if found else "")
                          + "; point at a checkpoint directory")


def count_nonfinite(t: torch.Tensor) -> int:
    """How many NaN/inf values ``t`` holds. Fast when there are none: one sum (NaN and inf propagate through it;
    a plain ``isfinite`` pass is 4-30x slower on CPU), and the exact count only when the sum is not finite (which
    a finite fp16 tensor's overflowing sum also triggers: then the count is 0)."""
    if not t.is_floating_point() or bool(torch.isfinite(t.sum())):
        return 0
    return int((~torch.isfinite(t)).sum())


def load_state_dict_files(path: str | Path, *, prefixes: Iterable[str] | None = None,
                          device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                          check_finite: bool = True) -> dict[str, torch.Tensor]:
    """Read a safetensors checkpoint (one file, or a directory: single file or sharded with an index).

    ``prefixes``: keep only keys starting with one of them (others are never read).
    ``dtype``: cast floating tensors while reading (one tensor at a time, so the peak stays one checkpoint).
    ``check_finite``: a tensor holding NaN or inf is a `CheckpointError` naming it (`count_nonfinite`, one sum
    per tensor as it is read; its cost is measured in docs/reliability.md).
    Pickled files (``.bin``, ``.pt``, ``.pth``, ``.ckpt``) are refused, never unpickled.
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
                    if check_finite and (bad := count_nonfinite(t)):
                        raise CheckpointError(f"{file}: tensor {key} holds {bad} NaN/inf value(s) of {t.numel()}; "
                                              "the weights are damaged or their training diverged: re-download "
                                              "them or use an earlier checkpoint")
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


# ----------------------------------------------------------------------------------------------- model checkpoints

CONFIG_FILE = "config.json"
# Files beside the weights that travel with a checkpoint on conversion (tokenizer, processors, generation config).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
              "added_tokens.json", "preprocessor_config.json", "chat_template.json", "chat_template.jinja",
              "generation_config.json")
_SECTION_OF_PREFIX = {"visual": "vision", "model": "llm", "lm_head": "llm", "vae_local": "vae", "vargpt_gen": "decoder",
                      "image_gen_projector": "decoder.embed_dim / llm.hidden_size",
                      "image_gen_projector_out": "llm.hidden_size / decoder.embed_dim",
                      "sos_embedding": "tokens.image_gen_start / decoder.embed_dim"}
Layout = Literal["vargpt", "released"]


def released_hf_config(cfg: VARGPTConfig, dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """The released ``config.json`` (model_type ``vargpt_qwen2_vl``) for ``cfg``.

    The decoder/VAE sizes are not part of the released format (the published code hard-codes them); they travel in
    an extra ``vargpt_config`` entry (ignored by the published code) so a conversion round trip is lossless.
    """
    v, t, ids = cfg.vision, cfg.llm, cfg.tokens
    names = ("image_gen_start", "image_gen_end", "image_gen_pad")
    special = {k: x for n in names for k, x in ((n, f"<|{n}|>"), (f"{n}_token_id", getattr(ids, n)))}
    return {
        "architectures": ["VARGPTQwen2VLForConditionalGeneration"], "model_type": "vargpt_qwen2_vl",
        "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads, "hidden_act": "silu",
        "max_position_embeddings": t.max_position_embeddings, "initializer_range": 0.02, "rms_norm_eps": t.rms_norm_eps,
        "use_cache": True, "tie_word_embeddings": t.tie_word_embeddings, "rope_theta": t.rope_theta,
        "use_sliding_window": False, "sliding_window": t.max_position_embeddings,
        "max_window_layers": t.num_hidden_layers, "attention_dropout": 0.0,
        "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
        "bos_token_id": ids.endoftext, "eos_token_id": ids.im_end, "pad_token_id": ids.endoftext,
        "vision_start_token_id": ids.vision_start, "vision_end_token_id": ids.vision_end,
        "vision_token_id": ids.vision_pad, "image_token_id": ids.image_pad, "video_token_id": ids.video_pad,
        "vision_config": {"model_type": "vargpt_qwen2_vl", "depth": v.depth, "embed_dim": v.embed_dim,
                          "hidden_size": v.hidden_size, "hidden_act": v.hidden_act, "mlp_ratio": v.mlp_ratio,
                          "num_heads": v.num_heads, "in_channels": v.in_channels, "in_chans": v.in_channels,
                          "patch_size": v.patch_size, "spatial_patch_size": v.patch_size,
                          "spatial_merge_size": v.spatial_merge_size, "temporal_patch_size": v.temporal_patch_size},
        "special_tokens": special, "train_from_scratch": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "vargpt_config": cfg.to_dict(),
    }


def read_config(path: str | Path) -> tuple[VARGPTConfig, Layout]:
    """Our config for a checkpoint's ``config.json`` (ours: has ``preset``; released: model_type vargpt_qwen2_vl)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no config.json; a checkpoint directory holds config.json + safetensors "
                              "(+ tokenizer.json); for bare weights pass config= and weights=")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {e.start}); a config.json is JSON, re-create it") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: a config.json holds one JSON object, got {type(d).__name__}; re-create it")
    try:
        if d.get("model_type") == "vargpt_qwen2_vl":
            if "vargpt_config" not in d:
                return from_released_hf_config(d), "released"
            ours = VARGPTConfig.from_dict(d["vargpt_config"])
            hf = from_released_hf_config(d, decoder=ours.decoder, vae=ours.vae)
            return dataclasses.replace(ours, vision=hf.vision, llm=hf.llm, tokens=hf.tokens).validate(), "released"
        if "preset" in d:
            return VARGPTConfig.from_dict(d), "vargpt"
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    raise CheckpointError(f"{path}: neither our config (no 'preset' field) nor a released VARGPT-v1.1 config "
                          f"(model_type {d.get('model_type')!r}, expected 'vargpt_qwen2_vl')")


def checkpoint_dtype(path: str | Path) -> torch.dtype:
    """dtype of the first floating tensor of a checkpoint (file or directory)."""
    for f in _shard_files(Path(path)):
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(
                    sf.get_slice(key).get_dtype())
                if dtype is not None:
                    return dtype
    return torch.float32


@dataclass
class Checkpoint:
    """What `load_checkpoint` read: the config, the state dict (released key layout) and the tokenizer (or None)."""

    config: VARGPTConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: Any | None
    weights_path: Path


def load_checkpoint(path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                    config: VARGPTConfig | None = None, weights: str | Path | None = None) -> Checkpoint:
    """Read a model checkpoint: its config (or ``config``), weights (or the file/directory ``weights``), tokenizer.

    Weights are read in ``dtype`` (None: as stored) onto ``device``. A config with ``decoder.source_condition``
    over weights without ``vargpt_gen.source_embed`` gets that term at zero (exactly the model without it), and
    ``source_copy`` an open copy gate (``source_gate`` zero); the same for ``vision.place_embed`` and ``image_place``,
    and ``decoder.source_context`` (its tokens start as zeros).
    """
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    if config is None:
        config, _ = read_config(directory / CONFIG_FILE)
    weights_path = Path(weights) if weights is not None else path
    sd = load_state_dict_files(weights_path, device=device, dtype=dtype)
    like = next((v for v in sd.values() if v.is_floating_point()), None)
    kw = {"device": device, "dtype": dtype or (like.dtype if like is not None else torch.float32)}
    C, D, H, P = (config.decoder.embed_dim, config.vae.codebook_dim, config.llm.hidden_size,
                  config.vision.place_embed)
    optional = {}  # zero-initialised modules a config may add over weights saved without them
    if config.decoder.source_condition:
        optional |= {"vargpt_gen.source_embed.weight": (C, D), "vargpt_gen.source_embed.bias": (C,)}
    if config.decoder.source_condition and config.decoder.source_copy:
        optional |= {"vargpt_gen.source_gate.weight": (1, C), "vargpt_gen.source_gate.bias": (1,)}
    if config.decoder.source_context:
        G = config.decoder.rope_max_grid
        optional |= {"vargpt_gen.source_ctx.weight": (C, D), "vargpt_gen.source_ctx.bias": (C,),
                     "vargpt_gen.source_ctx_row.weight": (G, C), "vargpt_gen.source_ctx_col.weight": (G, C)}
    if P:
        optional |= {"image_place.row.weight": (P, H), "image_place.col.weight": (P, H)}
    for key, shape in optional.items():
        sd.setdefault(key, torch.zeros(shape, **kw))
    tokenizer = load_tokenizer(directory, config.tokens) if (directory / "tokenizer.json").is_file() else None
    return Checkpoint(config, sd, tokenizer, weights_path)


def load_checkpoint_into(model: nn.Module, ckpt: Checkpoint, *, device: torch.device | str | None = None) -> None:
    """`load_into` (strict) with an error that names the checkpoint and, for shape mismatches, the config section
    that must describe the weights."""
    try:
        load_into(model, ckpt.state_dict, strict=True, device=device)
    except CheckpointError as e:
        sections = sorted({_SECTION_OF_PREFIX.get(str(e).split(": ", 1)[-1].split(".")[0], "?")})
        hint = f" (config section {', '.join(sections)})" if "shapes" in str(e) and "?" not in sections else ""
        raise CheckpointError(f"{ckpt.weights_path}: {e}{hint}") from None


def save_checkpoint(directory: str | Path, config: VARGPTConfig, state_dict: Mapping[str, torch.Tensor], *,
                    processor: VARGPTProcessor | None = None, layout: Layout = "vargpt",
                    max_shard_size: int | str = "5GB") -> Path:
    """Write config.json (ours, or the released format with ``layout="released"``), the weights as (sharded)
    safetensors in the released key layout, and the processor's tokenizer files."""
    if layout not in ("vargpt", "released"):
        raise InputError(f"unknown checkpoint layout {layout!r}; use 'vargpt' or 'released'")
    directory = Path(directory)
    save_state_dict(directory, state_dict, max_shard_size=max_shard_size)
    dtype = next((t.dtype for t in state_dict.values() if t.is_floating_point()), torch.float32)
    d = config.to_dict() if layout == "vargpt" else released_hf_config(config, dtype)
    (directory / CONFIG_FILE).write_text(json.dumps(d, indent=2) + "\n")
    if processor is not None:
        processor.save(directory)
    return directory


def convert_checkpoint(src: str | Path, dst: str | Path, *, layout: Layout | None = None,
                       max_shard_size: int | str = "5GB", dtype: torch.dtype | str | None = None,
                       device: torch.device | str = "cpu") -> Layout:
    """Convert a checkpoint directory between the released layout and ours (``layout``: target; default the other
    one). Weights keep their dtype unless ``dtype`` is given (the key layout is the same in both); tokenizer and
    processor files are copied. Returns the target layout."""
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise InputError(f"convert: source and destination are the same directory ({src}); pick a new one")
    _, src_layout = read_config(src / CONFIG_FILE)
    target: Layout = layout or ("released" if src_layout == "vargpt" else "vargpt")
    dev = resolve_device(device)
    ckpt = load_checkpoint(src, device=dev, dtype=resolve_dtype(dtype, dev) if dtype else checkpoint_dtype(src))
    processor = VARGPTProcessor(ckpt.tokenizer, ckpt.config) if ckpt.tokenizer is not None else None
    save_checkpoint(dst, ckpt.config, ckpt.state_dict, processor=processor, layout=target,
                    max_shard_size=max_shard_size)
    for name in SIDE_FILES:
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copy2(src / name, dst / name)
    return target
