"""The per-scale loop of image generation: prefill, conditions, both CFG rows, KV caches, bit draws.

Contract
--------
`sample_image_tokens(decoder, cond, schedule, sampling, generator=..., hook=...)` walks the scale schedule coarse
to fine. At scale k it takes the block input of that scale (scale 0: ``decoder.first_tokens(cond_BD)``; later:
``word_embed`` of the running code sum resized to the scale), passes it through the optional per-scale
``hook(k, x_BlC) -> x_BlC`` (the unified model puts the LLM there, `LLMScaleHook`), runs the decoder blocks on it
(`VisualDecoder.forward_step` with an explicit `DecoderKVCache`, or an uncached full pass over all scales so far),
applies 1/tau and CFG to the logits, samples every bit (`vargpt.engine.bits`), turns the bits into codes and
adds them, up-sampled, to the sum. ``stop()`` is asked after every scale; True raises `GenerationInterrupted`.

Classifier-free guidance: when any per-scale cfg scale differs from 1 the condition holds 2B rows, the B
conditional rows first, then the B unconditional ones (`DecoderCondition.cat(cond, uncond)`); both run as one
batch through the LLM step and the decoder.

* `generation_condition(...)`: the `DecoderCondition` of a sampling batch (cond rows, then uncond rows: the
  published ``cfg_uncond`` context by default (`published_uncond_context`), or a given one).
* `LLMScaleHook`: decoder-width tokens -> ``image_gen_projector`` -> LLM (the conditional rows continue the
  prompt's KV cache) -> ``image_gen_projector_out``. The unconditional rows follow ``uncond_mode``:
  ``"published"``: every scale re-runs the LLM on that scale's tokens alone (no prompt, no cache, positions
  0..l-1; reference-facts section 7 step 6b, rough edge 4); ``"cached"``: the rows continue their own KV cache
  (pre-filled with an unconditional prompt), like the conditional rows.
* `sample_from_prompt(...)`: prompts ending with ``<|image_gen_start|>`` -> image tokens (LLM prefill, context,
  conditions, hook, loop).

Returns per-scale bits ``[B, h, w, D]``, the summed codes ``[B, D, H, W]`` (decode them with the VAE), and, on
request, every scale's raw decoder logits (all rows, before 1/tau and CFG).

Differences from the published implementation (``autoregressive_infer_cfg`` and the LLM loop around it): any
batch size (left-padded prompts, per-sample positions), per-sample generators, per-scale cfg/tau lists from
`SamplingConfig`, teacher forcing of given bits, a progress callback, explicit caches and generators (published:
``past_hidden_states`` on the model, a time-seeded generator); no image is written to disk and nothing on the
modules is switched on or off.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from vargpt.config import SamplingConfig
from vargpt.engine.bits import as_bit_logits, cfg_mix, sample_bits
from vargpt.errors import InputError, VargptError
from vargpt.models.generation import LLMForward, prompt_context, start_condition
from vargpt.models.projectors import GenProjector, SosEmbedding
from vargpt.models.quantizer import bits_to_codes, next_scale_input, source_residual, upsample_codes
from vargpt.models.visual_decoder import DecoderCondition, VisualDecoder
from vargpt.scales import Schedule

__all__ = ["GenerationInterrupted", "ImageTokens", "LLMScaleHook", "ScaleHook", "generation_condition", "per_scale",
           "published_uncond_context", "sample_from_prompt", "sample_image_tokens"]

ScaleHook = Callable[[int, Tensor], Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None


class GenerationInterrupted(VargptError):
    """Generation was stopped (``stop()`` returned True, e.g. after `Engine.interrupt`) after a scale."""


@dataclass
class ImageTokens:
    """Result of `sample_image_tokens`."""

    bits: list[Tensor]  # per scale [B, h, w, D] long
    summed_codes_BDHW: Tensor  # input of the VAE decoder
    logits: list[Tensor] = field(default_factory=list)  # per scale raw logits [rows, l, 2D] (return_logits=True)


def per_scale(value: float | Sequence[float], n: int, name: str) -> list[float]:
    """A setting for each of n scales: a number is repeated; a list must have at least n entries."""
    if isinstance(value, (int, float)):
        return [float(value)] * n
    if len(value) < n:
        raise InputError(f"sampling.{name} lists {len(value)} values but the schedule has {n} scales")
    return [float(v) for v in value[:n]]


@torch.no_grad()
def sample_image_tokens(decoder: VisualDecoder, cond: DecoderCondition, schedule: Schedule,
                        sampling: SamplingConfig | None = None, *, generator: Generators = None,
                        hook: ScaleHook | None = None, teacher_bits: Sequence[Tensor] | None = None,
                        use_cache: bool = True, return_logits: bool = False,
                        callback: Callable[[int, Tensor], None] | None = None,
                        stop: Callable[[], bool] | None = None, source_latent: Tensor | None = None) -> ImageTokens:
    """Sample the bits of every scale. See the module docstring.

    ``generator``: one generator for the batch (the published single draw per scale) or one per sample
    (batch-invariant: sample b's bits depend only on its own generator and condition).
    ``teacher_bits``: per-scale bits [B, h, w, D] used instead of the sampled ones (teacher forcing; the
    draws still happen, so generators advance as in free sampling).
    ``callback(k, bits_BhwD)`` runs after each scale (progress bars, previews); then ``stop()``: True raises
    `GenerationInterrupted`.
    ``source_latent`` [B, D, H, W] (editing with ``decoder.source_input = "residual"``): before each scale its
    `source_residual` against the running sum drawn so far becomes that scale's slice of ``cond.source_BLD``
    (both CFG rows).
    """
    sampling = sampling or SamplingConfig()
    schedule = tuple(tuple(int(v) for v in s) for s in schedule)
    K = len(schedule)
    cfgs = per_scale(sampling.cfg_scale, K, "cfg_scale")
    taus = per_scale(sampling.tau, K, "tau")
    guided = any(c != 1 for c in cfgs)
    rows = cond.batch_size
    if guided and rows % 2:
        raise InputError(f"classifier-free guidance needs cond and uncond rows (2B), got {rows} rows")
    B = rows // 2 if guided else rows
    H, W = schedule[-1][1:]
    D = decoder.codebook_dim
    device = cond.cond_BD.device

    cache = decoder.new_cache(rows, schedule, device=device, dtype=cond.cond_BD.dtype) if use_cache else None
    x_BlC = decoder.first_tokens(cond.cond_BD)
    block_inputs: list[Tensor] = []
    summed = torch.zeros(B, D, H, W, device=device)
    out = ImageTokens([], summed)
    if source_latent is not None:
        L = sum(t * h * w for t, h, w in schedule)
        cond = dataclasses.replace(cond, source_BLD=torch.zeros(rows, L, D, device=device))
    start = 0
    nonfinite: Tensor | None = None  # off CPU: checked once after the loop, a check per scale would wait for the device
    for k, (_, h, w) in enumerate(schedule):
        if source_latent is not None:
            term = source_residual(source_latent, summed, (h, w))
            cond.source_BLD[:, start:start + h * w] = term.repeat(rows // B, 1, 1)
        start += h * w
        if hook is not None:
            x_BlC = hook(k, x_BlC)
        if cache is not None:
            logits = decoder.forward_step(x_BlC, cond, schedule, k, cache)
        else:
            block_inputs.append(x_BlC)
            logits = decoder.forward_train(torch.cat(block_inputs, dim=1), cond, schedule, num_scales=k + 1)
            logits = logits[:, -h * w:]
        if return_logits:
            out.logits.append(logits)
        if device.type != "cpu":  # on CPU `sample_bits` refuses them at once, as multinomial does
            bad = ~torch.isfinite(logits).all()
            nonfinite = bad if nonfinite is None else nonfinite | bad
        logits = logits.mul(1 / taus[k])
        logits = cfg_mix(logits[:B], logits[B:], cfgs[k]) if guided and cfgs[k] != 1 else logits[:B]
        bits = sample_bits(as_bit_logits(logits), top_k=sampling.top_k, top_p=sampling.top_p,
                           generator=generator).view(B, h, w, D)
        if teacher_bits is not None:
            bits = teacher_bits[k].reshape(B, h, w, D).to(device=device, dtype=torch.long)
        out.bits.append(bits)
        if callback is not None:
            callback(k, bits)
        if stop is not None and stop():
            raise GenerationInterrupted(f"generation interrupted after scale {k + 1} of {K}")
        codes_BDhw = bits_to_codes(bits)
        if k < K - 1:
            summed = summed + upsample_codes(codes_BDhw, (H, W))
            x_BlC = decoder.embed_inputs(next_scale_input(summed, schedule[k + 1][1:]).to(cond.cond_BD.dtype))
            if guided:
                x_BlC = x_BlC.repeat(2, 1, 1)
        else:
            summed = summed + codes_BDhw
    if nonfinite is not None and bool(nonfinite):
        raise RuntimeError("the decoder's bit logits held inf or nan, so the bits drawn from them mean nothing; run in "
                           "fp32 (--dtype fp32) or check the weights")
    out.summed_codes_BDHW = summed
    return out


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
                         source_BLD: Tensor | None = None,
                         source_latent_BDHW: Tensor | None = None) -> DecoderCondition:
    """The decoder condition of a generation batch: B conditional rows, then (``guided``) B unconditional ones.

    Conditional rows: start-of-image condition + the prompt context. Unconditional rows: the ``cfg_uncond``
    condition + ``uncond_context`` if given, else the published context (`published_uncond_context`).
    ``source_BLD`` (editing with ``decoder.source_condition``, `DecoderCondition`): the source codes of
    each sample, given to its conditional AND its unconditional row (condition dropout keeps it in training too),
    so guidance amplifies the instruction, not the copy. ``source_latent_BDHW`` (``decoder.source_context``): the
    sources' latents, appended to both rows' context the same way.
    """
    B, N = context_BNC.shape[:2]
    cond = decoder.condition(start_condition(decoder, sos, B), context_BNC, context_mask_BN, source_BLD=source_BLD,
                             source_latent_BDHW=source_latent_BDHW)
    if not guided:
        return cond
    if uncond_context_BNC is None:
        lengths = (context_mask_BN.sum(1) if context_mask_BN is not None
                   else torch.full((B,), N, device=context_BNC.device))
        uncond_context_BNC, uncond_context_mask_BN = published_uncond_context(decoder, lengths)
    uncond = decoder.condition(start_condition(decoder, sos, B, uncond=True), uncond_context_BNC,
                               uncond_context_mask_BN, source_BLD=source_BLD, source_latent_BDHW=source_latent_BDHW)
    return DecoderCondition.cat(cond, uncond)


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
                       uncond_context_mask_BN: Tensor | None = None, uncond_input_ids_BS: Tensor | None = None,
                       uncond_attention_mask_BS: Tensor | None = None, source_BLD: Tensor | None = None,
                       source_latent: Tensor | None = None, return_logits: bool = False,
                       callback: Callable[[int, Tensor], None] | None = None,
                       stop: Callable[[], bool] | None = None) -> ImageTokens:
    """Image tokens for prompts that end with ``<|image_gen_start|>`` (left-padded), the LLM in the loop.

    1. The LLM runs over the prompts into a fresh cache (``new_cache()``); ``position_ids`` for this prefill
       default to 0.. over each prompt's real tokens (pass M-RoPE positions for prompts with images).
    2. Context = projected states of the tokens before ``<|image_gen_start|>``; conditions by
       `generation_condition` (unconditional rows when any cfg != 1: the published ``cfg_uncond`` context
       unless ``uncond_context_BNC`` is given).
    3. `sample_image_tokens` with an `LLMScaleHook`: conditional rows continue the prompt cache (positions
       continue from each prompt's length, as published); unconditional rows per ``uncond_mode``
       (``"cached"``: a cache of their own, pre-filled with ``uncond_inputs_embeds_BSH`` if given: one row for
       all, or with ``uncond_input_ids_BS`` / ``uncond_attention_mask_BS`` one left-padded prompt per row ending
       with ``<|image_gen_start|>``, whose projected states become the rows' context).

    ``source_BLD``: the source codes of each prompt (editing, `DecoderCondition`), for both CFG rows; the decoder
    uses its slice of scale k at that scale (`VisualDecoder.forward_step`).
    ``source_latent``: instead, each source's VAE latent (``decoder.source_input = "residual"``; the term of scale k
    is built in the loop from what has been drawn, `sample_image_tokens`).
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
    guided = any(c != 1 for c in per_scale(sampling.cfg_scale, len(schedule), "cfg_scale"))
    uncond_cache = new_cache() if uncond_mode == "cached" else None  # stays empty when cfg is 1 at every scale
    uncond_mask = None
    if guided and uncond_cache is not None and uncond_inputs_embeds_BSH is not None:
        if uncond_input_ids_BS is None:
            llm(uncond_inputs_embeds_BSH.expand(B, -1, -1), cache=uncond_cache)
        else:  # one prompt per row (an edit's picture without its instruction)
            if uncond_attention_mask_BS is not None and not bool(uncond_attention_mask_BS.all()):
                uncond_mask = uncond_attention_mask_BS
            u_pos = (None if uncond_mask is None else
                     (uncond_mask.long().cumsum(1) - 1).clamp(min=0).unsqueeze(0).expand(3, -1, -1))
            u_hidden = llm(uncond_inputs_embeds_BSH, cache=uncond_cache, position_ids=u_pos, attention_mask=uncond_mask)
            uncond_context_BNC, uncond_context_mask_BN = prompt_context(u_hidden, uncond_input_ids_BS, start_id,
                                                                        projector_out, uncond_mask)
    cond = generation_condition(decoder, sos, context, context_mask, guided=guided,
                                uncond_context_BNC=uncond_context_BNC, uncond_context_mask_BN=uncond_context_mask_BN,
                                source_BLD=source_BLD, source_latent_BDHW=source_latent)
    hook = LLMScaleHook(llm, projector_in, projector_out, cond_cache=cache, cond_attention_mask=mask, batch_size=B,
                        uncond_mode=uncond_mode, uncond_cache=uncond_cache, uncond_attention_mask=uncond_mask)
    return sample_image_tokens(decoder, cond, schedule, sampling, generator=generator, hook=hook,
                               return_logits=return_logits, callback=callback, stop=stop,
                               source_latent=source_latent)
