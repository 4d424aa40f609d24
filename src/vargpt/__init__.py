"""VARGPT-v1.1: a unified model that understands images (next-token) and generates/edits them (next-scale).

Public API (importing this package does no work and touches no files):

* `VARGPTConfig` and the presets `official_config`, `tiny_config`, `get_preset`;
* `VARGPT` (the unified model), `Engine` (inference over it) and `VARGPTPipeline` (generate / chat / edit with PIL
  images), imported on first use.
"""

__version__ = "0.1.0"

from vargpt.config import VARGPTConfig, get_preset, official_config, tiny_config  # noqa: E402

__all__ = ["VARGPT", "Engine", "VARGPTConfig", "VARGPTPipeline", "get_preset", "official_config", "tiny_config",
           "__version__"]

_LAZY = {"VARGPT": "vargpt.models.vargpt", "Engine": "vargpt.engine", "VARGPTPipeline": "vargpt.pipeline"}


def __getattr__(name: str):
    """`VARGPT`, `Engine` and `VARGPTPipeline` load torch and transformers, so they are imported when first used."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vargpt' has no attribute {name!r}")
