"""VARGPT-v1.1: a unified model that understands images (next-token) and generates/edits them (next-scale).

Public API (importing this package does no work and touches no files):

* `VARGPTConfig` and the presets `official_config`, `tiny_config`, `get_preset`;
* the model, pipeline and trainer are added by their modules as they land.
"""

__version__ = "0.1.0"

from vargpt.config import VARGPTConfig, get_preset, official_config, tiny_config  # noqa: E402

__all__ = ["VARGPTConfig", "get_preset", "official_config", "tiny_config", "__version__"]
