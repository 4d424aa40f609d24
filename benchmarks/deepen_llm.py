"""A starting checkpoint with a deeper (or shallower) LLM: the vision tower, merger, image places and every other
non-LLM module copied from SRC, the LLM and lm_head freshly initialised (seed 0) at LAYERS layers. For the
understanding stage, whose input (the vision stage's output) carries an untrained LLM anyway.

    python benchmarks/deepen_llm.py runs/tiny/vision/model runs/s20/vision_l8/model 8

Session 20 trained `recipes/tiny/understanding.yaml` from such an 8-layer start (`model.checkpoint=DST
model.config_overrides.llm.num_hidden_layers=8`): val VQA 0.840 against 0.766 for 4 layers (docs/training.md).
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from vargpt.models.vargpt import VARGPT


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("layers", type=int)
    args = ap.parse_args()
    model = VARGPT.from_pretrained(args.src)
    cfg = dataclasses.replace(model.config, llm=dataclasses.replace(model.config.llm, num_hidden_layers=args.layers))
    torch.manual_seed(0)
    new = VARGPT(cfg, tokenizer=model.processor.tokenizer if model.processor else None)
    kept = {k: v for k, v in model.state_dict().items() if not k.startswith(("model.", "lm_head."))}
    missing, unexpected = new.load_state_dict(kept, strict=False)
    assert not unexpected and all(k.startswith(("model.", "lm_head.")) for k in missing), (missing, unexpected)
    new.save_pretrained(args.dst)
    print(f"{args.dst}: {args.layers}-layer LLM (fresh), {len(kept)} tensors copied from {args.src}")


if __name__ == "__main__":
    main()
