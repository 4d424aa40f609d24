"""Can the tiny vision tower learn to see ShapesWorld? Train the vision tower + merger of a preset (no LLM) with a
linear head on the pooled merged tokens to classify the shape / colour / cell of the one object in a scene, and
print held-out accuracy as it trains. Separates "the tower cannot learn" from "the LLM does not read it".

    python benchmarks/vision_probe.py [--target shape|colour|cell] [--minutes 5] [--lr 1e-3] [--batch 32]
        [--vision depth=2,embed_dim=64,num_heads=2,patch_size=4] [--pool mean|flat] [--threads 1]

``--pool flat`` concatenates the merged tokens (keeps where each one is), ``mean`` averages them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time

import torch
import torch.nn.functional as F
from torch import nn

from vargpt.config import get_preset
from vargpt.data.scene import COLOURS, SHAPES, sample_scene
from vargpt.data.scene import render as render_scene
from vargpt.models.vlm import build_vlm
from vargpt.processing import make_image_processor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", choices=("shape", "colour", "cell"), default="shape")
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--vision", default="", help="VisionConfig overrides, e.g. depth=4,embed_dim=128")
    ap.add_argument("--pool", choices=("mean", "flat"), default="mean")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = get_preset("tiny")
    over = {k: int(v) for k, v in (kv.split("=") for kv in args.vision.split(",") if kv)}
    cfg.vision = dataclasses.replace(cfg.vision, **over)
    vlm = build_vlm(cfg)
    visual = vlm.model.visual if hasattr(vlm.model, "visual") else vlm.visual
    proc = make_image_processor(cfg.vision)
    classes = {"shape": list(SHAPES), "colour": list(COLOURS), "cell": list(range(9))}[args.target]
    n_tok = (64 // (cfg.vision.patch_size * cfg.vision.spatial_merge_size)) ** 2
    head = nn.Linear(cfg.vision.hidden_size * (n_tok if args.pool == "flat" else 1), len(classes))
    opt = torch.optim.AdamW([*visual.parameters(), *head.parameters()], lr=args.lr, weight_decay=0.01)

    def batch(rng: random.Random, n: int):
        scenes = [sample_scene(rng, n_objects=1) for _ in range(n)]
        px = proc(images=[render_scene(s, 64) for s in scenes], return_tensors="pt")
        label = [classes.index({"shape": s.objects[0].shape, "colour": s.objects[0].colour,
                                "cell": s.objects[0].cell}[args.target]) for s in scenes]
        return px["pixel_values"], px["image_grid_thw"], torch.tensor(label)

    def logits(pv, grid):
        out = visual(pv, grid_thw=grid)
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        feats = feats.reshape(grid.shape[0], -1, feats.shape[-1])
        return head(feats.mean(1) if args.pool == "mean" else feats.flatten(1))

    test = batch(random.Random(12345), 256)
    rng, t0, step, curve = random.Random(0), time.time(), 0, []
    while time.time() - t0 < args.minutes * 60:
        pv, grid, y = batch(rng, args.batch)
        loss = F.cross_entropy(logits(pv, grid), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0:
            with torch.no_grad():
                acc = float((logits(test[0], test[1]).argmax(-1) == test[2]).float().mean())
            curve.append((step, round(time.time() - t0), round(loss.item(), 3), round(acc, 3)))
            print(*curve[-1], flush=True)
    print(json.dumps({"target": args.target, "vision": dataclasses.asdict(cfg.vision), "pool": args.pool,
                      "steps": step, "held_out_accuracy": curve[-1][-1] if curve else None,
                      "chance": round(1 / len(classes), 3)}))


if __name__ == "__main__":
    main()
