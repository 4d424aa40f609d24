"""Train the BSQ VAE on a folder of images (or generated ShapesWorld scenes).

Recipe: square images (shorter side resized, centre crop, random horizontal flip) in [-1, 1]; the VAE's own
multi-scale quantisation with the full schedule for the image size; loss =
reconstruction (``l1``, ``l2`` or ``l1+l2``) + ``commitment_weight`` x commitment + ``entropy_weight`` x BSQ
entropy term (`vargpt.models.quantizer.bsq_losses`) + ``prefix_weight`` x the reconstruction loss of the image
decoded from the first k < K scales only (k random each step; without it the coarse scales carry almost nothing
and the last scale everything, which is useless for next-scale prediction) + optionally ``adversarial_weight``
x a PatchGAN hinge loss (off by default). Several sizes (``extra_sizes``) alternate step by step, each with its
own schedule: a VAE trained at one size reconstructs poorly at another (32.9 dB at 64 px -> 20.5 dB at 128 px).
AdamW, linear warm-up then cosine decay, gradient clipping, bf16 autocast on CUDA
(the quantiser itself always runs in fp32, as released). Every ``ckpt_every`` steps a crash-safe checkpoint
(`vargpt.training.checkpoint`); ``resume`` continues from the newest complete one with the same data order.
At the end: ``OUT/model`` (model.safetensors + config.json), ``OUT/log.csv`` and ``OUT/loss.png``.

The published code ships no VAE trainer (VARGPT uses the released weights frozen); the loss weights default
to the values its VAE args carry (commitment 0.25, entropy 0.1) with our own recipe around them.
Perceptual (LPIPS) loss is not offered: it needs pretrained weights this package does not ship.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vargpt.config import VAEConfig, get_preset
from vargpt.data.images import ImageSet, find_images, resolve_data, to_unit
from vargpt.errors import CheckpointError, InputError
from vargpt.models.quantizer import bsq_losses
from vargpt.models.vae import BSQVAE
from vargpt.runtime import resolve_device, resolve_dtype
from vargpt.scales import schedule_for_size
from vargpt.training.checkpoint import latest_checkpoint, load_model_dir, save_checkpoint, save_model_dir
from vargpt.training.plots import Panel, plot_metrics, read_rows
from vargpt.training.schedule import lr_factor


@dataclass
class VAETrainConfig:
    data: str  # image folder (recursive *.png/*.jpg) or "shapesworld:N"
    out: str
    preset: str = "tiny"
    steps: int = 2000
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    size: int = 64
    extra_sizes: tuple[int, ...] = ()  # also train at these sizes (steps cycle through them, batch scaled by area;
    # a size repeated in (size, *extra_sizes) takes that many steps of each cycle: 64,64,128 = 2:1)
    recon_loss: Literal["l1", "l2", "l1+l2"] = "l1+l2"
    commitment_weight: float = 0.25
    entropy_weight: float = 0.1
    adversarial_weight: float = 0.0
    adversarial_start: int = 0  # step at which the adversarial term switches on
    foreground_weight: float = 0.0  # extra loss weight on pixels off the background colour (`foreground_weights`)
    edge_weight: float = 0.0  # extra loss weight on pixels at colour boundaries (`foreground_weights`)
    detail_weight: float = 0.0  # extra loss weight on fine structure: thin parts and notches (`foreground_weights`)
    detail_kernel: int = 5  # the opening / closing window that defines "fine" (pixels, odd)
    prefix_weight: float = 0.5  # also reconstruct from the first k < K scales (k random per step): coarse scales
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"  # autocast dtype: bf16 on CUDA, fp32 on CPU
    log_every: int = 10
    ckpt_every: int = 500
    keep_last: int = 3
    resume: bool = False
    init: str | None = None  # warm start: weights from a `vargpt train vae` output (OUT or OUT/model), new optimiser
    progress: bool = True
    max_minutes: float | None = None  # time budget: fit `steps` (at most as given) and the LR schedule to it
    crop: int | None = None  # train on random crop x crop windows (one offset per batch) of the images: the model is
    # convolutional, so a crop step costs ~(crop/size)^2 of a full one, but GroupNorm statistics differ between a crop
    # and a whole image (tiny stride-8 autoencoder after 984 crop steps: 23.7 dB on crops, 20.1 dB on whole 64 px
    # images), so finish at full size (--init)
    vae_overrides: dict[str, Any] | None = None  # VAEConfig fields replacing the preset's (e.g. {"base_ch": 64})
    decoder_only: bool = False  # with ``init``: train the decoder alone; encoder and quantiser stay, so every code (and
    # every model trained on them) stays valid while the pictures drawn from those codes get sharper

    def validate(self) -> None:
        if self.recon_loss not in ("l1", "l2", "l1+l2"):
            raise InputError(f"recon_loss {self.recon_loss!r} unknown; use l1, l2 or l1+l2")
        for name in ("steps", "batch_size", "size", "log_every", "ckpt_every", "keep_last"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if any(v < 1 for v in self.extra_sizes):
            raise InputError(f"sizes must be >= 1, got {self.extra_sizes}")
        if self.crop is not None and not 1 <= self.crop <= min(self.sizes):
            raise InputError(f"crop must be between 1 and the smallest size ({min(self.sizes)}), got {self.crop}")
        if self.lr <= 0:
            raise InputError(f"lr must be > 0, got {self.lr}")
        if self.decoder_only and not self.init:
            raise InputError("decoder_only trains the decoder of an existing VAE: give init (--init RUN)")
        if self.detail_kernel < 3 or self.detail_kernel % 2 == 0:
            raise InputError(f"detail_kernel must be an odd number >= 3, got {self.detail_kernel}")
        for name in ("foreground_weight", "edge_weight", "detail_weight"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def sizes(self) -> tuple[int, ...]:
        """The distinct training sizes, in order of first appearance."""
        return tuple(dict.fromkeys(self.size_cycle))

    @property
    def size_cycle(self) -> tuple[int, ...]:
        """The size of each step of one cycle (step ``s`` trains at ``size_cycle[s % len]``)."""
        return (self.size, *self.extra_sizes)

    def batch_for(self, size: int) -> int:
        """Batch size at ``size``: ``batch_size`` at the smallest size, scaled by pixel area above it."""
        return max(1, self.batch_size * min(self.sizes) ** 2 // size**2)


# ----------------------------------------------------------------------------------------------- model I/O


def vae_model_config(vae_cfg: VAEConfig, preset: str, sizes: tuple[int, ...]) -> dict[str, Any]:
    return {"kind": "bsq_vae", "preset": preset, "image_size": sizes[0], "trained_sizes": list(sizes),
            "vae": dataclasses.asdict(vae_cfg)}


def vae_from_config(d: dict[str, Any]) -> BSQVAE:
    if d.get("kind") != "bsq_vae" or "vae" not in d:
        raise CheckpointError("config.json does not describe a BSQ VAE (kind 'bsq_vae'); "
                              "pass the output directory of `vargpt train vae`")
    v = dict(d["vae"])
    v["ch_mult"] = tuple(v["ch_mult"])
    cfg = VAEConfig(**v)
    cfg.validate()
    return BSQVAE(cfg)


def _full_model_vae(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """(VAE state, VAE model config) of a full VARGPT model directory (config.json with a ``vae`` section and
    ``vae_local.*`` weights, e.g. the embedded default), else None. Only the VAE's tensors are read."""
    from vargpt.weights import load_state_dict_files

    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if config.get("kind") == "bsq_vae" or not isinstance(config.get("vae"), dict):
        return None
    state = load_state_dict_files(path, prefixes=("vae_local.",))
    if not state:
        return None
    state = {k.removeprefix("vae_local."): v for k, v in state.items()}
    size = int(config.get("image_size", 0)) or 64
    return state, {"kind": "bsq_vae", "preset": config.get("preset", "tiny"), "image_size": size,
                   "trained_sizes": [size], "vae": config["vae"], "from_model": str(path)}


