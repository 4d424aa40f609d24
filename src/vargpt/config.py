"""Configuration: typed dataclasses for every component, two presets, JSON round-trip, validation.

One `VARGPTConfig` describes a whole model and is saved as `config.json` next to every checkpoint;
it is enough to rebuild the model. Presets:

* ``official`` — the released VARGPT-v1.1 (Qwen2-VL-7B + Infinity-2B + BSQ-VAE d32). Values from
  ``shared/design/reference-facts.md`` (the "released" column). The same structure accepts other sizes:
  the conformance fixtures use it at tiny sizes (`official_fixture_config`).
* ``tiny`` — the embedded default trained on ShapesWorld on 2 CPU cores.

The published code keeps the decoder/VAE sizes as hard-coded constructor flags and 0/1 integers; here
they are typed fields, and behaviours that reproduce published quirks are named booleans in
`CompatConfig` (off for models we train, on for released checkpoints and the conformance tests).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vargpt.errors import ConfigError

# ----------------------------------------------------------------------------------------------- helpers


def _check(cond: bool, section: str, name: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"config field {section}.{name} = {value!r} is invalid: allowed {allowed}")


def _positive(section: str, **fields: Any) -> None:
    for name, value in fields.items():
        _check(isinstance(value, int) and value > 0, section, name, value, "an integer >= 1")


# ----------------------------------------------------------------------------------------------- sections


@dataclass
class VisionConfig:
    """Qwen2-VL vision tower (ViT) and its 2-layer MLP merger (the understanding projector)."""

    depth: int = 32
    embed_dim: int = 1280
    hidden_size: int = 3584  # merger output width = LLM width
    num_heads: int = 16
    mlp_ratio: float = 4.0
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    hidden_act: str = "quick_gelu"
    # Not in the released layout: learned row and column embeddings (zero-initialised) added to each merged image
    # token, so the LLM reads where a token is from its features (`ImagePlaceEmbedding`); 0 = off, else the largest
    # merged grid side they cover.
    place_embed: int = 0
    # Multiplier of the place tables' output (ours; 1 = as trained so far): zero-initialised tables under a large
    # multiplier grow fast enough to compete with the merged features (norm ~16) as values an answer can read.
    place_scale: float = 1.0

    def validate(self) -> None:
        s = "vision"
        _check(self.place_embed >= 0, s, "place_embed", self.place_embed, "0 (off) or the largest merged grid side")
        _check(math.isfinite(self.place_scale) and self.place_scale > 0, s, "place_scale", self.place_scale, "> 0")
        _positive(s, depth=self.depth, embed_dim=self.embed_dim, hidden_size=self.hidden_size,
                  num_heads=self.num_heads, patch_size=self.patch_size,
                  temporal_patch_size=self.temporal_patch_size, spatial_merge_size=self.spatial_merge_size)
        _check(self.embed_dim % self.num_heads == 0, s, "embed_dim", self.embed_dim,
               f"a multiple of num_heads ({self.num_heads})")
        _check(self.mlp_ratio > 0, s, "mlp_ratio", self.mlp_ratio, "> 0")


@dataclass
class LLMConfig:
    """Qwen2 decoder-only language model with M-RoPE (the text side of Qwen2-VL)."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        s = "llm"
        _positive(s, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                  intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
                  num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads)
        _check(self.hidden_size % self.num_attention_heads == 0, s, "hidden_size", self.hidden_size,
               f"a multiple of num_attention_heads ({self.num_attention_heads})")
        _check(self.num_attention_heads % self.num_key_value_heads == 0, s, "num_key_value_heads",
               self.num_key_value_heads, f"a divisor of num_attention_heads ({self.num_attention_heads})")
        _check(len(self.mrope_section) == 3 and sum(self.mrope_section) * 2 == self.head_dim, s,
               "mrope_section", self.mrope_section, f"3 integers summing to head_dim/2 = {self.head_dim // 2}")


