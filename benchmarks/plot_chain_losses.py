"""One picture of the embedded default's training: the loss curve of every stage of a
`scripts/build_embedded_default.sh` run (VAE: train PSNR; DPO: loss and reward accuracy).

    python benchmarks/plot_chain_losses.py --root runs/tiny --out docs/embedded_losses.png
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# (run, csv, x column, [(y column, label)], log y)
PANELS = [
    ("vae", "log.csv", "step", [("psnr_db", "train PSNR (dB)")], False),
    ("understanding", "metrics.csv", "step", [("loss", "answer loss")], True),
    ("understanding2", "metrics.csv", "step", [("text_loss", "answer loss"), ("early_loss", "after block 2")], True),
    ("understanding3", "metrics.csv", "step", [("text_loss", "answer loss"), ("early_loss", "after block 2")], True),
    ("gen", "metrics.csv", "step", [("bit_loss", "bit loss"), ("text_loss", "text loss")], True),
    *((name, "metrics.csv", "step", [("bit_loss", "bit loss"), ("text_loss", "text loss")], True)
      for name in ("edit", *(f"edit{i}" for i in range(2, 13)))),
    ("dpo", "metrics.csv", "step", [("loss", "DPO loss"), ("rewards_accuracy", "reward accuracy")], False),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("runs/tiny"))
    ap.add_argument("--out", type=Path, default=Path("docs/embedded_losses.png"))
    args = ap.parse_args()
    # the stages this chain ran (one continued from a given model, CONTINUE_FROM, lacks those up to it)
    panels = [p for p in PANELS if (args.root / p[0] / p[1]).is_file()]
    if not panels:
        raise SystemExit(f"{args.root}: no stage of a build_embedded_default.sh chain with a loss log")
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    axes = axes[0]
    for ax, (run, name, x, ys, log) in zip(axes, panels, strict=True):
        rows = list(csv.DictReader((args.root / run / name).open()))
        for y, label in ys:
            if y in rows[0]:
                ax.plot([float(r[x]) for r in rows], [float(r[y]) for r in rows], label=label, lw=1)
        ax.set_title(run)
        ax.set_xlabel(x)
        if log:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(args.out)


if __name__ == "__main__":
    main()
