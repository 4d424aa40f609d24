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

One named method per mode:

* `forward(input_ids, attention_mask, pixel_values, image_grid_thw, ...)`: understanding, transformers
  conventions (returns transformers' output with ``.logits``; M-RoPE positions computed by transformers).
* `training_losses(batch)` / `image_logprobs(batch)`: teacher-forced training forward and DPO log-probs.
* `generate_images(prompts | input_ids, ...)`: text-to-image (and, with ``pixel_values``, editing) by next-scale
  prediction with the LLM in the loop; `edit_images(images, instructions)` builds the editing prompts.
* `generate(input_ids, ...)`: text with transformers' ``generate`` (KV cache, greedy or sampled, batched) and
  mixed turns: when the LLM emits ``<|image_gen_start|>`` an image is generated, its tokens are put into the
  sequence (``<|image_gen_start|>`` + image stream + ``<|image_gen_end|>``, the training layout) and the text
  continues. Returns per sample a list of parts: ``str`` or an image tensor [3, H, W] in [-1, 1].

Training batch protocol (what `vargpt.data.records.Collator` makes from `VARGPTProcessor.training_inputs`)
------------------------------------------------------------------------------------------------------
``input_ids``, ``attention_mask``, ``labels`` [B, S] (prompt = -100; any padding side), optional
``pixel_values`` / ``image_grid_thw`` (understanding images, in reading order over the batch), optional
``gen_pixel_values`` [N, 3, H, W] in [-1, 1]: one target image per row that holds ``<|image_gen_pad|>`` slots
(in row order; the slots per image = the schedule's token count padded to ``decoder.pad_to_multiplier``); with
``decoder.source_condition``, optional ``gen_source_pixel_values`` [N, 3, H, W] (aligned with ``gen_pixel_values``:
each target's edit source at the same size) and ``gen_source_mask`` [N] bool (False: no source). Other
keys are ignored. The model encodes the targets with its VAE into bit labels and teacher-forcing inputs with
bitwise self-correction (``config.self_correction``) drawn from an explicit generator (``generator=``, default:
one seeded from torch's global RNG, so a seeded, resumed trainer replays the same noise).
`training_losses` returns ``{"loss", "text_loss", "bit_loss"}``: loss = text_loss_weight x text CE +
bit_loss_weight x bit CE (``compat.bit_loss``). `image_logprobs` returns [N]: sum over scales, positions and bits of
log p(own bit) under clean teacher forcing (no self-correction, no condition dropout: deterministic, so reference
log-probs can be cached); ``average=True`` divides by the tokens.

Positions: understanding rows use M-RoPE (as transformers does at inference); rows with an image to generate use
plain 1-D positions in training and in image sampling, as the published training does.

Unconditional CFG branch
------------------------
* ``compat.published_uncond_branch=True`` (released checkpoints, conformance): ``uncond_mode="published"``: every
  scale re-runs the LLM on that scale's tokens alone (no prompt, no cache), the decoder's cross-attention context
  is the raw ``cfg_uncond[:N]`` rows and its AdaLN condition comes from ``cfg_uncond[:1]``. Training then drops
  only the start-of-image condition (10%), as published.
* Otherwise (models we train), the consistent branch: the unconditional row is the same model run on the
  **null prompt** = the chat template with an empty user message and no images,
  ``<|im_start|>system\\n{default system}<|im_end|>\\n<|im_start|>user\\n<|im_end|>\\n<|im_start|>assistant\\n``
  followed by ``<|image_gen_start|>``: its AdaLN condition comes from ``cfg_uncond[:1]``, its cross-attention
  context is the projected LLM states of the null prompt, and its image tokens continue the null prompt's KV cache
  (``uncond_mode="cached"``). Training's condition dropout matches it exactly: with probability
  ``decoder.cond_drop_rate`` a generation row's whole prefix (everything before its first
  ``<|image_gen_start|>``, understanding images included) is replaced by the null prompt and its start condition by
  the ``cfg_uncond`` one.

Differences from the published implementation
---------------------------------------------
* Any batch size for images (left-padded prompts, one generator per sample: a batch equals separate calls with
  the same seeds); sampling settings in `SamplingConfig`; image size from the scale templates; no files written.
* After an image the text continues (published: generation stops); the image enters the LLM as in training.
* Text loss by default over the answer tokens only (``compat.published_text_loss`` restores the published
  whole-sequence loss of generation rows); lm_head is applied only at supervised positions (same value, less
  memory).
* Condition dropout, DropPath and self-correction act in training mode only, from explicit generators.
* Images are converted to uint8 by rounding (published: truncation) and returned, RGB.
* Optional source conditioning for editing (``decoder.source_condition``, VAREdit-style; off in every preset and
  absent from released checkpoints): the edit source's own multi-scale bits (the VAE encoding that gives the target's
  bit labels, no self-correction) enter the decoder's block input through the zero-initialised
  ``vargpt_gen.source_embed``, scale k's at the positions predicting scale k, in training (rows without a source and
  t2i rows get nothing; condition-dropped rows keep it), in `image_logprobs` and in both CFG rows of sampling.
  Loading weights without ``source_embed`` into such a config starts it at zero (exactly the model without it).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from torch import Tensor, nn
from transformers import LogitsProcessorList

from vargpt.config import SamplingConfig, VARGPTConfig, from_released_hf_config
from vargpt.data.records import gen_image_tensor
from vargpt.errors import CheckpointError, ConfigError, InputError
from vargpt.models import vlm as V
from vargpt.models.generation import (
    prompt_context,
    sample_from_prompt,
    scatter_gen_tokens,
    start_condition,
    teacher_forced_forward,
)
from vargpt.models.projectors import GenProjector, SosEmbedding
from vargpt.models.quantizer import add_scale, next_scale_input
from vargpt.models.vae import BSQVAE
from vargpt.models.visual_decoder import VisualDecoder
from vargpt.processing import (
    DEFAULT_SYSTEM_PROMPT,
    IGNORE_INDEX,
    ByteTokenizer,
    VARGPTProcessor,
    load_tokenizer,
    render_inference_prompt,
)
from vargpt.runtime import resolve_device, resolve_dtype
from vargpt.sampling.image import ImageTokens
from vargpt.scales import Schedule, padded_tokens, schedule_for_size
from vargpt.weights import SINGLE_FILE, load_into, load_state_dict_files, save_state_dict

__all__ = ["VARGPT", "GeneratedImages", "convert_checkpoint", "read_config", "released_hf_config"]

CONFIG_FILE = "config.json"
# Files beside the weights that travel with a checkpoint on conversion (tokenizer, processors, generation config).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
              "added_tokens.json", "preprocessor_config.json", "chat_template.json", "chat_template.jinja",
              "generation_config.json")
