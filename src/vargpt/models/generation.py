"""Glue between the LLM and the visual decoder for image generation (VARGPT-v1.1's "LLM in the loop").

Contract
--------
Small named steps, shared by the unified model's training forward, its sampler and the conformance tests:

* `start_condition(decoder, sos, batch_size, uncond=False)` -> ``cond_BD``: the decoder's AdaLN condition from
  the start-of-image embedding (``uncond``: from ``cfg_uncond[:1]``). It does not depend on the prompt.
* `prompt_context(hidden_BSH, input_ids_BS, start_id, projector_out, attention_mask)` -> ``(context_BNC,
  mask_BN)``: the cross-attention context = ``image_gen_projector_out`` of the LLM's final-norm states of all
  tokens strictly before ``<|image_gen_start|>`` (padding excluded), batched with a key mask.
* `published_uncond_context(decoder, lengths_B)`: the published unconditional context, raw ``cfg_uncond`` rows,
  as many as each prompt has tokens.
* `generation_condition(...)`: the whole `DecoderCondition` of a sampling batch (cond rows, then uncond rows:
  published context by default, or a given one).
* `scatter_gen_tokens` / `gather_gen_states`: put the decoder's token stream (projected to the LLM width) at
  the ``<|image_gen_pad|>`` slots of a training sequence, and read the LLM states back from them.
* `teacher_forced_forward(...)`: the released training forward of a generation batch (decoder stream through
  the LLM at the pad slots, LLM states back to the decoder): LLM states + bit logits.
* `sample_from_prompt(...)`: prompts ending with ``<|image_gen_start|>`` -> image tokens (LLM prefill, context,
  conditions, hook, `vargpt.sampling.image.sample_image_tokens`): the image branch of generation.
* `LLMScaleHook`: the per-scale hook of `vargpt.sampling.image.sample_image_tokens`: decoder-width tokens ->
  ``image_gen_projector`` -> LLM (the conditional rows continue the prompt's KV cache) ->
  ``image_gen_projector_out``. The unconditional rows (the second half of the batch) are handled by
  ``uncond_mode``:

  - ``"published"``: as released: every scale re-runs the LLM on that scale's tokens alone (no prompt, no
    cache, positions 0..l-1) — reference-facts section 7 step 6b, rough edge 4;
  - ``"cached"``: the rows continue their own KV cache (``uncond_cache``, e.g. pre-filled with an
    unconditional prompt by the caller), like the conditional rows.

The LLM is called through `vargpt.models.vlm.llm_forward` (a transformers Qwen2-VL); any callable with the same
signature can be passed instead. ``CompatConfig.published_uncond_branch`` maps to ``uncond_mode="published"``
with the default (``cfg_uncond``) unconditional context.

Differences from the published implementation
---------------------------------------------
* Any batch size (published: 1): prompts of different lengths are left-padded; padding is excluded from the
  cross-attention context (the published training slice ``hidden[b, :p]`` would include left padding) and
  per-sample positions continue from each prompt's own length.
* State is explicit: LLM caches and generators are arguments (published: ``past_hidden_states`` kept on the
  model, a time-seeded generator on the decoder).
* The unconditional branch is selectable (``uncond_mode`` and ``uncond_context_BNC``).
* Condition dropout acts in training mode only (published: also in eval, e.g. the DPO reference forward).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from vargpt.config import SamplingConfig
from vargpt.errors import InputError
from vargpt.models.projectors import GenProjector, SosEmbedding
from vargpt.models.visual_decoder import DecoderCondition, VisualDecoder
from vargpt.sampling.image import ImageTokens, per_scale, sample_image_tokens
from vargpt.scales import Schedule

__all__ = [
    "LLMScaleHook",
    "TeacherForcedOutput",
    "teacher_forced_forward",
    "gather_gen_states",
    "generation_condition",
    "prompt_context",
    "published_uncond_context",
    "sample_from_prompt",
    "scatter_gen_tokens",
    "start_condition",
]

LLMForward = Callable[..., Tensor]  # (inputs_embeds, *, cache, position_ids, attention_mask) -> hidden_BLH


def start_condition(decoder: VisualDecoder, sos: SosEmbedding, batch_size: int, *, uncond: bool = False,
                    cond_drop_generator: torch.Generator | None = None) -> Tensor:
    """``cond_BD`` [B, C] from the start-of-image embedding (``uncond``: from ``cfg_uncond[:1]``).

    In training mode the decoder applies condition dropout (``cond_drop_generator``)."""
    text = decoder.uncond_text(batch_size, 1) if uncond else sos.vector(batch_size)
    return decoder.encode_condition(text, cond_drop_generator=cond_drop_generator)


def prompt_context(hidden_BSH: Tensor, input_ids_BS: Tensor, start_id: int, projector_out: GenProjector,
                   attention_mask_BS: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Cross-attention context of each sample: projected states of the tokens before its first
    ``<|image_gen_start|>`` (masked-out tokens skipped), left-aligned and padded: ``([B, N, C], [B, N] | None)``.

    A sample without the start token uses its whole (unmasked) sequence.
    """
    B, S, _ = hidden_BSH.shape
    valid = torch.ones(B, S, dtype=torch.bool, device=hidden_BSH.device)
    if attention_mask_BS is not None:
        valid &= attention_mask_BS.bool()
    is_start = input_ids_BS == start_id
    before_start = torch.cumsum(is_start.long(), dim=1) == 0
    keep = valid & before_start
    lengths = keep.sum(1)
    N = int(lengths.max())
    if N == 0:
        raise InputError("no prompt tokens before <|image_gen_start|>: the image needs a prompt to attend to")
    # Stable sort puts the kept positions first, in order.
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :N]
    rows = torch.gather(hidden_BSH, 1, order.unsqueeze(-1).expand(-1, -1, hidden_BSH.shape[-1]))
    mask = torch.arange(N, device=hidden_BSH.device)[None, :] < lengths[:, None]
    context = projector_out(rows)
    return context, (None if bool(mask.all()) else mask)


