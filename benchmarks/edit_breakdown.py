"""Why edits fail: for every object an edit should leave alone, what became of it in the edited picture, and the
same for the VAE's reconstruction of the edit's target (what no generator on this VAE can beat); and, for moves and
swaps, where each relocated object went.

    python benchmarks/edit_breakdown.py --model runs/tiny/edit/model --split val --n 256

Edit i is drawn with seed i at the model's sampling settings. An untouched object is ``kept`` (the checker's
preservation rule: same shape, colour, size and cell, centre within 0.05), ``shifted`` (same four, centre off by
more), or changed in one or more of ``shape`` / ``colour`` / ``size`` / ``cell`` (the nearest object of the picture
within a cell's width), or ``missing`` (no object near it). A relocated object is found at its ``new cell``, its
``old cell`` or ``elsewhere`` (by shape, colour and size), else what the object at its new cell got wrong
(`moved_fates`). Prints one JSON line: pass rates (score, satisfied, preserved) per edit kind, the fates of untouched
objects for the model and for the VAE ceiling, and the counts of relocated objects' fates.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import numpy as np
import torch

from vargpt.data.scene import Scene, render
from vargpt.engine import to_pil
from vargpt.eval.checker import apply_edit, parse_edit, parse_scene, score_edit
from vargpt.eval.tasks import edit_cases
from vargpt.pipeline import VARGPTPipeline


def fate(want, objects, tol: float = 0.05, near: float = 1 / 3) -> str:
    """What became of the object ``want`` among the parsed ``objects`` (see the module docstring)."""
    same = [o for o in objects if o.key() == want.key()]
    if any(abs(o.cx - want.cx) <= tol and abs(o.cy - want.cy) <= tol for o in same):
        return "kept"
    if same:
        return "shifted"
    close = [o for o in objects if abs(o.cx - want.cx) < near and abs(o.cy - want.cy) < near]
    if not close:
        return "missing"
    o = min(close, key=lambda o: (o.cx - want.cx) ** 2 + (o.cy - want.cy) ** 2)
    return "+".join(a for a in ("shape", "colour", "size", "cell") if getattr(o, a) != getattr(want, a)) or "kept"


def untouched_fates(case, picture) -> list[str]:
    expected, changed = apply_edit(parse_scene(case.source), parse_edit(case.instruction))
    objects = parse_scene(picture).objects
    return [fate(o, objects) for i, o in enumerate(expected.objects) if i not in changed]


def moved_fates(case, picture) -> list[str]:
    """For a move or swap: where each relocated object went (``new cell``, ``old cell``, ``elsewhere``), or, with
    no object of its shape, colour and size anywhere, what the object drawn at its new cell got wrong."""
    source = parse_scene(case.source)
    expected, changed = apply_edit(source, parse_edit(case.instruction))
    objects = parse_scene(picture).objects
    out = []
    for i in changed:
        want = expected.objects[i]
        look = (want.shape, want.colour, want.size)
        cells = {o.cell for o in objects if (o.shape, o.colour, o.size) == look}
        old = next(o.cell for o in source.objects if (o.shape, o.colour, o.size) == look)
        if cells:
            out.append("new cell" if want.cell in cells else "old cell" if old in cells else "elsewhere")
            continue
        there = [o for o in objects if o.cell == want.cell]
        out.append("new cell, wrong " + "+".join(a for a in ("shape", "colour", "size")
                                                if getattr(there[0], a) != getattr(want, a)) if there else "missing")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model directory (default: the embedded one)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = VARGPTPipeline.from_pretrained(args.model, device="cpu", progress=False).engine
    vae = engine.model.vae_local
    cases = [c for c in edit_cases(args.n, split=args.split) if c.target is not None]
    total, rates, fates, ceiling, moved = Counter(), Counter(), Counter(), Counter(), Counter()
    for start in range(0, len(cases), args.batch):
        chunk = cases[start:start + args.batch]
        edited = to_pil(engine.edit_images([c.source for c in chunk], [c.instruction for c in chunk],
                                           seed=start).images)
        size = edited[0].size[0]
        x = torch.stack([torch.from_numpy(np.array(render(Scene.from_dict(c.target), size))).permute(2, 0, 1)
                         for c in chunk]).float().div(127.5).sub(1)
        with torch.no_grad():
            recon = to_pil(vae.decode(vae.quantize(x).quantized_BDHW).float())
        for case, picture, rec in zip(chunk, edited, recon, strict=True):
            try:
                v = score_edit(case.source, case.instruction, picture)
                verdict = (v.score, float(v.satisfied), float(v.preserved))
            except Exception:  # noqa: BLE001 - an unreadable picture scores 0 everywhere, as in `vargpt eval`
                verdict = (0.0, 0.0, 0.0)
            for key in (case.kind, "all"):
                total[key] += 1
                for name, value in zip(("score", "satisfied", "preserved"), verdict, strict=True):
                    rates[key, name] += value
            fates.update(untouched_fates(case, picture))
            if case.kind in ("move", "swap"):
                moved.update(f"{case.kind}: {f}" for f in moved_fates(case, picture))
            ceiling.update(untouched_fates(case, rec))
    n_objects = sum(fates.values())
    print(json.dumps({
        "model": args.model or "embedded default", "split": args.split, "n": dict(total),
        "rates": {k: {name: round(rates[k, name] / total[k], 3) for name in ("score", "satisfied", "preserved")}
                  for k in sorted(total)},
        "untouched_objects": n_objects,
        "fates": {k: round(v / n_objects, 3) for k, v in fates.most_common()},
        "vae_ceiling_fates": {k: round(v / n_objects, 3) for k, v in ceiling.most_common()},
        "moved_objects": dict(sorted(moved.items())),
    }))


if __name__ == "__main__":
    main()