def load_vae(path: str | Path, device: str | torch.device = "cpu") -> tuple[BSQVAE, dict[str, Any]]:
    """A trained VAE from a run directory (its ``model/``, else its newest checkpoint), a VAE model directory, or
    a full VARGPT model directory (its ``vae_local``)."""
    path = Path(path)
    full = _full_model_vae(path) if path.is_dir() else None
    if full is not None:
        state, config = full
        vae = vae_from_config(config)
        vae.load_state_dict(state, strict=True)
        return vae.to(device).eval(), config
    if (path / "model").is_dir():
        path = path / "model"
    elif not (path / "model.safetensors").is_file():
        ck = latest_checkpoint(path)
        if ck is None:
            raise CheckpointError(f"{path} holds no VAE (no model/, model.safetensors or complete checkpoint); "
                                  "train one with `vargpt train vae --out DIR`")
        path = ck.path
    state, config = load_model_dir(path)
    vae = vae_from_config(config)
    missing, unexpected = vae.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match its config (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}); re-export the model")
    return vae.to(device).eval(), config


# ----------------------------------------------------------------------------------------------- losses


class PatchDiscriminator(nn.Module):
    """Small PatchGAN (3 strided convs) for the optional adversarial term."""

    def __init__(self, ch: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, ch, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(ch, ch * 2, 4, 2, 1), nn.GroupNorm(32, ch * 2), nn.LeakyReLU(0.2),
            nn.Conv2d(ch * 2, 1, 4, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def foreground_weights(x: Tensor, weight: float, edge_weight: float = 0.0, detail_weight: float = 0.0,
                       detail_kernel: int = 5) -> Tensor:
    """Per-pixel loss weights [B, 1, H, W]: 1 on the background, ``1 + weight`` elsewhere, the background being
    the per-image, per-channel median colour (ShapesWorld: a flat background over most of the image). Small
    objects hold a few percent of the pixels; without it their edges barely move the mean loss and come out blurred.
    ``edge_weight`` adds to every pixel on a colour boundary (its 3x3 neighbourhood spans > 0.1 in some channel):
    a shape is told by its corners and edges, and a small object is mostly edge, so this weighs small objects most.
    ``detail_weight`` adds to every pixel where the foreground mask's closing and opening by a ``detail_kernel``
    square differ: parts thinner than the window (a small cross's arms, a triangle's tip, a whole small object) and
    gaps narrower than it (the notches between a cross's arms), the structure that tells a small cross from a
    diamond.
    """
    bg = x.flatten(2).median(dim=2).values[:, :, None, None]
    fg = ((x - bg).abs().amax(dim=1, keepdim=True) > 0.05).float()
    w = 1.0 + weight * fg
    if detail_weight:
        k = detail_kernel

        def dilate(m: Tensor) -> Tensor:
            return F.max_pool2d(m, k, 1, k // 2)

        def erode(m: Tensor) -> Tensor:  # outside the image counts as foreground, so borders do not erode
            return -F.max_pool2d(-m, k, 1, k // 2)

        w = w + detail_weight * (erode(dilate(fg)) - dilate(erode(fg)))
    if edge_weight:
        spread = F.max_pool2d(x, 3, 1, 1) + F.max_pool2d(-x, 3, 1, 1)  # local max - local min, per channel
        w = w + edge_weight * (spread.amax(dim=1, keepdim=True) > 0.1).float()
    return w


def recon_loss(recon: Tensor, x: Tensor, kind: str, weights: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, l1, mse) in fp32; ``weights`` (broadcast to x) weight the loss, never the reported l1 / mse."""
    d = recon.float() - x
    l1, mse = d.abs().mean(), d.pow(2).mean()
    if weights is not None:
        w = weights.expand_as(d)
        wl1, wmse = (w * d.abs()).sum() / w.sum(), (w * d.pow(2)).sum() / w.sum()
        return {"l1": wl1, "l2": wmse, "l1+l2": wl1 + wmse}[kind], l1, mse
    return {"l1": l1, "l2": mse, "l1+l2": l1 + mse}[kind], l1, mse


# ----------------------------------------------------------------------------------------------- loop


@dataclass
class VAETrainResult:
    out: Path
    steps: int
    final_loss: float
    final_psnr_db: float  # on the last logged training batch
    seconds: float


CSV_FIELDS = ["step", "lr", "loss", "recon", "l1", "mse", "psnr_db", "commit", "entropy", "adv_g", "adv_d", "sec"]


def train_vae(cfg: VAETrainConfig) -> VAETrainResult:
    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    amp_dtype = resolve_dtype(cfg.dtype, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest convs
    vae_cfg = get_preset(cfg.preset).vae
    if cfg.vae_overrides:
        bad = sorted(set(cfg.vae_overrides) - {f.name for f in dataclasses.fields(VAEConfig)})
        if bad:
            raise InputError(f"unknown VAE field(s) {', '.join(bad)}; allowed: "
                             f"{', '.join(f.name for f in dataclasses.fields(VAEConfig))}")
        vae_cfg = dataclasses.replace(vae_cfg, **cfg.vae_overrides)
        vae_cfg.validate()
    sizes = cfg.sizes
    schedules = {sz: schedule_for_size(cfg.crop or sz, cfg.crop or sz, vae_cfg.stride) for sz in sizes}
    paths = find_images(resolve_data(cfg.data, out / "data", max(sizes), seed=cfg.seed))
    image_sets = {sz: ImageSet(paths, sz) for sz in sizes}
    torch.manual_seed(cfg.seed)  # parameter init only; data order uses its own generator below
    vae = BSQVAE(vae_cfg).to(device).train()
    if cfg.init and not (cfg.resume and latest_checkpoint(out) is not None):
        init_vae, init_config = load_vae(cfg.init)
        refine = ("refine_blocks", "refine_ch")  # a decoder may gain refinement blocks over the same codes
        same = dataclasses.replace(init_vae.cfg, **{k: getattr(vae.cfg, k) for k in refine}) == vae.cfg
        if not same or (init_vae.cfg != vae.cfg and not cfg.decoder_only):
            raise CheckpointError(f"--init {cfg.init}: its VAE sizes {init_config.get('vae')} differ from this run's; "
                                  "pass the same --preset/--vae overrides it was trained with (only refine_blocks / "
                                  "refine_ch may differ, with --decoder-only)")
        missing, unexpected = vae.load_state_dict(init_vae.state_dict(), strict=False)
        if unexpected or any(not k.startswith("decoder.refine.") for k in missing):
            raise CheckpointError(f"--init {cfg.init}: weights do not fit (missing {missing[:3]}, unexpected "
                                  f"{unexpected[:3]})")
    if cfg.decoder_only:
        vae.encoder.requires_grad_(False)
        vae.quantizer.requires_grad_(False)
    trained = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    disc = disc_opt = None
    if cfg.adversarial_weight > 0:
        disc = PatchDiscriminator().to(device).train()
        disc_opt = torch.optim.AdamW(disc.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
    gen = torch.Generator().manual_seed(cfg.seed)
    model_config = vae_model_config(vae_cfg, cfg.preset, sizes)
    start = 0
    if cfg.resume and (ck := latest_checkpoint(out)) is not None:
        vae.load_state_dict(ck.model_state())
        extra = ck.optimizer_state()
        opt.load_state_dict(extra["optimizer"])
        gen.set_state(extra["rng"])
        if disc is not None and extra.get("disc") is not None:
            disc.load_state_dict(extra["disc"])
            disc_opt.load_state_dict(extra["disc_opt"])
        start = ck.step

    log_path = out / "log.csv"
    if start == 0 or not log_path.is_file():
        with open(log_path, "w", newline="") as f:
            csv.writer(f).writerow(CSV_FIELDS)
    else:  # drop log rows past the checkpoint we resume from
        with open(log_path) as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start]
        with open(log_path, "w", newline="") as f:
            w = csv.DictWriter(f, CSV_FIELDS)
            w.writeheader()
            w.writerows(rows)

    def save(step: int) -> None:
        extra = {"optimizer": opt.state_dict(), "rng": gen.get_state(),
                 "disc": disc.state_dict() if disc is not None else None,
                 "disc_opt": disc_opt.state_dict() if disc_opt is not None else None}
        save_checkpoint(out, step, model_state=vae.state_dict(), optimizer_state=extra,
                        state={"train_config": dataclasses.asdict(cfg)}, config=model_config, keep_last=cfg.keep_last)

    perm, pos = torch.randperm(len(paths), generator=gen), 0
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32)
    t0, last = time.time(), {"loss": float("nan"), "psnr_db": float("nan")}
    bar = range(start, cfg.steps)
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(bar, initial=start, total=cfg.steps, desc="train vae", dynamic_ncols=True)
    # time budget: from step fit_from on (warm), every 100 steps the plan is refitted to the rate of the steps since
    # the last refit, so a slow spell (another job on the machine) shortens the run only while it lasts
    requested, fit_from = cfg.steps, start + 10
    for step in bar:
        if step == fit_from:
            t_fit, s_fit = time.time(), step
        if cfg.max_minutes and step > fit_from and (step - fit_from) % 100 == 50:
            now = time.time()
            per_step = (now - t_fit) / (step - s_fit)
            t_fit, s_fit = now, step
            left = int((cfg.max_minutes * 60 - (now - t0)) / per_step)
            cfg.steps = max(step + 1, min(requested, step + left))
            if cfg.progress:
                bar.total = cfg.steps
        if cfg.max_minutes and step > start and time.time() - t0 > cfg.max_minutes * 60:
            cfg.steps = step  # hard stop; the checkpoint below is written at the step reached
        if step >= cfg.steps:
            break
        size = cfg.size_cycle[step % len(cfg.size_cycle)]
        bs, idx = cfg.batch_for(size), []
        while len(idx) < bs:  # epoch-wise permutation, reproducible across resumes
            if pos >= len(perm):
                perm, pos = torch.randperm(len(paths), generator=gen), 0
            take = perm[pos:pos + bs - len(idx)]
            idx.extend(take.tolist())
            pos += len(take)
        flip = torch.rand(bs, generator=gen) < 0.5
        k_prefix = int(torch.randint(1, len(schedules[size]), (1,), generator=gen)) if cfg.prefix_weight > 0 else None
        x = to_unit(image_sets[size].batch(torch.tensor(idx)), device)
        x = torch.where(flip.to(device)[:, None, None, None], x.flip(-1), x)
        if cfg.crop is not None and cfg.crop < size:
            top, left = torch.randint(0, size - cfg.crop + 1, (2,), generator=gen).tolist()
            x = x[:, :, top:top + cfg.crop, left:left + cfg.crop]

        lr = cfg.lr * lr_factor(step, cfg.steps, warmup=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        with autocast:
            recon, q = vae(x, schedules[size], prefix=k_prefix)
            recon_prefix = vae.decoder(q.prefix_BDHW) if k_prefix else None
        weighted = cfg.foreground_weight > 0 or cfg.edge_weight > 0 or cfg.detail_weight > 0
        w = foreground_weights(x, cfg.foreground_weight, cfg.edge_weight, cfg.detail_weight,
                               cfg.detail_kernel) if weighted else None
        rec, l1, mse = recon_loss(recon, x, cfg.recon_loss, w)
        commit, entropy = bsq_losses(q.z)
        loss = rec + cfg.commitment_weight * commit + cfg.entropy_weight * entropy
        if recon_prefix is not None:
            loss = loss + cfg.prefix_weight * recon_loss(recon_prefix, x, cfg.recon_loss, w)[0]
        adv_g = adv_d = torch.zeros((), device=device)
        use_adv = disc is not None and step >= cfg.adversarial_start
        if use_adv:
            with autocast:
                adv_g = -disc(recon).float().mean()
            loss = loss + cfg.adversarial_weight * adv_g
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(trained, cfg.grad_clip)
        opt.step()
        if use_adv:
            with autocast:
                adv_d = (F.relu(1 - disc(x)).float().mean() + F.relu(1 + disc(recon.detach())).float().mean()) / 2
            disc_opt.zero_grad(set_to_none=True)
            adv_d.backward()
            disc_opt.step()

        if not math.isfinite(loss.item()):
            raise InputError(f"training diverged at step {step + 1} (loss {loss.item()}); lower --lr")
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            psnr = (10 * torch.log10(4.0 / mse.clamp_min(1e-12))).item()  # [-1, 1] range -> peak-to-peak 2
            last = {"loss": loss.item(), "psnr_db": psnr}
            row = [done, f"{lr:.3e}", f"{loss.item():.6f}", f"{rec.item():.6f}", f"{l1.item():.6f}",
                   f"{mse.item():.6f}", f"{psnr:.3f}", f"{commit.item():.6f}", f"{entropy.item():.6f}",
                   f"{adv_g.item():.6f}", f"{adv_d.item():.6f}", f"{time.time() - t0:.1f}"]
            with open(log_path, "a", newline="") as f:
                csv.writer(f).writerow(row)
            if cfg.progress:
                bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{psnr:.2f}")
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            save(done)

    if latest_checkpoint(out) is None or latest_checkpoint(out).step != cfg.steps:  # hard stop by time
        save(cfg.steps)
    save_model_dir(out / "model", vae.state_dict(), model_config)
    plot_log(log_path, out / "loss.png")
    return VAETrainResult(out, cfg.steps, last["loss"], last["psnr_db"], time.time() - t0)


def plot_log(log_csv: Path, png: Path) -> None:
    """Loss and training-batch PSNR against step."""
    plot_metrics(read_rows(log_csv), png, [Panel(("loss", "recon", "commit"), "loss", "VAE training loss", log=True),
                                           Panel(("psnr_db",), "PSNR (dB, training batch)")])
