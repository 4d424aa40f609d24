"""What classifier-free guidance does to an edit model's bits, teacher-forced (clean) on the last N records of an
edit data set: the conditional row and the unconditional one (prompt dropped, source kept, as sampling builds it)
on the same inputs; at copyable positions (every label bit a copy of the source, `edit_copy_accuracy.py`) and the
others, how often each row and the mix ``cfg * c + (1 - cfg) * u`` get a bit right, and how often a bit right in
both rows turns wrong once mixed.

    python benchmarks/edit_guidance_flips.py MODEL_DIR [--data runs/tiny/data/edit64] [--n 64]
"""

import argparse

import torch

from vargpt.data.records import Collator, RecordDataset, read_records
from vargpt.models.vargpt import VARGPT
from vargpt.training import objective


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--data", default="runs/tiny/data/edit64")
    ap.add_argument("--n", type=int, default=64)
    args = ap.parse_args()
    model = VARGPT.from_pretrained(args.model).eval()
    if model.config.decoder.source_input != "residual":
        raise SystemExit("this benchmark reads the residual source term (decoder.source_input: residual)")
    recs = read_records(f"{args.data}/records.jsonl", "shapesworld")[-args.n:]
    ds = RecordDataset(recs, model.require_processor(), image_size=model.config.image_size,
                       stride=model.config.vae.stride, pad_multiple=model.config.decoder.pad_to_multiplier,
                       source_condition=True)
    batch = Collator(model.require_processor())([ds[i] for i in range(len(recs))])
    out_c, seen = objective.teacher_forced(model, batch)
    drop = torch.ones(seen["input_ids"].shape[0], dtype=torch.bool)
    out_u = model.forward_generation(objective.drop_prompts(model, seen, drop),
                                     cond_BD=objective._start_condition(model, drop), tokens=out_c.tokens)
    B, L, _ = out_c.gen_logits_BLV.shape
    label = out_c.bit_labels_BLD.long()
    toward = label * 2 - 1  # margins toward the label: (logit(1) - logit(0)) * (+1 or -1)
    margin_c, margin_u = ((o.gen_logits_BLV.float().view(B, L, -1, 2).diff(dim=-1).squeeze(-1)) * toward
                          for o in (out_c, out_u))
    copyable = ((out_c.source_BLD > 0).long() == label).all(-1, keepdim=True).expand_as(label)
    for name, where in (("copyable", copyable), ("other", ~copyable)):
        mc, mu = margin_c[where], margin_u[where]
        print(f"{name} bits: conditional right {(mc > 0).float().mean():.4f}, "
              f"unconditional {(mu > 0).float().mean():.4f} (median margins {mc.median():.2f} / {mu.median():.2f})")
        for cfg in (1.5, 2.0, 3.0):
            mix = cfg * mc + (1 - cfg) * mu
            flipped = (mc > 0) & (mu > 0) & (mix <= 0)
            print(f"  cfg {cfg}: mix right {(mix > 0).float().mean():.4f}; right in both rows, wrong mixed "
                  f"{flipped.float().mean():.4f}")


if __name__ == "__main__":
    main()