def published_uncond_context(decoder: VisualDecoder, lengths_B: Tensor) -> tuple[Tensor, Tensor | None]:
    """The published unconditional cross-attention context: ``cfg_uncond[:N_b]`` for sample b."""
    N = int(lengths_B.max())
    if N > decoder.cfg.text_maxlen:
        raise InputError(f"the published unconditional branch supports prompts of at most {decoder.cfg.text_maxlen} "
                         f"tokens (cfg_uncond rows); this one has {N}")
    context = decoder.cfg_uncond[:N].unsqueeze(0).expand(lengths_B.shape[0], -1, -1)
    mask = torch.arange(N, device=lengths_B.device)[None, :] < lengths_B[:, None]
    return context, (None if bool(mask.all()) else mask)


def generation_condition(decoder: VisualDecoder, sos: SosEmbedding, context_BNC: Tensor,
                         context_mask_BN: Tensor | None = None, *, guided: bool = True,
                         uncond_context_BNC: Tensor | None = None,
                         uncond_context_mask_BN: Tensor | None = None,
                         source_BLC: Tensor | None = None) -> DecoderCondition:
    """The decoder condition of a generation batch: B conditional rows, then (``guided``) B unconditional ones.

    Conditional rows: start-of-image condition + the prompt context. Unconditional rows: the ``cfg_uncond``
    condition + ``uncond_context`` if given, else the published context (`published_uncond_context`).
    ``source_BLC`` (editing with ``decoder.source_condition``, `VisualDecoder.source_tokens`): the source term of
    each sample, given to its conditional AND its unconditional row (condition dropout keeps it in training too),
    so guidance amplifies the instruction, not the copy.
    """
    B, N = context_BNC.shape[:2]
    cond = decoder.condition(start_condition(decoder, sos, B), context_BNC, context_mask_BN, source_BLC=source_BLC)
    if not guided:
        return cond
    if uncond_context_BNC is None:
        lengths = (context_mask_BN.sum(1) if context_mask_BN is not None
                   else torch.full((B,), N, device=context_BNC.device))
        uncond_context_BNC, uncond_context_mask_BN = published_uncond_context(decoder, lengths)
    uncond = decoder.condition(start_condition(decoder, sos, B, uncond=True), uncond_context_BNC,
                               uncond_context_mask_BN, source_BLC=source_BLC)
    return DecoderCondition.cat(cond, uncond)


