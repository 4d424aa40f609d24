"""Training recipes: one typed dataclass, loaded from YAML, overridable from the command line.

Contract
--------
``load_recipe(path, overrides)`` reads a YAML file, applies ``key.sub=value`` overrides (values parsed as YAML, so
``optim.lr=1e-4``, ``trainable=[model,lm_head]``, ``data.sources.0.weight=2`` all work), builds a `Recipe` and
validates it. Every problem (unknown field, unknown module name, wrong type, value out of range) raises
`ConfigError` naming the field, before any data or model is touched.

What a recipe holds: where the data come from (`DataSource`: path, format, weight), the stage (decides the loop:
``dpo`` runs the preference loop, every other stage the model's own training losses), the trainable modules (the
released top-level module names, optionally dotted for a sub-module such as ``visual.merger``, or a named preset
of the released freezing table, `FREEZE_PRESETS`), the image size, optimiser, schedule, precision, batch,
accumulation, length of the run, checkpoint cadence, seed, DPO settings and where the model starts (a preset or
a checkpoint, optionally with the tokenizer and the VAE weights from other directories).

Relative paths in a recipe (data sources, checkpoints, ``out_dir``) are taken relative to the working directory,
as paths on the command line are.

Differences from the published LLaMA-Factory fork: one file holds everything (the fork spreads it over a yaml,
``dataset_info.json``, hard-coded constructor flags and ``vargpt_train_stage`` integers); freezing is by module
name with prefix matching (the fork matches substrings), and the stage numbers of its freezing table are kept as
named presets; the seed is explicit and there are no hard-coded paths.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vargpt.errors import ConfigError

__all__ = [
    "MODULES",
    "FREEZE_PRESETS",
    "STAGES",
    "CheckpointConfig",
    "DPOConfig",
    "DataConfig",
    "DataSource",
    "ModelInit",
    "OptimConfig",
    "Recipe",
    "ScheduleConfig",
    "apply_overrides",
    "load_recipe",
    "recipe_from_dict",
    "trainable_modules",
]

# Top-level modules of the released checkpoint (reference-facts 2), in construction order.
MODULES: tuple[str, ...] = ("visual", "model", "lm_head", "vae_local", "vargpt_gen", "image_gen_projector",
                            "image_gen_projector_out", "sos_embedding")
_GEN = ("vargpt_gen", "image_gen_projector", "image_gen_projector_out", "sos_embedding")
# Modules only some configs build (not in the released layout): a trainable set may name them, and a model
# without them simply has nothing to train there.
OPTIONAL_MODULES: tuple[str, ...] = ("image_place",)

# The released freezing table (reference-facts 8.3, `vargpt_train_stage`) as trainable sets, plus readable names.
FREEZE_PRESETS: dict[str, tuple[str, ...]] = {
    "released_stage0": _GEN,
    "released_stage1": ("image_gen_projector", "image_gen_projector_out", "sos_embedding"),
    "released_stage2": ("model", "lm_head"),
    "released_stage3": _GEN,
    "released_stage4": ("model", "lm_head", *_GEN),
    "released_stage5": tuple(m for m in MODULES if m != "vae_local"),
    "generation": _GEN,  # visual decoder + both generation projectors (+ start embedding): stage 3a/3b/3c
    "gen_projectors": ("image_gen_projector", "image_gen_projector_out", "sos_embedding"),
    "llm": ("model", "lm_head"),
    "llm_and_generation": ("model", "lm_head", *_GEN),
    "all_but_vae": tuple(m for m in (*MODULES, *OPTIONAL_MODULES) if m != "vae_local"),
    "all": (*MODULES, *OPTIONAL_MODULES),
}

STAGES: tuple[str, ...] = ("pretrain", "sft_understanding", "sft_gen", "sft_mixed", "dpo", "edit")


# ----------------------------------------------------------------------------------------------- sections


@dataclass
class DataSource:
    """One JSONL (or JSON list) of records. ``weight``: how many times each record is drawn per epoch on average
    (2 = every record twice, 0.5 = a random half each epoch). ``tasks``: keep only these record tasks from this
    source (default: ``data.tasks``), so one file can give edits and another the answers mixed in beside them.
    ``root``: the data root the records' images must stay under (default: the records file's directory)."""

    path: str
    format: Literal["chat", "released", "shapesworld"] = "chat"
    weight: float = 1.0
    tasks: list[str] | None = None
    root: str | None = None  # the records' images must be under this directory (default: the records file's)


@dataclass
class DataConfig:
    sources: list[DataSource] = field(default_factory=list)
    image_size: int = 64  # generated images (targets) are trained at this square size in pixels
    # "resize": resize to image_size (deterministic; ShapesWorld positions stay exact). "released": the published
    # transform: shorter side to round(1.125 * size) with Lanczos, then a random size x size crop.
    gen_transform: Literal["resize", "released"] = "resize"
    keep_aspect: bool = False  # targets keep their aspect ratio (nearest template) instead of a square
    bucket_by_resolution: bool = True  # batches hold one target resolution only
    max_image_pixels: int | None = None  # shrink understanding images first (published: 262144 = 512 * 512)
    tasks: list[str] | None = None  # keep only these record tasks (caption, vqa, t2i, edit, dpo, chat)
    num_workers: int = 0
    shuffle: bool = True
    max_bad_records: float = 0.5  # stop with an error when more than this fraction of records is unreadable


@dataclass
class ModelInit:
    preset: str | None = "tiny"  # build a fresh model from this preset (random init), unless ...
    checkpoint: str | None = None  # ... this model directory is given (ours or the released layout)
    factory: str | None = None  # "package.module:function" building the model (default: vargpt's VARGPT)
    reference: str | None = None  # DPO reference model directory (default: a frozen copy of the initial model)
    tokenizer: str | None = None  # directory with tokenizer.json (default: the checkpoint's, else byte-level)
    # `vargpt train vae` output (run dir or its model/): its weights replace `vae_local` once the model is built;
    # its VAE config must equal the model's config.vae
    vae: str | None = None
    config_overrides: dict[str, Any] = field(default_factory=dict)  # VARGPTConfig fields, e.g. {compat: {...}}


@dataclass
class OptimConfig:
    """AdamW over the trainable parameters."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # max global gradient norm (None: no clipping)
    lr_scale: dict[str, float] = field(default_factory=dict)  # module (as in `trainable`) -> lr multiplier, e.g.
    # {visual: 0.3}: a from-scratch vision tower learns shape faster at a lower lr than the LLM beside it


