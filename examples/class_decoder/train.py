"""Train a class-conditional visual decoder on single-object ShapesWorld scenes (CPU-sized).

Recipe: ``pool`` single-object scenes (class = shape, or shape x colour; random cell, size and background)
rendered at ``size`` px, encoded ONCE by a frozen BSQ VAE into latents; each step turns a batch of latents
into multi-scale bits and teacher-forcing inputs, with bitwise self-correction of the given ``self_correction``
strength (0 = none; the released decoder trains with 0.3: later scales learn to repair wrong earlier bits, as
they must when sampling); the decoder (``tiny`` preset sizes) learns the bits with condition dropout; AdamW,
linear warm-up then cosine decay, gradient clipping. At the end: ``OUT/model`` (model.safetensors +
config.json), ``OUT/log.csv``, ``OUT/loss.png`` and ``OUT/samples.png`` (one sample per class, cfg 3).
``object_size`` = "small"/"large" renders every object at that size ("any": random), ``cell`` in 0-8 puts it
in that grid cell (-1: random), ``background`` fixes the background ("any": random); ``threads`` > 0 sets
torch's intra-op threads (1 is fastest for these tiny shapes on a loaded 2-core machine). Every ``ckpt_every``
steps a checkpoint (weights, optimiser, both generators, smoothed metrics) is written atomically to
``OUT/checkpoints``; ``resume`` continues from the newest one (the latent pool is rebuilt from the seed) and
reaches the same weights as an uninterrupted run.

With ``vae=None`` a randomly initialised VAE is used: the decoder still learns (the bits are a deterministic
function of the image) and the run exercises every step, but the sample picture is meaningless; pass a
trained VAE (``vargpt train vae`` output) for real images.

Run: ``python -m examples.class_decoder.train --out runs/cls --steps 2000``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from examples.class_decoder.model import ClassConditionalDecoder
from PIL import Image

from vargpt.config import SamplingConfig, SelfCorrectionConfig, get_preset
from vargpt.data.scene import BACKGROUNDS, COLOURS, SHAPES, Scene, random_object, render
from vargpt.models.quantizer import multiscale_bits
from vargpt.models.vae import BSQVAE
from vargpt.runtime import resolve_device
from vargpt.scales import schedule_for_size
from vargpt.training.checkpoint import latest_checkpoint, save_checkpoint, save_model_dir
from vargpt.training.plots import Panel, plot_metrics, read_rows
from vargpt.training.schedule import lr_factor

__all__ = ["ClassDecoderTrainConfig", "class_names", "make_class_images", "plot_log", "train_class_decoder", "main"]


@dataclass
class ClassDecoderTrainConfig:
    out: str
    steps: int = 2000
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup: int = 100
    grad_clip: float = 1.0
    size: int = 64
    classes: Literal["shape", "shape_colour"] = "shape_colour"
    pool: int = 2048
    object_size: Literal["any", "small", "large"] = "any"
    cell: int = -1
    background: str = "any"
    vae: str | None = None
    preset: str = "tiny"
    seed: int = 0
    log_every: int = 50
    device: str = "auto"
    threads: int = 0
    self_correction: float = 0.0  # bitwise self-correction strength (released: 0.3), see the module docstring
    ckpt_every: int = 250
    keep_last: int = 2
    resume: bool = False  # continue from the newest checkpoint in OUT/checkpoints


def class_names(kind: str) -> list[str]:
    if kind == "shape":
        return list(SHAPES)
    if kind == "shape_colour":
        return [f"{c} {s}" for s in SHAPES for c in COLOURS]
    raise ValueError(f"classes must be 'shape' or 'shape_colour', got {kind!r}")


def make_class_images(n: int, kind: str, size: int, seed: int,
                      object_size: str = "any", cell: int = -1,
                      background: str = "any") -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` single-object scenes, labels cycling over the classes: (uint8 [n, 3, size, size], long [n])."""
    names = class_names(kind)
    images, labels = [], []
    for i in range(n):
        rng = random.Random(f"{seed}/class/{i}")
        label = i % len(names)
        words = names[label].split()
        shape, colour = words[-1], (words[0] if len(words) == 2 else None)
        where = rng.randrange(9) if cell < 0 else cell
        obj = random_object(rng, where, shape=shape, colour=colour,
                            size=None if object_size == "any" else object_size)
        bg = rng.choice(tuple(BACKGROUNDS)) if background == "any" else background
        img = render(Scene((obj,), bg), size)
        images.append(torch.from_numpy(np.array(img)).permute(2, 0, 1))
        labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def _load_vae(cfg: ClassDecoderTrainConfig, device: torch.device) -> BSQVAE:
    if cfg.vae:
        from vargpt.training.vae import load_vae

        return load_vae(cfg.vae, device)[0]
    torch.manual_seed(cfg.seed)
    return BSQVAE(get_preset(cfg.preset).vae).to(device).eval()


@torch.no_grad()
def _encode(vae: BSQVAE, images: torch.Tensor, device: torch.device, chunk: int = 64) -> torch.Tensor:
    """uint8 images -> the VAE's continuous latents [N, D, h, w]."""
    return torch.cat([vae.encode_latent(images[i:i + chunk].to(device).float() / 127.5 - 1)
                      for i in range(0, len(images), chunk)])


