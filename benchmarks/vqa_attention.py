"""Where the answer looks: the attention of the position that predicts an answer's first token, per LLM layer and
head, on the image tokens of the object the question names against the image tokens of the other objects.

    python benchmarks/vqa_attention.py MODEL [--n 800] [--split val] [--types where,colour] [--json PATH]

Reads the single-question records among the first ``--n`` of the split (ShapesWorld, 64 px) whose picture holds two
or more objects and whose question names one of them ("Where is the purple diamond?", "What colour is the
triangle?"). An image token belongs to an object when the object covers over a quarter of its pixels (the object
rendered alone on the picture's background). Per (question type, answered right) and per head: ``target`` and
``others``, the shares of the head's image attention on the named object's tokens and on the other objects' tokens,
``image``, the head's attention on image tokens at all; and ``top``, the image token (index in the merged grid,
row-major) or text token each head attends to most often.

Session 22 (shipped default): on "colour" questions the heads of layers 2-3 put 0.9-1.0 of their image attention
on objects (0.35-0.44 on the named one); on "where" questions the image-attending heads of layers 2-3 look at fixed
background tokens (the same merged token for most questions) and almost never at an object: the model answers
"where" by probing fixed places, not by looking the object up.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch

from vargpt.data.scene import Scene, render
from vargpt.data.shapesworld import make_record, ref_text, unique_ref
from vargpt.eval.checker import normalise_answer
from vargpt.models.vlm import embed_inputs, rope_positions
from vargpt.pipeline import VARGPTPipeline

MERGED = 8  # merged tokens per side of a 64 px picture (patch 4, merge 2)


def coverage(scene: Scene, obj_index: int) -> np.ndarray:
    """Share of each merged token's pixels that object ``obj_index`` covers, [MERGED * MERGED]."""
    d = scene.to_dict()
    alone = render(Scene.from_dict(d | {"objects": [d["objects"][obj_index]]}), 64)
    empty = render(Scene.from_dict(d | {"objects": []}), 64)
    mask = np.abs(np.asarray(alone, dtype=int) - np.asarray(empty, dtype=int)).sum(-1) > 30
    side = 64 // MERGED
    return mask.reshape(MERGED, side, MERGED, side).mean(axis=(1, 3)).reshape(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=None, help="model directory (default: the embedded one)")
    ap.add_argument("--n", type=int, default=800)
    ap.add_argument("--split", default="val")
    ap.add_argument("--types", default="where,colour")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    pipe = VARGPTPipeline.from_pretrained(args.model, device="cpu")
    model = pipe.model
    vlm = model.vlm
    lm = vlm.model.language_model
    lm.config._attn_implementation = "eager"  # sdpa returns no attention weights
    tok = pipe.processor.tokenizer
    pad = model.config.tokens.image_pad
    types = args.types.split(",")
    shares: dict[tuple[str, bool], dict[str, list[tuple[float, float, float]]]] = defaultdict(lambda: defaultdict(list))
    tops: dict[tuple[str, bool], dict[str, Counter[str]]] = defaultdict(lambda: defaultdict(Counter))
    for i in range(args.n):
        rec, images = make_record(i, split=args.split, tasks=("vqa",))
        qtype, scene = rec["meta"]["qtype"], Scene.from_dict(rec["scene"])
        if qtype not in types or len(scene.objects) < 2:
            continue
        question = rec["messages"][0]["content"].removeprefix("<image>\n")
        named = [j for j, o in enumerate(scene.objects)
                 if ref_text(unique_ref(o, scene, with_colour=qtype != "colour")) in question]
        if len(named) != 1:
            continue
        inputs = pipe.chat_inputs(question, next(iter(images.values())))
        ids = inputs["input_ids"]
        with torch.no_grad():
            embeds = embed_inputs(vlm, ids, inputs["pixel_values"], inputs["image_grid_thw"],
                                  getattr(model, "image_place", None))
            positions, _ = rope_positions(vlm, ids, inputs["image_grid_thw"], inputs["attention_mask"])
            out = lm(inputs_embeds=embeds, position_ids=positions, attention_mask=inputs["attention_mask"],
                     output_attentions=True)
            first = tok.decode([int(vlm.lm_head(out.last_hidden_state[:, -1]).argmax())])
        truth = rec["messages"][1]["content"]
        right = normalise_answer(first).split()[:1] == normalise_answer(truth).split()[:1]
        slots = (ids[0] == pad).nonzero().squeeze(1)
        target = torch.from_numpy(coverage(scene, named[0]) > 0.25)
        others = torch.zeros_like(target)
        for j in range(len(scene.objects)):
            if j != named[0]:
                others |= torch.from_numpy(coverage(scene, j) > 0.25)
        others &= ~target
        for layer, att in enumerate(out.attentions):
            row = att[0, :, -1]  # heads x sequence
            for h in range(row.shape[0]):
                on_image = row[h, slots]
                mass = float(on_image.sum())
                key = f"L{layer}H{h}"
                shares[(qtype, right)][key].append((float(on_image[target].sum()) / max(mass, 1e-9),
                                                    float(on_image[others].sum()) / max(mass, 1e-9), mass))
                j = int(row[h].argmax())
                top = f"img{j - int(slots[0])}" if bool((slots == j).any()) else repr(tok.decode([int(ids[0, j])]))
                tops[(qtype, right)][key][top] += 1
    report = {}
    for key in sorted(shares):
        qtype, right = key
        name = f"{qtype} ({'right' if right else 'wrong'})"
        heads = {}
        for head, rows in shares[key].items():
            v = np.array(rows)
            top, count = tops[key][head].most_common(1)[0]
            heads[head] = {"target": round(float(v[:, 0].mean()), 3), "others": round(float(v[:, 1].mean()), 3),
                           "image": round(float(v[:, 2].mean()), 3), "top": f"{top} ({count}/{len(v)})"}
        report[name] = {"n": len(next(iter(shares[key].values()))), "heads": heads}
        print(f"{name}: n = {report[name]['n']}")
        for head, s in heads.items():
            print(f"  {head}: target {s['target']:.2f}  others {s['others']:.2f}  image {s['image']:.2f}  "
                  f"top {s['top']}")
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model or "embedded default"), "split": args.split,
                                         "n": args.n, **report}, indent=1) + "\n")


if __name__ == "__main__":
    main()
