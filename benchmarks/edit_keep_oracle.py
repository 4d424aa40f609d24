"""An upper bound for "where to copy" in editing: edit success when every position outside the edit's true changed
region takes the signs of the residual source term (the bits a copy of the source draws) and only the rest is sampled,
as usual (cfg, tau, top-k/p of the model's defaults).

    python benchmarks/edit_keep_oracle.py MODEL [--split val] [--n 256] [--seeds 0,1,2] [--rule area:0.5]

The changed region comes from the edit's target: pixels that differ from the source's by more than 2/255, pooled to
the VAE's grid and grown by one position (as `vargpt.models.vae.keep_unchanged` does for the training labels). At a
scale of grid h x w a position is "changed" by ``--rule``: ``any`` when any finest-grid position under it changed,
``area:F`` when more than the fraction F of them did. ``--rule none`` is the model as it is (the control).
``--blank RULE`` also zeroes the decoder's source term inside the changed region chosen by RULE, as for a record
without a source: whether the source term, which says "keep what is here", is what stops a move or a swap.

A model whose keep decision (a learned head, a gate, a snap rule) were perfect would score this; what it cannot
reach here is lost by drawing the edit itself (applied), not by redrawing the rest. This is a measurement, not a
sampling mode: it replaces the sampling loop's bit draw (`vargpt.engine.loop.sample_bits`) and records its source
term (`vargpt.engine.loop.source_residual`) for the length of the run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vargpt.cli import _pipeline
from vargpt.data.scene import Scene, render
from vargpt.engine import loop
from vargpt.eval import tasks


def changed_grid(source, target_scene: dict, stride: int, size: int) -> torch.Tensor:
    """[H, W] 1.0 where the edit changes the picture (finest latent grid, grown by one position)."""
    def px(img):
        return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).float().div(127.5).sub(1)

    diff = (px(render(Scene.from_dict(target_scene), size)) - px(source)).abs().amax(0, keepdim=True)[None] > 2 / 255
    grid = F.max_pool2d(diff.float(), stride)
    return F.max_pool2d(grid, 3, stride=1, padding=1)[0, 0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--split", default="val")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rule", default="area:0.5", help="none | any | area:F")
    ap.add_argument("--blank", default="none", help="none | any | area:F: zero the decoder's source term inside the "
                    "changed region so chosen (the decoder is told nothing of the source there)")
    args = ap.parse_args()
    pipe = _pipeline(Path(args.model), "cpu", "auto")
    size = pipe.engine.config.image_size
    cases = tasks.edit_cases(args.n, split=args.split, size=size)
    stride = pipe.engine.model.vae_local.stride
    changed = {id(c.source): changed_grid(c.source, c.target, stride, size) for c in cases}
    state: dict = {}
    draw, residual = loop.sample_bits, loop.source_residual

    def edit_region(rule: str, hw: tuple[int, int]) -> torch.Tensor:  # [B, h*w, 1] True where the edit changes
        grid = state["changed"][:, None]
        if rule == "any":
            return (F.adaptive_max_pool2d(grid, hw) > 0).flatten(1)[..., None]
        return (F.adaptive_avg_pool2d(grid, hw) > float(rule.split(":")[1])).flatten(1)[..., None]

    def recorded_residual(source, summed, hw):
        state["term"], state["hw"] = residual(source, summed, hw), tuple(hw)
        if args.blank == "none":
            return state["term"]
        return state["term"].masked_fill(edit_region(args.blank, tuple(hw)), 0.0)

    def keep_outside_changes(logits, **kw):
        bits = draw(logits, **kw)
        if args.rule == "none" or "term" not in state:
            return bits
        return torch.where(edit_region(args.rule, state["hw"]), bits, (state["term"] > 0).long())

    edit_images = pipe.engine.edit_images

    def edit_with_oracle(images, instructions, **kw):
        state.clear()
        state["changed"] = torch.stack([changed[id(im)] for im in images])
        return edit_images(images, instructions, **kw)

    loop.sample_bits, loop.source_residual = keep_outside_changes, recorded_residual
    pipe.engine.edit_images = edit_with_oracle
    try:
        rep = tasks.evaluate_edit(pipe.engine, cases, seeds=[int(s) for s in args.seeds.split(",")], batch=16,
                                  progress=False)
    finally:
        loop.sample_bits, loop.source_residual = draw, residual
    print(json.dumps({"model": args.model, "rule": args.rule, "blank": args.blank, "split": args.split, "n": args.n,
                      **{k: round(rep[k]["mean"], 4) for k in ("score", "satisfied", "preserved")},
                      "score_range": [rep["score"]["min"], rep["score"]["max"]],
                      "by_group": {k: round(v, 3) for k, v in rep["by_group"].items()},
                      "vae_ceiling": rep["vae_ceiling"]["score"]}))


if __name__ == "__main__":
    main()
