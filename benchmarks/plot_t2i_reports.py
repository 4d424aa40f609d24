"""Bar chart of `vargpt eval t2i` reports side by side: the GenEval-style score overall and per category (mean over
sampling seeds; overall bars carry the min-max range across seeds), and object recall.

    python benchmarks/plot_t2i_reports.py runs/eval/t2i64_t3a_long.json:SFT runs/eval/t2i64_dpo64.json:DPO \
        --out docs/dpo_gains.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+", help="REPORT.json:LABEL (label defaults to the file stem)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--title", default="Held-out text-to-image prompts, ShapesWorld checker")
    args = ap.parse_args()
    reps = []
    for spec in args.reports:
        path, _, label = spec.partition(":")
        reps.append((label or Path(path).stem, json.loads(Path(path).read_text())))
    cats = sorted({c for _, r in reps for c in r["by_group"]})
    groups = ["overall", *cats, "object recall"]
    width = 0.8 / len(reps)
    fig, ax = plt.subplots(figsize=(10, 3.6))
    for i, (label, r) in enumerate(reps):
        vals = [r["score"]["mean"], *(r["by_group"].get(c, 0.0) for c in cats), r["object_recall"]["mean"]]
        xs = [g + (i - (len(reps) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, vals, width, label=f"{label} (n={r['n']}, seeds {','.join(map(str, r['seeds']))})")
        ends = [r["score"], r["object_recall"]]  # seed ranges: per-category values are seed means only
        ax.errorbar([xs[0], xs[-1]], [e["mean"] for e in ends], fmt="none", ecolor="black", capsize=3,
                    yerr=[[e["mean"] - e["min"] for e in ends], [e["max"] - e["mean"] for e in ends]])
    ax.set_xticks(range(len(groups)), [g.replace("_", " ") for g in groups], fontsize=8)
    ax.set_ylabel("fraction")
    ax.set_title(args.title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()
