"""Encode / decode throughput of the BSQ VAE (images per second), JSON out.

encode = image -> per-scale bits (encoder + multi-scale quantisation, `BSQVAE.encode`);
decode = per-scale bits -> image (code summation + decoder, `BSQVAE.decode_bits`). Weights do not change the
timing, so by default a randomly initialised VAE of the preset is used (``--model DIR`` loads a trained one).

    python benchmarks/vae_throughput.py --preset tiny --sizes 64 128 --batch-size 16 --device cpu --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from vargpt.config import get_preset
from vargpt.models.vae import BSQVAE


def _time(fn, iters: int, device: torch.device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--model", default=None, help="a `vargpt train vae` output directory (optional)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.model:
        from vargpt.training.vae import load_vae

        vae = load_vae(args.model, device)[0]
    else:
        vae = BSQVAE(get_preset(args.preset).vae).to(device).eval()
    g = torch.Generator().manual_seed(0)
    results = []
    for size in args.sizes:
        x = (torch.rand(args.batch_size, 3, size, size, generator=g) * 2 - 1).to(device)
        bits = vae.encode(x).bits
        t_enc = _time(lambda x=x: vae.encode(x), args.iters, device)
        t_dec = _time(lambda bits=bits: vae.decode_bits(bits), args.iters, device)
        results.append({"size": size, "batch_size": args.batch_size, "scales": len(bits),
                        "encode_images_per_s": round(args.batch_size / t_enc, 1),
                        "decode_images_per_s": round(args.batch_size / t_dec, 1)})
        print(json.dumps(results[-1]))
    report = {"preset": args.preset, "model": args.model, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "params_M": round(sum(p.numel() for p in vae.parameters()) / 1e6, 3), "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
