"""Teacher-forced copy fidelity of an edit model, per scale, on the last N records of an edit data set.

A position is *copyable* when every one of its label bits is what a copy of the source gives: the sign of the
residual source term (``decoder.source_input: residual``) or the source's own bits (``bits``). For copyable and
other positions: the share of bits the model's argmax gets right, the share of positions with ALL bits right, and
the mean probability of the right bit. With the residual term, the copyable bits' error rate by the size of the
source entry |s| (entries are l2-normalised residuals times sqrt(D), so ~1 on average) shows whether the misses sit
where the source's sign is faint.

    python benchmarks/edit_copy_accuracy.py MODEL_DIR [--data runs/tiny/data/edit64] [--n 64]
"""

import argparse

import torch

from vargpt.data.records import Collator, RecordDataset, read_records
from vargpt.models.vargpt import VARGPT
from vargpt.training import objective

BUCKETS = ((0, 0.05), (0.05, 0.1), (0.1, 0.2), (0.2, 0.5), (0.5, 1.0), (1.0, float("inf")))


def _stats(ok: torch.Tensor, all_ok: torch.Tensor, p_right: torch.Tensor, where: torch.Tensor) -> str:
    if not bool(where.any()):
        return "-"
    return (f"bits {ok[where].float().mean():.4f}, positions {all_ok[where].float().mean():.3f}, "
            f"p {p_right[where].mean():.4f}")


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--data", default="runs/tiny/data/edit64")
    ap.add_argument("--n", type=int, default=64)
    args = ap.parse_args()
    model = VARGPT.from_pretrained(args.model).eval()
    recs = read_records(f"{args.data}/records.jsonl", "shapesworld")[-args.n:]
    ds = RecordDataset(recs, model.require_processor(), image_size=model.config.image_size,
                       stride=model.config.vae.stride, pad_multiple=model.config.decoder.pad_to_multiplier,
                       source_condition=True)
    batch = Collator(model.require_processor())([ds[i] for i in range(len(recs))])
    out, _ = objective.teacher_forced(model, batch)
    B, L, _ = out.gen_logits_BLV.shape
    logp = out.gen_logits_BLV.float().view(B, L, -1, 2).log_softmax(-1)
    label = out.bit_labels_BLD.long()
    p_right = logp.gather(-1, label.unsqueeze(-1)).squeeze(-1).exp()
    ok = logp.argmax(-1) == label
    residual = model.config.decoder.source_input == "residual"
    if residual:
        copy = (out.source_BLD > 0).long()
    else:
        src = batch["gen_source_pixel_values"].to(model.device)
        copy = model.vae_local.encode(src, out.schedule).labels_BLD.long()
    copyable = (copy == label).all(-1)  # [B, L]
    all_ok = ok.all(-1)
    print(f"{args.model}: {args.n} records, source term {model.config.decoder.source_input}")
    start = 0
    for k, (_, h, w) in enumerate(out.schedule):
        s = slice(start, start + h * w)
        start += h * w
        c = copyable[:, s]
        print(f"scale {k} {h}x{w}: copyable {c.float().mean():.2f} of positions: "
              f"{_stats(ok[:, s], all_ok[:, s], p_right[:, s], c)} | other: "
              f"{_stats(ok[:, s], all_ok[:, s], p_right[:, s], ~c)}")
    if residual:
        mag = out.source_BLD.abs()
        bits = copyable.unsqueeze(-1).expand_as(label)
        for lo, hi in BUCKETS:
            m = bits & (mag >= lo) & (mag < hi)
            print(f"copyable bits with |s| in [{lo}, {hi}): {m.float().sum() / bits.float().sum():.3f} of them, "
                  f"error {(~ok[m]).float().mean():.4f}")


if __name__ == "__main__":
    main()
