"""`VARGPTPipeline`: generate, chat and edit with PIL images in and out (what the CLI, server and UI call).

Contract
--------
* `VARGPTPipeline.from_pretrained(path=None, device=..., dtype=...)`: a checkpoint directory (ours or the released
  layout, see `vargpt.models.vargpt.VARGPT.from_pretrained`); ``None`` = the embedded default shipped in
  ``vargpt/assets/tiny`` (a clear `VargptError` while it is not built yet).
* ``pipe(prompts, *, seed, cfg_scale, size, n, images) -> PipelineOutput`` (PIL images, their bits, seconds per
  step); ``n`` images per prompt, prompt-major; image i of the call uses seed ``seed + i`` (one generator per
  image), so a batch equals single calls with those seeds. ``images``: one source image per prompt (editing).
* `generate(prompts, ...) -> list[PIL.Image]` and `edit(image, instruction, ...) -> PIL.Image`: the same call.
* `chat(messages, images) -> str` and `chat_stream(...)` (an iterator of text pieces); a plain-string message with
  images and no ``<image>`` placeholder gets one placeholder per image in front.

Each call is a numbered recipe of the engine's named steps (`vargpt.engine.Engine`, diffusers style): check inputs,
encode the prompt, sample scale by scale (progress bar, ``callback_on_scale(scale_index, num_scales, bits)``,
`interrupt()`), decode, post-process. `interrupt()` (e.g. from a UI thread) stops the running generation after the
current scale with `GenerationInterrupted`. Sizes: any size `vargpt.scales` defines for the model's VAE stride
(official: 256 and 512 in every aspect ratio; tiny: 64 and 128); others raise `InputError` listing the supported
ones.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm
from transformers import TextIteratorStreamer

from vargpt.config import SamplingConfig
from vargpt.engine import Engine, GenerationInterrupted, to_pil
from vargpt.errors import InputError, VargptError
from vargpt.imageio import to_rgb
from vargpt.models.vargpt import VARGPT
from vargpt.processing import IMAGE_PLACEHOLDER
from vargpt.scales import padded_tokens
from vargpt.validation import check_prompt_fits

__all__ = ["VARGPTPipeline", "PipelineOutput", "GenerationInterrupted", "default_model_dir", "to_pil"]

ScaleCallback = Callable[[int, int, Tensor], None]


@dataclass
class PipelineOutput:
    """A pipeline call's result: the images, their per-scale bits [N, h, w, D] and seconds per step."""

    images: list[Image.Image]
    bits: list[Tensor]
    seconds: dict[str, float] = field(default_factory=dict)


def default_model_dir() -> Path:
    """Where the embedded default model lives (``vargpt/assets/tiny``)."""
    return Path(__file__).resolve().parent / "assets" / "tiny"


