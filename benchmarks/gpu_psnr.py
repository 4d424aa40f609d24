"""bf16 against fp32 on one device: how far the bf16 path moves the images (issue 15: PSNR >= 40 dB).

Three measurements, each fp32 and bf16 on the same inputs and seeds:

1. ``t2i``: the embedded default (or ``--model``), whole text-to-image on the first ``--n`` held-out ShapesWorld
   test prompts (one image each, seed i): per image PSNR (uint8 pixels) and whether every sampled bit agrees; the
   checker's pass rate of each. bf16 reorders sums, so a bit whose probability sits near its draw can flip and
   change everything after it: a flipped image is a different sample, not a numerical error, so the PSNR is
   reported over all images and over the images whose bits agree.
2. ``vae_decode_tiny``: the model's VAE decoding the same random codes (batch 8), pixels in [-1, 1] (peak 2).
3. ``vae_decode_official``: the released VAE's architecture (`official_config`) with `fill_random_` weights,
   decoding the same random codes at 512 px (batch 1): the decode the official preset runs in bf16.

    python benchmarks/gpu_psnr.py --device cuda --json out/gpu/psnr.json [--n 64] [--model DIR]

On CPU (``--device cpu``) it runs too (bf16 matmuls on CPU): a dry run, and the CPU's own figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from vargpt.bench_published import fill_random_
from vargpt.config import official_config
from vargpt.eval.tasks import prompt_metrics, t2i_cases
from vargpt.models.vae import BSQVAE
from vargpt.pipeline import VARGPTPipeline


def psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, peak: float) -> float:
    """PSNR in dB of ``a`` against ``b`` (inf when equal)."""
    mse = float(((torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def _summary(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"min": None, "median": None}
    return {"min": round(min(values), 2), "median": round(float(np.median(values)), 2)}


def t2i_psnr(model: str | None, device: str, n: int) -> dict:
    cases = t2i_cases(n)
    prompts = [c.prompt for c in cases]
    outs = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        pipe = VARGPTPipeline.from_pretrained(model, device=device, dtype=dtype, progress=False)
        t0 = time.perf_counter()
        outs[name] = [pipe(p, seed=i) for i, p in enumerate(prompts)]
        outs[name + "_s"] = time.perf_counter() - t0
        del pipe
    every, agreeing, same_bits = [], [], 0
    for a, b in zip(outs["fp32"], outs["bf16"], strict=True):
        p = psnr(np.asarray(a.images[0]), np.asarray(b.images[0]), 255.0)
        every.append(p)
        if all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(a.bits, b.bits, strict=True)):
            same_bits += 1
            agreeing.append(p)
    passed = {name: float(np.mean([prompt_metrics(o.images[0], c.prompt)["score"] for o, c in zip(outs[name], cases,
                                                                                                   strict=True)]))
              for name in ("fp32", "bf16")}
    return {"n": n, "same_bits": same_bits, "psnr_db_all": _summary(every), "psnr_db_same_bits": _summary(agreeing),
            "checker_pass": passed, "seconds": {k: round(outs[k + "_s"], 2) for k in ("fp32", "bf16")}}


def random_codes(codebook_dim: int, grid: int, batch: int) -> torch.Tensor:
    """Summed-code maps of random +-1/sqrt(D) bits, the scale of a BSQ code (the bench's VAE rows use the same)."""
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 2, (batch, codebook_dim, grid, grid), generator=g).float()
    return (bits * 2 - 1) / math.sqrt(codebook_dim)


def vae_psnr(vae: BSQVAE, codes: torch.Tensor) -> dict:
    """Decode ``codes`` in fp32 and in bf16 (the engine's channels-last decode); PSNR over [-1, 1] pixels."""
    ref = vae.float().decode(codes.float(), channels_last=True).float().clamp(-1, 1)
    low = copy.deepcopy(vae).to(torch.bfloat16)
    out = low.decode(codes.to(torch.bfloat16), channels_last=True).float().clamp(-1, 1)
    return {"shape": list(ref.shape), "psnr_db": round(psnr(out, ref, 2.0), 2),
            "max_abs": float((out - ref).abs().max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--n", type=int, default=64, help="held-out prompts for the whole-path comparison")
    ap.add_argument("--model", default=None, help="model directory (default: the embedded default)")
    ap.add_argument("--skip-official", action="store_true", help="leave out the full-size VAE decode")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here
    torch.backends.cudnn.allow_tf32 = False
    report: dict = {"device": args.device, "torch": torch.__version__}
    if args.device.startswith("cuda"):
        report["device_name"] = torch.cuda.get_device_name()
    report["t2i"] = t2i_psnr(args.model, args.device, args.n)
    print(json.dumps({"t2i": report["t2i"]}), flush=True)
    pipe = VARGPTPipeline.from_pretrained(args.model, device=args.device, dtype=torch.float32, progress=False)
    cfg = pipe.model.config
    codes = random_codes(cfg.vae.codebook_dim, cfg.image_size // cfg.vae.stride, 8).to(args.device)
    report["vae_decode_tiny"] = vae_psnr(pipe.model.vae_local, codes)
    del pipe
    if not args.skip_official:
        vcfg = official_config().vae
        vae = BSQVAE(vcfg).to(args.device)
        fill_random_(vae.named_parameters(), seed=0)
        codes = random_codes(vcfg.codebook_dim, 512 // vcfg.stride, 1).to(args.device)
        report["vae_decode_official"] = vae_psnr(vae, codes)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    with torch.inference_mode():
        main()
