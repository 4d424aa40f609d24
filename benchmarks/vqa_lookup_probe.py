"""After which LLM block a question has looked its objects up: linear probes on the answer position's hidden state
(the last prompt token) after each block, for pictures of two objects A and B, predicting the cell of A and the cell
of B (9 classes each; chance about 0.11-0.2) and, for "relative", the yes/no answer (always "no": about 0.62).

    python benchmarks/vqa_lookup_probe.py MODEL [--question relative|where] [--n 4000]

``relative`` asks "Is A <relation> B?", ``where`` asks "Where is A?". Probes are fitted on 75% of the pictures and
scored on the rest. Session 26 (docs/training.md): in the shipped understanding stage, "Where is A?" has A's cell at
0.93 only after the last block (0.48 after blocks 1-3), and "Is A left of B?" never has either cell (0.41-0.48), so
no block is left to compare two places; with the answer loss also taken after block 2 (``early_exit_layer``) A's cell
is there at 0.90 after block 2.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from torch import Tensor

from vargpt.data.scene import render, sample_scene
from vargpt.data.shapesworld import HELDOUT_PAIRS, RELATION_TEXT, RELATIONS, ref_text, relation_holds, unique_ref
from vargpt.pipeline import VARGPTPipeline


def cases(n: int, question: str, seed: int = 0) -> list[tuple[str, object, int, int, int]]:
    """(question, picture, cell of A, cell of B, answer yes) for n random two-object training-split scenes."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene = sample_scene(rng, n_objects=2, allowed=lambda s, c: (s, c) not in HELDOUT_PAIRS)
        a, b = rng.sample(scene.objects, 2)
        relation = rng.choice(RELATIONS)
        text = (f"Is {ref_text(unique_ref(a, scene))} {RELATION_TEXT[relation]} {ref_text(unique_ref(b, scene))}?"
                if question == "relative" else f"Where is {ref_text(unique_ref(a, scene))}?")
        out.append((text, render(scene, 64), a.cell, b.cell, int(relation_holds(a, b, relation))))
    return out


def probe_accuracy(x: Tensor, y: Tensor, classes: int, n_fit: int, steps: int = 300) -> float:
    """Held-out accuracy of a linear classifier fitted (full batch, Adam) on the first n_fit rows."""
    x = (x - x[:n_fit].mean(0)) / (x[:n_fit].std(0) + 1e-5)
    lin = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(lin(x[:n_fit]), y[:n_fit]).backward()
        opt.step()
    with torch.no_grad():
        return (lin(x[n_fit:]).argmax(1) == y[n_fit:]).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--question", choices=("relative", "where"), default="relative")
    ap.add_argument("--n", type=int, default=4000)
    args = ap.parse_args()
    torch.manual_seed(0)
    pipe = VARGPTPipeline.from_pretrained(args.model, device="cpu")
    rows = cases(args.n, args.question)
    states = []
    with torch.no_grad():
        for text, image, *_ in rows:
            out = pipe.model(**pipe.chat_inputs(text, image), output_hidden_states=True)
            states.append(torch.stack([h[0, -1] for h in out.hidden_states]))
    x = torch.stack(states)  # [n, blocks + 1, hidden]
    targets = {"cell_a": (2, 9), "cell_b": (3, 9)} | ({"answer": (4, 2)} if args.question == "relative" else {})
    n_fit = int(0.75 * len(rows))
    for block in range(x.shape[1]):
        scores = {name: round(probe_accuracy(x[:, block], torch.tensor([r[i] for r in rows]), k, n_fit), 3)
                  for name, (i, k) in targets.items()}
        print(json.dumps({"model": str(args.model), "question": args.question, "after_block": block, **scores}))


if __name__ == "__main__":
    main()
