"""Dense pretraining of the vision tower on ShapesWorld scene labels (the embedded default's first stage).

Trained from scratch with the LLM, the tiny vision tower learns colour and position quickly but not shape: after
1,500 understanding steps the tiny model named the shape of a LONE object in 19% of held-out questions (colour:
100%, position: 88%), because the only shape signal reaches it through an untrained LLM. Here each merged vision
token (what the LLM reads) gets the labels of the object whose box covers the token's centre ("none" elsewhere):
its shape, colour and size, each by a linear head over the merger's output, cross-entropy, on freshly drawn
training-split scenes (held-out colour-shape pairs excluded). A few minutes on one core make shape linearly
readable from every object token (docs/training.md, "Vision pretraining"); the understanding stage then starts
from these weights. The published model starts from Qwen2-VL's pretrained tower, which this world lacks.

    python -m vargpt.training.embedded vision --recipe recipes/tiny/understanding.yaml --out runs/tiny/vision \\
        --steps 1500

Writes ``OUT/model`` (the recipe's fresh model with the trained ``visual.*`` weights and the recipe's tokenizer) and
``OUT/log.csv`` (step, loss, per-head token accuracy on a fixed held-out batch).
"""

from __future__ import annotations

import csv
import dataclasses
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vargpt.data.scene import COLOURS, SHAPES, SIZES, Scene, render, sample_scene
from vargpt.data.shapesworld import _allowed
from vargpt.errors import InputError
from vargpt.training.schedule import lr_factor, warmup_steps

HEADS = {"shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES)}  # label 0 = no object at the token
PLACES = ("row", "col")  # every token's own grid row and column: where it is, whatever it shows


@dataclass
class VisionPretrainConfig:
    recipe: str  # the understanding recipe whose model (preset + overrides, tokenizer; not its checkpoint) is built
    out: str
    overrides: tuple[str, ...] = ()  # recipe overrides, key=value (as `vargpt train`), e.g. model.tokenizer=DIR
    steps: int = 1500
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0
    eval_every: int = 100
    place_heads: bool = False  # also label every token's row and column (`_Heads`)
    progress: bool = True


def token_labels(scenes: list[Scene], grid: int) -> dict[str, Tensor]:
    """Per head [B, grid*grid] long labels of the tokens of a ``grid`` x ``grid`` merged-token map (row-major):
    1 + the index of the attribute of the object whose box holds the token centre (later objects win), else 0;
    ``row`` / ``col``: the token's own grid row / column."""
    centre = (torch.arange(grid) + 0.5) / grid
    y, x = centre[:, None].expand(grid, grid).flatten(), centre[None, :].expand(grid, grid).flatten()
    out = {name: torch.zeros(len(scenes), grid * grid, dtype=torch.long) for name in HEADS}
    out["row"] = (torch.arange(grid * grid) // grid).expand(len(scenes), -1)
    out["col"] = (torch.arange(grid * grid) % grid).expand(len(scenes), -1)
    for b, scene in enumerate(scenes):
        for o in scene.objects:
            half = SIZES[o.size] / 2
            inside = ((x - o.cx).abs() <= half) & ((y - o.cy).abs() <= half)
            for name, values in HEADS.items():
                out[name][b, inside] = 1 + values.index(getattr(o, name))
    return out


class _Heads(nn.Module):
    """Linear heads over the merged tokens: the covering object's attributes and, with ``grid``, the token's place
    (row and column), so the features say where a token is: the LLM reads positions from them instead of from
    rotary phases, which also rotate with the question's length."""

    def __init__(self, dim: int, grid: int = 0) -> None:
        super().__init__()
        sizes = {name: 1 + len(values) for name, values in HEADS.items()} | {name: grid for name in PLACES if grid}
        self.heads = nn.ModuleDict({name: nn.Linear(dim, n) for name, n in sizes.items()})

    def forward(self, feats_BLC: Tensor, labels: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        loss, acc = feats_BLC.new_zeros(()), {}
        on_object = labels["shape"] > 0
        for name, head in self.heads.items():
            logits = head(feats_BLC)
            loss = loss + F.cross_entropy(logits.flatten(0, 1), labels[name].flatten())
            hit = logits.argmax(-1) == labels[name]
            acc[name] = (hit if name in PLACES else hit[on_object]).float().mean().item()
        return loss, acc


def pretrain_vision(cfg: VisionPretrainConfig) -> Path:
    """Train the recipe model's vision tower + merger on `token_labels` (module docstring); returns OUT/model."""
    from tqdm import tqdm

    from vargpt.processing import make_image_processor
    from vargpt.training.recipe import load_recipe
    from vargpt.training.trainer import build_model, build_processor

    if cfg.steps < 1 or cfg.batch_size < 1:
        raise InputError(f"steps and batch_size must be >= 1, got {cfg.steps} and {cfg.batch_size}")
    recipe = load_recipe(cfg.recipe, list(cfg.overrides))
    # the recipe's preset + overrides define the model; its checkpoint (this stage's output) is ignored
    recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, checkpoint=None, vae=None))
    size = recipe.data.image_size
    torch.manual_seed(cfg.seed)
    model = build_model(recipe)
    vision = model.config.vision
    grid = size // (vision.patch_size * vision.spatial_merge_size)
    image_processor = make_image_processor(vision)
    with torch.random.fork_rng(devices=[]):  # the heads' initial weights follow the seed alone, not what the model
        torch.manual_seed(cfg.seed + 1)      # drew before them (e.g. a wider VAE in the recipe)
        heads = _Heads(vision.hidden_size, grid if cfg.place_heads else 0)
    opt = torch.optim.AdamW([*model.visual.parameters(), *heads.parameters()], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    allowed = _allowed(True)

    def batch(rng: random.Random, n: int) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        scenes = [sample_scene(rng, allowed=allowed) for _ in range(n)]
        px = image_processor(images=[render(s, size) for s in scenes], return_tensors="pt")
        return px["pixel_values"], px["image_grid_thw"], token_labels(scenes, grid)

    def features(pixels: Tensor, grid_thw: Tensor) -> Tensor:
        out = model.visual(pixels, grid_thw=grid_thw)
        out = getattr(out, "pooler_output", out)  # transformers versions differ: merged tokens either way
        return out.reshape(grid_thw.shape[0], grid * grid, -1)

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    held_out = batch(random.Random(10_000 + cfg.seed), 128)  # training-split scenes never drawn below
    rng, t0, rows = random.Random(cfg.seed), time.perf_counter(), []
    warmup = warmup_steps(0.05, cfg.steps)
    for step in tqdm(range(1, cfg.steps + 1), desc="vision pretraining", disable=not cfg.progress):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_factor(step - 1, cfg.steps, warmup=warmup, min_lr_ratio=0.1)
        pixels, grid_thw, labels = batch(rng, cfg.batch_size)
        loss, _ = heads(features(pixels, grid_thw), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            with torch.no_grad():
                _, acc = heads(features(held_out[0], held_out[1]), held_out[2])
            rows.append({"step": step, "loss": round(loss.item(), 4), "elapsed_s": round(time.perf_counter() - t0, 1),
                         **{f"{k}_acc": round(v, 4) for k, v in acc.items()}})
    with (out / "log.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    processor = build_processor(model, recipe)
    model.processor = type(processor)(processor.tokenizer, model.config)
    model.save_pretrained(out / "model")
    return out / "model"