def train_class_decoder(cfg: ClassDecoderTrainConfig) -> dict[str, float]:
    """Run the recipe; returns the final smoothed loss and bit accuracy."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    preset = get_preset(cfg.preset)
    names = class_names(cfg.classes)
    schedule = schedule_for_size(cfg.size, cfg.size, preset.vae.stride)
    vae = _load_vae(cfg, device)
    images, labels = make_class_images(cfg.pool, cfg.classes, cfg.size, cfg.seed, cfg.object_size, cfg.cell,
                                       cfg.background)
    latents = _encode(vae, images, device)
    correction = SelfCorrectionConfig(strength=cfg.self_correction)
    labels = labels.to(device)

    torch.manual_seed(cfg.seed)
    model = ClassConditionalDecoder(preset.decoder, vae.cfg.codebook_dim, len(names)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.97))
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    order = torch.Generator().manual_seed(cfg.seed + 1)
    ema_loss = ema_acc = None
    start, t0 = 0, time.time()
    if cfg.resume and (ck := latest_checkpoint(out)) is not None:
        model.load_state_dict(ck.model_state())
        extra = ck.optimizer_state(map_location=device)
        opt.load_state_dict(extra["optimizer"])
        gen.set_state(extra["gen"])
        order.set_state(extra["order"])
        start, ema_loss, ema_acc = ck.step, extra["ema_loss"], extra["ema_acc"]
        t0 -= extra["seconds"]
        print(f"resuming from {ck.path} (step {start})", flush=True)

    def save(step: int) -> None:
        extra = {"optimizer": opt.state_dict(), "gen": gen.get_state(), "order": order.get_state(),
                 "ema_loss": ema_loss, "ema_acc": ema_acc, "seconds": time.time() - t0}
        save_checkpoint(out, step, model_state=model.state_dict(), optimizer_state=extra,
                        state={"train_config": dataclasses.asdict(cfg)}, keep_last=cfg.keep_last)

    kept = []  # log rows before the step we resume from
    if start and (out / "log.csv").is_file():
        with (out / "log.csv").open(newline="") as f:
            kept = [r for r in list(csv.reader(f))[1:] if int(r[0]) < start]
    with (out / "log.csv").open("w", newline="") as f:
        log = csv.writer(f)
        log.writerow(["step", "loss", "bit_accuracy", "lr", "seconds"])
        log.writerows(kept)
        for step in range(start, cfg.steps):
            idx = torch.randint(0, cfg.pool, (cfg.batch_size,), generator=order).to(device)
            batch = multiscale_bits(latents[idx], schedule, self_correction=correction, generator=gen)
            for group in opt.param_groups:
                group["lr"] = cfg.lr * lr_factor(step, cfg.steps, warmup=cfg.warmup)
            res = model.loss(labels[idx], batch, schedule, generator=gen)
            opt.zero_grad(set_to_none=True)
            res.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            loss = res.loss.item()
            ema_loss = loss if ema_loss is None else 0.95 * ema_loss + 0.05 * loss
            ema_acc = res.bit_accuracy if ema_acc is None else 0.95 * ema_acc + 0.05 * res.bit_accuracy
            if step % cfg.log_every == 0 or step == cfg.steps - 1:
                log.writerow([step, f"{loss:.5f}", f"{res.bit_accuracy:.4f}", f"{opt.param_groups[0]['lr']:.2e}",
                              f"{time.time() - t0:.1f}"])
                f.flush()
                print(f"step {step:5d}  loss {ema_loss:.4f}  bit acc {ema_acc:.4f}", flush=True)
            if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps:
                save(step + 1)

    plot_log(out / "log.csv", out / "loss.png")
    model.eval()
    config = {"kind": "class_decoder", "decoder": dataclasses.asdict(preset.decoder),
              "codebook_dim": vae.cfg.codebook_dim, "num_classes": len(names), "class_names": names,
              "image_size": cfg.size, "vae": cfg.vae, "train": dataclasses.asdict(cfg)}
    save_model_dir(out / "model", model.state_dict(), config)
    shown = torch.arange(min(len(names), 10), device=device)
    gens = [torch.Generator(device=device).manual_seed(cfg.seed + i) for i in range(len(shown))]
    sample = model.sample(shown, schedule, SamplingConfig(cfg_scale=3.0, tau=1.0, top_k=0, top_p=0.0), generator=gens)
    pics = ((vae.decode(sample.summed_codes_BDHW) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()
    Image.fromarray(torch.cat(list(pics), dim=2).permute(1, 2, 0).numpy()).save(out / "samples.png")
    return {"loss": float(ema_loss), "bit_accuracy": float(ema_acc)}


def plot_log(log_csv: Path, png: Path) -> None:
    """Training loss (log scale) and bit accuracy against step."""
    panels = [Panel(("loss",), "bit cross-entropy", "class decoder: training loss", log=True),
              Panel(("bit_accuracy",), "bit accuracy (training batch)")]
    plot_metrics(read_rows(log_csv), png, panels, dpi=80)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    defaults = ClassDecoderTrainConfig(out="")
    for f in dataclasses.fields(ClassDecoderTrainConfig):
        default, flag = getattr(defaults, f.name), f"--{f.name.replace('_', '-')}"
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true")
            continue
        kind = {int: int, float: float}.get(type(default), str)
        p.add_argument(flag, type=kind, default=default, required=f.name == "out")
    args = p.parse_args(argv)
    result = train_class_decoder(ClassDecoderTrainConfig(**vars(args)))
    print(f"done: loss {result['loss']:.4f}, bit accuracy {result['bit_accuracy']:.4f}, model in {args.out}/model")


if __name__ == "__main__":
    main()
