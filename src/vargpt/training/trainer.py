"""The training loop: one recipe in, a trained model and a run directory out.

Contract
--------
``train(recipe, resume=False)`` reads like a recipe: config, data, model, freezing, optimiser, schedule, one
loop with gradient accumulation, logging, checkpoints. It runs on `accelerate.Accelerator`, so the same recipe
runs on one CPU, one GPU, or many GPUs with DDP or FSDP, chosen by the accelerate config / launcher, not by the
recipe.

The model is `vargpt.models.vargpt.VARGPT` (its losses: `vargpt.training.objective`) or anything that follows
`TrainableModel`: an ``nn.Module`` with

* ``config`` — a `VARGPTConfig` (token ids, VAE stride, image-token padding: what the data side needs);
* ``training_losses(batch) -> dict[str, Tensor]`` with a ``"loss"`` key (the other scalar entries are logged);
* ``image_logprobs(batch, *, average=False) -> Tensor[N]`` for DPO: log pi of each row's generated image (sum over
  scales, positions and bits; ``average``: divided by the tokens, used for IPO);
* optionally ``gradient_checkpointing_enable()`` (needed when the recipe asks for gradient checkpointing) and
  ``save_pretrained(dir)`` (else the final model is written as model.safetensors + config.json).

A batch is what `vargpt.data.records.Collator` makes: ``input_ids``, ``attention_mask``, ``labels`` (prompt = -100),
``mm_token_type_ids``, ``pixel_values`` / ``image_grid_thw`` (understanding images), ``gen_pixel_values``
``[n, 3, H, W]`` in [-1, 1] (generated-image targets, encoded by the model's own VAE), ``ids``, ``tasks``; for DPO
the rows are the chosen answers then the rejected ones and ``n_pairs`` says how many pairs.
The default model is `vargpt.models.vargpt.VARGPT` (built from ``model.preset`` or loaded from
``model.checkpoint``); ``model.factory: "pkg.mod:fn"`` names another builder ``fn(recipe) -> nn.Module``.

DPO (stage ``dpo``): the policy's log-probs of the chosen and rejected images (one forward over the 2B rows) and a
frozen reference model's (no grad; a copy of the initial model, or ``model.reference``; cached per record id when
``dpo.cache_reference`` — only valid when the model's reference forward is deterministic) give the TRL / LLaMA-
Factory loss (`vargpt.training.losses.dpo_loss`); implicit reward margins and accuracies are logged.

Run directory (``out_dir``, default ``runs/<name>``): ``checkpoints/step_N`` (crash-safe, keep-last-N, see
`vargpt.training.checkpoint`: trainable weights — or all with ``checkpoint.save_full`` — as safetensors, plus
optimiser, scheduler, per-process RNG states (python, numpy, torch CPU and CUDA), the data position and the DPO
reference cache), ``metrics.csv``, ``loss.png``, ``recipe.yaml``, TensorBoard events when ``tensorboard`` is
installed, and ``model/`` (the final full model). ``resume=True`` continues from the newest complete checkpoint;
with deterministic kernels the result equals an uninterrupted run's.

Multi-GPU launch
----------------
The launcher decides the distribution; the recipe's ``batch_size`` is per process and micro-step, so the global
batch is ``batch_size x grad_accum x processes``::

    accelerate config                                   # once: DDP or FSDP, number of GPUs, bf16
    accelerate launch -m vargpt train --recipe recipes/stage3a_256px.yaml
    accelerate launch --multi_gpu --num_processes 8 -m vargpt train --recipe R.yaml optim.lr=2e-5
    torchrun --nproc_per_node 8 -m vargpt train --recipe R.yaml                  # the same, without a config
    torchrun --standalone --nproc_per_node 2 -m vargpt train --recipe R.yaml --device cpu   # CPU processes, gloo

(``accelerate launch --cpu --num_processes N`` does not spawn processes by itself: it expects an MPI launcher;
use torchrun for several CPU processes.)

For FSDP choose ``FULL_STATE_DICT`` in the accelerate config (checkpoints hold full weights); auto-wrap the
transformer blocks (``Qwen2VLDecoderLayer``, the decoder's block class). See ``docs/training.md``.

Differences from the published LLaMA-Factory fork: text loss over answer tokens by default (the model's
``CompatConfig.published_text_loss`` restores the published whole-sequence loss), DPO averaged over any batch
size, explicit seeds (per process: ``seed + rank``), no hard-coded paths, frozen modules by exact name prefix,
crash-safe resumable checkpoints including the data position. What this module writes itself and why: the
data-position-exact resume (accelerate's ``skip_first_batches`` cannot replay a weighted, bucketed mixture), the
learning-rate schedule stepped once per optimiser step (accelerate's prepared scheduler steps once per
process), and checkpoints through `vargpt.training.checkpoint` (atomic, keep-last-N; accelerate's
``save_state`` is neither).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import functools
import importlib
import io
import math
import random
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import yaml
from torch import Tensor, nn

from vargpt.errors import CheckpointError, ConfigError, InputError
from vargpt.training.checkpoint import atomic_write_bytes, latest_checkpoint, save_checkpoint, save_model_dir
from vargpt.training.losses import dpo_loss, dpo_metrics
from vargpt.training.plots import Panel, plot_metrics
from vargpt.training.recipe import OPTIONAL_MODULES, Recipe, trainable_modules
from vargpt.training.schedule import lr_factor, warmup_steps

__all__ = ["TrainResult", "TrainableModel", "apply_freezing", "build_model", "build_processor", "load_vae_weights",
           "train"]


@runtime_checkable
class TrainableModel(Protocol):
    config: Any

    def training_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]: ...

    def image_logprobs(self, batch: dict[str, Any], *, average: bool = False) -> Tensor: ...


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_loss: float
    seconds: float
    skipped_records: int
    model_dir: Path
    main_process: bool = True  # False on the other ranks of a distributed run


# ----------------------------------------------------------------------------------------------- pieces


def build_model(recipe: Recipe) -> nn.Module:
    """The model a recipe starts from: ``model.factory`` if given, else vargpt's unified model; then the VAE
    weights of ``model.vae`` (a `vargpt train vae` output) when given."""
    model = _new_model(recipe)
    if recipe.model.vae:
        load_vae_weights(model, recipe.model.vae)
    return model


def load_vae_weights(model: nn.Module, path: str | Path) -> None:
    """Replace ``model.vae_local`` by the VAE trained by `vargpt train vae` in ``path`` (run or model directory);
    `ConfigError` when ``path`` holds no VAE or its config differs from the model's ``config.vae``."""
    from vargpt.training.vae import load_vae

    where = f"recipe field model.vae = {str(path)!r}"
    if not Path(path).is_dir():
        raise ConfigError(f"{where}: no such directory; train the VAE first with `vargpt train vae --out DIR`")
    target = getattr(model, "vae_local", None)
    if not isinstance(target, nn.Module):
        raise ConfigError(f"{where}: the model ({type(model).__name__}) has no vae_local module to load it into")
    try:
        vae, _ = load_vae(path)
    except (CheckpointError, InputError, TypeError) as e:  # TypeError: a config.json with unknown VAE fields
        raise ConfigError(f"{where}: cannot load a VAE from it ({e})") from None
    want = getattr(getattr(model, "config", None), "vae", None)
    if vae.cfg != want:
        shown = dataclasses.asdict(want) if dataclasses.is_dataclass(want) else want
        raise ConfigError(f"{where}: its VAE config {dataclasses.asdict(vae.cfg)} differs from the model's "
                          f"config.vae {shown}; train the VAE with the model's "
                          "preset (`vargpt train vae --preset ...`, no --vae overrides) or set "
                          "model.config_overrides.vae to match")
    target.load_state_dict(vae.state_dict())