@dataclass
class TokenIds:
    """Ids of the special tokens. Released ids by default; the tiny tokenizer has its own."""

    endoftext: int = 151643  # also bos and pad
    im_start: int = 151644
    im_end: int = 151645  # eos
    vision_start: int = 151652
    vision_end: int = 151653
    vision_pad: int = 151654
    image_pad: int = 151655
    video_pad: int = 151656
    image_gen_start: int = 151657
    image_gen_end: int = 151658
    image_gen_pad: int = 151659

    def validate(self, vocab_size: int) -> None:
        ids = dataclasses.asdict(self)
        for name, value in ids.items():
            _check(isinstance(value, int) and 0 <= value < vocab_size, "tokens", name, value,
                   f"an id in [0, {vocab_size})")
        _check(len(set(ids.values())) == len(ids), "tokens", "*", ids, "distinct ids")


@dataclass
class VAEConfig:
    """Multi-scale BSQ VAE (Infinity's ``vae_local``): conv encoder/decoder + bitwise quantiser.

    ``arch="conv"`` is the released encoder/decoder; ``arch="patch"`` (the embedded default's) patchifies by
    ``patch_size`` and spends all its compute at the latent grid (``base_ch`` wide, ``ch_mult`` unused), which
    learns ~8 dB more per CPU-minute on ShapesWorld (`benchmarks/vae_learning_speed.py`).
    """

    codebook_dim: int = 32  # bits per token (d); z_channels
    base_ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4, 4)
    num_res_blocks: int = 2
    in_channels: int = 3
    norm_groups: int = 32
    arch: Literal["conv", "patch"] = "conv"
    patch_size: int = 8  # arch "patch" only: pixels per latent position
    # arch "patch" only: ResnetBlocks at full resolution after the patch decoder (its picture + its per-pixel
    # features in, a residual correction out, zero-initialised): sharper small shapes; the encoder is unchanged, so
    # a decoder with them can be trained over an existing VAE's codes (`vargpt train vae --decoder-only`)
    refine_blocks: int = 0
    refine_ch: int = 32
    # arch "patch" only: hidden width of the decoder's per-patch MLP (0 = 4 * base_ch). It runs at the latent grid,
    # so widening it is cheap, and every patch's pixels are a mix of this many learned patterns
    patch_mlp_ch: int = 0

    @property
    def decoder_mlp_ch(self) -> int:
        return self.patch_mlp_ch or 4 * self.base_ch

    @property
    def stride(self) -> int:
        """Pixels per latent position (16 for the released VAE)."""
        return self.patch_size if self.arch == "patch" else 2 ** (len(self.ch_mult) - 1)

    def validate(self) -> None:
        s = "vae"
        _positive(s, codebook_dim=self.codebook_dim, base_ch=self.base_ch,
                  num_res_blocks=self.num_res_blocks, in_channels=self.in_channels, norm_groups=self.norm_groups)
        _check(len(self.ch_mult) >= 1 and all(isinstance(m, int) and m > 0 for m in self.ch_mult), s,
               "ch_mult", self.ch_mult, "a non-empty list of positive integers")
        _check(self.arch in ("conv", "patch"), s, "arch", self.arch, "conv or patch")
        _positive(s, patch_size=self.patch_size, refine_ch=self.refine_ch)
        _check(self.refine_blocks >= 0, s, "refine_blocks", self.refine_blocks, "0 or more")
        _check(self.patch_mlp_ch >= 0, s, "patch_mlp_ch", self.patch_mlp_ch, "0 (4 * base_ch) or more")
        _check(self.refine_blocks == 0 or self.decoder_mlp_ch % self.patch_size**2 == 0, s, "patch_mlp_ch",
               self.patch_mlp_ch, f"a multiple of patch_size**2 ({self.patch_size**2}) with refine_blocks")
        _check(self.refine_blocks == 0 or self.arch == "patch", s, "refine_blocks", self.refine_blocks,
               "0 unless arch is patch")
        _check(self.refine_blocks == 0 or self.refine_ch % self.norm_groups == 0, s, "refine_ch", self.refine_ch,
               f"a multiple of norm_groups ({self.norm_groups})")
        for m in self.ch_mult if self.arch == "conv" else (1,):
            _check((self.base_ch * m) % self.norm_groups == 0, s, "base_ch", self.base_ch,
                   f"base_ch * every ch_mult a multiple of norm_groups ({self.norm_groups})")


