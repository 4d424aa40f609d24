"""The understanding side: transformers' Qwen2-VL built from our config, plus the glue the unified model needs.

Contract
--------
* `build_vlm(cfg)` returns a stock `transformers.Qwen2VLForConditionalGeneration` whose sizes and token ids
  come from our `VisionConfig` / `LLMConfig` / `TokenIds`. Nothing in it is re-implemented: vision tower,
  merger (the understanding projector), Qwen2 LLM, M-RoPE (`get_rope_index`) and `generate` are transformers'.
  With ``device="meta"`` no parameter memory is allocated (load weights with `vargpt.weights.load_into`);
  the few rotary buffers, which no checkpoint holds, are built for real on the CPU so the model runs after loading.
* Small named glue steps: `image_token_mask` / `mm_token_type_ids` (which positions hold image features),
  `embed_inputs` (token embeddings with image features scattered into the ``<|image_pad|>`` slots by
  `scatter_features`, which checks the count), `rope_positions` (M-RoPE position ids and deltas),
  `llm_forward` (the LLM on ready ``inputs_embeds`` with an explicit KV cache, returning final-norm hidden
  states) and `new_cache`.

In memory the parameters are named ``model.visual.*``, ``model.language_model.*`` and ``lm_head.*``
(transformers' layout); `vargpt.weights.released_to_vlm_keys` maps the released names onto them.

Differences from the published implementation
---------------------------------------------
* The published code copies Qwen2-VL's modeling file (transformers 4.46) into one big subclass; here the
  classes are composed unchanged, so the model follows transformers' conventions (e.g. it needs
  ``mm_token_type_ids`` whenever images are passed, which `mm_token_type_ids` below builds).
* Image placeholders are located by token type (runs of ``<|image_pad|>``) rather than by the token after
  ``<|vision_start|>``; for well-formed prompts (the processor's) the positions are identical.
* During image generation the published forward runs the LLM with ``position_ids=None`` (positions continue
  from the cache length, ignoring ``rope_deltas``); `llm_forward` keeps that behaviour when no positions
  are given, and callers may pass explicit ones.
"""

from __future__ import annotations

import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.cache_utils import DynamicCache
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding, Qwen2VLVisionRotaryEmbedding

from vargpt.config import VARGPTConfig
from vargpt.errors import ConfigError, InputError

__all__ = [
    "build_vlm",
    "hf_config",
    "image_token_mask",
    "mm_token_type_ids",
    "embed_inputs",
    "scatter_features",
    "rope_positions",
    "new_cache",
    "llm_forward",
]


def hf_config(cfg: VARGPTConfig) -> Qwen2VLConfig:
    """transformers' `Qwen2VLConfig` equivalent to our vision/llm/tokens sections."""
    v, t, ids = cfg.vision, cfg.llm, cfg.tokens
    if float(v.mlp_ratio) != int(v.mlp_ratio):
        raise ConfigError(f"config field vision.mlp_ratio = {v.mlp_ratio} is invalid: Qwen2-VL needs an integer ratio")
    vision = dict(depth=v.depth, embed_dim=v.embed_dim, hidden_size=v.hidden_size, hidden_act=v.hidden_act,
                  mlp_ratio=int(v.mlp_ratio), num_heads=v.num_heads, in_channels=v.in_channels,
                  patch_size=v.patch_size, spatial_merge_size=v.spatial_merge_size,
                  temporal_patch_size=v.temporal_patch_size)
    text = dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                num_key_value_heads=t.num_key_value_heads, hidden_act="silu",
                max_position_embeddings=t.max_position_embeddings, rms_norm_eps=t.rms_norm_eps,
                use_sliding_window=False,
                rope_parameters={"rope_type": "default", "rope_theta": float(t.rope_theta),
                                 "mrope_section": list(t.mrope_section)},
                # The published embedding uses <|endoftext|> as padding_idx (its gradient row stays zero).
                bos_token_id=ids.endoftext, eos_token_id=ids.im_end, pad_token_id=ids.endoftext)
    return Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids.image_pad,
                         video_token_id=ids.video_pad, vision_start_token_id=ids.vision_start,
                         vision_end_token_id=ids.vision_end, tie_word_embeddings=t.tie_word_embeddings)


def build_vlm(cfg: VARGPTConfig, *, device: torch.device | str | None = None,
              dtype: torch.dtype | None = None) -> Qwen2VLForConditionalGeneration:
    """A randomly initialised Qwen2-VL (vision tower + merger + LLM + lm_head) sized by ``cfg``.

    ``device="meta"``: parameters are shapes only (nothing allocated, no init cost); load real weights with
    ``vargpt.weights.load_into(vlm, state_dict)``. ``dtype`` sets the parameter dtype (rotary tables stay fp32).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    config = hf_config(cfg)
    with device:
        vlm = Qwen2VLForConditionalGeneration._from_config(
            config, dtype=dtype or torch.float32, attn_implementation=cfg.llm.attn_implementation)
    if device.type == "meta":
        # Rotary tables are non-persistent buffers (in no checkpoint): build them for real, on the CPU;
        # `load_into` moves them next to the loaded weights.
        with torch.device("cpu"):
            vlm.model.language_model.rotary_emb = Qwen2VLRotaryEmbedding(config.text_config)
            vlm.model.visual.rotary_pos_emb = Qwen2VLVisionRotaryEmbedding(config.vision_config)
    return vlm.eval()


# ----------------------------------------------------------------------------------------------- glue


def image_token_mask(vlm: Qwen2VLForConditionalGeneration, input_ids: torch.Tensor) -> torch.Tensor:
    """Bool mask [B, L] of the ``<|image_pad|>`` slots that receive image features."""
    return input_ids == vlm.config.image_token_id


def mm_token_type_ids(vlm: Qwen2VLForConditionalGeneration, input_ids: torch.Tensor) -> torch.Tensor:
    """transformers' token types [B, L]: 1 at image slots, 0 elsewhere (videos are not used by VARGPT)."""
    return image_token_mask(vlm, input_ids).to(torch.int32)


