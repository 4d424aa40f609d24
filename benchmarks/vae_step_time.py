"""Seconds per VAE optimiser step (AdamW, l1+l2 reconstruction, batch 16, random input) for VAE shapes and sizes:
what a VAE costs to train before training it.

    python benchmarks/vae_step_time.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vargpt.config import VAEConfig
from vargpt.models.vae import BSQVAE

CASES = {  # name: (VAE config, image size)
    "stride 8 (ch_mult 1,1,2,2) @128": (VAEConfig(codebook_dim=16, base_ch=32, ch_mult=(1, 1, 2, 2)), 128),
    "stride 4 (ch_mult 1,1,2) @64": (VAEConfig(codebook_dim=16, base_ch=32, ch_mult=(1, 1, 2)), 64),
    "stride 8 (ch_mult 1,1,2,2) @64": (VAEConfig(codebook_dim=16, base_ch=32, ch_mult=(1, 1, 2, 2)), 64),
}


def step_seconds(cfg: VAEConfig, size: int, batch: int, runs: int) -> tuple[float, tuple[int, ...]]:
    vae = BSQVAE(cfg)
    opt = torch.optim.AdamW(vae.parameters(), 1e-4)
    x = torch.rand(batch, 3, size, size) * 2 - 1
    times = []
    for _ in range(runs + 1):  # the first is warm-up
        t = time.perf_counter()
        rec, q = vae(x)
        ((rec - x).abs().mean() + (rec - x).pow(2).mean()).backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:]), tuple(q.quantized_BDHW.shape[-2:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("| VAE | latent | s / step |\n|---|---|---|")
    for name, (cfg, size) in CASES.items():
        sec, grid = step_seconds(cfg, size, args.batch_size, args.runs)
        print(f"| {name} | {grid[0]}x{grid[1]} | {sec:.2f} |")


if __name__ == "__main__":
    main()
