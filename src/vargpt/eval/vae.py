"""VAE evaluation: reconstruction quality per number of scales, bit usage, pictures.

``evaluate_vae(vae, images)`` encodes uint8 images [N, 3, S, S] with the full schedule for S and decodes the
summed codes of the first k scales for k = 1..K. It reports PSNR (dB, images in [0, 1], data range 1) and
SSIM (scikit-image, channel axis last, data range 1) averaged over images, per k and for the full schedule,
the PSNR of the unquantised latent (the autoencoder's own ceiling), and per-scale bit usage: the fraction of
ones, the mean per-bit entropy in bits (1 = every bit used half the time) and the fraction of distinct codes
among the positions of that scale. ``run_eval`` is what ``vargpt eval vae`` calls: it also writes a PNG of
reconstructions (original, then k = 1..K) and a plot of PSNR against k. ``eval_images`` reads the images
(a folder, or ShapesWorld scenes of one split) for it and for the one-report ``vargpt eval``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torch import Tensor

from vargpt.data.images import ImageSet, find_images, resolve_data
from vargpt.errors import InputError
from vargpt.models.vae import BSQVAE
from vargpt.scales import schedule_for_size


def to_unit01_hwc(x: Tensor) -> np.ndarray:
    """[-1, 1] images [B, 3, H, W] -> float64 numpy [B, H, W, 3] in [0, 1]."""
    return ((x.detach().float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().double().numpy()


def psnr_ssim(recon: Tensor, ref: Tensor) -> tuple[list[float], list[float]]:
    """Per-image PSNR (dB) and SSIM of two [-1, 1] batches."""
    a, b = to_unit01_hwc(ref), to_unit01_hwc(recon)
    psnr = [float(peak_signal_noise_ratio(x, y, data_range=1.0)) for x, y in zip(a, b, strict=True)]
    ssim = [float(structural_similarity(x, y, data_range=1.0, channel_axis=-1)) for x, y in zip(a, b, strict=True)]
    return psnr, ssim


def bit_usage(bits_list: Sequence[Tensor]) -> list[dict[str, Any]]:
    """Per scale: grid, fraction of ones, mean per-bit entropy (bits), fraction of distinct codes."""
    out = []
    for k, bits in enumerate(bits_list):
        flat = bits.reshape(-1, bits.shape[-1]).float()
        p = flat.double().mean(0)
        h = -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p)) / math.log(2)
        unique = torch.unique(bits.reshape(-1, bits.shape[-1]), dim=0).shape[0]
        out.append({"scale": k, "grid": [int(bits.shape[1]), int(bits.shape[2])], "positions": flat.shape[0],
                    "ones_frac": round(float(flat.mean()), 4), "bit_entropy": round(float(h.mean()), 4),
                    "unique_code_frac": round(unique / flat.shape[0], 4)})
    return out


@torch.no_grad()
def evaluate_vae(vae: BSQVAE, images_uint8: Tensor, *, batch_size: int = 16) -> dict[str, Any]:
    """Metrics of ``vae`` on uint8 images [N, 3, S, S] (see module docstring)."""
    if images_uint8.ndim != 4 or images_uint8.dtype != torch.uint8:
        raise InputError(f"evaluate_vae expects uint8 images [N, 3, S, S], got {images_uint8.dtype} "
                         f"{tuple(images_uint8.shape)}")
    device = next(vae.parameters()).device
    S = images_uint8.shape[-1]
    schedule = schedule_for_size(images_uint8.shape[-2], S, vae.stride)
    K = len(schedule)
    psnr_k: list[list[float]] = [[] for _ in range(K)]
    ssim_k: list[list[float]] = [[] for _ in range(K)]
    psnr_latent: list[float] = []
    all_bits: list[list[Tensor]] = [[] for _ in range(K)]
    for i in range(0, len(images_uint8), batch_size):
        x = images_uint8[i:i + batch_size].to(device).float() / 127.5 - 1
        latent = vae.encode_latent(x)
        psnr_latent += psnr_ssim(vae.decode(latent), x)[0]
        from vargpt.models.quantizer import multiscale_bits

        tok = multiscale_bits(latent, schedule)
        for k in range(K):
            p, s = psnr_ssim(vae.decode_bits(tok.bits[:k + 1], schedule), x)
            psnr_k[k] += p
            ssim_k[k] += s
            all_bits[k].append(tok.bits[k].cpu())
    mean = lambda v: round(float(np.mean(v)), 4)
    return {
        "n_images": len(images_uint8), "size": [int(images_uint8.shape[-2]), S],
        "schedule": [list(s) for s in schedule],
        "psnr_db": mean(psnr_k[-1]), "ssim": mean(ssim_k[-1]),
        "psnr_db_by_scales": [mean(v) for v in psnr_k], "ssim_by_scales": [mean(v) for v in ssim_k],
        "psnr_db_unquantized": mean(psnr_latent), "psnr_db_min": round(float(np.min(psnr_k[-1])), 4),
        "bit_usage": bit_usage([torch.cat(b) for b in all_bits]),
    }


@torch.no_grad()
def save_reconstruction_grid(vae: BSQVAE, images_uint8: Tensor, path: str | Path, *, n: int = 4) -> Path:
    """PNG: one row per image: original, then the reconstruction from the first k scales for k = 1..K."""
    from PIL import Image

    device = next(vae.parameters()).device
    x = images_uint8[:n].to(device).float() / 127.5 - 1
    schedule = schedule_for_size(x.shape[-2], x.shape[-1], vae.stride)
    tok = vae.encode(x, schedule)
    cols = [x] + [vae.decode_bits(tok.bits[:k + 1], schedule) for k in range(len(schedule))]
    rows = [np.concatenate([to_unit01_hwc(c[i:i + 1])[0] for c in cols], axis=1) for i in range(len(x))]
    grid = (np.concatenate(rows, axis=0) * 255).round().astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path


def plot_psnr_by_scales(report: dict[str, Any], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = list(range(1, len(report["psnr_db_by_scales"]) + 1))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(k, report["psnr_db_by_scales"], marker="o", label="first k scales")
    ax.axhline(report["psnr_db_unquantized"], ls="--", c="grey", label="unquantised latent")
    ax.set_xlabel("number of scales k")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title(f"VAE reconstruction, {report['size'][0]}x{report['size'][1]}, n={report['n_images']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def eval_images(data: str, work_dir: str | Path, size: int, *, split: str = "test",
                 limit: int | None = None) -> Tensor:
    """uint8 [N, 3, size, size]: the first ``limit`` images of ``data``, a folder or ``shapesworld:N`` (the records
    of ``split``, written once under ``work_dir``)."""
    paths = find_images(resolve_data(data, Path(work_dir), size, split=split, seed=0))[:limit]
    return ImageSet(paths, size).batch(torch.arange(len(paths)))


def run_eval(model: str | Path, data: str, json_path: str | Path, *, split: str = "test", size: int = 64,
             limit: int = 256, device: str = "auto", batch_size: int = 16) -> dict[str, Any]:
    """Load a trained VAE (or a full model's), evaluate on ``data`` (a folder or ``shapesworld:N`` of ``split``),
    write the report."""
    from vargpt.runtime import resolve_device
    from vargpt.training.vae import load_vae

    json_path = Path(json_path)
    out_dir = json_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    vae, model_cfg = load_vae(model, dev)
    if size % vae.stride:
        raise InputError(f"--size {size} is not a multiple of the VAE stride {vae.stride}")
    images = eval_images(data, out_dir / "data", size, split=split, limit=limit)
    report = evaluate_vae(vae, images, batch_size=batch_size)
    stem = json_path.with_suffix("")
    report["model"], report["data"], report["preset"] = str(model), str(data), model_cfg.get("preset")
    report["split"] = split if data.startswith("shapesworld:") else None  # a folder has no split
    report["pictures"] = {
        "reconstructions": str(save_reconstruction_grid(vae, images, f"{stem}_recon.png")),
        "psnr_by_scales": str(plot_psnr_by_scales(report, f"{stem}_psnr_by_scales.png")),
    }
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    return report