@dataclass
class SelfCorrectionConfig:
    """Bitwise self-correction used to build the visual decoder's training inputs (released values)."""

    strength: float = 0.3  # flip probability drawn uniformly from {0.00, 0.01, ..., strength} per scale
    apply_layers: int = 13  # scales 0..apply_layers-1 get flips
    requant: bool = True

    def validate(self) -> None:
        _check(0.0 <= self.strength <= 0.5, "self_correction", "strength", self.strength, "[0, 0.5]")
        _check(self.apply_layers >= 0, "self_correction", "apply_layers", self.apply_layers, ">= 0")


@dataclass
class DecoderConfig:
    """Infinity-style next-scale visual decoder (``vargpt_gen``)."""

    depth: int = 32
    embed_dim: int = 2048
    num_heads: int = 16
    mlp_ratio: float = 4.0
    block_chunks: int = 8
    text_channels: int = 2048  # width of the conditioning tokens (Infinity's Ct5)
    text_maxlen: int = 512  # rows of cfg_uncond
    num_levels: int = 15  # rows of lvl_embed
    norm_eps: float = 1e-6
    drop_path_rate: float = 0.1
    cond_drop_rate: float = 0.1
    pad_to_multiplier: int = 128
    rope_theta: float = 10000.0
    rope_max_grid: int = 128  # largest grid the 2-D RoPE table covers (released: 2048/16)
    gradient_checkpointing: bool = False
    # Editing: a term of the source image is added (``source_embed``, zero-initialised) to the block input of the
    # positions predicting each scale (VAREdit-style). Not in the released layout. ``source_input``: "bits" = the
    # source's own multi-scale bits; "residual" = the source latent minus the running sum of the image drawn so far,
    # at each scale's grid (what the scale must add to keep the source: right even after a coarse scale differs), and
    # training labels built from the target latent with the source's wherever the edit leaves the picture
    # (`vargpt.models.vae.keep_unchanged`). ``source_copy`` = G > 0: the source codes also reach the bit logits,
    # G * gate * code (a learned per-position gate that starts open), so an edit model starts as a copier of its
    # source and learns where to deviate (0: off).
    source_condition: bool = False
    source_input: str = "bits"
    source_copy: float = 0.0
    # Editing, with source_input "residual": the source's latent at the finest grid, one token per position
    # (``source_context``: a linear map of its D channels + learned row and column embeddings), is appended to the
    # cross-attention context, so a position can copy what the source holds ELSEWHERE (a moved or swapped object);
    # the residual term only tells it what the source holds at the same place. Not in the released layout.
    source_context: bool = False
    # Editing CFG (models we train; not with compat.published_uncond_branch): the unconditional row of a prompt with
    # an understanding image keeps the prompt up to that image and drops the text after it (the instruction), as
    # InstructPix2Pix's image-conditioned branch, so guidance amplifies what the instruction changes rather than
    # the whole picture; condition dropout of such training rows drops the same text. False: the null prompt.
    uncond_keeps_image: bool = False

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def ffn_hidden(self) -> int:
        """FFN width, rounded to a multiple of 256 as the released decoder does."""
        return round(self.embed_dim * self.mlp_ratio / 256) * 256

    def validate(self) -> None:
        s = "decoder"
        _positive(s, depth=self.depth, embed_dim=self.embed_dim, num_heads=self.num_heads,
                  block_chunks=self.block_chunks, text_channels=self.text_channels,
                  text_maxlen=self.text_maxlen, num_levels=self.num_levels,
                  pad_to_multiplier=self.pad_to_multiplier)
        _check(self.embed_dim % self.num_heads == 0, s, "embed_dim", self.embed_dim,
               f"a multiple of num_heads ({self.num_heads})")
        _check(self.head_dim % 4 == 0, s, "num_heads", self.num_heads,
               "a value making head_dim a multiple of 4 (2-D RoPE splits it in rotation pairs per axis)")
        _check(self.depth % self.block_chunks == 0, s, "block_chunks", self.block_chunks,
               f"a divisor of depth ({self.depth})")
        _check(0.0 <= self.drop_path_rate < 1.0, s, "drop_path_rate", self.drop_path_rate, "[0, 1)")
        _check(0.0 <= self.cond_drop_rate < 1.0, s, "cond_drop_rate", self.cond_drop_rate, "[0, 1)")
        _check(self.ffn_hidden > 0, s, "mlp_ratio", self.mlp_ratio, "a value with embed_dim * mlp_ratio >= 128")
        _check(isinstance(self.source_condition, bool), s, "source_condition", self.source_condition, "true or false")
        _check(self.source_input in ("bits", "residual"), s, "source_input", self.source_input, "bits or residual")
        _check(not self.source_context or (self.source_condition and self.source_input == "residual"), s,
               "source_context", self.source_context, "false unless source_condition is on with source_input residual")
        _check(isinstance(self.source_copy, (int, float)) and self.source_copy >= 0, s, "source_copy", self.source_copy,
               "a number >= 0 (the copy gain; 0 = off)")