def _new_model(recipe: Recipe) -> nn.Module:
    init = recipe.model
    if init.factory:
        module_name, _, fn_name = init.factory.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"recipe field model.factory = {init.factory!r} cannot be imported ({e})") from None
        return fn(recipe)
    try:
        from vargpt.models.vargpt import VARGPT  # the unified model (written beside this trainer)
    except ImportError as e:
        raise ConfigError(f"the unified model vargpt.models.vargpt.VARGPT is not available ({e}); "
                          "set model.factory to a builder") from None
    from vargpt.config import VARGPTConfig, get_preset

    if init.checkpoint:
        model = VARGPT.from_pretrained(init.checkpoint)
        if init.config_overrides:
            cfg = VARGPTConfig.from_dict(_merge(model.config.to_dict(), init.config_overrides))
            if cfg.vae != model.config.vae and init.vae:
                # a VAE of another shape replaces the checkpoint's (build_model loads model.vae into it)
                return _without_vae(init.checkpoint, cfg)
            if cfg != model.config:
                # rebuild around the weights: an override may add a module (zero-initialised) or change how one
                # computes (llm.rope_theta lives in the transformers model), which setting the config alone would
                # not; weights that no longer fit fail the strict load with the key named
                return VARGPT.from_pretrained(init.checkpoint, config=cfg)
        return model
    cfg = VARGPTConfig.from_dict(_merge(get_preset(init.preset).to_dict(), init.config_overrides))
    return VARGPT(cfg)