MAX_BYTE_VOCAB = 4096  # without tokenizer.json only small (byte-level) vocabularies fall back to ByteTokenizer
_SECTION_OF_PREFIX = {"visual": "vision", "model": "llm", "lm_head": "llm", "vae_local": "vae", "vargpt_gen": "decoder",
                      "image_gen_projector": "decoder.embed_dim / llm.hidden_size",
                      "image_gen_projector_out": "llm.hidden_size / decoder.embed_dim",
                      "sos_embedding": "tokens.image_gen_start / decoder.embed_dim"}
Layout = Literal["vargpt", "released"]


@dataclass
class GeneratedImages:
    """`VARGPT.generate_images` result: images [N, 3, H, W] in [-1, 1] and their tokens."""

    images: Tensor
    bits: list[Tensor]  # per scale [N, h, w, D]
    schedule: Schedule
    logits: list[Tensor] = field(default_factory=list)  # per scale raw decoder logits (return_logits=True)


# ----------------------------------------------------------------------------------------------- config files


def released_hf_config(cfg: VARGPTConfig, dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """The released ``config.json`` (model_type ``vargpt_qwen2_vl``) for ``cfg``.

    The decoder/VAE sizes are not part of the released format (the published code hard-codes them); they travel in
    an extra ``vargpt_config`` entry (ignored by the published code) so a conversion round trip is lossless.
    """
    v, t, ids = cfg.vision, cfg.llm, cfg.tokens
    names = ("image_gen_start", "image_gen_end", "image_gen_pad")
    special = {k: x for n in names for k, x in ((n, f"<|{n}|>"), (f"{n}_token_id", getattr(ids, n)))}
    return {
        "architectures": ["VARGPTQwen2VLForConditionalGeneration"], "model_type": "vargpt_qwen2_vl",
        "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads, "hidden_act": "silu",
        "max_position_embeddings": t.max_position_embeddings, "initializer_range": 0.02, "rms_norm_eps": t.rms_norm_eps,
        "use_cache": True, "tie_word_embeddings": t.tie_word_embeddings, "rope_theta": t.rope_theta,
        "use_sliding_window": False, "sliding_window": t.max_position_embeddings,
        "max_window_layers": t.num_hidden_layers, "attention_dropout": 0.0,
        "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
        "bos_token_id": ids.endoftext, "eos_token_id": ids.im_end, "pad_token_id": ids.endoftext,
        "vision_start_token_id": ids.vision_start, "vision_end_token_id": ids.vision_end,
        "vision_token_id": ids.vision_pad, "image_token_id": ids.image_pad, "video_token_id": ids.video_pad,
        "vision_config": {"model_type": "vargpt_qwen2_vl", "depth": v.depth, "embed_dim": v.embed_dim,
                          "hidden_size": v.hidden_size, "hidden_act": v.hidden_act, "mlp_ratio": v.mlp_ratio,
                          "num_heads": v.num_heads, "in_channels": v.in_channels, "in_chans": v.in_channels,
                          "patch_size": v.patch_size, "spatial_patch_size": v.patch_size,
                          "spatial_merge_size": v.spatial_merge_size, "temporal_patch_size": v.temporal_patch_size},
        "special_tokens": special, "train_from_scratch": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "vargpt_config": cfg.to_dict(),
    }


def read_config(path: str | Path) -> tuple[VARGPTConfig, Layout]:
    """Our config for a checkpoint's ``config.json`` (ours: has ``preset``; released: model_type vargpt_qwen2_vl)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no config.json; a checkpoint directory holds config.json + safetensors "
                              "(+ tokenizer.json); for bare weights pass config= and weights=")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    try:
        if d.get("model_type") == "vargpt_qwen2_vl":
            if "vargpt_config" not in d:
                return from_released_hf_config(d), "released"
            ours = VARGPTConfig.from_dict(d["vargpt_config"])
            hf = from_released_hf_config(d, decoder=ours.decoder, vae=ours.vae)
            return dataclasses.replace(ours, vision=hf.vision, llm=hf.llm, tokens=hf.tokens).validate(), "released"
        if "preset" in d:
            return VARGPTConfig.from_dict(d), "vargpt"
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    raise CheckpointError(f"{path}: neither our config (no 'preset' field) nor a released VARGPT-v1.1 config "
                          f"(model_type {d.get('model_type')!r}, expected 'vargpt_qwen2_vl')")


def _checkpoint_dtype(path: Path) -> torch.dtype:
    """dtype of the first floating tensor of a checkpoint (file or directory)."""
    files = [path] if path.is_file() else (
        [path / SINGLE_FILE] if (path / SINGLE_FILE).is_file() else sorted(path.glob("*.safetensors")))
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                t = sf.get_slice(key)
                dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(t.get_dtype())
                if dtype is not None:
                    return dtype
    return torch.float32


def _bits_to_inputs(bits: Sequence[Tensor], schedule: Schedule) -> Tensor:
    """Teacher-forcing inputs [B, L - 1, D] of sampled bits (what the sampling loop fed the decoder)."""
    H, W = schedule[-1][1:]
    summed, xs = None, []
    for k, b in enumerate(bits):
        summed = add_scale(summed, b, (H, W))
        if k < len(schedule) - 1:
            xs.append(next_scale_input(summed, schedule[k + 1][1:]))
    return torch.cat(xs, dim=1)


# ----------------------------------------------------------------------------------------------- the model


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
        for m in (self.vae_local, self.vargpt_gen, self.image_gen_projector, self.image_gen_projector_out,
                  self.sos_embedding):
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

    def _llm(self) -> Callable[..., Tensor]:
        return functools.partial(V.llm_forward, self.vlm)

    # ---- checkpoints

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: torch.device | str | None = "cpu",
                        dtype: torch.dtype | str | None = None, config: VARGPTConfig | None = None,
                        weights: str | Path | None = None) -> VARGPT:
        """Load our layout or the released one (config.json + (sharded) safetensors + tokenizer files).

        ``config`` / ``weights``: an explicit config and weights file (e.g. the conformance fixtures' directory,
        whose ``tiny_config.json`` is read with `vargpt.config.official_fixture_config`). The model is built on
        the meta device and takes the loaded tensors (read in ``dtype``, on ``device``) without a second copy.
        ``device``: ``"auto"`` picks CUDA when present; default CPU (what trainers expect before they place the
        model). ``dtype``: fp32 / bf16 / fp16 (or a torch dtype); default fp32 on CPU, bf16 on CUDA. A config with
        ``decoder.source_condition`` over weights without ``vargpt_gen.source_embed`` starts that term at zero.
        """
        path = Path(path)
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        directory = path if path.is_dir() else path.parent
        if config is None:
            config, _ = read_config(directory / CONFIG_FILE)
        weights_path = Path(weights) if weights is not None else path
        sd = load_state_dict_files(weights_path, device=dev, dtype=dt)
        if config.decoder.source_condition and "vargpt_gen.source_embed.weight" not in sd:
            # weights from before source conditioning was turned on: its term starts at zero (same model)
            C, D = config.decoder.embed_dim, config.vae.codebook_dim
            sd["vargpt_gen.source_embed.weight"] = torch.zeros(C, D, device=dev, dtype=dt)
            sd["vargpt_gen.source_embed.bias"] = torch.zeros(C, device=dev, dtype=dt)
        tokenizer = None
        if (directory / "tokenizer.json").is_file():
            tokenizer = load_tokenizer(directory, config.tokens)
        model = cls(config, device="meta", dtype=dt, tokenizer=tokenizer)
        try:
            load_into(model, sd, strict=True, device=dev)
        except CheckpointError as e:
            sections = sorted({_SECTION_OF_PREFIX.get(str(e).split(": ", 1)[-1].split(".")[0], "?")})
            hint = f" (config section {', '.join(sections)})" if "shapes" in str(e) and "?" not in sections else ""
            raise CheckpointError(f"{weights_path}: {e}{hint}") from None
        return model.eval()

    def save_pretrained(self, directory: str | Path, *, layout: Layout = "vargpt",
                        max_shard_size: int | str = "5GB") -> Path:
        """Write config.json (ours, or the released format with ``layout="released"``), the weights as
        (sharded) safetensors in the released key layout, and the tokenizer files."""
        if layout not in ("vargpt", "released"):
            raise InputError(f"unknown checkpoint layout {layout!r}; use 'vargpt' or 'released'")
        directory = Path(directory)
        save_state_dict(directory, self.state_dict(), max_shard_size=max_shard_size)
        d = self.config.to_dict() if layout == "vargpt" else released_hf_config(self.config, self.dtype)
        (directory / CONFIG_FILE).write_text(json.dumps(d, indent=2) + "\n")
        if self.processor is not None:
            self.processor.save(directory)
        return directory

    # ---- understanding

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, pixel_values: Tensor | None = None,
                image_grid_thw: Tensor | None = None, *, mm_token_type_ids: Tensor | None = None,
                position_ids: Tensor | None = None, cache: Any | None = None, labels: Tensor | None = None,
                use_cache: bool = False, **kwargs: Any) -> Any:
        """Understanding forward with transformers' conventions: returns its output (``.logits`` [B, S, V])."""
        if pixel_values is not None and mm_token_type_ids is None:
            mm_token_type_ids = V.mm_token_type_ids(self.vlm, input_ids)
        return self.vlm(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                        image_grid_thw=image_grid_thw, mm_token_type_ids=mm_token_type_ids,
                        position_ids=position_ids, cache=cache, labels=labels, use_cache=use_cache, **kwargs)

    # ---- training

    def _null_prefix(self) -> list[int]:
        """Ids of the null prompt (chat template, empty user message, default system), without the start token."""
        return self.require_processor().encode(render_inference_prompt(""))

    def _drop_prompts(self, batch: dict[str, Any], drop_B: Tensor) -> dict[str, Any]:
        """``batch`` with the prefix (before the first ``<|image_gen_start|>``) of the ``drop_B`` rows replaced by
        the null prompt, their understanding images removed, re-padded on the right."""
        t = self.config.tokens
        null = self._null_prefix()
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        rows, keep_img = [], []
        for b in range(ids.shape[0]):
            real = mask[b].bool()
            r_ids, r_lab = ids[b][real].tolist(), labels[b][real].tolist()
            n_img = r_ids.count(t.vision_start)
            if bool(drop_B[b]):
                s = r_ids.index(t.image_gen_start)
                n_prefix = r_ids[:s].count(t.vision_start)
                keep_img += [False] * n_prefix + [True] * (n_img - n_prefix)
                r_ids, r_lab = null + r_ids[s:], [IGNORE_INDEX] * len(null) + r_lab[s:]
            else:
                keep_img += [True] * n_img
            rows.append((r_ids, r_lab))
        S = max(len(r) for r, _ in rows)
        out = dict(batch)
        out["input_ids"] = torch.tensor([r + [t.endoftext] * (S - len(r)) for r, _ in rows], device=ids.device)
        out["labels"] = torch.tensor([lab + [IGNORE_INDEX] * (S - len(lab)) for _, lab in rows], device=ids.device)
        out["attention_mask"] = torch.tensor([[1] * len(r) + [0] * (S - len(r)) for r, _ in rows],
                                             device=ids.device, dtype=mask.dtype)
        if batch.get("pixel_values") is not None and not all(keep_img):
            grid = batch["image_grid_thw"]
            pieces = batch["pixel_values"].split(grid.prod(-1).tolist())
            kept = [p for p, k in zip(pieces, keep_img, strict=True) if k]
            out["pixel_values"] = torch.cat(kept) if kept else None
            out["image_grid_thw"] = grid[torch.tensor(keep_img, device=grid.device)] if kept else None
        return out

    def _start_condition(self, drop_N: Tensor) -> Tensor:
        """Start condition per image: from the start-of-image embedding, or ``cfg_uncond`` where ``drop_N``."""
        dec = self.vargpt_gen
        n = drop_N.shape[0]
        text = torch.where(drop_N.view(-1, 1, 1).to(self.device), dec.uncond_text(n, 1),
                           self.sos_embedding.vector(n).to(dec.cfg_uncond.dtype))
        return dec.text_proj_for_sos(dec.text_norm(text), None)

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

    def _teacher_forced(self, batch: dict[str, Any], *, noisy: bool, generator: torch.Generator | None,
                        ) -> tuple[Tensor, dict[str, Any], Tensor | None, Tensor | None, Schedule | None]:
        """(hidden [B, S, H], the batch used (after condition dropout), gen logits [N, L, 2D] | None, bit labels
        [N, L, D] | None, schedule | None)."""
        dev, tok, cfg = self.device, self.config.tokens, self.config
        batch = {k: (v.to(dev) if isinstance(v, Tensor) else v) for k, v in batch.items()}
        if "attention_mask" not in batch or batch["attention_mask"] is None:
            batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        if "labels" not in batch or batch["labels"] is None:
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        gen_rows = (batch["input_ids"] == tok.image_gen_pad).any(1)
        n_gen = int(gen_rows.sum())
        gen_px = batch.get("gen_pixel_values")
        if n_gen and gen_px is None:
            raise InputError(f"{n_gen} row(s) hold <|image_gen_pad|> slots but the batch has no gen_pixel_values")
        if gen_px is not None and gen_px.shape[0] != n_gen:
            raise InputError(f"gen_pixel_values holds {gen_px.shape[0]} image(s) for {n_gen} generation row(s); "
                             "give one target image per row with an <image_gen> slot")
        drop_N = torch.zeros(n_gen, dtype=torch.bool)
        consistent = not cfg.compat.published_uncond_branch
        if noisy and n_gen and consistent and self.training and cfg.decoder.cond_drop_rate > 0:
            drop_N = torch.rand(n_gen, generator=generator) < cfg.decoder.cond_drop_rate
            if bool(drop_N.any()):
                drop_B = torch.zeros(gen_rows.shape[0], dtype=torch.bool)
                drop_B[gen_rows.cpu()] = drop_N
                batch = self._drop_prompts(batch, drop_B)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        grid = batch.get("image_grid_thw")
        embeds = V.embed_inputs(self.vlm, ids, batch.get("pixel_values"), grid)
        llm = functools.partial(V.llm_forward, self.vlm, position_ids=self._positions(ids, grid, mask))
        if not n_gen:
            return llm(embeds, attention_mask=mask), batch, None, None, None
        schedule = schedule_for_size(gen_px.shape[-2], gen_px.shape[-1], cfg.vae.stride)
        tokens = self.vae_local.encode(gen_px, schedule, self_correction=cfg.self_correction if noisy else None,
                                       generator=generator)
        source = self._batch_source(batch, gen_px, schedule)
        # published mode in training: the decoder drops the start condition itself (cond_drop_generator)
        cond_BD = None if (noisy and not consistent) else self._start_condition(drop_N)
        out = teacher_forced_forward(self.vargpt_gen, self.image_gen_projector, self.image_gen_projector_out,
                                     self.sos_embedding, llm, embeds, ids, tokens.x_wo_prefix_BLD.to(self.dtype),
                                     schedule, start_id=tok.image_gen_start, pad_id=tok.image_gen_pad,
                                     attention_mask_BS=mask, cond_drop_generator=generator,
                                     drop_path_generator=generator, cond_BD=cond_BD, source_BLC=source)
        return out.hidden_BSH, batch, out.gen_logits_BLV, tokens.labels_BLD, schedule

    # ---- source conditioning (editing; decoder.source_condition)

    def source_term(self, pixels_N3HW: Tensor, schedule: Schedule, mask_N: Tensor | None = None) -> Tensor:
        """The decoder's source term [N, L, C] of source images [N, 3, H, W] in [-1, 1] at the generation size:
        their own multi-scale bits, encoded exactly like the targets' bit labels (clean, no self-correction), as
        +-1 through ``vargpt_gen.source_embed``. ``mask_N``: False rows get zeros (their pixels are not encoded)."""
        dec = self.vargpt_gen
        n, L = pixels_N3HW.shape[0], sum(t * h * w for t, h, w in schedule)
        mask = (torch.ones(n, dtype=torch.bool) if mask_N is None else mask_N.bool()).to(self.device)
        codes = torch.zeros(n, L, self.config.vae.codebook_dim, device=self.device)
        if bool(mask.any()):
            px = pixels_N3HW.to(device=self.device)[mask]
            codes[mask] = self.vae_local.encode(px, schedule).labels_BLD.float() * 2 - 1
        return dec.source_tokens(codes, None if mask_N is None else mask)

    def _batch_source(self, batch: dict[str, Any], gen_px: Tensor, schedule: Schedule) -> Tensor | None:
        """Source term of a training batch's targets (``gen_source_*`` keys), or None (no source conditioning)."""
        src = batch.get("gen_source_pixel_values")
        if not self.config.decoder.source_condition or src is None:
            return None
        mask = batch.get("gen_source_mask")
        if src.shape != gen_px.shape or (mask is not None and mask.shape != (gen_px.shape[0],)):
            raise InputError(f"gen_source_pixel_values {tuple(src.shape)} / gen_source_mask "
                             f"{None if mask is None else tuple(mask.shape)} do not match gen_pixel_values "
                             f"{tuple(gen_px.shape)}: give one source row (and mask entry) per target, same size")
        return self.source_term(src, schedule, mask)

    def _source_pixels(self, images: Sequence[Any], schedule: Schedule) -> Tensor:
        """Source images (PIL or HxWx3 uint8) -> [N, 3, H, W] in [-1, 1] at the schedule's output size (the
        ``resize`` training transform)."""
        size_hw = (schedule[-1][1] * self.config.vae.stride, schedule[-1][2] * self.config.vae.stride)
        out = []
        for im in images:
            if not isinstance(im, Image.Image):
                im = Image.fromarray(np.asarray(im.cpu() if isinstance(im, Tensor) else im, dtype=np.uint8))
            out.append(gen_image_tensor(im.convert("RGB"), size_hw, "resize"))
        return torch.stack(out)

    def _text_ce(self, hidden_BSH: Tensor, labels_BS: Tensor) -> Tensor:
        """Shifted next-token CE over labels != -100; lm_head only at the supervised positions. Mean over tokens,
        or (``config.text_loss_mean == "sample"``) within each sample first, then over the samples with labels."""
        h, y = hidden_BSH[:, :-1], labels_BS[:, 1:]
        keep = y != IGNORE_INDEX
        if not bool(keep.any()):
            return hidden_BSH.sum() * 0.0
        ce = F.cross_entropy(self.lm_head(h[keep]).float(), y[keep], reduction="none")
        if self.config.text_loss_mean == "token":
            return ce.mean()
        counts = keep.sum(1)  # supervised tokens per sample
        row = torch.arange(keep.shape[0], device=ce.device).repeat_interleave(counts)
        per_sample = torch.zeros(keep.shape[0], device=ce.device).index_add_(0, row, ce)
        labelled = counts > 0
        return (per_sample[labelled] / counts[labelled]).mean()

    def _generator(self, generator: torch.Generator | None) -> torch.Generator:
        if generator is not None:
            return generator
        return torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))

    def training_losses(self, batch: dict[str, Any], *,
                        generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Teacher-forced losses of a training batch (protocol in the module docstring)."""
        from vargpt.training.losses import bit_loss, published_text_labels

        cfg = self.config
        hidden, batch, logits, bits, schedule = self._teacher_forced(batch, noisy=True,
                                                                     generator=self._generator(generator))
        labels = batch["labels"]
        if cfg.compat.published_text_loss:
            gen_rows = (batch["input_ids"] == cfg.tokens.image_gen_pad).any(1, keepdim=True)
            labels = torch.where(gen_rows, published_text_labels(batch["input_ids"], cfg.tokens.image_gen_pad),
                                 labels)
        text = self._text_ce(hidden, labels)
        bit = (bit_loss(logits, bits, reduction=cfg.compat.bit_loss, schedule=schedule) if logits is not None
               else text.new_zeros(()))
        return {"loss": cfg.text_loss_weight * text + cfg.bit_loss_weight * bit, "text_loss": text, "bit_loss": bit}

    def image_logprobs(self, batch: dict[str, Any], *, average: bool = False) -> Tensor:
        """[N]: log pi of each generation row's target image (clean teacher forcing; see the module docstring)."""
        from vargpt.training.losses import bit_logprob

        _, _, logits, bits, _ = self._teacher_forced(batch, noisy=False, generator=None)
        if logits is None:
            raise InputError("image_logprobs needs rows with an <image_gen> slot and gen_pixel_values")
        return bit_logprob(logits, bits, average=average)

    # ---- image generation

    def _prompt_batch(self, prompts: Sequence[str], images: Sequence[Any] | None, n: int,
                      system: str | None) -> dict[str, Tensor]:
        proc = self.require_processor()
        samples = []
        for i, p in enumerate(prompts):
            s = proc(p, [images[i]] if images is not None else None, system=system)
            s["input_ids"] = torch.cat([s["input_ids"], torch.tensor([[self.config.tokens.image_gen_start]])], 1)
            s["attention_mask"] = torch.ones_like(s["input_ids"])
            s["mm_token_type_ids"] = (s["input_ids"] == self.config.tokens.image_pad).to(torch.int32)
            samples += [s] * n
        return proc.pad(samples, padding_side="left")

    def _seeded(self, B: int, seed: int | Sequence[int] | None,
                generator: torch.Generator | Sequence[torch.Generator] | None) -> Any:
        if generator is not None:
            return generator
        if seed is None:
            seed = int(torch.randint(0, 2**31, ()))
        seeds = [seed + i for i in range(B)] if isinstance(seed, int) else list(seed)
        if len(seeds) != B:
            raise InputError(f"got {len(seeds)} seeds for {B} images; give one per image or a single seed")
        return [torch.Generator().manual_seed(int(s)) for s in seeds]

    def schedule_for(self, size: int | tuple[int, int] | None) -> Schedule:
        """The scale schedule generating ``size`` (pixels: an int for square, or (height, width))."""
        size = size if size is not None else self.config.image_size
        h, w = (size, size) if isinstance(size, int) else size
        return schedule_for_size(int(h), int(w), self.config.vae.stride)

    def _uncond_inputs(self, B: int) -> dict[str, Any]:
        """sample_from_prompt arguments of the unconditional rows (module docstring, "Unconditional CFG branch")."""
        if self.config.compat.published_uncond_branch:
            return {"uncond_mode": "published"}
        null = torch.tensor([self._null_prefix() + [self.config.tokens.image_gen_start]], device=self.device)
        embeds = self.vlm.model.get_input_embeddings()(null)
        hidden = V.llm_forward(self.vlm, embeds)
        context, _ = prompt_context(hidden, null, self.config.tokens.image_gen_start, self.image_gen_projector_out)
        return {"uncond_mode": "cached", "uncond_inputs_embeds_BSH": embeds,
                "uncond_context_BNC": context.expand(B, -1, -1)}

    @torch.no_grad()
    def generate_images(self, prompts: str | Sequence[str] | None = None, *, input_ids: Tensor | None = None,
                        attention_mask: Tensor | None = None, pixel_values: Tensor | None = None,
                        image_grid_thw: Tensor | None = None, sampling: SamplingConfig | None = None,
                        size: int | tuple[int, int] | None = None, seed: int | Sequence[int] | None = None,
                        generator: torch.Generator | Sequence[torch.Generator] | None = None, n: int = 1,
                        system: str | None = DEFAULT_SYSTEM_PROMPT,
                        callback: Callable[[int, Tensor], None] | None = None, return_logits: bool = False,
                        source_images: Sequence[Any] | None = None) -> GeneratedImages:
        """Images by next-scale prediction with the LLM in the loop, both CFG branches in one batch.

        Give ``prompts`` (each rendered with the chat template; ``n`` images per prompt; ``source_images``: one
        image per prompt for editing, ``<image>`` in the prompt marks it) or ready ``input_ids`` (left-padded; the
        start token is appended when the rows do not end with it; with ``pixel_values`` / ``image_grid_thw`` for
        editing; there ``source_images``, one per row before ``n``, only feed the decoder's source term). With
        ``decoder.source_condition`` each source image, resized to the output size, also conditions the decoder
        (its multi-scale bits, `source_term`) in the conditional and the unconditional row. ``seed``: image i gets
        seed + i (or a list, one per image); ``generator``: explicit generator(s) instead. ``size``: pixels, any
        size of `vargpt.scales` for the VAE stride (default ``config.image_size``).
        """
        start = self.config.tokens.image_gen_start
        sampling = sampling or self.config.sampling
        sampling.validate()
        schedule = self.schedule_for(size)
        if prompts is not None:
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            if not prompts:
                raise InputError("no prompts given")
            batch = self._prompt_batch(prompts, source_images, n, system)
            input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
            pixel_values, image_grid_thw = batch.get("pixel_values"), batch.get("image_grid_thw")
        elif input_ids is None:
            raise InputError("give prompts or input_ids")
        else:
            if not bool((input_ids[:, -1] == start).all()):
                input_ids = torch.cat([input_ids, input_ids.new_full((input_ids.shape[0], 1), start)], 1)
                if attention_mask is not None:
                    attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)],
                                               1)
            if n > 1:
                input_ids = input_ids.repeat_interleave(n, 0)
                attention_mask = attention_mask.repeat_interleave(n, 0) if attention_mask is not None else None
                if pixel_values is not None:
                    raise InputError("n > 1 with pixel_values: repeat the rows yourself or pass prompts")
        dev = self.device
        input_ids = input_ids.to(dev)
        attention_mask = attention_mask.to(dev) if attention_mask is not None else None
        B = input_ids.shape[0]
        source = None
        if self.config.decoder.source_condition and source_images is not None:
            if len(source_images) * n != B:
                raise InputError(f"{len(source_images)} source image(s) for {B // n} prompt(s); give one per prompt")
            source = self.source_term(self._source_pixels(source_images, schedule), schedule)
            source = source.repeat_interleave(n, 0)
        embeds = V.embed_inputs(self.vlm, input_ids, pixel_values.to(dev) if pixel_values is not None else None,
                                image_grid_thw.to(dev) if image_grid_thw is not None else None)
        tokens: ImageTokens = sample_from_prompt(
            self.vargpt_gen, self.image_gen_projector, self.image_gen_projector_out, self.sos_embedding,
            self._llm(), functools.partial(V.new_cache, self.vlm), embeds, input_ids, schedule, sampling,
            start_id=start, attention_mask_BS=attention_mask, generator=self._seeded(B, seed, generator),
            return_logits=return_logits, callback=callback, source_BLC=source, **self._uncond_inputs(B))
        images = self.vae_local.decode(tokens.summed_codes_BDHW.to(self.dtype)).float()
        return GeneratedImages(images, tokens.bits, schedule, tokens.logits)

    @torch.no_grad()
    def edit_images(self, images: Sequence[Any], instructions: Sequence[str], **kwargs: Any) -> GeneratedImages:
        """Editing: each source image through the vision tower in the user turn + its instruction -> new image."""
        if len(images) != len(instructions):
            raise InputError(f"{len(images)} image(s) for {len(instructions)} instruction(s); give one per image")
        prompts = [f"<image>\n{t}" for t in instructions]
        return self.generate_images(prompts, source_images=list(images), **kwargs)

    # ---- text (and mixed) generation

    def _image_stream(self, bits: Sequence[Tensor], schedule: Schedule) -> Tensor:
        """What the LLM sees at the ``<|image_gen_pad|>`` slots of a generated image, [1, slots, H] (training
        layout: first token + embedded next-scale inputs, zero-padded, through ``image_gen_projector``)."""
        dec = self.vargpt_gen
        x = dec.input_sequence(start_condition(dec, self.sos_embedding, 1),
                               _bits_to_inputs(bits, schedule).to(device=self.device, dtype=self.dtype))
        slots = padded_tokens(schedule, self.config.decoder.pad_to_multiplier)
        return self.image_gen_projector(F.pad(x, (0, 0, 0, slots - x.shape[1])))

    def _text_generate(self, ids: Tensor, mask: Tensor, *, max_new_tokens: int, stop_on_image: bool,
                       allow_image: bool, inputs_embeds: Tensor | None = None, extra: dict[str, Any],
                       gen_kwargs: dict[str, Any]) -> Tensor:
        t = self.config.tokens
        eos = [t.im_end] + ([t.image_gen_start] if stop_on_image else [])
        kw = dict(gen_kwargs)
        if not allow_image:
            kw["suppress_tokens"] = [t.image_gen_start]
        if inputs_embeds is not None:
            kw["inputs_embeds"] = inputs_embeds
        out = self.vlm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                eos_token_id=eos, pad_token_id=t.endoftext, **extra, **kw)
        return out[:, ids.shape[1]:]  # transformers returns prompt + new tokens

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, pixel_values: Tensor | None = None,
                 image_grid_thw: Tensor | None = None, *, max_new_tokens: int = 256, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 logits_processor: LogitsProcessorList | list | None = None, images: bool = True,
                 max_images: int = 1, image_sampling: SamplingConfig | None = None,
                 image_size: int | tuple[int, int] | None = None, image_seed: int = 0, streamer: Any | None = None,
                 callback: Callable[[int, Tensor], None] | None = None) -> list[list[str | Tensor]]:
        """Text for each (left-padded) prompt with transformers' generate; mixed turns when ``images``.

        Each row's answer is a list of parts: text (``str``, special tokens removed) and images ([3, H, W] in
        [-1, 1]). When a row emits ``<|image_gen_start|>`` (at most ``max_images`` times) its image is sampled
        (``image_sampling``, ``image_size``, seed ``image_seed``), put into the sequence as in training and the text
        continues until ``<|im_end|>`` or ``max_new_tokens`` in all. ``images=False`` suppresses the start token.
        ``logits_processor``: transformers processors (e.g. one forcing ``<|image_gen_start|>``).
        """
        self.require_processor()
        dev = self.device
        ids = input_ids.to(dev)
        mask = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).to(dev)
        extra: dict[str, Any] = {}
        if pixel_values is not None:
            extra = {"pixel_values": pixel_values.to(dev), "image_grid_thw": image_grid_thw.to(dev),
                     "mm_token_type_ids": V.mm_token_type_ids(self.vlm, ids)}
        gen_kwargs: dict[str, Any] = {"do_sample": do_sample, "streamer": streamer,
                                      "logits_processor": LogitsProcessorList(logits_processor or [])}
        if do_sample:
            gen_kwargs.update(temperature=temperature, top_k=top_k, top_p=top_p)
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(seed)
            new = self._text_generate(ids, mask, max_new_tokens=max_new_tokens, stop_on_image=images,
                                      allow_image=images, extra=extra, gen_kwargs=gen_kwargs)
            row_images = self._split_images(ids, mask, pixel_values, image_grid_thw)
            return [self._finish_row(ids[b][mask[b].bool()], new[b], *row_images[b], max_new_tokens, images,
                                     max_images, image_sampling, image_size, image_seed, gen_kwargs, callback)
                    for b in range(ids.shape[0])]

    def _finish_row(self, prompt: Tensor, new: Tensor, px: Tensor | None, grid: Tensor | None, budget: int,
                    images: bool, max_images: int,
                    image_sampling: SamplingConfig | None, image_size: Any, image_seed: int,
                    gen_kwargs: dict[str, Any], callback: Any) -> list[str | Tensor]:
        """Parts of one row: text up to <|im_end|>; at each <|image_gen_start|> an image, then the text goes on."""
        t, proc = self.config.tokens, self.require_processor()
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
            out = self.generate_images(input_ids=ids, pixel_values=px, image_grid_thw=grid, sampling=image_sampling,
                                       size=image_size, seed=[image_seed + n_img], callback=callback)
            parts.append(out.images[0])
            n_img += 1
            stream = self._image_stream(out.bits, out.schedule)
            seq += [t.image_gen_pad] * stream.shape[1] + [t.image_gen_end]
            ids = torch.tensor([seq], device=self.device)
            embeds = scatter_gen_tokens(V.embed_inputs(self.vlm, ids, px, grid), ids, t.image_gen_pad, stream)
            allow = images and n_img < max_images
            new = self._text_generate(ids, torch.ones_like(ids), max_new_tokens=budget, stop_on_image=allow,
                                      allow_image=allow, inputs_embeds=embeds, extra={}, gen_kwargs=gen_kwargs)[0]

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



# ----------------------------------------------------------------------------------------------- conversion


def convert_checkpoint(src: str | Path, dst: str | Path, *, layout: Layout | None = None,
                       max_shard_size: int | str = "5GB", dtype: torch.dtype | str | None = None,
                       device: torch.device | str = "cpu") -> Layout:
    """Convert a checkpoint directory between the released layout and ours (``layout``: target; default the other
    one). Weights keep their dtype unless ``dtype`` is given; tokenizer and processor files are copied. Returns the
    target layout."""
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise InputError(f"convert: source and destination are the same directory ({src}); pick a new one")
    _, src_layout = read_config(src / CONFIG_FILE)
    target: Layout = layout or ("released" if src_layout == "vargpt" else "vargpt")
    model = VARGPT.from_pretrained(src, device=device, dtype=dtype or _checkpoint_dtype(src))
    model.save_pretrained(dst, layout=target, max_shard_size=max_shard_size)
    for name in SIDE_FILES:
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copy2(src / name, dst / name)
    return target