@dataclass
class SamplingConfig:
    """Knobs of next-scale image sampling. Defaults = what the released forward hard-codes."""

    cfg_scale: float | list[float] = 3.0  # guidance scale: one value for every scale, or one per scale
    tau: float | list[float] = 0.5
    top_k: int = 900
    top_p: float = 0.97

    def validate(self) -> None:
        for name in ("cfg_scale", "tau"):
            v = getattr(self, name)
            vals = v if isinstance(v, list) else [v]
            _check(all(isinstance(x, (int, float)) and math.isfinite(x) for x in vals), "sampling", name, v,
                   "a finite number or a list of them")
        taus = self.tau if isinstance(self.tau, list) else [self.tau]
        _check(all(t > 0 for t in taus), "sampling", "tau", self.tau, "> 0")
        _check(self.top_k >= 0, "sampling", "top_k", self.top_k, ">= 0 (0 = off)")
        _check(0.0 <= self.top_p <= 1.0, "sampling", "top_p", self.top_p, "[0, 1] (0 = off)")


@dataclass
class CompatConfig:
    """Switches that reproduce the published implementation's quirks (reference-facts.md section 11).

    Released checkpoints and the conformance tests turn them on; models we train leave them off.
    """

    # Unconditional CFG branch as published: LLM re-run per scale without prompt or cache, and the
    # decoder's cross-attention context = raw cfg_uncond rows. Off: the uncond branch keeps the
    # prompt-free sos condition in training and inference, both branches KV-cached.
    published_uncond_branch: bool = False
    # Text loss over the whole generation sample (prompt included) as published; off: answer tokens only.
    published_text_loss: bool = False
    # Cross-attention computed on bf16-rounded q/k/v (the published flash-attn path); off: full precision.
    bf16_cross_attention: bool = False
    # Image bit loss: "mean" over all bits (published VARGPT) or Infinity's per-scale reweighting.
    bit_loss: Literal["mean", "scale_reweighted"] = "mean"


