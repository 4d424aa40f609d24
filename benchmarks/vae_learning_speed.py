"""How fast a tiny VAE learns ShapesWorld from scratch on a CPU: training-batch PSNR every 50 steps for a fixed
wall-clock budget, then PSNR of the whole 64 px images (first 200 of the data) at the end.

    python benchmarks/vae_learning_speed.py --minutes 6 [--bottleneck bsq|none] [--arch conv|patch]
        [--base-ch 32] [--ch-mult 1,1,2,2] [--norm-groups 32] [--codebook-dim 64] [--batch 16] [--lr 1e-3]
        [--crop 32] [--data shapesworld:4000] [--threads 1]

``--bottleneck none`` trains encoder -> decoder without the quantiser (an upper bound on learning speed);
``bsq`` uses the model's own multi-scale BSQ. ``--arch`` is `VAEConfig.arch`: ``conv`` (released layout) or
``patch`` (the embedded default's: all compute at the latent grid). No prefix / commitment / entropy terms: this
measures how fast the autoencoder itself learns, not the full `vargpt train vae` recipe. Session-6 figures
(27.6 dB for patch) came from an earlier patch layout without the per-patch MLPs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from torch import nn

from vargpt.config import get_preset
from vargpt.data.images import ImageSet, find_images, resolve_data, to_unit
from vargpt.models.vae import BSQVAE
from vargpt.training.vae import recon_loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=6.0)
    ap.add_argument("--arch", choices=("conv", "patch"), default="conv")
    ap.add_argument("--bottleneck", choices=("bsq", "none"), default="bsq")
    ap.add_argument("--base-ch", type=int, default=32, help="conv: base channels; patch: width")
    ap.add_argument("--ch-mult", default="1,1,2,2")
    ap.add_argument("--norm-groups", type=int, default=32)
    ap.add_argument("--num-res-blocks", type=int, default=1, help="encoder blocks per level (decoder: one more)")
    ap.add_argument("--codebook-dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--crop", type=int, default=0, help="train on random CROP px windows (0 = whole images)")
    ap.add_argument("--data", default="shapesworld:4000")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_preset("tiny").vae, ch_mult=tuple(int(c) for c in args.ch_mult.split(",")),
                              codebook_dim=args.codebook_dim, base_ch=args.base_ch, norm_groups=args.norm_groups,
                              arch=args.arch, num_res_blocks=args.num_res_blocks)
    cfg.validate()
    model = BSQVAE(cfg)
    model.train()
    paths = find_images(resolve_data(args.data, Path("runs/bench_data"), args.size))
    images = ImageSet(paths, args.size)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(0)
    quantise = args.bottleneck == "bsq"

    def reconstruct(x):
        if quantise:
            return model.decoder(model.quantize(x).quantized_BDHW)
        return model.decoder(model.encode_latent(x))

    curve, t0, step = [], time.time(), 0
    while time.time() - t0 < args.minutes * 60:
        x = to_unit(images.batch(torch.randint(0, len(paths), (args.batch,), generator=gen)), torch.device("cpu"))
        if args.crop:
            top, left = torch.randint(0, args.size - args.crop + 1, (2,), generator=gen).tolist()
            x = x[:, :, top:top + args.crop, left:left + args.crop]
        loss, _, mse = recon_loss(reconstruct(x), x, "l1+l2")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            curve.append((step, round(time.time() - t0, 1), round(float(10 * torch.log10(4 / mse)), 2)))
            print(*curve[-1], flush=True)
    model.eval()
    with torch.no_grad():
        x = to_unit(images.batch(torch.arange(min(200, len(paths)))), torch.device("cpu"))
        final = float(10 * torch.log10(4 / (reconstruct(x) - x).pow(2).mean()))
    report = {"args": vars(args) | {"json": str(args.json)}, "steps": step, "seconds": round(time.time() - t0, 1),
              "params": sum(p.numel() for p in model.parameters()), "curve_step_s_psnr": curve,
              "whole_image_psnr_db": round(final, 2)}
    print(json.dumps({k: report[k] for k in ("steps", "seconds", "params", "whole_image_psnr_db")}))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