def _without_vae(checkpoint: str, cfg: Any) -> nn.Module:
    """The model of ``checkpoint`` under ``cfg`` whose VAE differs in shape from the checkpoint's own: everything
    but the VAE loads from the checkpoint; the VAE is a fresh placeholder, for `load_vae_weights` to replace."""
    from vargpt.models.vae import BSQVAE
    from vargpt.models.vargpt import VARGPT
    from vargpt.weights import load_checkpoint, load_checkpoint_into

    ckpt = load_checkpoint(checkpoint, config=cfg)
    sd = {k: v for k, v in ckpt.state_dict.items() if not k.startswith("vae_local.")}
    sd |= {f"vae_local.{k}": v for k, v in BSQVAE(cfg.vae).state_dict().items()}
    model = VARGPT(cfg, device="meta", tokenizer=ckpt.tokenizer)
    load_checkpoint_into(model, dataclasses.replace(ckpt, state_dict=sd), device="cpu")
    return model.eval()


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_freezing(model: nn.Module, modules: tuple[str, ...] | list[str]) -> dict[str, int]:
    """Make exactly the parameters under ``modules`` (name prefixes) trainable; returns parameter counts.

    A module name that matches no parameter is a `ConfigError` (a typo would otherwise freeze everything), unless it
    is one of the optional modules this model was built without.
    """
    hits = dict.fromkeys(modules, 0)
    counts = {"trainable": 0, "frozen": 0}
    for name, p in model.named_parameters():
        owner = next((m for m in modules if name == m or name.startswith(m + ".")), None)
        p.requires_grad_(owner is not None)
        if owner is not None:
            hits[owner] += p.numel()
        counts["trainable" if owner else "frozen"] += p.numel()
    missing = [m for m, n in hits.items() if n == 0 and m not in OPTIONAL_MODULES]
    if missing:
        tops = sorted({n.split(".")[0] for n, _ in model.named_parameters()})
        raise ConfigError(f"recipe field trainable: module(s) {', '.join(missing)} have no parameters in this "
                          f"model (its modules: {', '.join(tops)})")
    return counts


