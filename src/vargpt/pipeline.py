"""`VARGPTPipeline`: generate, chat and edit with PIL images in and out (what the CLI, server and UI call).

Contract
--------
* `VARGPTPipeline.from_pretrained(path=None, device=..., dtype=...)`: a checkpoint directory (ours or the released
  layout, see `vargpt.models.vargpt.VARGPT.from_pretrained`); ``None`` = the embedded default shipped in
  ``vargpt/assets/tiny`` (a clear `VargptError` while it is not built yet).
* `generate(prompts, *, seed, cfg, size, n) -> list[PIL.Image]`: ``n`` images per prompt, prompt-major; image i of
  the call uses seed ``seed + i`` (one generator per image), so a batch equals single calls with those seeds.
* `chat(messages, images) -> str` and `chat_stream(...)` (an iterator of text pieces); a plain-string message with
  images and no ``<image>`` placeholder gets one placeholder per image in front.
* `edit(image, instruction, *, seed, cfg) -> PIL.Image`: the source image goes through the vision tower in the user
  turn, the instruction is text, the generated image is the edit.

Each call is a numbered recipe of named steps (diffusers style): check inputs, encode the prompt, sample scale by
scale (progress bar, ``callback_on_scale(scale_index, num_scales, bits)``, `interrupt()`), decode, post-process.
`interrupt()` (e.g. from a UI thread) stops the running generation after the current scale with
`GenerationInterrupted`. Sizes: any size `vargpt.scales` defines for the model's VAE stride (official: 256 and 512
in every aspect ratio; tiny: 64 and 128); others raise `InputError` listing the supported ones.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm
from transformers import TextIteratorStreamer

from vargpt.config import SamplingConfig
from vargpt.errors import InputError, VargptError
from vargpt.models.vargpt import VARGPT
from vargpt.processing import IMAGE_PLACEHOLDER

__all__ = ["VARGPTPipeline", "GenerationInterrupted", "default_model_dir", "to_pil"]

ScaleCallback = Callable[[int, int, Tensor], None]


class GenerationInterrupted(VargptError):
    """`VARGPTPipeline.interrupt` was called while an image was being generated."""


def default_model_dir() -> Path:
    """Where the embedded default model lives (``vargpt/assets/tiny``)."""
    return Path(__file__).resolve().parent / "assets" / "tiny"


def to_pil(images_N3HW: Tensor) -> list[Image.Image]:
    """Images in [-1, 1] -> 8-bit RGB PIL images (rounded)."""
    arr = images_N3HW.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return [Image.fromarray(np.ascontiguousarray(a.permute(1, 2, 0).cpu().numpy())) for a in arr]


class VARGPTPipeline:
    """Generate / chat / edit over a `VARGPT` model (see the module docstring)."""

    def __init__(self, model: VARGPT, *, progress: bool = True) -> None:
        self.model = model.eval()
        self.processor = model.require_processor()
        self.progress = progress
        self._interrupt = threading.Event()

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, *, device: str | torch.device | None = "auto",
                        dtype: str | torch.dtype | None = None, progress: bool = True) -> VARGPTPipeline:
        if path is None:
            path = default_model_dir()
            if not (path / "config.json").is_file():
                raise VargptError(f"the embedded default model is not built yet ({path} is empty); train it with "
                                  "`vargpt train --recipe recipes/tiny_*.yaml` and copy its model/ directory there, "
                                  "or point --model at a checkpoint directory")
        return cls(VARGPT.from_pretrained(path, device=device, dtype=dtype), progress=progress)

    # ---- control

    def interrupt(self) -> None:
        """Stop the running generation after the current scale (raises `GenerationInterrupted` in that call)."""
        self._interrupt.set()

    def _scale_hook(self, num_scales: int, total: int, callback: ScaleCallback | None) -> tuple[Any, Any]:
        bar = tqdm(total=total, desc="scales", disable=not self.progress, leave=False)

        def on_scale(k: int, bits: Tensor) -> None:
            bar.update(1)
            if callback is not None:
                callback(k, num_scales, bits)
            if self._interrupt.is_set():
                raise GenerationInterrupted("generation interrupted")

        return on_scale, bar

    # ---- steps

    def check_inputs(self, prompts: Sequence[str], size: int | tuple[int, int] | None, n: int) -> None:
        if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise InputError("every prompt must be a non-empty string, e.g. 'a red circle'")
        if n < 1:
            raise InputError(f"n = {n}: ask for at least one image per prompt")
        self.model.schedule_for(size)  # raises InputError listing the supported sizes

    def sampling_config(self, cfg: float | None, tau: float | None = None) -> SamplingConfig:
        """The model's sampling defaults with ``cfg`` / ``tau`` replaced where given."""
        base = self.model.config.sampling
        sampling = SamplingConfig(cfg=base.cfg if cfg is None else float(cfg),
                                  tau=base.tau if tau is None else float(tau), top_k=base.top_k, top_p=base.top_p)
        sampling.validate()
        return sampling

    def _run(self, call: Callable[..., Any], num_scales: int, callback: ScaleCallback | None, **kwargs: Any) -> Any:
        self._interrupt.clear()
        on_scale, bar = self._scale_hook(num_scales, num_scales, callback)
        try:
            return call(callback=on_scale, **kwargs)
        finally:
            bar.close()
            self._interrupt.clear()

    # ---- entry points

    def generate(self, prompts: str | Sequence[str], *, seed: int = 0, cfg: float | None = None,
                 size: int | tuple[int, int] | None = None, n: int = 1,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None,
                 callback_on_scale: ScaleCallback | None = None) -> list[Image.Image]:
        """Text-to-image: ``n`` images per prompt (prompt-major), image i seeded with ``seed + i`` (or drawn from
        ``generator``: one per image, or one for the whole batch)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        # 1. check inputs
        self.check_inputs(prompts, size, n)
        # 2-4. encode the prompts, sample scale by scale (LLM in the loop), decode with the VAE
        schedule = self.model.schedule_for(size)
        out = self._run(self.model.generate_images, len(schedule), callback_on_scale, prompts=prompts, n=n,
                        size=size, seed=seed, generator=generator, sampling=self.sampling_config(cfg))
        # 5. post-process
        return to_pil(out.images)

    def edit(self, image: Image.Image, instruction: str, *, seed: int = 0, cfg: float | None = None,
             size: int | tuple[int, int] | None = None,
             callback_on_scale: ScaleCallback | None = None) -> Image.Image:
        """Edit ``image`` as ``instruction`` says (the output has the model's default size unless ``size``)."""
        # 1. check inputs
        if not isinstance(image, Image.Image):
            raise InputError(f"edit needs a PIL image, got {type(image).__name__}; load it with vargpt.imageio")
        self.check_inputs([instruction], size, 1)
        # 2-4. source image through the vision tower + instruction -> sample -> decode
        schedule = self.model.schedule_for(size)
        out = self._run(self.model.edit_images, len(schedule), callback_on_scale, images=[image.convert("RGB")],
                        instructions=[instruction], size=size, seed=seed, sampling=self.sampling_config(cfg))
        # 5. post-process
        return to_pil(out.images)[0]

    def chat_inputs(self, messages: str | Sequence[dict[str, Any]],
                    images: Sequence[Image.Image] | Image.Image | None) -> dict[str, Tensor]:
        """The processor's inputs for a chat turn: a question string gets one image placeholder per image in front."""
        images = [images] if isinstance(images, Image.Image) else list(images or [])
        if isinstance(messages, str):
            if not messages.strip():
                raise InputError("the question is empty; ask something, e.g. 'What is in the image?'")
            if images and IMAGE_PLACEHOLDER not in messages:
                messages = IMAGE_PLACEHOLDER * len(images) + "\n" + messages
        return self.processor(messages, [im.convert("RGB") for im in images] or None)

    def chat_generate_kwargs(self, inputs: dict[str, Tensor], max_new_tokens: int, do_sample: bool,
                             temperature: float, top_p: float, seed: int) -> dict[str, Any]:
        """`VARGPT.generate` keywords answering ``inputs`` (one sample, or a left-padded batch) with text only."""
        return dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    pixel_values=inputs.get("pixel_values"), image_grid_thw=inputs.get("image_grid_thw"),
                    max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
                    seed=seed, images=False)

    def chat(self, messages: str | Sequence[dict[str, Any]], images: Sequence[Image.Image] | Image.Image | None = None,
             *, max_new_tokens: int = 256, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             seed: int = 0) -> str:
        """The assistant's answer to ``messages`` (a question string or chat messages) about ``images``."""
        inputs = self.chat_inputs(messages, images)
        parts = self.model.generate(**self.chat_generate_kwargs(inputs, max_new_tokens, do_sample, temperature, top_p,
                                                                seed))
        return "".join(p for p in parts[0] if isinstance(p, str))

    def chat_stream(self, messages: str | Sequence[dict[str, Any]],
                    images: Sequence[Image.Image] | Image.Image | None = None, *, max_new_tokens: int = 256,
                    do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                    seed: int = 0) -> Iterator[str]:
        """Like `chat`, as text pieces while they are generated (transformers' `TextIteratorStreamer`)."""
        inputs = self.chat_inputs(messages, images)
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = self.chat_generate_kwargs(inputs, max_new_tokens, do_sample, temperature, top_p, seed)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                self.model.generate(**kwargs, streamer=streamer)
            except BaseException as e:  # re-raised in the caller's thread
                errors.append(e)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        for piece in streamer:
            if piece:
                yield piece
        worker.join()
        if errors:
            raise errors[0]
