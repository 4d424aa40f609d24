"""Seconds per training step of a recipe, fp32 against bf16 autocast (``precision: bf16``), on the CPU or a GPU:
the recipe's model, freezing and batch size, batches drawn uniformly from the first ``--records`` records of each
data source; blocks of steps alternate between the two so that a busy machine slows both alike. Prints one JSON
line: the median step time of each and the ratio.

    python benchmarks/train_step_time.py recipes/tiny/understanding.yaml model.checkpoint=runs/tiny/vision/model \
        model.tokenizer=runs/tiny/tokenizer data.sources.0.path=runs/tiny/data/und64 [--threads 1] [--blocks 4]

Overrides are the trainer's (``key=value``). Session 20 (2-core AMD EPYC with avx512_bf16, 1 thread): the
understanding recipe (batch 32) 1.054 s fp32 / 0.724 s bf16, measured beside two trainings; the editing recipe
(batch 8) 0.31 / 0.26 s on an idle core.
Whole stages gain less than these single-process steps say (session 21, docs/training.md): the understanding stage
(one process) ran 22% faster in bf16, the two-process text-to-image and editing stages 0-10% (gen 5% slower).
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext

import torch

from vargpt.data.records import Collator, RecordDataset, read_records
from vargpt.training.objective import training_losses
from vargpt.training.recipe import load_recipe, trainable_modules
from vargpt.training.trainer import apply_freezing, build_model, build_processor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--blocks", type=int, default=4, help="blocks of --steps steps per precision")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--records", type=int, default=2000, help="records read per data source")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe, args.overrides)
    records = []
    for src in recipe.data.sources:
        recs = [r for r in read_records(src.path, src.format, root=src.root) if r.task in src.tasks]
        records += [r for r in recs if not r.is_pair][:args.records]
    torch.manual_seed(recipe.seed)
    model = build_model(recipe).to(args.device)
    apply_freezing(model, trainable_modules(recipe))
    model.train()
    processor = build_processor(model, recipe)
    source_condition = model.config.decoder.source_condition
    ds = RecordDataset(records, processor, image_size=recipe.data.image_size, stride=model.config.vae.stride,
                       gen_transform=recipe.data.gen_transform, pad_multiple=model.config.decoder.pad_to_multiplier,
                       seed=recipe.seed, source_condition=source_condition)
    collate = Collator(processor)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    device_type = torch.device(args.device).type

    def step(bf16: bool) -> float:
        idx = torch.randint(len(ds), (recipe.batch_size,), generator=gen).tolist()
        batch = collate([ds[(i, 0)] for i in idx])
        t = time.perf_counter()
        amp = torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else nullcontext()
        with amp:
            loss = training_losses(model, batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device_type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for bf16 in (False, True):  # warm-up
        step(bf16)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.blocks):
        for bf16 in (False, True):
            times[bf16] += [step(bf16) for _ in range(args.steps)]
    fp32, bf16 = (sorted(v)[len(v) // 2] for v in (times[False], times[True]))
    print(json.dumps({"recipe": args.recipe, "batch": recipe.batch_size, "threads": args.threads,
                      "device": args.device, "fp32_s": round(fp32, 4), "bf16_s": round(bf16, 4),
                      "bf16_speedup": round(fp32 / bf16, 3), "steps_each": len(times[False])}))


if __name__ == "__main__":
    main()
