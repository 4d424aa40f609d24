"""Device and dtype selection shared by every entry point (`--device`, `--dtype`).

``auto`` picks CUDA when present (bf16 there, the published code's fp32 default wastes half the memory),
else CPU in fp32. Bad names raise `InputError` naming the allowed values.
"""

from __future__ import annotations

import torch

from vargpt.errors import InputError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """`auto` -> cuda if available else cpu; otherwise a torch device string such as `cpu`, `cuda:1`."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} requested but CUDA is not available here; use --device cpu")
    return device


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`auto` -> bf16 on CUDA, fp32 on CPU; otherwise one of fp32, bf16, fp16."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise InputError(f"unknown dtype {name!r}; use auto, fp32, bf16 or fp16")
    return DTYPES[name]