def build_processor(model: nn.Module, recipe: Recipe):
    """The processor for the recipe's image size, with ``<image_gen>`` slots for that size. Tokenizer: the recipe's
    ``model.tokenizer`` directory, else the model's own (``model.processor``), else the checkpoint's
    ``tokenizer.json``, else byte-level (`ByteTokenizer`, fine for a preset trained from scratch)."""
    from vargpt.config import VARGPTConfig
    from vargpt.processing import ByteTokenizer, VARGPTProcessor, load_tokenizer
    from vargpt.scales import padded_tokens, schedule_for_size

    cfg = getattr(model, "config", None)
    if not isinstance(cfg, VARGPTConfig):
        raise ConfigError("the model has no VARGPTConfig `config`; the trainer needs its token ids and VAE stride")
    size = recipe.data.image_size
    try:
        schedule = schedule_for_size(size, size, cfg.vae.stride)
    except InputError as e:
        raise ConfigError(f"recipe field data.image_size = {size}: {e}") from None
    cfg = copy.deepcopy(cfg)
    cfg.image_size = size
    cfg.image_gen_token_num = padded_tokens(schedule, cfg.decoder.pad_to_multiplier)
    tokenizer = None
    if recipe.model.tokenizer:
        tokenizer = load_tokenizer(recipe.model.tokenizer, cfg.tokens)
    tokenizer = tokenizer or getattr(getattr(model, "processor", None), "tokenizer", None)
    ckpt = recipe.model.checkpoint
    if tokenizer is None and ckpt and (Path(ckpt) / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(ckpt, cfg.tokens)
    if tokenizer is None:
        tokenizer = ByteTokenizer(cfg.tokens)
    return VARGPTProcessor(tokenizer, cfg, max_image_pixels=recipe.data.max_image_pixels)


def param_groups(params: list[tuple[str, nn.Parameter]], optim: Any) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices only; ``optim.lr_scale`` (module prefix -> multiplier) sets each
    group's lr (the most specific prefix wins; the LR schedule multiplies every group's own lr)."""
    def scale(name: str) -> float:
        hits = [m for m in optim.lr_scale if name == m or name.startswith(m + ".")]
        return optim.lr_scale[max(hits, key=len)] if hits else 1.0

    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for n, p in params:
        groups.setdefault((p.dim() >= 2, scale(n)), []).append(p)
    order = sorted(groups, key=lambda k: (not k[0], k[1]))  # matrices first, as checkpoints of older runs have it
    return [{"params": groups[k], "weight_decay": optim.weight_decay if k[0] else 0.0, "lr": optim.lr * k[1]}
            for k in order]


def _rng_state() -> dict[str, Any]:
    """Every RNG's state as plain data (numpy's key array as a tensor): checkpoints load with weights_only."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (name, torch.from_numpy(key.astype(np.int64)), pos, has_gauss,
                                                   gauss),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict[str, Any]) -> None:
    random.setstate(s["python"])
    name, key, pos, has_gauss, gauss = s["numpy"]  # key: a tensor (an ndarray in checkpoints of earlier versions)
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def objective_of(model: nn.Module) -> tuple[Any, Any]:
    """(losses(batch), image_logprobs(batch, average=...)) of a model: `vargpt.training.objective` for VARGPT, else
    the model's own `TrainableModel` methods (None where it has none)."""
    from vargpt.models.vargpt import VARGPT

    if isinstance(model, VARGPT):
        from vargpt.training import objective

        return functools.partial(objective.training_losses, model), functools.partial(objective.image_logprobs, model)
    return getattr(model, "training_losses", None), getattr(model, "image_logprobs", None)


