"""The VAE ceiling of a model on held-out ShapesWorld targets: the checker's score on the VAE's reconstructions of
the text-to-image and edit targets (what no generator on that VAE can beat), per category.

    python benchmarks/vae_ceiling.py [--model DIR] --sizes 64 128 --n 200 [--raw] [--t2i-layout canonical]

``--model``: a full VARGPT directory or a `vargpt train vae` run (default: the embedded default); ``--raw``: score
the renders themselves (the checker's own ceiling, no VAE); ``--t2i-layout canonical``: text-to-image targets in the
canonical layout the embedded default is trained to draw (the held-out records' own targets by default).
"""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import torch

from vargpt.eval import tasks
from vargpt.pipeline import default_model_dir
from vargpt.training.vae import load_vae


class _Identity(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def quantize(self, x):
        return SimpleNamespace(quantized_BDHW=x)

    def decode(self, z):
        return z


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--split", default="test")
    ap.add_argument("--raw", action="store_true")
    ap.add_argument("--t2i-layout", default="random", choices=["random", "canonical"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    vae = _Identity() if args.raw else load_vae(args.model or default_model_dir())[0]
    for size in args.sizes:
        t2i = tasks.vae_ceiling(vae, tasks.t2i_cases(args.n, split=args.split, layout=args.t2i_layout), size=size)
        edit = tasks.vae_ceiling(vae, tasks.edit_cases(args.n, split=args.split, size=size), size=size)
        print(json.dumps({"size": size, "t2i": t2i, "edit": edit}))


if __name__ == "__main__":
    main()