def scatter_gen_tokens(inputs_embeds_BSH: Tensor, input_ids_BS: Tensor, pad_id: int, tokens_BLH: Tensor) -> Tensor:
    """Place ``tokens_BLH`` (one row of L per sample, reading order) at the ``<|image_gen_pad|>`` slots."""
    mask = input_ids_BS == pad_id
    n = int(mask.sum())
    if n != tokens_BLH.shape[0] * tokens_BLH.shape[1]:
        raise InputError(f"the sequence has {n} <|image_gen_pad|> slots but the images give "
                         f"{tokens_BLH.shape[0] * tokens_BLH.shape[1]} tokens; build the prompt with "
                         "image_gen_token_num pads per image")
    return inputs_embeds_BSH.masked_scatter(mask.unsqueeze(-1).expand_as(inputs_embeds_BSH),
                                            tokens_BLH.to(inputs_embeds_BSH.dtype))


def gather_gen_states(hidden_BSH: Tensor, input_ids_BS: Tensor, pad_id: int, num_images: int) -> Tensor:
    """LLM states at the ``<|image_gen_pad|>`` slots, [num_images, L_padded, H]."""
    mask = input_ids_BS == pad_id
    return hidden_BSH[mask].view(num_images, -1, hidden_BSH.shape[-1])


@dataclass
class TeacherForcedOutput:
    """`teacher_forced_forward` result: LLM states of the whole sequence (``lm_head`` gives the text logits)
    and the decoder's bit logits of every image, [num_images, L, 2D]."""

    hidden_BSH: Tensor
    gen_logits_BLV: Tensor


def teacher_forced_forward(decoder: VisualDecoder, projector_in: GenProjector, projector_out: GenProjector,
                           sos: SosEmbedding, llm: LLMForward, inputs_embeds_BSH: Tensor, input_ids_BS: Tensor,
                           x_wo_prefix_BlD: Tensor, schedule: Schedule, *, start_id: int, pad_id: int,
                           attention_mask_BS: Tensor | None = None,
                           cond_drop_generator: torch.Generator | None = None,
                           drop_path_generator: torch.Generator | None = None,
                           cond_BD: Tensor | None = None, source_BLC: Tensor | None = None) -> TeacherForcedOutput:
    """The released training forward of a batch with images to generate (one image per sample that has
    ``<|image_gen_pad|>`` slots, in batch order; ``x_wo_prefix_BlD`` holds their teacher-forcing inputs):

    1. decoder token stream = first token (start-of-image condition + ``pos_start``) + ``word_embed`` of the
       inputs, zero-padded to the number of pad slots per image (published: the multiple of 128);
    2. ``image_gen_projector`` -> scattered into the pad slots of ``inputs_embeds`` -> LLM (causal, plain
       positions unless the caller's ``llm`` does otherwise);
    3. LLM states at the first L slots -> ``image_gen_projector_out`` -> decoder blocks, cross-attending to the
       projected states of the tokens before ``<|image_gen_start|>`` -> bit logits.

    ``cond_BD``: a precomputed start condition per image (e.g. with the caller's own condition dropout);
    default `start_condition` with the decoder's dropout (``cond_drop_generator``). ``source_BLC``: the source term
    per image (`VisualDecoder.source_tokens`), added to the decoder's block input.
    """
    has_image = (input_ids_BS == pad_id).any(1)
    n_img = int(has_image.sum())
    if n_img != x_wo_prefix_BlD.shape[0]:
        raise InputError(f"{n_img} sequence(s) have <|image_gen_pad|> slots but {x_wo_prefix_BlD.shape[0]} "
                         "image(s) were given")
    slots = int((input_ids_BS == pad_id).sum()) // max(n_img, 1)
    if cond_BD is None:
        cond_BD = start_condition(decoder, sos, n_img, cond_drop_generator=cond_drop_generator)
    x_BLC = decoder.input_sequence(cond_BD, x_wo_prefix_BlD)
    L = x_BLC.shape[1]
    if slots < L:
        raise InputError(f"each image needs at least {L} <|image_gen_pad|> slots for this schedule, got {slots}")
    x_pad = torch.nn.functional.pad(x_BLC, (0, 0, 0, slots - L))
    embeds = scatter_gen_tokens(inputs_embeds_BSH, input_ids_BS, pad_id, projector_in(x_pad))
    hidden = llm(embeds, attention_mask=attention_mask_BS)
    states = gather_gen_states(hidden, input_ids_BS, pad_id, n_img)[:, :L]
    mask = attention_mask_BS[has_image] if attention_mask_BS is not None else None
    context, context_mask = prompt_context(hidden[has_image], input_ids_BS[has_image], start_id, projector_out, mask)
    cond = decoder.condition(cond_BD, context, context_mask, source_BLC=source_BLC)
    logits = decoder.forward_train(projector_out(states), cond, schedule, generator=drop_path_generator)
    return TeacherForcedOutput(hidden, logits)


