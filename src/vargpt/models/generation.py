"""Glue between the LLM and the visual decoder (VARGPT-v1.1's "LLM in the loop"), shared by the model's training
forward and the inference engine (`vargpt.engine`, which owns prefill and the per-scale loop).

Contract
--------
* `start_condition(decoder, sos, batch_size, uncond=False)` -> ``cond_BD``: the decoder's AdaLN condition from
  the start-of-image embedding (``uncond``: from ``cfg_uncond[:1]``). It does not depend on the prompt.
* `prompt_context(hidden_BSH, input_ids_BS, start_id, projector_out, attention_mask)` -> ``(context_BNC,
  mask_BN)``: the cross-attention context = ``image_gen_projector_out`` of the LLM's final-norm states of all
  tokens strictly before ``<|image_gen_start|>`` (padding excluded), batched with a key mask.
* `scatter_gen_tokens` / `gather_gen_states`: put the decoder's token stream (projected to the LLM width) at
  the ``<|image_gen_pad|>`` slots of a training sequence, and read the LLM states back from them.
* `teacher_forced_forward(...)`: the released training forward of a generation batch (decoder stream through
  the LLM at the pad slots, LLM states back to the decoder): LLM states + bit logits.
* `source_codes(vae, pixels, schedule)`: the decoder's source codes of edit sources (source conditioning).
* `null_prompt_ids(processor)`: the null prompt of the consistent unconditional branch (chat template, empty user
  message, default system), without the start token: sampling's unconditional rows and training's condition
  dropout both use it.
* `image_only_prompt_ids(prefix_ids, processor)`: an edit prompt without its instruction (the prompt up to its
  last understanding image, then the end of the user turn): the unconditional rows of an edit with
  ``decoder.uncond_keeps_image`` (sampling and condition dropout alike).

The LLM is called through `vargpt.models.vlm.llm_forward` (a transformers Qwen2-VL); any callable with the same
signature can be passed instead.

Differences from the published implementation
---------------------------------------------
* Any batch size (published: 1): prompts of different lengths are left-padded; padding is excluded from the
  cross-attention context (the published training slice ``hidden[b, :p]`` would include left padding).
* Condition dropout acts in training mode only (published: also in eval, e.g. the DPO reference forward), from
  explicit generators.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from vargpt.errors import InputError
from vargpt.models.projectors import GenProjector, SosEmbedding
from vargpt.models.vae import BSQVAE
from vargpt.models.visual_decoder import VisualDecoder
from vargpt.processing import IMAGE_PLACEHOLDER, VARGPTProcessor, render_inference_prompt
from vargpt.scales import Schedule

__all__ = [
    "LLMForward",
    "TeacherForcedOutput",
    "teacher_forced_forward",
    "gather_gen_states",
    "image_only_prompt_ids",
    "null_prompt_ids",
    "prompt_context",
    "source_codes",
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
    copy_gate_BL: Tensor | None = None  # the copy gate's logits (decoder.source_copy with a source), else None


def teacher_forced_forward(decoder: VisualDecoder, projector_in: GenProjector, projector_out: GenProjector,
                           sos: SosEmbedding, llm: LLMForward, inputs_embeds_BSH: Tensor, input_ids_BS: Tensor,
                           x_wo_prefix_BlD: Tensor, schedule: Schedule, *, start_id: int, pad_id: int,
                           attention_mask_BS: Tensor | None = None,
                           cond_drop_generator: torch.Generator | None = None,
                           drop_path_generator: torch.Generator | None = None,
                           cond_BD: Tensor | None = None, source_BLD: Tensor | None = None,
                           source_latent_BDHW: Tensor | None = None,
                           source_mask_N: Tensor | None = None) -> TeacherForcedOutput:
    """The released training forward of a batch with images to generate (one image per sample that has
    ``<|image_gen_pad|>`` slots, in batch order; ``x_wo_prefix_BlD`` holds their teacher-forcing inputs):

    1. decoder token stream = first token (start-of-image condition + ``pos_start``) + ``word_embed`` of the
       inputs, zero-padded to the number of pad slots per image (published: the multiple of 128);
    2. ``image_gen_projector`` -> scattered into the pad slots of ``inputs_embeds`` -> LLM (causal, plain
       positions unless the caller's ``llm`` does otherwise);
    3. LLM states at the first L slots -> ``image_gen_projector_out`` -> decoder blocks, cross-attending to the
       projected states of the tokens before ``<|image_gen_start|>`` -> bit logits.

    ``cond_BD``: a precomputed start condition per image (e.g. with the caller's own condition dropout);
    default `start_condition` with the decoder's dropout (``cond_drop_generator``). ``source_BLD``: the source codes
    per image (`DecoderCondition`; zero rows: none). ``source_latent_BDHW`` / ``source_mask_N``: the sources'
    latents for ``decoder.source_context`` (`VisualDecoder.condition`).
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
    cond = decoder.condition(cond_BD, context, context_mask, source_BLD=source_BLD,
                             source_latent_BDHW=source_latent_BDHW, source_mask_B=source_mask_N)
    logits, gate = decoder.forward_train(projector_out(states), cond, schedule, generator=drop_path_generator,
                                         return_gate=True)
    return TeacherForcedOutput(hidden, logits, gate)




def source_codes(vae: BSQVAE, decoder: VisualDecoder, pixels_N3HW: Tensor, schedule: Schedule,
                 mask_N: Tensor | None = None) -> Tensor:
    """The decoder's source codes [N, L, D] of source images [N, 3, H, W] in [-1, 1] at the generation size
    (``source_input = "bits"``): their own multi-scale bits, encoded exactly like the targets' bit labels (clean, no
    self-correction), as +-1. ``mask_N``: False rows get zeros (their pixels are not encoded)."""
    device = decoder.source_embed.weight.device
    n, L = pixels_N3HW.shape[0], sum(t * h * w for t, h, w in schedule)
    mask = (torch.ones(n, dtype=torch.bool) if mask_N is None else mask_N.bool()).to(device)
    codes = torch.zeros(n, L, decoder.codebook_dim, device=device)
    if bool(mask.any()):
        codes[mask] = vae.encode(pixels_N3HW.to(device=device)[mask], schedule).labels_BLD.float() * 2 - 1
    return codes


def null_prompt_ids(processor: VARGPTProcessor) -> list[int]:
    """Ids of the null prompt (chat template, empty user message, default system), without the start token."""
    return processor.encode(render_inference_prompt(""))


def image_only_prompt_ids(prefix_ids: list[int], processor: VARGPTProcessor) -> list[int]:
    """``prefix_ids`` (a prompt with an understanding image, before ``<|image_gen_start|>``, unpadded) up to and
    including its last ``<|vision_end|>``, then the rest of the chat template of an empty message after an image
    (end of the user turn, assistant header): the edit's picture without its instruction, the unconditional row of
    ``decoder.uncond_keeps_image``. Raises `InputError` without an image."""
    vision_end = processor.tokens.vision_end
    if vision_end not in prefix_ids:
        raise InputError("an image-only unconditional prompt needs a prompt with an <image>")
    last = len(prefix_ids) - 1 - prefix_ids[::-1].index(vision_end)
    tail = render_inference_prompt(IMAGE_PLACEHOLDER + "\n").split(IMAGE_PLACEHOLDER, 1)[1]
    return prefix_ids[:last + 1] + processor.encode(tail)