@dataclass
class VARGPTConfig:
    """The whole model."""

    preset: str = "official"
    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    tokens: TokenIds = field(default_factory=TokenIds)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    self_correction: SelfCorrectionConfig = field(default_factory=SelfCorrectionConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    compat: CompatConfig = field(default_factory=CompatConfig)
    image_size: int = 512  # default generation size in pixels (square)
    image_gen_token_num: int = 2560  # <|image_gen_pad|> slots of one image in training sequences
    text_loss_weight: float = 1.0
    # "token": text CE averaged over every supervised token of the batch (published); "sample": averaged within each
    # sample, then over samples, so a 2-token VQA answer weighs as much as a 20-token caption
    text_loss_mean: str = "token"
    bit_loss_weight: float = 3.0  # published lambda_loss
    # editing with the copy path (decoder.source_copy): weight of the copy gate's BCE against where copying the
    # source gives every bit of a position right (`vargpt.training.objective.copy_gate_loss`); 0 = none
    copy_gate_loss_weight: float = 0.0
    # editing: weight of a bit loss on the GUIDED logits of each edit row that keeps its prompt, cfg c + (1 - cfg) u
    # with cfg = sampling.cfg_scale, the unconditional row u (prompt dropped, source kept) run without gradient on
    # the same inputs (`vargpt.training.objective.guided_bit_loss`): guidance flips copied bits the conditional row
    # is less sure of than the unconditional one (docs/training.md, session 24); 0 = none
    guided_loss_weight: float = 0.0
    # deep supervision of the text loss: the same CE is also taken at the output of LLM block `early_exit_layer`
    # (1-based, through the final norm and lm_head) with weight `early_exit_weight`, so the look-up of a named object
    # happens early and the later blocks are free for a second look-up and a comparison ("Is A left of B?";
    # docs/training.md, session 26); 0 = none
    early_exit_layer: int = 0
    early_exit_weight: float = 0.0

    def validate(self) -> VARGPTConfig:
        self.vision.validate()
        self.llm.validate()
        self.tokens.validate(self.llm.vocab_size)
        self.decoder.validate()
        self.vae.validate()
        self.self_correction.validate()
        self.sampling.validate()
        _check(self.vision.hidden_size == self.llm.hidden_size, "vision", "hidden_size", self.vision.hidden_size,
               f"equal to llm.hidden_size ({self.llm.hidden_size})")
        _check(self.image_size % self.vae.stride == 0, "", "image_size", self.image_size,
               f"a multiple of the VAE stride ({self.vae.stride})")
        _check(self.text_loss_mean in ("token", "sample"), "", "text_loss_mean", self.text_loss_mean,
               "'token' or 'sample'")
        _check(self.copy_gate_loss_weight >= 0, "", "copy_gate_loss_weight", self.copy_gate_loss_weight, ">= 0")
        _check(self.guided_loss_weight >= 0, "", "guided_loss_weight", self.guided_loss_weight, ">= 0")
        _check(0 <= self.early_exit_layer < self.llm.num_hidden_layers, "", "early_exit_layer", self.early_exit_layer,
               f"0 (none) or a block before the last, 1..{self.llm.num_hidden_layers - 1}")
        _check(self.early_exit_weight >= 0, "", "early_exit_weight", self.early_exit_weight, ">= 0")
        _check(not self.early_exit_weight or self.early_exit_layer, "", "early_exit_weight", self.early_exit_weight,
               "0 while early_exit_layer is 0 (set the block to supervise)")
        return self

    # ---- JSON round-trip

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VARGPTConfig:
        return _from_dict(cls, d, "").validate()

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> VARGPTConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); fix or regenerate it") from None
        return cls.from_dict(d)


# Fields renamed since checkpoints were first written: (section class, old name) -> new name.
_RENAMED = {("SamplingConfig", "cfg"): "cfg_scale"}


def _from_dict(cls: type, d: dict[str, Any], prefix: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"config section {prefix or '<root>'} must be an object, got {type(d).__name__}")
    d = {_RENAMED.get((cls.__name__, k), k): v for k, v in d.items()}
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        where = f" in section {prefix.rstrip('.')}" if prefix else ""
        raise ConfigError(f"unknown config field(s) {', '.join(unknown)}{where}; allowed: {', '.join(known)}")
    kwargs = {}
    for name, value in d.items():
        default = getattr(cls(), name) if name in known else None
        if dataclasses.is_dataclass(default):
            kwargs[name] = _from_dict(type(default), value, f"{prefix}{name}.")
        elif isinstance(default, tuple) and isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


# ----------------------------------------------------------------------------------------------- presets


def official_config() -> VARGPTConfig:
    """The released VARGPT-v1.1 (7B LLM + 2B visual decoder + d32 BSQ VAE)."""
    return VARGPTConfig(
        preset="official",
        compat=CompatConfig(published_uncond_branch=True, bf16_cross_attention=True),
    ).validate()


def tiny_config() -> VARGPTConfig:
    """The embedded default: small enough to train every stage on 2 CPU cores in about an hour."""
    llm = LLMConfig(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, mrope_section=(4, 6, 6),
                    max_position_embeddings=4096)
    return VARGPTConfig(
        preset="tiny",
        vision=VisionConfig(depth=2, embed_dim=64, hidden_size=128, num_heads=2, patch_size=8),
        llm=llm,
        tokens=TokenIds(endoftext=1013, im_start=1014, im_end=1015, vision_start=1016, vision_end=1017,
                        vision_pad=1018, image_pad=1019, video_pad=1020, image_gen_start=1021,
                        image_gen_end=1022, image_gen_pad=1023),
        decoder=DecoderConfig(depth=4, embed_dim=128, num_heads=4, block_chunks=2, text_channels=128,
                              text_maxlen=256, drop_path_rate=0.0),
        vae=VAEConfig(codebook_dim=16, base_ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1),
        image_size=64,
        image_gen_token_num=128,
    ).validate()


