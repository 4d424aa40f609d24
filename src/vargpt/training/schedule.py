"""The learning-rate schedule every training loop here uses (the unified trainer, the VAE trainer, the vision
pretraining and the class-decoder example): a linear warm-up, then cosine decay to a floor, or constant.

Eight lines of arithmetic; `transformers.get_cosine_schedule_with_warmup` has no floor (``min_lr_ratio``) and
starts the warm-up at 0, and the loops that set ``lr`` by hand (no ``LambdaLR``) call this directly.
"""

from __future__ import annotations

import math


def warmup_steps(ratio: float, total: int) -> int:
    """Warm-up length for a ``ratio`` of ``total`` optimiser steps (rounded up)."""
    return int(math.ceil(ratio * total))


def lr_factor(step: int, total: int, *, warmup: int, kind: str = "cosine", min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr for optimiser step ``step`` (0-based) of ``total``: ``(step + 1) / (warmup + 1)``
    over the first ``warmup`` steps (never 0, and the peak first at step ``warmup``), then cosine from 1 to
    ``min_lr_ratio`` at ``total`` (``kind="cosine"``) or 1 (``kind="constant"``)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