class VARGPTPipeline:
    """Generate / chat / edit over a `VARGPT` model (see the module docstring)."""

    def __init__(self, model: VARGPT, *, progress: bool = True) -> None:
        self.model = model.eval()
        self.engine = Engine(model)
        self.processor = model.require_processor()
        self.progress = progress

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, *, device: str | torch.device | None = "auto",
                        dtype: str | torch.dtype | None = None, progress: bool = True) -> VARGPTPipeline:
        if path is None:
            path = default_model_dir()
            if not (path / "config.json").is_file():
                raise VargptError(f"the embedded default model is not built yet ({path} is empty); build it with "
                                  "`INSTALL=1 bash scripts/build_embedded_default.sh`, or point --model at a "
                                  "checkpoint directory")
        return cls(VARGPT.from_pretrained(path, device=device, dtype=dtype), progress=progress)

    # ---- control

    def interrupt(self) -> None:
        """Stop the running generation after the current scale (raises `GenerationInterrupted` in that call)."""
        self.engine.interrupt()

    def check_inputs(self, prompts: Sequence[str], size: int | tuple[int, int] | None, n: int,
                     images: Sequence[Image.Image] | None = None) -> None:
        if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise InputError("every prompt must be a non-empty string, e.g. 'a red circle'")
        if n < 1:
            raise InputError(f"n = {n}: ask for at least one image per prompt")
        if images is not None and any(not isinstance(im, Image.Image) for im in images):
            bad = next(type(im).__name__ for im in images if not isinstance(im, Image.Image))
            raise InputError(f"edit needs PIL images, got {bad}; load it with vargpt.imageio")
        schedule = self.engine.schedule_for(size)  # raises InputError listing the supported sizes
        # the prompt, <|image_gen_start|> and the image's slots must fit the LLM's positions
        reserved = padded_tokens(schedule, self.model.config.decoder.pad_to_multiplier) + 1
        for i, p in enumerate(prompts):
            check_prompt_fits(self.processor, p, [to_rgb(images[i])] if images else None, reserved=reserved)

    def sampling_config(self, cfg_scale: float | None, tau: float | None = None) -> SamplingConfig:
        """The model's sampling defaults with ``cfg_scale`` / ``tau`` replaced where given."""
        base = self.model.config.sampling
        sampling = SamplingConfig(cfg_scale=base.cfg_scale if cfg_scale is None else float(cfg_scale),
                                  tau=base.tau if tau is None else float(tau), top_k=base.top_k, top_p=base.top_p)
        sampling.validate()
        return sampling

    def _progress(self, num_scales: int, callback: ScaleCallback | None) -> tuple[Callable[[int, Tensor], None], Any]:
        bar = tqdm(total=num_scales, desc="scales", disable=not self.progress, leave=False)

        def on_scale(k: int, bits: Tensor) -> None:
            bar.update(1)
            if callback is not None:
                callback(k, num_scales, bits)

        return on_scale, bar

    # ---- entry points

    def __call__(self, prompts: str | Sequence[str], *, seed: int = 0, cfg_scale: float | None = None,
                 size: int | tuple[int, int] | None = None, n: int = 1,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None,
                 images: Sequence[Image.Image] | None = None,
                 callback_on_scale: ScaleCallback | None = None) -> PipelineOutput:
        """Images for ``prompts`` (``images``: one source image per prompt, the editing prompt's ``<image>``);
        ``n`` per prompt (prompt-major), image i seeded with ``seed + i`` (or drawn from ``generator``: one per
        image, or one for the whole batch)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        t0 = time.perf_counter()
        # 1. check inputs
        self.check_inputs(prompts, size, n, images)
        schedule = self.engine.schedule_for(size)
        # 2. encode the prompts (chat template; source images through the vision tower)
        batch = self.engine.encode_prompts(prompts, [to_rgb(im) for im in images] if images else None, n)
        t1 = time.perf_counter()
        # 3. sample scale by scale, the LLM in the loop, both CFG branches in one batch
        on_scale, bar = self._progress(len(schedule), callback_on_scale)
        try:
            tokens = self.engine.sample_scales(batch, schedule, self.sampling_config(cfg_scale), callback=on_scale,
                                               generator=self.engine.generators(batch.size, seed, generator))
        finally:
            bar.close()
        t2 = time.perf_counter()
        # 4. decode with the VAE
        decoded = self.engine.decode(tokens)
        t3 = time.perf_counter()
        # 5. post-process
        return PipelineOutput(to_pil(decoded), tokens.bits, {"encode": t1 - t0, "sample": t2 - t1, "decode": t3 - t2})

    def generate(self, prompts: str | Sequence[str], *, seed: int = 0, cfg_scale: float | None = None,
                 size: int | tuple[int, int] | None = None, n: int = 1,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None,
                 callback_on_scale: ScaleCallback | None = None) -> list[Image.Image]:
        """Text-to-image: the images of ``pipe(prompts, ...)``."""
        return self(prompts, seed=seed, cfg_scale=cfg_scale, size=size, n=n, generator=generator,
                    callback_on_scale=callback_on_scale).images

    def edit(self, image: Image.Image, instruction: str, *, seed: int = 0, cfg_scale: float | None = None,
             size: int | tuple[int, int] | None = None,
             callback_on_scale: ScaleCallback | None = None) -> Image.Image:
        """Edit ``image`` as ``instruction`` says (the output has the model's default size unless ``size``)."""
        if not isinstance(image, Image.Image):
            raise InputError(f"edit needs a PIL image, got {type(image).__name__}; load it with vargpt.imageio")
        if not isinstance(instruction, str) or not instruction.strip():
            raise InputError("every prompt must be a non-empty string, e.g. 'a red circle'")
        return self(f"{IMAGE_PLACEHOLDER}\n{instruction}", seed=seed, cfg_scale=cfg_scale, size=size, images=[image],
                    callback_on_scale=callback_on_scale).images[0]

    def chat_inputs(self, messages: str | Sequence[dict[str, Any]],
                    images: Sequence[Image.Image] | Image.Image | None) -> dict[str, Tensor]:
        """The processor's inputs for a chat turn: a question string gets one image placeholder per image in front."""
        if images is None:
            images = []
        elif isinstance(images, (Image.Image, Tensor, np.ndarray)):
            images = [images]
        images = [to_rgb(im) if isinstance(im, Image.Image) else im for im in images]  # arrays: the processor checks
        if isinstance(messages, str):
            if not messages.strip():
                raise InputError("the question is empty; ask something, e.g. 'What is in the image?'")
            if images and IMAGE_PLACEHOLDER not in messages:
                messages = IMAGE_PLACEHOLDER * len(images) + "\n" + messages
        return self.processor(messages, images or None)

    def chat_generate_kwargs(self, inputs: dict[str, Tensor], max_new_tokens: int, do_sample: bool,
                             temperature: float, top_p: float, seed: int) -> dict[str, Any]:
        """`Engine.generate_text` keywords answering ``inputs`` (one sample, or a left-padded batch) with text only."""
        return dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    pixel_values=inputs.get("pixel_values"), image_grid_thw=inputs.get("image_grid_thw"),
                    max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
                    seed=seed, images=False)

    def chat(self, messages: str | Sequence[dict[str, Any]], images: Sequence[Image.Image] | Image.Image | None = None,
             *, max_new_tokens: int = 256, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             seed: int = 0) -> str:
        """The assistant's answer to ``messages`` (a question string or chat messages) about ``images``."""
        inputs = self.chat_inputs(messages, images)
        kwargs = self.chat_generate_kwargs(inputs, max_new_tokens, do_sample, temperature, top_p, seed)
        parts = self.engine.generate_text(**kwargs)
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
                self.engine.generate_text(**kwargs, streamer=streamer)
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
