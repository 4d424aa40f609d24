"""`Engine`: runs a `VARGPT` — prompts in, images and text out (nanochat's Engine beside its GPT).

Contract
--------
Named steps, composed by `generate_images` and by `vargpt.pipeline.VARGPTPipeline`:

1. `encode_prompts(prompts, images=None, n=1)` -> `PromptBatch`: the chat template, the processor, left padding,
   ``<|image_gen_start|>`` appended (`prompt_ids` does the same for ready token ids);
2. `sample_scales(batch, schedule, sampling, generators)` -> `ImageTokens`: LLM prefill of both CFG branches,
   then the per-scale loop of `vargpt.engine.loop` (LLM in the loop, KV caches, cond + uncond rows in one batch);
3. `decode(tokens)` -> images [N, 3, H, W] in [-1, 1] (the VAE, channels-last activations).

`generate_images(prompts | input_ids, ...)` runs 1-3 and returns `GeneratedImages` (images, bits, schedule,
seconds per step); `edit_images(images, instructions)` builds the editing prompts (the source image goes through
the vision tower in the user turn); `generate_text(input_ids, ...)` answers as transformers' ``generate`` does (KV
cache, greedy or sampled, batched) with mixed turns: when the LLM emits ``<|image_gen_start|>`` an image is
generated, its tokens are put into the sequence (``<|image_gen_start|>`` + image stream + ``<|image_gen_end|>``,
the training layout) and the text continues. `interrupt()` (any thread) stops a running image after its current
scale with `GenerationInterrupted`.

Everything runs in inference mode. The LLM (prefill, the image loop, text decoding) is `vargpt.engine.llm`'s
`LeanLLM` when the model's attention runs through SDPA: transformers' layers and floats without its per-call
overhead (tests compare hidden states, tokens and images with transformers' forward and ``generate``, which run
otherwise).

Unconditional CFG branch
------------------------
* ``compat.published_uncond_branch=True`` (released checkpoints, conformance): every scale re-runs the LLM on that
  scale's tokens alone (no prompt, no cache), the decoder's cross-attention context is the raw
  ``cfg_uncond[:N]`` rows and its AdaLN condition comes from ``cfg_uncond[:1]``.
* Otherwise (models we train), the consistent branch: the unconditional row is the same model run on the null
  prompt (`vargpt.models.generation.null_prompt_ids`) followed by ``<|image_gen_start|>``: its AdaLN condition
  comes from ``cfg_uncond[:1]``, its cross-attention context is the projected LLM states of the null prompt, and
  its image tokens continue the null prompt's KV cache. Training's condition dropout
  (`vargpt.training.objective`) shows the model exactly this row. With ``decoder.uncond_keeps_image`` an edit's
  unconditional row is its own prompt cut after the picture (`image_only_prompt_ids`: the instruction goes), each
  row prefilled with its image, so guidance amplifies the instruction rather than the whole scene.

Differences from the published implementation
---------------------------------------------
* Any batch size for images (left-padded prompts, one generator per sample: a batch equals separate calls with
  the same seeds); sampling settings in `SamplingConfig`; image size from the scale templates; no files written.
* After an image the text continues (published: generation stops); the image enters the LLM as in training.
* With ``decoder.source_condition`` each edit source, resized to the output size, also conditions the decoder
  (its multi-scale bits) in the conditional and the unconditional row.
* Images are returned in [-1, 1]; `to_pil` rounds them to uint8 (published: truncation).
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from vargpt.config import SamplingConfig
from vargpt.data.records import gen_image_tensor
from vargpt.engine import llm as fast_llm
from vargpt.engine.loop import ImageTokens, sample_from_prompt
from vargpt.errors import InputError
from vargpt.models import vlm as V
from vargpt.models.generation import (
    image_only_prompt_ids,
    null_prompt_ids,
    prompt_context,
    scatter_gen_tokens,
    source_codes,
    start_condition,
)
from vargpt.models.quantizer import add_scale, next_scale_input
from vargpt.models.vargpt import VARGPT
from vargpt.processing import DEFAULT_SYSTEM_PROMPT
from vargpt.scales import Schedule, padded_tokens, schedule_for_size

__all__ = ["Engine", "GeneratedImages", "PromptBatch", "to_pil"]

Seeds = int | Sequence[int] | None
Generators = torch.Generator | Sequence[torch.Generator] | None


@dataclass
class PromptBatch:
    """Prompts ready for image sampling: left-padded ids ending with ``<|image_gen_start|>``, their understanding
    images (editing) and, with source conditioning, the source pixels [B, 3, H, W] (resized at sampling)."""

    input_ids: Tensor
    attention_mask: Tensor | None = None
    pixel_values: Tensor | None = None
    image_grid_thw: Tensor | None = None
    source_images: list[Any] | None = None

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]


@dataclass
class GeneratedImages:
    """`Engine.generate_images` result: images [N, 3, H, W] in [-1, 1], their tokens and where the time went."""

    images: Tensor
    bits: list[Tensor]  # per scale [N, h, w, D]
    schedule: Schedule
    logits: list[Tensor] = field(default_factory=list)  # per scale raw decoder logits (return_logits=True)
    seconds: dict[str, float] = field(default_factory=dict)  # encode / sample / decode


def bits_to_inputs(bits: Sequence[Tensor], schedule: Schedule) -> Tensor:
    """Teacher-forcing inputs [B, L - 1, D] of sampled bits (what the sampling loop fed the decoder)."""
    H, W = schedule[-1][1:]
    summed, xs = None, []
    for k, b in enumerate(bits):
        summed = add_scale(summed, b, (H, W))
        if k < len(schedule) - 1:
            xs.append(next_scale_input(summed, schedule[k + 1][1:]))
    return torch.cat(xs, dim=1)


def to_pil(images_N3HW: Tensor) -> list[Image.Image]:
    """Images in [-1, 1] -> 8-bit RGB PIL images (rounded)."""
    arr = images_N3HW.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return [Image.fromarray(np.ascontiguousarray(a.permute(1, 2, 0).cpu().numpy())) for a in arr]


class Engine:
    """Inference over one `VARGPT` (see the module docstring). Holds no per-call state but the interrupt flag."""

    def __init__(self, model: VARGPT) -> None:
        self.model = model.eval()
        self.config = model.config
        self._interrupt = threading.Event()

    @property
    def device(self) -> torch.device:
        return self.model.device

    def interrupt(self) -> None:
        """Stop the running image generation after its current scale (`GenerationInterrupted` in that call)."""
        self._interrupt.set()

    def schedule_for(self, size: int | tuple[int, int] | None) -> Schedule:
        """The scale schedule generating ``size`` (pixels: an int for square, or (height, width))."""
        size = size if size is not None else self.config.image_size
        h, w = (size, size) if isinstance(size, int) else size
        return schedule_for_size(int(h), int(w), self.config.vae.stride)

    # ---- 1. prompts

    def encode_prompts(self, prompts: Sequence[str], images: Sequence[Any] | None = None, n: int = 1,
                       system: str | None = DEFAULT_SYSTEM_PROMPT) -> PromptBatch:
        """Chat-template prompts (``images``: one per prompt, ``<image>`` marks it) -> a left-padded batch with
        ``n`` rows per prompt, each ending with ``<|image_gen_start|>``."""
        if not prompts:
            raise InputError("no prompts given")
        if images is not None and len(images) != len(prompts):
            raise InputError(f"{len(images)} source image(s) for {len(prompts)} prompt(s); give one per prompt")
        proc, start = self.model.require_processor(), self.config.tokens.image_gen_start
        samples = []
        for i, p in enumerate(prompts):
            s = proc(p, [images[i]] if images is not None else None, system=system)
            s["input_ids"] = torch.cat([s["input_ids"], torch.tensor([[start]])], 1)
            s["attention_mask"] = torch.ones_like(s["input_ids"])
            s["mm_token_type_ids"] = (s["input_ids"] == self.config.tokens.image_pad).to(torch.int32)
            samples += [s] * n
        b = proc.pad(samples, padding_side="left")
        sources = [im for im in images for _ in range(n)] if images is not None else None
        return PromptBatch(b["input_ids"], b["attention_mask"], b.get("pixel_values"), b.get("image_grid_thw"),
                           sources)

    def prompt_ids(self, input_ids: Tensor, attention_mask: Tensor | None = None, pixel_values: Tensor | None = None,
                   image_grid_thw: Tensor | None = None, n: int = 1,
                   source_images: Sequence[Any] | None = None) -> PromptBatch:
        """Ready (left-padded) token ids -> a `PromptBatch` (the start token appended where missing, ``n`` rows
        per prompt; ``source_images``: one per prompt, for source conditioning only)."""
        start = self.config.tokens.image_gen_start
        if not bool((input_ids[:, -1] == start).all()):
            input_ids = torch.cat([input_ids, input_ids.new_full((input_ids.shape[0], 1), start)], 1)
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], 1)
        if source_images is not None and len(source_images) != input_ids.shape[0]:
            raise InputError(f"{len(source_images)} source image(s) for {input_ids.shape[0]} prompt(s); give one "
                             "per prompt")
        if n > 1:
            if pixel_values is not None:
                raise InputError("n > 1 with pixel_values: repeat the rows yourself or pass prompts")
            input_ids = input_ids.repeat_interleave(n, 0)
            attention_mask = attention_mask.repeat_interleave(n, 0) if attention_mask is not None else None
        sources = [im for im in source_images for _ in range(n)] if source_images is not None else None
        return PromptBatch(input_ids, attention_mask, pixel_values, image_grid_thw, sources)

    # ---- 2. sampling

    def generators(self, n: int, seed: Seeds = None, generator: Generators = None) -> Generators:
        """One generator per image: image i seeded with ``seed + i`` (or ``seed[i]``); ``generator`` wins."""
        if generator is not None:
            return generator
        if seed is None:
            seed = int(torch.randint(0, 2**31, ()))
        seeds = [seed + i for i in range(n)] if isinstance(seed, int) else list(seed)
        if len(seeds) != n:
            raise InputError(f"got {len(seeds)} seeds for {n} images; give one per image or a single seed")
        return [torch.Generator().manual_seed(int(s)) for s in seeds]

    def _llm(self) -> tuple[Callable[..., Tensor], Callable[[], object]]:
        """The LLM forward and cache of the image loop: `vargpt.engine.llm` (the same floats, without transformers'
        per-call overhead) when the model's attention runs through SDPA, else transformers' own."""
        vlm = self.model.vlm
        if fast_llm.supported(vlm):
            return fast_llm.LeanLLM(vlm), fast_llm.KVCache
        return functools.partial(V.llm_forward, vlm), functools.partial(V.new_cache, vlm)

    def _uncond_inputs(self, ids: Tensor, mask: Tensor | None, px: Tensor | None,
                       grid: Tensor | None) -> dict[str, Any]:
        """sample_from_prompt arguments of the unconditional rows (module docstring, "Unconditional CFG branch")."""
        m, B = self.model, ids.shape[0]
        if self.config.compat.published_uncond_branch:
            return {"uncond_mode": "published"}
        if self.config.decoder.uncond_keeps_image and px is not None:
            return self._image_uncond_inputs(ids, mask, px, grid)
        null = torch.tensor([null_prompt_ids(m.require_processor()) + [self.config.tokens.image_gen_start]],
                            device=self.device)
        embeds = m.vlm.model.get_input_embeddings()(null)
        hidden = self._llm()[0](embeds)
        context, _ = prompt_context(hidden, null, self.config.tokens.image_gen_start, m.image_gen_projector_out)
        return {"uncond_mode": "cached", "uncond_inputs_embeds_BSH": embeds,
                "uncond_context_BNC": context.expand(B, -1, -1)}

    def _image_uncond_inputs(self, ids: Tensor, mask: Tensor | None, px: Tensor,
                             grid: Tensor | None) -> dict[str, Any]:
        """Unconditional rows of ``decoder.uncond_keeps_image``: each prompt with an image cut after it
        (`image_only_prompt_ids`), one without one the null prompt; left-padded, prefilled row by row."""
        m, proc, t = self.model, self.model.require_processor(), self.config.tokens
        rows = []
        for b in range(ids.shape[0]):
            r = (ids[b][mask[b].bool()] if mask is not None else ids[b]).tolist()[:-1]  # without the start token
            rows.append((image_only_prompt_ids(r, proc) if t.vision_end in r else null_prompt_ids(proc))
                        + [t.image_gen_start])
        S = max(len(r) for r in rows)
        u_ids = torch.tensor([[t.endoftext] * (S - len(r)) + r for r in rows], device=self.device)
        u_mask = torch.tensor([[0] * (S - len(r)) + [1] * len(r) for r in rows], device=self.device)
        return {"uncond_mode": "cached", "uncond_input_ids_BS": u_ids, "uncond_attention_mask_BS": u_mask,
                "uncond_inputs_embeds_BSH": V.embed_inputs(m.vlm, u_ids, px, grid, m.image_place)}

    def _source(self, batch: PromptBatch, schedule: Schedule) -> dict[str, Tensor]:
        """The loop's source arguments for the batch's edit sources (``decoder.source_condition``), resized to the
        output size: ``source_BLD`` (source bits) or ``source_latent`` (residual source codes); none without."""
        if not self.config.decoder.source_condition or batch.source_images is None:
            return {}
        size_hw = (schedule[-1][1] * self.config.vae.stride, schedule[-1][2] * self.config.vae.stride)
        px = []
        for im in batch.source_images:
            if not isinstance(im, Image.Image):
                im = Image.fromarray(np.asarray(im.cpu() if isinstance(im, Tensor) else im, dtype=np.uint8))
            px.append(gen_image_tensor(im.convert("RGB"), size_hw, "resize"))
        px = torch.stack(px).to(self.device)
        if self.config.decoder.source_input == "residual":
            return {"source_latent": self.model.vae_local.encode_latent(px)}
        return {"source_BLD": source_codes(self.model.vae_local, self.model.vargpt_gen, px, schedule)}

    @torch.inference_mode()
    def sample_scales(self, batch: PromptBatch, schedule: Schedule, sampling: SamplingConfig | None = None, *,
                      generator: Generators = None, callback: Callable[[int, Tensor], None] | None = None,
                      return_logits: bool = False) -> ImageTokens:
        """Prefill both CFG branches, then sample every scale with the LLM in the loop (`vargpt.engine.loop`)."""
        m, dev = self.model, self.device
        sampling = sampling or self.config.sampling
        sampling.validate()
        ids = batch.input_ids.to(dev)
        mask = batch.attention_mask.to(dev) if batch.attention_mask is not None else None
        px = batch.pixel_values.to(dev) if batch.pixel_values is not None else None
        grid = batch.image_grid_thw.to(dev) if batch.image_grid_thw is not None else None
        embeds = V.embed_inputs(m.vlm, ids, px, grid, m.image_place)
        self._interrupt.clear()
        try:
            return sample_from_prompt(
                m.vargpt_gen, m.image_gen_projector, m.image_gen_projector_out, m.sos_embedding,
                *self._llm(), embeds, ids,
                schedule, sampling, start_id=self.config.tokens.image_gen_start, attention_mask_BS=mask,
                generator=generator, return_logits=return_logits, callback=callback,
                stop=self._interrupt.is_set, **self._source(batch, schedule),
                **self._uncond_inputs(ids, mask, px, grid))
        finally:
            self._interrupt.clear()

    # ---- 3. decode

    @torch.inference_mode()
    def decode(self, tokens: ImageTokens) -> Tensor:
        """Summed codes -> images [N, 3, H, W] in [-1, 1] (fp32) through the VAE decoder, its activations channels-last
        (`BSQVAE.decode`: faster convolutions, pixels within ~1e-4 of the released layout's)."""
        return self.model.vae_local.decode(tokens.summed_codes_BDHW.to(self.model.dtype), channels_last=True).float()

    # ---- composed

    @torch.inference_mode()
    def generate_images(self, prompts: str | Sequence[str] | None = None, *, input_ids: Tensor | None = None,
                        attention_mask: Tensor | None = None, pixel_values: Tensor | None = None,
                        image_grid_thw: Tensor | None = None, sampling: SamplingConfig | None = None,
                        size: int | tuple[int, int] | None = None, seed: Seeds = None, generator: Generators = None,
                        n: int = 1, system: str | None = DEFAULT_SYSTEM_PROMPT,
                        callback: Callable[[int, Tensor], None] | None = None, return_logits: bool = False,
                        source_images: Sequence[Any] | None = None) -> GeneratedImages:
        """Images by next-scale prediction with the LLM in the loop, both CFG branches in one batch.

        Give ``prompts`` (``n`` images per prompt; ``source_images``: one image per prompt for editing, ``<image>``
        in the prompt marks it) or ready ``input_ids`` (left-padded; with ``pixel_values`` / ``image_grid_thw`` for
        editing; there ``source_images`` only feed the decoder's source term). ``seed``: image i gets seed + i (or a
        list, one per image); ``generator``: explicit generator(s) instead. ``size``: pixels, any size of
        `vargpt.scales` for the VAE stride (default ``config.image_size``).
        """
        t0 = time.perf_counter()
        schedule = self.schedule_for(size)
        if prompts is not None:
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            batch = self.encode_prompts(prompts, source_images, n, system)
        elif input_ids is None:
            raise InputError("give prompts or input_ids")
        else:
            batch = self.prompt_ids(input_ids, attention_mask, pixel_values, image_grid_thw, n, source_images)
        t1 = time.perf_counter()
        tokens = self.sample_scales(batch, schedule, sampling, generator=self.generators(batch.size, seed, generator),
                                    callback=callback, return_logits=return_logits)
        t2 = time.perf_counter()
        images = self.decode(tokens)
        t3 = time.perf_counter()
        return GeneratedImages(images, tokens.bits, schedule, tokens.logits,
                               {"encode": t1 - t0, "sample": t2 - t1, "decode": t3 - t2})

    @torch.inference_mode()
    def edit_images(self, images: Sequence[Any], instructions: Sequence[str], **kwargs: Any) -> GeneratedImages:
        """Editing: each source image through the vision tower in the user turn + its instruction -> new image."""
        if len(images) != len(instructions):
            raise InputError(f"{len(images)} image(s) for {len(instructions)} instruction(s); give one per image")
        prompts = [f"<image>\n{t}" for t in instructions]
        return self.generate_images(prompts, source_images=list(images), **kwargs)

    # ---- text (and mixed turns)

    def _image_stream(self, bits: Sequence[Tensor], schedule: Schedule) -> Tensor:
        """What the LLM sees at the ``<|image_gen_pad|>`` slots of a generated image, [1, slots, H] (training
        layout: first token + embedded next-scale inputs, zero-padded, through ``image_gen_projector``)."""
        m = self.model
        x = m.vargpt_gen.input_sequence(start_condition(m.vargpt_gen, m.sos_embedding, 1),
                                        bits_to_inputs(bits, schedule).to(device=self.device, dtype=m.dtype))
        slots = padded_tokens(schedule, self.config.decoder.pad_to_multiplier)
        return m.image_gen_projector(F.pad(x, (0, 0, 0, slots - x.shape[1])))

    def _text_generate(self, ids: Tensor, mask: Tensor, *, max_new_tokens: int, allow_image: bool,
                       inputs_embeds: Tensor | None = None, extra: dict[str, Any],
                       gen_kwargs: dict[str, Any]) -> Tensor:
        """New tokens of transformers' generate; it stops at ``<|image_gen_start|>`` when an image may come. With SDPA
        attention and the default generation config the same tokens come from `_lean_generate`."""
        t, vlm = self.config.tokens, self.model.vlm
        if fast_llm.supported(vlm) and fast_llm.default_generation(vlm):
            return self._lean_generate(ids, mask, max_new_tokens=max_new_tokens, allow_image=allow_image,
                                       inputs_embeds=inputs_embeds, extra=extra, gen_kwargs=gen_kwargs)
        kw = dict(gen_kwargs)
        if not allow_image:
            kw["suppress_tokens"] = [t.image_gen_start]
        if inputs_embeds is not None:
            kw["inputs_embeds"] = inputs_embeds
        out = vlm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                           eos_token_id=[t.im_end] + ([t.image_gen_start] if allow_image else []),
                           pad_token_id=t.endoftext, **extra, **kw)
        return out[:, ids.shape[1]:]  # transformers returns prompt + new tokens

    def _lean_generate(self, ids: Tensor, mask: Tensor, *, max_new_tokens: int, allow_image: bool,
                       inputs_embeds: Tensor | None, extra: dict[str, Any], gen_kwargs: dict[str, Any]) -> Tensor:
        """`_text_generate` through `vargpt.engine.llm.generate_tokens`: transformers' suppression, processors and
        warpers in its order, its positions (M-RoPE when ``extra`` holds images, else the running count of real tokens
        on every axis), without its per-token overhead."""
        t, vlm = self.config.tokens, self.model.vlm
        procs = list(gen_kwargs["logits_processor"])
        if gen_kwargs["do_sample"]:
            temp, k, p = gen_kwargs["temperature"], gen_kwargs["top_k"], gen_kwargs["top_p"]
            procs += [TemperatureLogitsWarper(temp)] if temp != 1.0 else []
            procs += [TopKLogitsWarper(k)] if k else []
            procs += [TopPLogitsWarper(p)] if p < 1.0 else []
        if inputs_embeds is None:  # (with an image_place module generate_text has embedded the images already)
            inputs_embeds = V.embed_inputs(vlm, ids, extra.get("pixel_values"), extra.get("image_grid_thw"),
                                           self.model.image_place)
        if "image_grid_thw" in extra:
            pos = V.rope_positions(vlm, ids, extra["image_grid_thw"], mask)[0]
        else:
            pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0).unsqueeze(0).expand(3, -1, -1)
        return fast_llm.generate_tokens(fast_llm.LeanLLM(vlm), ids, inputs_embeds, pos, mask,
                                        max_new_tokens=max_new_tokens, pad_id=t.endoftext,
                                        eos_ids=[t.im_end] + ([t.image_gen_start] if allow_image else []),
                                        suppress_ids=[] if allow_image else [t.image_gen_start],
                                        processors=procs, do_sample=gen_kwargs["do_sample"],
                                        streamer=gen_kwargs["streamer"])

    @torch.inference_mode()
    def generate_text(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                      pixel_values: Tensor | None = None, image_grid_thw: Tensor | None = None, *,
                      max_new_tokens: int = 256, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                      top_p: float = 1.0, seed: int | None = None,
                      logits_processor: LogitsProcessorList | list | None = None, images: bool = True,
                      max_images: int = 1, image_sampling: SamplingConfig | None = None,
                      image_size: int | tuple[int, int] | None = None, image_seed: int = 0,
                      streamer: Any | None = None,
                      callback: Callable[[int, Tensor], None] | None = None) -> list[list[str | Tensor]]:
        """Text for each (left-padded) prompt with transformers' generate; mixed turns when ``images``.

        Each row's answer is a list of parts: text (``str``, special tokens removed) and images ([3, H, W] in
        [-1, 1]). When a row emits ``<|image_gen_start|>`` (at most ``max_images`` times) its image is sampled
        (``image_sampling``, ``image_size``, seed ``image_seed``), put into the sequence as in training and the text
        continues until ``<|im_end|>`` or ``max_new_tokens`` in all. ``images=False`` suppresses the start token.
        ``logits_processor``: transformers processors (e.g. one forcing ``<|image_gen_start|>``).
        """
        m, dev = self.model, self.device
        m.require_processor()
        ids = input_ids.to(dev)
        mask = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).to(dev)
        extra: dict[str, Any] = {}
        embeds = None
        if pixel_values is not None:
            extra = {"pixel_values": pixel_values.to(dev), "image_grid_thw": image_grid_thw.to(dev),
                     "mm_token_type_ids": V.mm_token_type_ids(m.vlm, ids)}
            if m.image_place is not None:  # transformers would embed the image without its place: embed it here
                embeds = V.embed_inputs(m.vlm, ids, extra.pop("pixel_values"), extra["image_grid_thw"], m.image_place)
        gen_kwargs: dict[str, Any] = {"do_sample": do_sample, "streamer": streamer,
                                      "logits_processor": LogitsProcessorList(logits_processor or [])}
        if do_sample:
            gen_kwargs.update(temperature=temperature, top_k=top_k, top_p=top_p)
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(seed)
            new = self._text_generate(ids, mask, max_new_tokens=max_new_tokens, allow_image=images, extra=extra,
                                      inputs_embeds=embeds, gen_kwargs=gen_kwargs)
            row_images = self._split_images(ids, mask, pixel_values, image_grid_thw)
            image_kw = dict(sampling=image_sampling, size=image_size, callback=callback)
            return [self._finish_row(ids[b][mask[b].bool()], new[b], *row_images[b], max_new_tokens,
                                     max_images if images else 0, image_seed, image_kw, gen_kwargs)
                    for b in range(ids.shape[0])]

    def _finish_row(self, prompt: Tensor, new: Tensor, px: Tensor | None, grid: Tensor | None, budget: int,
                    max_images: int, image_seed: int, image_kw: dict[str, Any],
                    gen_kwargs: dict[str, Any]) -> list[str | Tensor]:
        """Parts of one row: text up to <|im_end|>; at each <|image_gen_start|> an image, then the text goes on."""
        t, proc = self.config.tokens, self.model.require_processor()
        seq, parts, n_img = prompt.tolist(), [], 0
        while True:
            toks = new.tolist()
            cut = next((i for i, x in enumerate(toks) if x in (t.im_end, t.endoftext, t.image_gen_start)), len(toks))
            text = proc.decode(toks[:cut])
            if text:
                parts.append(text)
            budget -= min(cut + 1, len(toks))
            if cut == len(toks) or toks[cut] != t.image_gen_start or budget <= 0:
                return parts
            seq += toks[:cut + 1]
            ids = torch.tensor([seq], device=self.device)
            out = self.generate_images(input_ids=ids, pixel_values=px, image_grid_thw=grid,
                                       seed=[image_seed + n_img], **image_kw)
            parts.append(out.images[0])
            n_img += 1
            stream = self._image_stream(out.bits, out.schedule)
            seq += [t.image_gen_pad] * stream.shape[1] + [t.image_gen_end]
            ids = torch.tensor([seq], device=self.device)
            embeds = scatter_gen_tokens(V.embed_inputs(self.model.vlm, ids, px, grid, self.model.image_place), ids,
                                        t.image_gen_pad, stream)
            new = self._text_generate(ids, torch.ones_like(ids), max_new_tokens=budget,
                                      allow_image=n_img < max_images, inputs_embeds=embeds, extra={},
                                      gen_kwargs=gen_kwargs)[0]

    def _split_images(self, ids: Tensor, mask: Tensor, pixel_values: Tensor | None,
                      grid: Tensor | None) -> list[tuple[Tensor | None, Tensor | None]]:
        """Per row: its understanding images (pixel rows, grid rows), in the batch's reading order."""
        if pixel_values is None or grid is None:
            return [(None, None)] * ids.shape[0]
        counts = ((ids == self.config.tokens.vision_start) & mask.bool()).sum(1).tolist()
        pieces = pixel_values.to(self.device).split(grid.prod(-1).tolist())
        out, i = [], 0
        for c in counts:
            out.append((torch.cat(pieces[i:i + c]), grid[i:i + c].to(self.device)) if c else (None, None))
            i += c
        return out
