"""Seconds per text-to-image training step of the tiny VARGPT for several VAE layouts (tokens per image decide
the cost: the LLM and the visual decoder both run over every image token), random weights, one batch of
ShapesWorld text-to-image records.

    python benchmarks/gen_step_time.py [--layouts s8d16 s4d16 s8d64] [--batch 16] [--threads 1] [--steps 4]

Layouts: ``sSdD`` = VAE stride S (ch_mult 1,1,2,2 for 8, 1,1,2 for 4) with D bits per token, at 64 px, image
slots padded to a multiple of 8. Needs no data on disk (records are made in memory) and no tokenizer (bytes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import tempfile
import time

import torch

from vargpt.config import tiny_config
from vargpt.data.records import Collator, RecordDataset, read_records
from vargpt.data.shapesworld import write_dataset
from vargpt.models.vargpt import VARGPT
from vargpt.processing import ByteTokenizer, VARGPTProcessor
from vargpt.scales import num_tokens, padded_tokens, schedule_for_size
from vargpt.training.objective import training_losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", nargs="+", default=["s8d16", "s4d16", "s8d64"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4, help="timed steps (the first is reported apart)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        write_dataset(tmp, n=args.batch, size=64, tasks=("t2i",), t2i_layout="canonical", progress=False)
        records = read_records(tmp)
        for layout in args.layouts:
            m = re.fullmatch(r"s(4|8)d(\d+)", layout)
            if m is None:
                raise SystemExit(f"layout {layout!r}: use sSdD with S 4 or 8, e.g. s8d64")
            stride, bits = int(m[1]), int(m[2])
            cfg = tiny_config()
            ch_mult = (1, 1, 2) if stride == 4 else (1, 1, 2, 2)
            cfg.vae = dataclasses.replace(cfg.vae, ch_mult=ch_mult, codebook_dim=bits)
            cfg.decoder = dataclasses.replace(cfg.decoder, pad_to_multiplier=8)
            schedule = schedule_for_size(64, 64, stride)
            cfg.image_gen_token_num = padded_tokens(schedule, 8)
            cfg.validate()
            torch.manual_seed(0)
            model = VARGPT(cfg).train()
            proc = VARGPTProcessor(ByteTokenizer(cfg.tokens), cfg)
            ds = RecordDataset(records, proc, image_size=64, stride=stride, pad_multiple=8)
            batch = Collator(proc)([ds[(i, 0)] for i in range(args.batch)])
            opt = torch.optim.AdamW([p for n, p in model.named_parameters() if not n.startswith("vae_local")])
            times = []
            for _ in range(args.steps):
                t = time.perf_counter()
                training_losses(model, batch)["loss"].backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                times.append(time.perf_counter() - t)
            print(json.dumps({"layout": layout, "image_tokens": num_tokens(schedule), "slots": cfg.image_gen_token_num,
                              "batch": args.batch, "threads": args.threads, "first_s": round(times[0], 2),
                              "step_s": round(sorted(times[1:])[len(times[1:]) // 2], 2)}), flush=True)


if __name__ == "__main__":
    main()