class LLMScaleHook:
    """Per-scale hook putting the LLM between the decoder's input embedding and its blocks.

    Rows ``[:B]`` are conditional: they continue ``cond_cache`` (which holds the prompt up to and including
    ``<|image_gen_start|>``). With ``cond_attention_mask`` [B, S_cache] (left-padded prompts of different
    lengths) explicit positions are used: each sample continues from its own number of real tokens. Without
    it, positions continue from the cache length (the published behaviour, batch of equal lengths).
    Rows ``[B:]`` (present when the batch is guided) follow ``uncond_mode`` (see the module docstring).
    """

    def __init__(self, llm: LLMForward, projector_in: GenProjector, projector_out: GenProjector, *,
                 cond_cache: object, batch_size: int, cond_attention_mask: Tensor | None = None,
                 uncond_mode: Literal["published", "cached"] = "published", uncond_cache: object | None = None,
                 uncond_attention_mask: Tensor | None = None) -> None:
        if uncond_mode not in ("published", "cached"):
            raise InputError(f"uncond_mode must be 'published' or 'cached', got {uncond_mode!r}")
        if uncond_mode == "cached" and uncond_cache is None:
            raise InputError("uncond_mode='cached' needs an uncond_cache (an empty or pre-filled LLM cache)")
        self.llm, self.projector_in, self.projector_out = llm, projector_in, projector_out
        self.B = batch_size
        self.uncond_mode = uncond_mode
        self.streams = {"cond": [cond_cache, cond_attention_mask], "uncond": [uncond_cache, uncond_attention_mask]}

    def _run_cached(self, name: str, x_BlH: Tensor) -> Tensor:
        cache, mask = self.streams[name]
        if mask is None:
            return self.llm(x_BlH, cache=cache)
        B, l = x_BlH.shape[:2]
        ones = torch.ones(B, l, dtype=mask.dtype, device=mask.device)
        start = mask.long().sum(1, keepdim=True)
        positions = (start + torch.arange(l, device=mask.device)).unsqueeze(0).expand(3, -1, -1)
        mask = torch.cat([mask, ones], dim=1)
        self.streams[name][1] = mask
        return self.llm(x_BlH, cache=cache, position_ids=positions, attention_mask=mask)

    def __call__(self, scale_index: int, x_BlC: Tensor) -> Tensor:
        h = self.projector_in(x_BlC)
        outs = [self._run_cached("cond", h[: self.B])]
        if h.shape[0] > self.B:
            if self.uncond_mode == "published":
                outs.append(self.llm(h[self.B:], cache=None))
            else:
                outs.append(self._run_cached("uncond", h[self.B:]))
        return self.projector_out(torch.cat(outs, dim=0))