@dataclass
class ScheduleConfig:
    kind: Literal["cosine", "constant"] = "cosine"
    warmup_ratio: float = 0.0  # linear warm-up over this fraction of the optimiser steps
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr


@dataclass
class DPOConfig:
    beta: float = 0.1  # published default pref_beta
    loss_type: Literal["sigmoid", "hinge", "ipo"] = "sigmoid"
    label_smoothing: float = 0.0
    dpop_lambda: float = 0.0  # > 0: DPO-Positive, the chosen log-prob kept at or above the reference's (`dpo_loss`)
    cache_reference: bool = True  # compute the reference log-probs once per record id and reuse them
    scale_weighted: bool = False  # image log-probs with Infinity's per-scale token weights (`bit_logprob`)


@dataclass
class CheckpointConfig:
    every: int = 500  # optimiser steps between checkpoints (one is always written at the end)
    keep_last: int = 3
    save_full: bool = False  # every weight in each checkpoint (default: the trainable ones; frozen = init)


@dataclass
class Recipe:
    name: str = "recipe"
    stage: Literal["pretrain", "sft_understanding", "sft_gen", "sft_mixed", "dpo", "edit"] = "sft_gen"
    model: ModelInit = field(default_factory=ModelInit)
    data: DataConfig = field(default_factory=DataConfig)
    trainable: str | list[str] = "generation"  # a FREEZE_PRESETS name or module names
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    precision: Literal["fp32", "bf16"] = "fp32"
    batch_size: int = 8  # per process and micro-step
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    # DDP: tolerate parameters without a gradient in a step (mixed batches skip the generation path; a trainable
    # VAE is used under no_grad). Off saves one graph traversal per step when every parameter is always used.
    find_unused_parameters: bool = True
    max_steps: int | None = None  # optimiser steps; None: `epochs` passes over the data
    epochs: float = 1.0
    seed: int = 0
    out_dir: str | None = None  # default runs/<name>
    log_every: int = 10
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    progress: bool = True  # tqdm bar on the main process

    def validate(self) -> Recipe:
        trainable_modules(self)
        if not self.data.sources:
            raise ConfigError("recipe field data.sources is empty; list at least one {path, format, weight}")
        for i, s in enumerate(self.data.sources):
            _require(s.weight > 0, f"data.sources.{i}.weight", s.weight, "> 0")
            _require(bool(s.path), f"data.sources.{i}.path", s.path, "a file or directory")
        for name in ("batch_size", "grad_accum", "log_every"):
            _require(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        _require(self.data.image_size >= 8, "data.image_size", self.data.image_size, ">= 8 pixels")
        _require(self.data.num_workers >= 0, "data.num_workers", self.data.num_workers, ">= 0")
        _require(0 <= self.data.max_bad_records <= 1, "data.max_bad_records", self.data.max_bad_records, "[0, 1]")
        _require(self.max_steps is None or self.max_steps >= 1, "max_steps", self.max_steps, ">= 1 or null")
        _require(self.epochs > 0, "epochs", self.epochs, "> 0")
        _require(self.optim.lr > 0, "optim.lr", self.optim.lr, "> 0")
        _require(all(0 <= b < 1 for b in self.optim.betas), "optim.betas", self.optim.betas, "two values in [0, 1)")
        _require(self.optim.weight_decay >= 0, "optim.weight_decay", self.optim.weight_decay, ">= 0")
        for name, scale in self.optim.lr_scale.items():
            _require(isinstance(name, str) and name.split(".")[0] in (*MODULES, *OPTIONAL_MODULES), "optim.lr_scale",
                     name, f"a module name ({', '.join((*MODULES, *OPTIONAL_MODULES))}, dotted sub-modules allowed)")
            _require(isinstance(scale, (int, float)) and scale > 0, f"optim.lr_scale.{name}", scale, "> 0")
        _require(self.optim.grad_clip is None or self.optim.grad_clip > 0, "optim.grad_clip", self.optim.grad_clip,
                 "> 0 or null")
        _require(0 <= self.schedule.warmup_ratio < 1, "schedule.warmup_ratio", self.schedule.warmup_ratio, "[0, 1)")
        _require(0 <= self.schedule.min_lr_ratio <= 1, "schedule.min_lr_ratio", self.schedule.min_lr_ratio, "[0, 1]")
        _require(self.checkpoint.every >= 1, "checkpoint.every", self.checkpoint.every, ">= 1")
        _require(self.checkpoint.keep_last >= 1, "checkpoint.keep_last", self.checkpoint.keep_last, ">= 1")
        _require(self.dpo.beta > 0, "dpo.beta", self.dpo.beta, "> 0")
        _require(0 <= self.dpo.label_smoothing < 0.5, "dpo.label_smoothing", self.dpo.label_smoothing, "[0, 0.5)")
        _require(self.dpo.dpop_lambda >= 0, "dpo.dpop_lambda", self.dpo.dpop_lambda, ">= 0")
        init = self.model
        _require(init.preset is not None or init.checkpoint is not None or init.factory is not None, "model.preset",
                 init.preset, "a preset name when neither model.checkpoint nor model.factory is set")
        _require(init.factory is None or ":" in init.factory, "model.factory", init.factory,
                 "'package.module:function'")
        for name in ("checkpoint", "reference", "tokenizer", "vae"):
            _require(getattr(init, name) != "", f"model.{name}", getattr(init, name), "a directory or null")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir or f"runs/{self.name}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _require(cond: bool, name: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"recipe field {name} = {value!r} is invalid: allowed {allowed}")


def trainable_modules(recipe: Recipe) -> tuple[str, ...]:
    """The recipe's trainable module names (a preset resolved), each checked against the released modules."""
    spec = recipe.trainable
    if isinstance(spec, str):
        if spec not in FREEZE_PRESETS:
            raise ConfigError(f"recipe field trainable = {spec!r} is not a preset; use one of "
                              f"{', '.join(FREEZE_PRESETS)} or a list of modules ({', '.join(MODULES)})")
        return FREEZE_PRESETS[spec]
    if not spec:
        raise ConfigError("recipe field trainable is an empty list; name at least one module")
    for name in spec:
        if not isinstance(name, str) or name.split(".")[0] not in (*MODULES, *OPTIONAL_MODULES):
            raise ConfigError(f"recipe field trainable: unknown module {name!r}; modules are "
                              f"{', '.join((*MODULES, *OPTIONAL_MODULES))} (a dotted sub-module such as visual.merger "
                              "is allowed)")
    return tuple(spec)


# ----------------------------------------------------------------------------------------------- loading


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(hint: Any, value: Any, name: str) -> Any:
    """``value`` checked (and lightly converted: int -> float, list -> tuple) against the type ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, name)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"recipe field {name} = {value!r} is invalid: expected {_type_name(hint)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"recipe field {name} = {value!r} is invalid: allowed {', '.join(map(str, args))}")
        return value
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{name}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"recipe field {name} = {value!r} is invalid: expected a list")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"recipe field {name} = {value!r} is invalid: expected {len(args)} values")
            return tuple(_coerce(a, v, f"{name}.{i}") for i, (a, v) in enumerate(zip(args, value, strict=True)))
        item = args[0] if args else Any
        out = [_coerce(item, v, f"{name}.{i}") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"recipe field {name} = {value!r} is invalid: expected a mapping")
        if len(args) == 2:
            return {_coerce(args[0], k, name): _coerce(args[1], v, f"{name}.{k}") for k, v in value.items()}
        return value
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    else:
        ok = isinstance(value, hint)
    if not ok:
        raise ConfigError(f"recipe field {name} = {value!r} is invalid: expected {_type_name(hint)}")
    return value


def _build(cls: type, d: Any, prefix: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"recipe section {prefix.rstrip('.') or '<root>'} must be a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(known))
    if unknown:
        where = f" in section {prefix.rstrip('.')}" if prefix else ""
        raise ConfigError(f"unknown recipe field(s) {', '.join(prefix + u for u in unknown)}{where}; "
                          f"allowed: {', '.join(known)}")
    try:
        return cls(**{k: _coerce(hints[k], v, prefix + k) for k, v in d.items()})
    except TypeError as e:  # a required field missing
        raise ConfigError(f"recipe section {prefix.rstrip('.') or '<root>'}: {e}") from None


def recipe_from_dict(d: dict[str, Any]) -> Recipe:
    return _build(Recipe, d, "").validate()


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(d: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``key.sub=value`` strings applied to a nested dict (new keys allowed; validation happens after)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key.sub=value, e.g. optim.lr=1e-4")
        parts = key.split(".")
        node: Any = d
        for i, part in enumerate(parts[:-1]):
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {item!r}: {where} is not an index of a list of {len(node)}")
                node = node[int(part)]
            else:
                node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override {item!r}: {where} is a value, not a section")
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"override {item!r}: {key} is not an index of a list of {len(node)}")
            node[int(last)] = _parse_value(text)
        else:
            node[last] = _parse_value(text)
    return d


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """The recipe in the YAML file ``path`` with ``key.sub=value`` overrides applied, validated."""
    path = Path(path)
    try:
        d = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such recipe file; see the recipes/ directory for examples") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except UnicodeDecodeError as e:
        line = e.object[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{e.object[e.start]:02x}); re-save the recipe as "
                          "UTF-8") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory; pass a recipe .yaml file") from None
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: a recipe must be a YAML mapping of fields, got {type(d).__name__}")
    d.setdefault("name", path.stem)
    return recipe_from_dict(apply_overrides(d, overrides))
