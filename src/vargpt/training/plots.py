"""Training-curve pictures: one function that draws logged metrics as panels of a PNG.

Every trainer (VAE, class-conditional decoder, the staged trainer) logs rows of scalars to a CSV and draws
its curves at the end with `plot_metrics`; matplotlib is imported lazily with the Agg backend, so nothing
needs a display.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Panel:
    """One subplot: the metrics ``keys`` against the step column, optionally on a log scale."""

    keys: tuple[str, ...]
    ylabel: str
    title: str = ""
    log: bool = False
    height: float = 1.0  # relative height when panels are stacked


def read_rows(log_csv: str | Path) -> list[dict[str, float]]:
    """The CSV's rows as floats (empty cells become NaN)."""
    with open(log_csv) as f:
        return [{k: float(v) if v not in ("", None) else float("nan") for k, v in r.items()} for r in csv.DictReader(f)]


def plot_metrics(rows: Sequence[dict[str, float]], png: str | Path, panels: Sequence[Panel], *,
                 x: str = "step", stacked: bool = False, dpi: int = 100) -> None:
    """Draw ``panels`` (side by side, or ``stacked`` with a shared x axis) from ``rows``; no rows, no file."""
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels)
    if stacked:
        fig, axes = plt.subplots(n, 1, figsize=(8, 2 + 2 * n), sharex=True, squeeze=False,
                                 height_ratios=[p.height for p in panels])
    else:
        fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.4), squeeze=False)
    steps = [r[x] for r in rows]
    for ax, panel in zip(axes.flat, panels, strict=True):
        for key in panel.keys:
            ax.plot(steps, [r.get(key, float("nan")) for r in rows], label=key)
        if panel.log:
            ax.set_yscale("log")
        ax.set(xlabel=x, ylabel=panel.ylabel, title=panel.title)
        if len(panel.keys) > 1:
            ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=dpi)
    plt.close(fig)