PRESETS = {"official": official_config, "tiny": tiny_config}


def get_preset(name: str) -> VARGPTConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]()


# ----------------------------------------------------------------------------------------------- released layout


def from_released_hf_config(hf: dict[str, Any], *, decoder: DecoderConfig | None = None,
                            vae: VAEConfig | None = None) -> VARGPTConfig:
    """Our config for a released-layout ``config.json`` (model_type ``vargpt_qwen2_vl``).

    The released config.json holds only the Qwen2-VL part and the generation token ids; the decoder and
    VAE sizes are hard-coded in the published code, so they come from the ``official`` preset unless given.
    """
    if hf.get("model_type") != "vargpt_qwen2_vl":
        raise ConfigError(f"config.json has model_type {hf.get('model_type')!r}, expected 'vargpt_qwen2_vl' "
                          "(a released VARGPT-v1.1 checkpoint) or our own layout (with a 'preset' field)")
    v = hf.get("vision_config", {})
    vision = VisionConfig(depth=v.get("depth", 32), embed_dim=v.get("embed_dim", 1280),
                          hidden_size=v.get("hidden_size", 3584), num_heads=v.get("num_heads", 16),
                          mlp_ratio=float(v.get("mlp_ratio", 4)), patch_size=v.get("patch_size", 14),
                          temporal_patch_size=v.get("temporal_patch_size", 2),
                          spatial_merge_size=v.get("spatial_merge_size", 2),
                          in_channels=v.get("in_channels", 3), hidden_act=v.get("hidden_act", "quick_gelu"))
    rope = hf.get("rope_scaling") or {}
    llm = LLMConfig(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                    intermediate_size=hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
                    num_attention_heads=hf["num_attention_heads"],
                    num_key_value_heads=hf["num_key_value_heads"], rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                    rope_theta=hf.get("rope_theta", 1e6),
                    mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
                    max_position_embeddings=hf.get("max_position_embeddings", 32768),
                    tie_word_embeddings=hf.get("tie_word_embeddings", False))
    st = hf.get("special_tokens") or {}
    if "image_gen_start_token_id" not in st:
        raise ConfigError("config.json lacks special_tokens.image_gen_start_token_id: not a VARGPT-v1.1 "
                          "checkpoint (a plain Qwen2-VL one?)")
    # config.json does not carry <|im_start|>; in every Qwen2 tokenizer it is the id after <|endoftext|>.
    tokens = TokenIds(endoftext=hf.get("bos_token_id", 151643), im_start=hf.get("bos_token_id", 151643) + 1,
                      im_end=hf.get("eos_token_id", 151645), vision_start=hf["vision_start_token_id"],
                      vision_end=hf["vision_end_token_id"], vision_pad=hf["vision_token_id"],
                      image_pad=hf["image_token_id"], video_pad=hf["video_token_id"],
                      image_gen_start=st["image_gen_start_token_id"], image_gen_end=st["image_gen_end_token_id"],
                      image_gen_pad=st["image_gen_pad_token_id"])
    base = official_config()
    return VARGPTConfig(preset="official", vision=vision, llm=llm, tokens=tokens,
                        decoder=decoder or base.decoder, vae=vae or base.vae, compat=base.compat).validate()


def official_fixture_config(fixture_json: str | Path) -> VARGPTConfig:
    """The ``official`` structure at the tiny sizes of the conformance fixtures (``tiny_config.json``)."""
    j = json.loads(Path(fixture_json).read_text())
    ik = j["infinity_kwargs"]
    decoder = DecoderConfig(depth=ik["depth"], embed_dim=ik["embed_dim"], num_heads=ik["num_heads"],
                            mlp_ratio=float(ik["mlp_ratio"]), block_chunks=ik["block_chunks"],
                            drop_path_rate=ik["drop_path_rate"], text_channels=j["infinity_text_channels"])
    vj = j["vae"]
    vae = VAEConfig(codebook_dim=vj["codebook_dim"], base_ch=vj["base_ch"], ch_mult=tuple(vj["ch_mult"]),
                    num_res_blocks=vj["num_res_blocks"])
    cfg = from_released_hf_config(j["hf_config"], decoder=decoder, vae=vae)
    cfg.image_size = 256
    cfg.image_gen_token_num = 640
    return cfg.validate()
