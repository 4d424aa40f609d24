"""The unified VARGPT-v1.1 model: understanding (next-token) and generation/editing (next-scale) in one module.

Contract
--------
`VARGPT(config)` composes the pieces, registered under the released top-level names so that ``state_dict()`` IS
the released layout (``visual.*``, ``model.*``, ``lm_head.*``, ``vae_local.*``, ``vargpt_gen.*``,
``image_gen_projector.*``, ``image_gen_projector_out.*``, ``sos_embedding.*``) and trainers can freeze by those
names:

* ``visual`` / ``model`` / ``lm_head``: the vision tower + merger, the Qwen2 LLM and its head of a stock
  transformers ``Qwen2VLForConditionalGeneration`` (`vlm`; built by `vargpt.models.vlm.build_vlm`, its children
  registered here under the released names, the wrapper itself kept unregistered so nothing is stored twice);
* ``vae_local`` (`vae`): `BSQVAE`; ``vargpt_gen`` (`decoder`): `VisualDecoder`; ``image_gen_projector`` /
  ``image_gen_projector_out``: `GenProjector`; ``sos_embedding``: `SosEmbedding`;
* ``processor``: the `VARGPTProcessor` (tokenizer + image processor) saved with the weights.

The model holds its parts and one forward per mode, nothing else:

* `forward(input_ids, attention_mask, pixel_values, image_grid_thw, ...)`: understanding, transformers
  conventions (returns transformers' output with ``.logits``; M-RoPE positions computed by transformers).
* `forward_generation(batch, ...)`: the teacher-forced forward of a generation batch (the protocol of
  `vargpt.training.objective`): LLM states of every token, the decoder's bit logits of every target image and
  their bit labels. Rows with an image to generate use plain 1-D positions (as the published training does);
  other rows with understanding images use M-RoPE.

Running the model lives elsewhere: sampling images and text, editing, mixed turns and caches in `vargpt.engine`;
losses, condition dropout and DPO log-probs in `vargpt.training.objective`; reading, writing and converting
checkpoints in `vargpt.weights` (`from_pretrained` / `save_pretrained` call it).

Optional source conditioning for editing (``decoder.source_condition``, VAREdit-style; off in every preset and
absent from released checkpoints): the edit source's own multi-scale bits (`vargpt.models.generation.source_codes`)
enter the decoder's block input through the zero-initialised ``vargpt_gen.source_embed``. Loading weights without
``source_embed`` into such a config starts it at zero (exactly the model without it).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vargpt.config import VARGPTConfig
from vargpt.errors import CheckpointError, InputError
from vargpt.models import vlm as V
from vargpt.models.generation import source_codes, teacher_forced_forward
from vargpt.models.projectors import GenProjector, ImagePlaceEmbedding, SosEmbedding
from vargpt.models.quantizer import MultiScaleTokens
from vargpt.models.vae import BSQVAE
from vargpt.models.visual_decoder import VisualDecoder
from vargpt.processing import ByteTokenizer, VARGPTProcessor
from vargpt.runtime import resolve_device, resolve_dtype
from vargpt.scales import Schedule, schedule_for_size
from vargpt.weights import Layout, load_checkpoint, load_checkpoint_into, save_checkpoint

__all__ = ["VARGPT", "GenerationForward"]

MAX_BYTE_VOCAB = 4096  # without tokenizer.json only small (byte-level) vocabularies fall back to ByteTokenizer


@dataclass
class GenerationForward:
    """`VARGPT.forward_generation` result. Without generation rows only ``hidden_BSH`` is set."""

    hidden_BSH: Tensor  # LLM final-norm states of every token (lm_head gives the text logits)
    gen_logits_BLV: Tensor | None = None  # [N, L, 2D] bit logits of the N target images
    bit_labels_BLD: Tensor | None = None  # [N, L, D] their bits (the VAE encoding of the targets)
    schedule: Schedule | None = None
    source_BLD: Tensor | None = None  # edit sources' codes given to the decoder (zero rows: none), else None
    copy_gate_BL: Tensor | None = None  # the copy gate's logits (decoder.source_copy), else None
    tokens: MultiScaleTokens | None = None  # the targets' encoding (labels, teacher-forcing inputs, source term)


class VARGPT(nn.Module):
    """VARGPT-v1.1: see the module docstring for the contract."""

    def __init__(self, config: VARGPTConfig, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, tokenizer: Any | None = None) -> None:
        super().__init__()
        config.validate()
        self.config = config
        device = torch.device(device) if device is not None else torch.device("cpu")
        dtype = dtype or torch.float32
        vlm = V.build_vlm(config, device=device, dtype=dtype)
        self._hf = (vlm,)  # a tuple: not registered, its children are (under the released names)
        self.visual = vlm.model.visual
        self.model = vlm.model.language_model
        self.lm_head = vlm.lm_head
        C, H = config.decoder.embed_dim, config.llm.hidden_size
        with device:
            self.vae_local = BSQVAE(config.vae)
            self.vargpt_gen = VisualDecoder(config.decoder, config.vae.codebook_dim, config.compat)
            self.image_gen_projector = GenProjector(C, H)
            self.image_gen_projector_out = GenProjector(H, C)
            self.sos_embedding = SosEmbedding(config.tokens.image_gen_start, C)
            self.image_place = (ImagePlaceEmbedding(config.vision.place_embed, H, config.vision.spatial_merge_size,
                                                    config.vision.place_scale)
                                if config.vision.place_embed else None)
        for m in (self.vae_local, self.vargpt_gen, self.image_gen_projector, self.image_gen_projector_out,
                  self.sos_embedding, self.image_place):
            if m is not None:
                m.to(dtype)
        if tokenizer is None and config.llm.vocab_size <= MAX_BYTE_VOCAB:
            tokenizer = ByteTokenizer(config.tokens)
        self.processor: VARGPTProcessor | None = VARGPTProcessor(tokenizer, config) if tokenizer else None
        self.eval()

    # ---- views

    @property
    def vlm(self) -> nn.Module:
        """The transformers Qwen2-VL whose children are ``visual``, ``model`` and ``lm_head``."""
        return self._hf[0]

    @property
    def vae(self) -> BSQVAE:
        return self.vae_local

    @property
    def decoder(self) -> VisualDecoder:
        return self.vargpt_gen

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def require_processor(self) -> VARGPTProcessor:
        if self.processor is None:
            raise CheckpointError("this model has no tokenizer (no tokenizer.json beside its weights); copy the "
                                  "checkpoint's tokenizer files into its directory or pass token ids")
        return self.processor

    def train(self, mode: bool = True) -> VARGPT:
        super().train(mode)
        self.vlm.train(mode)  # the unregistered wrapper and its Qwen2VLModel
        return self

    def gradient_checkpointing_enable(self) -> None:
        """Per-layer checkpointing in the LLM and ViT (transformers) and per block in the decoder."""
        self.vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.vargpt_gen.cfg.gradient_checkpointing = True

    # ---- checkpoints (vargpt.weights)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: torch.device | str | None = "cpu",
                        dtype: torch.dtype | str | None = None, config: VARGPTConfig | None = None,
                        weights: str | Path | None = None) -> VARGPT:
        """Load our layout or the released one (config.json + (sharded) safetensors + tokenizer files).

        ``config`` / ``weights``: an explicit config and weights file (e.g. the conformance fixtures' directory,
        whose ``tiny_config.json`` is read with `vargpt.config.official_fixture_config`). The model is built on
        the meta device and takes the loaded tensors (read in ``dtype``, on ``device``) without a second copy.
        ``device``: ``"auto"`` picks CUDA when present; default CPU (what trainers expect before they place the
        model). ``dtype``: fp32 / bf16 / fp16 (or a torch dtype); default fp32 on CPU, bf16 on CUDA.
        """
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        ckpt = load_checkpoint(path, device=dev, dtype=dt, config=config, weights=weights)
        model = cls(ckpt.config, device="meta", dtype=dt, tokenizer=ckpt.tokenizer)
        load_checkpoint_into(model, ckpt, device=dev)
        return model.eval()

    def save_pretrained(self, directory: str | Path, *, layout: Layout = "vargpt",
                        max_shard_size: int | str = "5GB") -> Path:
        """Write config.json (ours, or the released format with ``layout="released"``), the weights as
        (sharded) safetensors in the released key layout, and the tokenizer files."""
        return save_checkpoint(directory, self.config, self.state_dict(), processor=self.processor, layout=layout,
                               max_shard_size=max_shard_size)

    # ---- understanding

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, pixel_values: Tensor | None = None,
                image_grid_thw: Tensor | None = None, *, mm_token_type_ids: Tensor | None = None,
                position_ids: Tensor | None = None, cache: Any | None = None, labels: Tensor | None = None,
                use_cache: bool = False, **kwargs: Any) -> Any:
        """Understanding forward with transformers' conventions: returns its output (``.logits`` [B, S, V])."""
        if pixel_values is not None and mm_token_type_ids is None:
            mm_token_type_ids = V.mm_token_type_ids(self.vlm, input_ids)
        if pixel_values is not None and self.image_place is not None:  # transformers would embed without places
            kwargs["inputs_embeds"] = V.embed_inputs(self.vlm, input_ids, pixel_values, image_grid_thw,
                                                     self.image_place)
            pixel_values = None
        return self.vlm(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                        image_grid_thw=image_grid_thw, mm_token_type_ids=mm_token_type_ids,
                        position_ids=position_ids, cache=cache, labels=labels, use_cache=use_cache, **kwargs)

    # ---- generation (teacher forced)

    def _positions(self, ids: Tensor, grid: Tensor | None, mask: Tensor | None) -> Tensor | None:
        """M-RoPE for rows with understanding images and no image to generate; plain 1-D positions otherwise."""
        if grid is None:
            return None
        pos, _ = V.rope_positions(self.vlm, ids, grid, mask)
        gen_rows = (ids == self.config.tokens.image_gen_pad).any(1)
        if bool(gen_rows.any()):
            m = mask if mask is not None else torch.ones_like(ids)
            plain = (m.long().cumsum(1) - 1).clamp(min=0)
            pos = torch.where(gen_rows.view(1, -1, 1), plain.unsqueeze(0).expand_as(pos), pos)
        return pos

    def forward_generation(self, batch: dict[str, Any], *, cond_BD: Tensor | None = None,
                           self_correction: bool = False, generator: torch.Generator | None = None,
                           tokens: MultiScaleTokens | None = None) -> GenerationForward:
        """Teacher-forced forward of a batch on this model's device (``input_ids``, ``attention_mask``, optional
        understanding images, ``gen_pixel_values`` for the rows with ``<|image_gen_pad|>`` slots, optional
        ``gen_source_*``; see `vargpt.training.objective`).

        The targets are encoded by the VAE into bit labels and teacher-forcing inputs (``self_correction``: the
        config's bitwise self-correction, drawn from ``generator``). ``cond_BD``: the decoder's start condition
        per image (None: the decoder's own, with its training-mode dropout from ``generator``). DropPath draws
        from ``generator`` too. ``tokens``: the targets' encoding of an earlier forward of the same targets and
        sources (``GenerationForward.tokens``), used instead of encoding them again (same self-correction draws).
        """
        cfg, tok = self.config, self.config.tokens
        ids, mask = batch["input_ids"], batch["attention_mask"]
        grid = batch.get("image_grid_thw")
        embeds = V.embed_inputs(self.vlm, ids, batch.get("pixel_values"), grid, self.image_place)
        llm = functools.partial(V.llm_forward, self.vlm, position_ids=self._positions(ids, grid, mask))
        n_gen = int((ids == tok.image_gen_pad).any(1).sum())
        gen_px = batch.get("gen_pixel_values")
        if not n_gen:
            return GenerationForward(llm(embeds, attention_mask=mask))
        if gen_px is None or gen_px.shape[0] != n_gen:
            got = "no gen_pixel_values" if gen_px is None else f"{gen_px.shape[0]} image(s) in gen_pixel_values"
            raise InputError(f"{n_gen} row(s) hold <|image_gen_pad|> slots but the batch has {got}; give one target "
                             "image per row with an <image_gen> slot")
        schedule = schedule_for_size(gen_px.shape[-2], gen_px.shape[-1], cfg.vae.stride)
        src_px, src_mask = self._batch_source(batch, gen_px)
        residual = src_px is not None and cfg.decoder.source_input == "residual"
        if tokens is None:
            tokens = self.vae_local.encode(gen_px, schedule, self_correction=cfg.self_correction if self_correction
                                           else None, generator=generator, source=src_px if residual else None,
                                           source_mask=src_mask)
        source = latent = None
        if residual:
            source = tokens.source_BLD * src_mask.view(-1, 1, 1).to(tokens.source_BLD)
            if cfg.decoder.source_context:
                with torch.no_grad():
                    latent = self.vae_local.encode_latent(src_px)
        elif src_px is not None:
            source = source_codes(self.vae_local, self.vargpt_gen, src_px, schedule, src_mask)
        out = teacher_forced_forward(self.vargpt_gen, self.image_gen_projector, self.image_gen_projector_out,
                                     self.sos_embedding, llm, embeds, ids, tokens.x_wo_prefix_BLD.to(self.dtype),
                                     schedule, start_id=tok.image_gen_start, pad_id=tok.image_gen_pad,
                                     attention_mask_BS=mask, cond_drop_generator=generator,
                                     drop_path_generator=generator, cond_BD=cond_BD, source_BLD=source,
                                     source_latent_BDHW=latent, source_mask_N=src_mask)
        return GenerationForward(out.hidden_BSH, out.gen_logits_BLV, tokens.labels_BLD, schedule, source,
                                 out.copy_gate_BL, tokens)

    def _batch_source(self, batch: dict[str, Any], gen_px: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Edit sources of a batch's targets and which rows have one (``gen_source_*`` keys), or Nones (no source
        conditioning)."""
        src = batch.get("gen_source_pixel_values")
        if not self.config.decoder.source_condition or src is None:
            return None, None
        mask = batch.get("gen_source_mask")
        if src.shape != gen_px.shape or (mask is not None and mask.shape != (gen_px.shape[0],)):
            raise InputError(f"gen_source_pixel_values {tuple(src.shape)} / gen_source_mask "
                             f"{None if mask is None else tuple(mask.shape)} do not match gen_pixel_values "
                             f"{tuple(gen_px.shape)}: give one source row (and mask entry) per target, same size")
        return src.to(gen_px.device), None if mask is None else mask.to(gen_px.device)

