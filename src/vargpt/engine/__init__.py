"""Inference: `Engine` (prompts -> images and text) over a `VARGPT`, its per-scale loop (`vargpt.engine.loop`), the
bit samplers (`vargpt.engine.bits`) and its lean LLM forward and decode loop (`vargpt.engine.llm`)."""

from vargpt.engine.engine import Engine, GeneratedImages, PromptBatch, to_pil
from vargpt.engine.loop import GenerationInterrupted, ImageTokens

__all__ = ["Engine", "GeneratedImages", "GenerationInterrupted", "ImageTokens", "PromptBatch", "to_pil"]