class _Step(nn.Module):
    """What accelerate wraps: DDP/FSDP only hook ``forward``, so the objective is dispatched from it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._losses, self._logprobs = objective_of(model)

    def forward(self, batch: dict[str, Any], kind: str = "losses", **logprob_kwargs: Any) -> Any:
        if kind == "losses":
            return self._losses(batch)
        return self._logprobs(batch, **logprob_kwargs)


class _Metrics:
    """metrics.csv (rewritten atomically at each log, so a killed run leaves a valid file), TensorBoard, loss.png."""

    def __init__(self, run_dir: Path, resume_step: int | None, enabled: bool) -> None:
        self.path, self.enabled, self.rows = run_dir / "metrics.csv", enabled, []
        if enabled and resume_step is not None and self.path.is_file():
            with self.path.open() as f:
                self.rows = [{k: int(v) if k == "step" else float(v) for k, v in r.items() if v != ""}
                             for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional
                pass

    def log(self, row: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.rows.append(row)
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(self.rows)
        atomic_write_bytes(self.path, buf.getvalue().encode())
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(k, v, int(row["step"]))

    def plot(self, path: Path) -> None:
        if not self.enabled or not self.rows:
            return
        loss_keys = tuple(k for k in self.rows[-1] if "loss" in k)
        plot_metrics(self.rows, path, [Panel(loss_keys, "loss", height=3), Panel(("lr",), "lr")], stacked=True)
        if self.tb is not None:
            self.tb.close()


# ----------------------------------------------------------------------------------------------- train


def train(recipe: Recipe, *, resume: bool = False, device: str = "auto") -> TrainResult:
    """Train ``recipe`` (validated); ``resume``: continue from the newest complete checkpoint of its run dir.

    ``device``: ``auto`` (what the launcher gives: a GPU per process when there are GPUs) or ``cpu``.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType, gather_object, set_seed
    from tqdm import tqdm

    from vargpt.data.records import Collator, MixtureBatchSampler, RecordDataset, iterate_batches, read_records

    recipe.validate()
    run_dir = recipe.run_dir
    dpo = recipe.stage == "dpo"
    if device not in ("auto", "cpu"):
        raise InputError(f"--device {device!r}: the trainer takes auto or cpu (GPUs are chosen by the launcher)")
    accelerator = Accelerator(mixed_precision="bf16" if recipe.precision == "bf16" else "no", cpu=device == "cpu",
                              kwargs_handlers=[DistributedDataParallelKwargs(
                                  find_unused_parameters=recipe.find_unused_parameters)])
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process

    # ---- data records (before the model: a bad file fails fast)
    sources = []
    for i, src in enumerate(recipe.data.sources):
        recs = read_records(src.path, src.format, root=src.root)
        for r in recs:
            r.id = f"{i}:{r.id}"
        tasks = src.tasks if src.tasks is not None else recipe.data.tasks
        recs = [r for r in recs if r.is_pair == dpo and (tasks is None or r.task in tasks)]
        if not recs:
            kind = "preference (chosen/rejected)" if dpo else "non-preference"
            raise InputError(f"{src.path}: no {kind} records left for stage {recipe.stage}"
                             f"{' and tasks ' + ','.join(tasks) if tasks else ''}")
        sources.append(recs)

    # ---- model, freezing
    set_seed(recipe.seed)
    model = build_model(recipe)
    for method, fn in zip(("training_losses", "image_logprobs")[:1 + dpo], objective_of(model), strict=False):
        if not callable(fn):
            raise ConfigError(f"the model ({type(model).__name__}) has no {method}(batch); the trainer needs it")
    modules = trainable_modules(recipe)
    counts = apply_freezing(model, modules)
    if recipe.gradient_checkpointing:
        if not callable(getattr(model, "gradient_checkpointing_enable", None)):
            raise ConfigError(f"recipe field gradient_checkpointing = true but {type(model).__name__} has no "
                              "gradient_checkpointing_enable()")
        model.gradient_checkpointing_enable()
    reference = None
    if dpo:
        reference = (build_model(_as_reference(recipe)) if recipe.model.reference else copy.deepcopy(model))
        reference.requires_grad_(False).eval()
    set_seed(recipe.seed + rank)

    # ---- data pipeline
    processor = build_processor(model, recipe)
    if recipe.model.tokenizer and hasattr(model, "processor"):  # the model's own (null prompt, saved with it)
        model.processor = type(processor)(processor.tokenizer, model.config)
    records = [r for recs in sources for r in recs]
    dataset = RecordDataset(records, processor, image_size=recipe.data.image_size, stride=model.config.vae.stride,
                            gen_transform=recipe.data.gen_transform, keep_aspect=recipe.data.keep_aspect,
                            pad_multiple=model.config.decoder.pad_to_multiplier, seed=recipe.seed, pairs=dpo,
                            source_condition=model.config.decoder.source_condition)
    keys = [dataset.bucket_key(i) for i in range(len(records))] if recipe.data.keep_aspect else [0] * len(records)
    sampler = MixtureBatchSampler([len(s) for s in sources], [s.weight for s in recipe.data.sources], keys,
                                  batch_size=recipe.batch_size, seed=recipe.seed, shuffle=recipe.data.shuffle,
                                  bucket=recipe.data.bucket_by_resolution)
    collate = Collator(processor)

    def make_loader(batches: list) -> torch.utils.data.DataLoader:
        # its own generator: starting a loader must not draw from the global RNG (a resumed run starts its loader
        # at another moment than the uninterrupted one; the model's noise comes from the global RNG)
        return torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                                           num_workers=recipe.data.num_workers,
                                           pin_memory=accelerator.device.type == "cuda",
                                           generator=torch.Generator().manual_seed(recipe.seed))

    micro_per_epoch = sampler.num_batches(0) // world
    if micro_per_epoch == 0:
        raise InputError(f"{len(records)} records make no full batch of {recipe.batch_size} for {world} "
                         "process(es); lower batch_size or add records")
    steps_per_epoch = max(1, micro_per_epoch // recipe.grad_accum)
    total_steps = recipe.max_steps or max(1, math.ceil(recipe.epochs * steps_per_epoch))

    # ---- optimiser (trainable parameters only; no weight decay on vectors), schedule
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(params, recipe.optim), lr=recipe.optim.lr, betas=recipe.optim.betas,
                                  eps=recipe.optim.eps)
    sched = recipe.schedule
    warmup = warmup_steps(sched.warmup_ratio, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, total_steps, warmup=warmup, kind=sched.kind, min_lr_ratio=sched.min_lr_ratio))

    trainable_names = {n for n, _ in params}
    ref_cache: dict[str, tuple[float, float]] = {}

    # ---- resume: weights before wrapping (FSDP shards them), optimiser/RNG/data position after
    step, epoch, position, skipped_total, samples_seen = 0, 0, 0, 0, 0
    ckpt = latest_checkpoint(run_dir) if resume else None
    if resume and ckpt is None:
        accelerator.print(f"no complete checkpoint in {run_dir / 'checkpoints'}; starting from step 0")
    if ckpt is not None:
        weights = ckpt.model_state()
        unknown = sorted(set(weights) - set(model.state_dict()))
        if unknown or not trainable_names <= set(weights):
            raise CheckpointError(f"{ckpt.path} does not match this recipe's model/trainable modules; resume with "
                                  "the recipe that wrote it")
        model.load_state_dict(weights, strict=False)

    step_module, optimizer = accelerator.prepare(_Step(model), optimizer)
    ref_module = accelerator.prepare_model(_Step(reference), evaluation_mode=True) if dpo else None
    if ckpt is not None:
        state = ckpt.state()
        blob = ckpt.optimizer_state()
        _load_optimizer(accelerator, step_module, optimizer, blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        if rank < len(blob["rng"]):
            _set_rng_state(blob["rng"][rank])
        ref_cache = dict(blob.get("ref_cache") or {})
        step, epoch, position = state["step"], state["epoch"], state["position"]
        skipped_total, samples_seen = state.get("skipped_records", 0), state.get("samples_seen", 0)
        if state.get("world_size", world) * state.get("grad_accum", recipe.grad_accum) != world * recipe.grad_accum:
            accelerator.print("warning: resuming with a different processes x grad_accum changes the global batch")
        accelerator.print(f"resumed from {ckpt.path} (step {step})")

    metrics = _Metrics(run_dir, step if ckpt is not None else None, main)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(run_dir / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False).encode())
        accelerator.print(f"{recipe.name}: stage {recipe.stage}, {len(records)} records, {total_steps} steps, "
                          f"{world} process(es), trainable {counts['trainable']:,} / frozen {counts['frozen']:,} "
                          f"parameters ({', '.join(modules)})")

    def save(at_step: int) -> None:
        full = accelerator.get_state_dict(step_module)  # collective under FSDP
        sd = {k.removeprefix("model."): v for k, v in full.items()} if full is not None else {}
        if not recipe.checkpoint.save_full:  # parameters and buffers of the trainable modules
            sd = {k: v for k, v in sd.items() if k in trainable_names or any(k.startswith(m + ".") for m in modules)}
        osd = _optimizer_state(accelerator, step_module, optimizer)
        rngs = gather_object([_rng_state()])
        caches = gather_object([ref_cache])
        if main:
            merged = {k: v for c in caches for k, v in c.items()}
            save_checkpoint(run_dir, at_step, model_state=sd,
                            optimizer_state={"optimizer": osd, "scheduler": scheduler.state_dict(), "rng": rngs,
                                             "ref_cache": merged},
                            state={"epoch": epoch, "position": position, "skipped_records": skipped_total,
                                   "samples_seen": samples_seen, "world_size": world, "grad_accum": recipe.grad_accum},
                            config={"recipe": recipe.to_dict(), "model": _config_dict(model)},
                            keep_last=recipe.checkpoint.keep_last)
        accelerator.wait_for_everyone()

    def losses(batch: dict[str, Any]) -> dict[str, Tensor]:
        if not dpo:
            return step_module(batch, "losses")
        n, lp_kwargs = batch["n_pairs"], {"average": recipe.dpo.loss_type == "ipo"}
        if recipe.dpo.scale_weighted:
            lp_kwargs["scale_weighted"] = True
        logps = step_module(batch, "logprobs", **lp_kwargs)
        cached = recipe.dpo.cache_reference and all(i in ref_cache for i in batch["ids"])
        if world > 1:  # one decision for all ranks: under FSDP the reference forward is a collective
            flag = torch.tensor([float(cached)], device=accelerator.device)
            cached = bool(accelerator.reduce(flag, reduction="sum").item() == world)
        if cached:
            ref = torch.tensor([ref_cache[i] for i in batch["ids"]], device=logps.device, dtype=torch.float32).T
            ref_c, ref_r = ref[0], ref[1]
        else:
            with torch.no_grad():
                ref_logps = ref_module(batch, "logprobs", **lp_kwargs).float()
            ref_c, ref_r = ref_logps[:n], ref_logps[n:]
            if recipe.dpo.cache_reference:
                for i, c, r in zip(batch["ids"], ref_c.tolist(), ref_r.tolist(), strict=True):
                    ref_cache[i] = (c, r)
        res = dpo_loss(logps[:n].float(), logps[n:].float(), ref_c, ref_r, recipe.dpo.beta, recipe.dpo.loss_type,
                       recipe.dpo.label_smoothing, recipe.dpo.dpop_lambda)
        return {"loss": res.loss, **dpo_metrics(res.chosen_rewards, res.rejected_rewards),
                "logps_chosen": logps[:n].detach().float().mean(), "logps_rejected": logps[n:].detach().float().mean()}

    # ---- the loop
    data = iterate_batches(make_loader, sampler, rank=rank, world_size=world, epoch=epoch, start=position)
    step_module.train()
    bar = tqdm(total=total_steps, initial=step, disable=not (main and recipe.progress), desc=recipe.name,
               unit="step", dynamic_ncols=True)
    t_start = t_log = time.perf_counter()
    window: dict[str, float] = defaultdict(float)  # sums of logged scalars since the last log ...
    counts: dict[str, int] = defaultdict(int)  # ... and how many micro-steps (or steps) contributed
    window_samples, window_skipped, last_loss = 0, 0, float("nan")
    trainable = [p for _, p in params]
    while step < total_steps:
        for micro in range(recipe.grad_accum):
            epoch, position, batch = next(data)
            batch = _to_device(batch, accelerator.device)
            last = micro == recipe.grad_accum - 1
            with (nullcontext() if last else accelerator.no_sync(step_module)), accelerator.autocast():
                out = losses(batch)
                if "loss" not in out:
                    raise ConfigError(f"{type(model).__name__}.training_losses returned no 'loss' key")
                accelerator.backward(out["loss"] / recipe.grad_accum)
            for k, v in out.items():
                if isinstance(v, Tensor) and v.numel() == 1:
                    window[k] += float(v.detach())
                    counts[k] += 1
            window_samples += len(batch["ids"])
            window_skipped += len(batch["skipped"])
        if recipe.optim.grad_clip is not None:
            gn = accelerator.clip_grad_norm_(trainable, recipe.optim.grad_clip)
            window["grad_norm"] += float(gn)
            counts["grad_norm"] += 1
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)

        if step % recipe.log_every == 0 or step == total_steps:
            # ranks may log different keys (a batch without generated images has no bit loss): agree on the union
            keys = sorted({k for ks in (gather_object([sorted(window)]) if world > 1 else [window]) for k in ks})
            vals = torch.tensor([window.get(k, 0.0) for k in keys] + [counts.get(k, 0) for k in keys]
                                + [window_samples, window_skipped], dtype=torch.float64, device=accelerator.device)
            vals = accelerator.reduce(vals, reduction="sum").tolist()
            n_samples, n_skipped = int(vals[-2]), int(vals[-1])
            mean = {k: vals[i] / vals[len(keys) + i] for i, k in enumerate(keys) if vals[len(keys) + i] > 0}
            samples_seen += n_samples
            skipped_total += n_skipped
            now = time.perf_counter()
            row = {"step": step, **mean, "lr": recipe.optim.lr * scheduler.lr_lambdas[0](scheduler.last_epoch),
                   "samples_per_s": n_samples / max(now - t_log, 1e-9), "skipped_records": skipped_total,
                   "elapsed_s": now - t_start}
            metrics.log(row)
            last_loss = mean.get("loss", float("nan"))
            bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{row['lr']:.2e}", sps=f"{row['samples_per_s']:.1f}",
                            skipped=skipped_total)
            if n_skipped and main:
                bar.write(f"step {step}: skipped {n_skipped} unreadable record(s) ({skipped_total} so far)")
            if samples_seen >= 32 and skipped_total > recipe.data.max_bad_records * (samples_seen + skipped_total):
                raise InputError(f"{skipped_total} records skipped for missing or corrupt images (more than "
                                 f"data.max_bad_records = {recipe.data.max_bad_records}); fix the data paths")
            window.clear()
            counts.clear()
            window_samples, window_skipped, t_log = 0, 0, now
        if step % recipe.checkpoint.every == 0 or step == total_steps:
            save(step)
    bar.close()

    # ---- the trained model (its config says the size it was trained at: the default generation size)
    model_dir = run_dir / "model"
    full = accelerator.get_state_dict(step_module)
    if main:
        unwrapped = accelerator.unwrap_model(step_module).model
        unwrapped.config.image_size = recipe.data.image_size
        unwrapped.config.image_gen_token_num = processor.image_gen_token_num
        if callable(getattr(unwrapped, "save_pretrained", None)) and \
                accelerator.distributed_type != DistributedType.FSDP:
            unwrapped.save_pretrained(model_dir)  # with its own processor files
        else:
            save_model_dir(model_dir, {k.removeprefix("model."): v for k, v in full.items()}, _config_dict(model))
            processor.save(model_dir)
        metrics.plot(run_dir / "loss.png")
        accelerator.print(f"done: {step} steps, final loss {last_loss:.4f}, {skipped_total} record(s) skipped; "
                          f"model in {model_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(run_dir=run_dir, steps=step, final_loss=last_loss, seconds=time.perf_counter() - t_start,
                       skipped_records=skipped_total, model_dir=model_dir, main_process=main)


def _as_reference(recipe: Recipe) -> Recipe:
    ref = copy.deepcopy(recipe)
    ref.model.checkpoint, ref.model.preset = recipe.model.reference, None
    return ref


def _config_dict(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    return cfg.to_dict() if hasattr(cfg, "to_dict") else {}


def _optimizer_state(accelerator: Any, module: nn.Module, optimizer: Any) -> Any:
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:  # full (unsharded) optimiser state, like the weights
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP.optim_state_dict(module, optimizer.optimizer)
    return optimizer.state_dict()


def _load_optimizer(accelerator: Any, module: nn.Module, optimizer: Any, osd: Any) -> None:
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        osd = FSDP.optim_state_dict_to_load(module, optimizer.optimizer, osd)
    optimizer.load_state_dict(osd)
