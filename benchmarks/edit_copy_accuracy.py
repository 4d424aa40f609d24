"""Teacher-forced bit accuracy of an edit model on the last 64 records of an edit data set, per scale: on the bits
where the label equals the source's own bit (what a copy gets right) and on the others.

    python benchmarks/edit_copy_accuracy.py MODEL_DIR [DATA_DIR]   # DATA_DIR default runs/tiny/data/edit64
"""

import sys

import torch

from vargpt.data.records import Collator, RecordDataset, read_records
from vargpt.models.vargpt import VARGPT
from vargpt.training import objective


def main() -> None:
    model = VARGPT.from_pretrained(sys.argv[1]).eval()
    data = sys.argv[2] if len(sys.argv) > 2 else "runs/tiny/data/edit64"
    recs = read_records(f"{data}/records.jsonl", "shapesworld")[-64:]
    ds = RecordDataset(recs, model.require_processor(), image_size=64, stride=model.config.vae.stride,
                       pad_multiple=model.config.decoder.pad_to_multiplier, source_condition=True)
    batch = Collator(model.require_processor())([ds[i] for i in range(len(recs))])
    with torch.no_grad():
        out, _ = objective.teacher_forced(model, batch)
        B, L, _ = out.gen_logits_BLV.shape
        pred = out.gen_logits_BLV.float().view(B, L, -1, 2).argmax(-1)
        label = out.bit_labels_BLD.long()
        src = model.vae_local.encode(batch["gen_source_pixel_values"], out.schedule).labels_BLD.long()
    start = 0
    for k, (_, h, w) in enumerate(out.schedule):
        s = slice(start, start + h * w)
        start += h * w
        same, ok = src[:, s] == label[:, s], pred[:, s] == label[:, s]
        as_source = (pred[:, s] == src[:, s]).float().mean()
        print(f"scale {k} {h}x{w}: copy bits {ok[same].float().mean():.4f} ({same.float().mean():.2f} of bits), "
              f"changed bits {ok[~same].float().mean():.3f}, prediction == source {as_source:.3f}")


if __name__ == "__main__":
    main()