@torch.no_grad()
def sample_from_prompt(decoder: VisualDecoder, projector_in: GenProjector, projector_out: GenProjector,
                       sos: SosEmbedding, llm: LLMForward, new_cache: Callable[[], object], inputs_embeds_BSH: Tensor,
                       input_ids_BS: Tensor, schedule: Schedule, sampling: SamplingConfig | None = None, *,
                       start_id: int, attention_mask_BS: Tensor | None = None, position_ids: Tensor | None = None,
                       generator: torch.Generator | Sequence[torch.Generator] | None = None,
                       uncond_mode: Literal["published", "cached"] = "published",
                       uncond_inputs_embeds_BSH: Tensor | None = None, uncond_context_BNC: Tensor | None = None,
                       uncond_context_mask_BN: Tensor | None = None, source_BLC: Tensor | None = None,
                       return_logits: bool = False,
                       callback: Callable[[int, Tensor], None] | None = None) -> ImageTokens:
    """Image tokens for prompts that end with ``<|image_gen_start|>`` (left-padded), the LLM in the loop.

    1. The LLM runs over the prompts into a fresh cache (``new_cache()``); ``position_ids`` for this prefill
       default to 0.. over each prompt's real tokens (pass M-RoPE positions for prompts with images).
    2. Context = projected states of the tokens before ``<|image_gen_start|>``; conditions by
       `generation_condition` (unconditional rows when any cfg != 1: the published ``cfg_uncond`` context
       unless ``uncond_context_BNC`` is given).
    3. `sample_image_tokens` with an `LLMScaleHook`: conditional rows continue the prompt cache (positions
       continue from each prompt's length, as published); unconditional rows per ``uncond_mode``
       (``"cached"``: a cache of their own, pre-filled with ``uncond_inputs_embeds_BSH`` if given).

    ``source_BLC``: the source term of each prompt (editing, `VisualDecoder.source_tokens`), for both CFG rows;
    the decoder adds its slice of scale k to that scale's block input (`VisualDecoder.forward_step`).
    """
    sampling = sampling or SamplingConfig()
    B = input_ids_BS.shape[0]
    last_real = input_ids_BS[:, -1]
    if not bool((last_real == start_id).all()):
        raise InputError("every prompt must end with <|image_gen_start|> (left-pad batches of different lengths)")
    mask = attention_mask_BS
    if mask is not None and bool(mask.all()):
        mask = None
    if position_ids is None and mask is not None:
        position_ids = (mask.long().cumsum(1) - 1).clamp(min=0).unsqueeze(0).expand(3, -1, -1)
    cache = new_cache()
    hidden = llm(inputs_embeds_BSH, cache=cache, position_ids=position_ids, attention_mask=mask)
    context, context_mask = prompt_context(hidden, input_ids_BS, start_id, projector_out, mask)
    guided = any(c != 1 for c in per_scale(sampling.cfg, len(schedule), "cfg"))
    cond = generation_condition(decoder, sos, context, context_mask, guided=guided,
                                uncond_context_BNC=uncond_context_BNC, uncond_context_mask_BN=uncond_context_mask_BN,
                                source_BLC=source_BLC)
    uncond_cache = new_cache() if uncond_mode == "cached" else None  # stays empty when cfg is 1 at every scale
    if guided and uncond_cache is not None:
        if uncond_inputs_embeds_BSH is not None:
            llm(uncond_inputs_embeds_BSH.expand(B, -1, -1), cache=uncond_cache)
    hook = LLMScaleHook(llm, projector_in, projector_out, cond_cache=cache, cond_attention_mask=mask, batch_size=B,
                        uncond_mode=uncond_mode, uncond_cache=uncond_cache)
    return sample_image_tokens(decoder, cond, schedule, sampling, generator=generator, hook=hook,
                               return_logits=return_logits, callback=callback)