def embed_inputs(vlm: Qwen2VLForConditionalGeneration, input_ids: torch.Tensor,
                 pixel_values: torch.Tensor | None = None,
                 image_grid_thw: torch.Tensor | None = None, place: torch.nn.Module | None = None) -> torch.Tensor:
    """LLM input embeddings [B, L, D]: token embeddings, image features scattered into the image slots.

    Image features come from the vision tower + merger in the order of ``image_grid_thw`` rows; they fill
    the ``<|image_pad|>`` slots in reading order (row-major over the batch), one slot per merged patch.
    ``place``: a module adding where each token is (`vargpt.models.projectors.ImagePlaceEmbedding`), or None.
    """
    embeds_BLD = vlm.model.get_input_embeddings()(input_ids)
    mask_BL = image_token_mask(vlm, input_ids)
    n_slots = int(mask_BL.sum())
    if pixel_values is None:
        if n_slots:
            raise InputError(f"the prompt has {n_slots} <|image_pad|> slot(s) but no image was given; "
                             "pass the image(s) or remove the placeholders")
        return embeds_BLD
    if image_grid_thw is None:
        raise InputError("pixel_values given without image_grid_thw; pass both, as the processor returns them")
    feats_ND = torch.cat(vlm.model.get_image_features(pixel_values, image_grid_thw).pooler_output, dim=0)
    if place is not None:
        feats_ND = feats_ND + place(image_grid_thw).to(feats_ND.dtype)
    return scatter_features(embeds_BLD, mask_BL, feats_ND, what="image")


def scatter_features(embeds_BLD: torch.Tensor, slots_BL: torch.Tensor, feats_ND: torch.Tensor, *,
                     what: str) -> torch.Tensor:
    """``embeds_BLD`` with its ``slots_BL`` positions replaced, in reading order, by the rows of ``feats_ND``.

    One masked scatter with an explicit count check; also used for the ``<|image_gen_pad|>`` slots of training.
    """
    n_slots = int(slots_BL.sum())
    if feats_ND.shape[0] != n_slots:
        raise InputError(f"the {what}s give {feats_ND.shape[0]} tokens but the sequence has {n_slots} {what} slots; "
                         "build the prompt with the processor so the counts match")
    mask_BLD = slots_BL.unsqueeze(-1).expand_as(embeds_BLD)
    return embeds_BLD.masked_scatter(mask_BLD, feats_ND.to(embeds_BLD.dtype))


def rope_positions(vlm: Qwen2VLForConditionalGeneration, input_ids: torch.Tensor,
                   image_grid_thw: torch.Tensor | None = None,
                   attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE positions [3, B, L] and deltas [B, 1] (transformers' `get_rope_index`).

    Worked example (merge 2, grid_thw [1, 4, 6] -> a 2 x 3 token image after 2 text tokens):
    text gets t = h = w = 0, 1; the image tokens get t = 2 and (h, w) = 2 + (row, col), i.e.
    h = 2 2 2 3 3 3, w = 2 3 4 2 3 4; the next text token continues at 2 + max(2, 3) = 5 on all axes.
    ``rope_deltas`` = (largest position + 1) - sequence length; decoding adds it to the cache length.
    """
    return vlm.model.get_rope_index(input_ids, mm_token_type_ids(vlm, input_ids), image_grid_thw=image_grid_thw,
                                    attention_mask=attention_mask)


def new_cache(vlm: Qwen2VLForConditionalGeneration) -> DynamicCache:
    """An empty KV cache for the LLM (grows with every `llm_forward` call that is given it)."""
    return DynamicCache(config=vlm.config.text_config)


def llm_forward(vlm: Qwen2VLForConditionalGeneration, inputs_embeds: torch.Tensor, *,
                cache: DynamicCache | None = None, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Final-norm LLM hidden states [B, L, D] for ``inputs_embeds`` [B, L, D].

    ``cache``: appended to in place (positions default to cache length + 0..L-1 on all M-RoPE axes, and the
    new tokens attend causally to each other and to everything cached). ``position_ids``: [3, B, L] or [B, L].
    Apply ``vlm.lm_head`` to the result for text logits.
    """
    out = vlm.model.language_model(inputs_embeds=inputs_embeds, cache=cache, position_ids=position_ids,
                                   attention_mask=attention_mask, use_cache=cache is not None)
    return out.last_hidden_state
