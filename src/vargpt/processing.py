"""The processor: special tokens, chat templates, placeholder expansion, tokenizers, image preprocessing.

Contract
--------
* Templates are the released ones (reference-facts.md section 3). Inference (Qwen2-VL chat template)::

      <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n

  with the default system prompt "You are a helpful assistant." (``system=None`` drops the system turn, as
  the conformance fixtures do). Training (the LLaMA-Factory ``vargpt_qwen2_vl`` template): the same prompt,
  each answer ``{content}<|im_end|>`` supervised, a ``\\n`` opening the next user turn.
* Placeholders in message text: ``<image>`` -> ``<|vision_start|>`` + N x ``<|image_pad|>`` + ``<|vision_end|>``
  with N = t*h*w / merge^2 of that image's grid; ``<image_gen>`` -> ``<|image_gen_start|>`` +
  ``image_gen_token_num`` x ``<|image_gen_pad|>`` + ``<|image_gen_end|>`` (training targets only). Images are
  assigned to placeholders in reading order.
* Tokenizers share one small interface (`Tokenizer`): `ByteTokenizer` (ids 0..255 = UTF-8 bytes, special tokens
  at the ids of `TokenIds`; what the conformance fixtures use), `BPETokenizer` (a ``tokenizers`` model: a released
  Qwen2 ``tokenizer.json`` via `load_tokenizer`, or the tiny preset's own from `train_bpe_tokenizer`). Special-token
  strings in text map to their ids, as in Qwen2's tokenizer.
* Images go through transformers' Qwen2-VL image processor (PIL backend), sized from our `VisionConfig`.

Differences from the published implementation: the published code reaches these steps through LLaMA-Factory's
template registry and a patched Qwen2-VL processor; here they are plain functions of our config, and bad input
(images without slots, more images than slots, over-long prompts) raises `InputError` instead of failing later in
the model. The published training plugin first shrinks understanding images to <= 512*512 pixels (nearest);
pass ``max_image_pixels`` to `VARGPTProcessor` for that.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from PIL import Image
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Qwen2VLImageProcessorPil

from vargpt.config import TokenIds, VARGPTConfig, VisionConfig
from vargpt.errors import CheckpointError, ConfigError, InputError
from vargpt.imageio import to_rgb
from vargpt.validation import check_finite, check_utf8

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "IMAGE_PLACEHOLDER",
    "IMAGE_GEN_PLACEHOLDER",
    "IGNORE_INDEX",
    "special_tokens",
    "TextTokenizer",
    "ByteTokenizer",
    "BPETokenizer",
    "load_tokenizer",
    "train_bpe_tokenizer",
    "make_image_processor",
    "render_inference_prompt",
    "render_training_turns",
    "VARGPTProcessor",
]

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
IMAGE_PLACEHOLDER = "<image>"
IMAGE_GEN_PLACEHOLDER = "<image_gen>"
IGNORE_INDEX = -100  # label of positions without a text loss

Message = Mapping[str, Any]  # {"role": "system"|"user"|"assistant", "content": str | list of items}
ImageLike = Image.Image | np.ndarray | torch.Tensor  # RGB; arrays/tensors HWC uint8


def special_tokens(token_ids: TokenIds) -> dict[str, int]:
    """Special-token text -> id, e.g. ``"<|image_pad|>" -> 151655`` (names from the `TokenIds` fields)."""
    return {f"<|{name}|>": value for name, value in dataclasses.asdict(token_ids).items()}


# ----------------------------------------------------------------------------------------------- tokenizers


class TextTokenizer(Protocol):
    """What the processor needs from a tokenizer."""

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; special-token strings inside it become their ids. No BOS/EOS added."""
        ...

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str: ...


class ByteTokenizer:
    """Ids 0..255 are the UTF-8 bytes of the text; special tokens sit at the ids of ``token_ids``."""

    def __init__(self, token_ids: TokenIds) -> None:
        self.specials = special_tokens(token_ids)
        if min(self.specials.values()) < 256:
            raise ConfigError("a byte tokenizer needs every special token id >= 256 (ids 0..255 are bytes)")
        self._by_id = {i: s for s, i in self.specials.items()}
        self._split = re.compile("(" + "|".join(re.escape(s) for s in self.specials) + ")")

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self._split.split(text):
            ids.extend([self.specials[piece]] if piece in self.specials else piece.encode("utf-8"))
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        out, run = [], bytearray()
        for i in ids:
            if 0 <= i < 256:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            if i in self._by_id and not skip_special_tokens:
                out.append(self._by_id[i])  # ids neither byte nor special (unused vocab rows) decode to nothing
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)


class BPETokenizer:
    """A ``tokenizers`` model (a Qwen2 ``tokenizer.json`` or one from `train_bpe_tokenizer`)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer.json`` into ``directory``."""
        path = Path(directory) / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(path))
        return path


def _check_special_ids(tok: Tokenizer, token_ids: TokenIds, where: str) -> None:
    for text, want in special_tokens(token_ids).items():
        got = tok.token_to_id(text)
        if got != want:
            raise CheckpointError(f"{where}: special token {text} has id {got}, the config says {want}; "
                                  "use the tokenizer saved with these weights")


def load_tokenizer(directory: str | Path, token_ids: TokenIds) -> BPETokenizer:
    """The ``tokenizer.json`` of a checkpoint directory, checked against the config's special-token ids.

    A plain Qwen2-VL tokenizer lacks the three image-generation tokens; they are appended (as the published
    prepare script does) when that puts them at the configured ids.
    """
    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: no tokenizer.json; copy the tokenizer files of the checkpoint there")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise CheckpointError(f"{path}: cannot read the tokenizer ({e}); re-download it") from None
    for name in ("image_gen_start", "image_gen_end", "image_gen_pad"):
        text = f"<|{name}|>"
        if tok.token_to_id(text) is None and tok.get_vocab_size(with_added_tokens=True) == getattr(token_ids, name):
            tok.add_special_tokens([AddedToken(text, special=True, normalized=False)])
    _check_special_ids(tok, token_ids, str(path))
    return BPETokenizer(tok)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, token_ids: TokenIds) -> BPETokenizer:
    """A byte-level BPE tokenizer trained on ``texts``, with the special tokens at exactly ``token_ids``.

    The special ids must be the top ids of the vocabulary (as in Qwen2, and the tiny preset's 1013..1023): BPE
    learns ``min(special ids)`` tokens (256 bytes + merges); if the texts run out of merges first, the gap is
    filled with ``<|reserved_i|>`` tokens so the special ids do not move. Deterministic for the same texts.
    """
    specials = {i: s for s, i in special_tokens(token_ids).items()}
    lowest = min(specials)
    if lowest <= 256 or max(specials) >= vocab_size:
        raise ConfigError(f"special token ids {min(specials)}..{max(specials)} must lie in (256, {vocab_size}) "
                          "at the top of the vocabulary; set tokens.* below llm.vocab_size")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=lowest, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    tok.train_from_iterator(texts, trainer)
    for i in range(tok.get_vocab_size(with_added_tokens=True), vocab_size):
        tok.add_special_tokens([AddedToken(specials.get(i, f"<|reserved_{i}|>"), special=True, normalized=False)])
    _check_special_ids(tok, token_ids, "trained tokenizer")
    return BPETokenizer(tok)


# ----------------------------------------------------------------------------------------------- images


def make_image_processor(vision: VisionConfig) -> Qwen2VLImageProcessorPil:
    """transformers' Qwen2-VL image processor for our vision tower (CLIP mean/std, bicubic smart-resize).

    Pixel bounds keep the released ratios to the token size f = patch * merge: at least 4 tokens (56*56 for
    f = 28) and at most 1280 tokens (28*28*1280), so the tiny preset (f = 16) behaves the same in token counts.
    """
    f = vision.patch_size * vision.spatial_merge_size
    return Qwen2VLImageProcessorPil(patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
                                    merge_size=vision.spatial_merge_size, min_pixels=4 * f * f,
                                    max_pixels=1280 * f * f)


def _to_pil(image: ImageLike, max_pixels: int | None) -> Image.Image | np.ndarray:
    """An understanding image as 8-bit RGB (PIL images of any mode through `to_rgb`; arrays must be HxWx3 uint8)."""
    if isinstance(image, torch.Tensor):
        image = check_finite(image, "the image tensor").cpu()
        if image.dtype != torch.uint8:
            raise InputError(f"image tensor of shape {tuple(image.shape)} and dtype {image.dtype}: expected HxWx3 "
                             "uint8")
        image = image.numpy()
    if isinstance(image, np.ndarray):
        if image.dtype.kind == "f" and not np.isfinite(image).all():
            raise InputError("the image array holds NaN or inf values; clean it (np.nan_to_num) and pass HxWx3 uint8")
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise InputError(f"image array of shape {image.shape} and dtype {image.dtype}: expected HxWx3 uint8")
        if max_pixels is None:
            return image
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise InputError(f"unsupported image type {type(image).__name__}; pass a PIL image or an HxWx3 uint8 array")
    if 0 in image.size:
        raise InputError(f"the image is {image.width}x{image.height} pixels (empty); pass a picture with pixels")
    image = to_rgb(image)
    if max_pixels is not None and image.width * image.height > max_pixels:
        scale = (max_pixels / (image.width * image.height)) ** 0.5
        image = image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))),
                             Image.Resampling.NEAREST)
    return image


# ----------------------------------------------------------------------------------------------- templates


def _content_text(content: str | Sequence[Mapping[str, Any]]) -> str:
    """Message content as text; list items ``{"type": "image"}`` / ``"image_gen"`` become placeholders. Text no
    tokenizer can encode (lone surrogates: bytes that were not UTF-8) is an `InputError`."""
    if isinstance(content, str):
        return check_utf8(content, "message")
    parts = []
    for item in content:
        kind = item.get("type")
        if kind == "text":
            parts.append(item["text"])
        elif kind == "image":
            parts.append(IMAGE_PLACEHOLDER)
        elif kind == "image_gen":
            parts.append(IMAGE_GEN_PLACEHOLDER)
        else:
            raise InputError(f"message content item of type {kind!r}; use 'text', 'image' or 'image_gen'")
    return check_utf8("".join(parts), "message")


def _split_system(messages: Sequence[Message], system: str | None) -> tuple[str | None, list[Message]]:
    if not messages:
        raise InputError("no messages given; pass at least one user message")
    rest = list(messages)
    if rest[0].get("role") == "system":
        system, rest = _content_text(rest[0]["content"]), rest[1:]
    for m in rest:
        if m.get("role") not in ("user", "assistant"):
            raise InputError(f"message role {m.get('role')!r}; use 'user' or 'assistant' (and 'system' first)")
    return system, rest


def render_inference_prompt(messages: Sequence[Message] | str, *, system: str | None = DEFAULT_SYSTEM_PROMPT,
                            add_generation_prompt: bool = True) -> str:
    """The Qwen2-VL chat template as text, placeholders (``<image>``) left in place.

    A leading ``system`` message overrides ``system``; ``system=None`` and no system message: no system turn.
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    system, rest = _split_system(messages, system)
    out = f"<|im_start|>system\n{check_utf8(system, 'system prompt')}<|im_end|>\n" if system is not None else ""
    for m in rest:
        out += f"<|im_start|>{m['role']}\n{_content_text(m['content'])}<|im_end|>\n"
    return out + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def render_training_turns(messages: Sequence[Message], *,
                          system: str | None = DEFAULT_SYSTEM_PROMPT) -> list[tuple[str, str]]:
    """(prompt, answer) text pairs of the training template; answers are supervised, prompts are not.

    Messages alternate user, assistant (optionally after one system message); the conversation ends with an
    assistant message.
    """
    system, rest = _split_system(messages, system)
    roles = [m["role"] for m in rest]
    if len(rest) % 2 or roles != ["user", "assistant"] * (len(rest) // 2):
        raise InputError(f"training messages must alternate user/assistant and end with assistant, got {roles}")
    turns = []
    for k in range(0, len(rest), 2):
        head = (f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else "") if k == 0 else "\n"
        prompt = f"{head}<|im_start|>user\n{_content_text(rest[k]['content'])}<|im_end|>\n<|im_start|>assistant\n"
        turns.append((prompt, f"{_content_text(rest[k + 1]['content'])}<|im_end|>"))
    return turns


# ----------------------------------------------------------------------------------------------- processor

_PLACEHOLDERS = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(IMAGE_GEN_PLACEHOLDER)})")


class VARGPTProcessor:
    """Text + images -> model inputs (``input_ids``, ``attention_mask``, ``mm_token_type_ids``, ``pixel_values``,
    ``image_grid_thw``), the way the released model expects them."""

    def __init__(self, tokenizer: TextTokenizer, cfg: VARGPTConfig, *,
                 image_processor: Qwen2VLImageProcessorPil | None = None,
                 max_image_pixels: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.tokens = cfg.tokens
        self.merge = cfg.vision.spatial_merge_size
        self.max_positions = cfg.llm.max_position_embeddings
        self.image_gen_token_num = cfg.image_gen_token_num
        self.image_processor = image_processor or make_image_processor(cfg.vision)
        self.max_image_pixels = max_image_pixels

    # ---- pieces

    def preprocess_images(self, images: Sequence[ImageLike]) -> dict[str, torch.Tensor]:
        """``pixel_values`` [sum of patches, C*T*P*P] and ``image_grid_thw`` [n, 3] of understanding images."""
        pil = [_to_pil(im, self.max_image_pixels) for im in images]
        out = self.image_processor(images=pil, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def image_slot_count(self, grid_thw: Sequence[int] | torch.Tensor) -> int:
        """``<|image_pad|>`` slots of one image: t*h*w / merge^2 (merged patches)."""
        t, h, w = (int(x) for x in grid_thw)
        return t * h * w // (self.merge * self.merge)

    def encode(self, text: str, image_grids: Sequence[Sequence[int]] | torch.Tensor = (), *,
               allow_image_gen: bool = False) -> list[int]:
        """Ids of ``text`` with ``<image>`` (one per row of ``image_grids``, in order) and ``<image_gen>`` expanded."""
        ids: list[int] = []
        grids = iter(image_grids)
        t = self.tokens
        for piece in _PLACEHOLDERS.split(text):
            if piece == IMAGE_PLACEHOLDER:
                grid = next(grids, None)
                if grid is None:  # counts are checked by the callers; this guards direct use
                    raise InputError("the text has more <image> placeholders than images; pass one image per <image>")
                ids += [t.vision_start] + [t.image_pad] * self.image_slot_count(grid) + [t.vision_end]
            elif piece == IMAGE_GEN_PLACEHOLDER:
                if not allow_image_gen:
                    raise InputError("<image_gen> marks a generated image in training answers; it cannot appear "
                                     "in a prompt")
                ids += [t.image_gen_start] + [t.image_gen_pad] * self.image_gen_token_num + [t.image_gen_end]
            elif piece:
                ids += self.tokenizer.encode(check_utf8(piece, "text"))  # text not from the templates too
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor, *, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def _check_counts(self, n_understanding: int, n_images: int, gen_slots: int = 0) -> None:
        slots = n_understanding + gen_slots
        if n_images and not slots:
            raise InputError(f"{n_images} image(s) given but the prompt has no {IMAGE_PLACEHOLDER} placeholder; "
                             f"put {IMAGE_PLACEHOLDER} in the message where the image belongs")
        if n_images > slots:
            raise InputError(f"{n_images} images given but the prompt has only {slots} image placeholder(s); "
                             "add a placeholder per image or pass fewer images")
        if n_images < slots:
            raise InputError(f"the prompt has {slots} image placeholder(s) but {n_images} image(s) were given; "
                             "pass one image per placeholder")

    def _check_length(self, n: int) -> None:
        if n > self.max_positions:
            raise InputError(f"the prompt is {n} tokens but the model takes at most {self.max_positions}; "
                             "shorten it or use fewer/smaller images")

    def _finish(self, ids: list[int], pixels: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        input_ids = torch.tensor([ids], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                "mm_token_type_ids": (input_ids == self.tokens.image_pad).to(torch.int32), **pixels}

    # ---- entry points

    def __call__(self, messages: Sequence[Message] | str, images: Sequence[ImageLike] | ImageLike | None = None, *,
                 system: str | None = DEFAULT_SYSTEM_PROMPT, add_generation_prompt: bool = True,
                 ) -> dict[str, torch.Tensor]:
        """Inference inputs (batch of one) for a chat (``messages``) or a single user turn (a string)."""
        images = _as_list(images)
        text = render_inference_prompt(messages, system=system, add_generation_prompt=add_generation_prompt)
        self._check_counts(text.count(IMAGE_PLACEHOLDER), len(images))
        pixels = self.preprocess_images(images) if images else {}
        ids = self.encode(text, pixels.get("image_grid_thw", ()))
        self._check_length(len(ids))
        return self._finish(ids, pixels)

    def training_inputs(self, messages: Sequence[Message], images: Sequence[ImageLike] | None = None, *,
                        system: str | None = DEFAULT_SYSTEM_PROMPT) -> dict[str, Any]:
        """One training sample: ``input_ids`` and ``labels`` [1, L] (prompts and ``<|image_gen_pad|>`` slots =
        -100), the understanding images' tensors, ``gen_images``: the images of the ``<image_gen>`` slots
        (training targets, for the VAE side) and ``gen_sources``: per target the last ``<image>`` before its slot
        (the edit's source; None for text-to-image), for a decoder with ``source_condition``.

        ``images`` fill the ``<image>`` and ``<image_gen>`` placeholders in reading order.
        """
        images = _as_list(images)
        turns = render_training_turns(messages, system=system)
        order = [p for prompt, answer in turns for p in _PLACEHOLDERS.findall(prompt + answer)]
        self._check_counts(order.count(IMAGE_PLACEHOLDER), len(images), order.count(IMAGE_GEN_PLACEHOLDER))
        understanding = [im for im, p in zip(images, order, strict=True) if p == IMAGE_PLACEHOLDER]
        gen_images = [im for im, p in zip(images, order, strict=True) if p == IMAGE_GEN_PLACEHOLDER]
        gen_sources, last = [], None
        for im, p in zip(images, order, strict=True):
            if p == IMAGE_PLACEHOLDER:
                last = im
            else:
                gen_sources.append(last)
        pixels = self.preprocess_images(understanding) if understanding else {}
        grids = iter(pixels.get("image_grid_thw", torch.empty(0, 3, dtype=torch.long)))
        ids: list[int] = []
        labels: list[int] = []
        for prompt, answer in turns:
            for part, supervised in ((prompt, False), (answer, True)):
                n = part.count(IMAGE_PLACEHOLDER)
                part_ids = self.encode(part, [next(grids) for _ in range(n)], allow_image_gen=True)
                ids += part_ids
                # <|image_gen_pad|> slots carry image tokens, not text: never a text target (as published)
                labels += ([IGNORE_INDEX if i == self.tokens.image_gen_pad else i for i in part_ids] if supervised
                           else [IGNORE_INDEX] * len(part_ids))
        self._check_length(len(ids))
        out: dict[str, Any] = self._finish(ids, pixels)
        out["labels"] = torch.tensor([labels], dtype=torch.long)
        out["gen_images"] = gen_images
        out["gen_sources"] = gen_sources
        return out

    def pad(self, samples: Sequence[Mapping[str, Any]], *,
            padding_side: Literal["left", "right"] = "left") -> dict[str, torch.Tensor]:
        """Batch samples from `__call__` / `training_inputs`: pad with ``<|endoftext|>`` (labels -100, mask 0) and
        concatenate the image tensors. Left padding for generation (as the released model), right for training."""
        if not samples:
            raise InputError("no samples to batch")
        length = max(s["input_ids"].shape[1] for s in samples)
        fills = {"input_ids": self.tokens.endoftext, "attention_mask": 0, "mm_token_type_ids": 0,
                 "labels": IGNORE_INDEX}
        out: dict[str, torch.Tensor] = {}
        for key, fill in fills.items():
            if key not in samples[0]:
                continue
            rows = []
            for s in samples:
                x = s[key]
                pad = x.new_full((1, length - x.shape[1]), fill)
                rows.append(torch.cat([pad, x] if padding_side == "left" else [x, pad], dim=1))
            out[key] = torch.cat(rows)
        with_images = [s for s in samples if "pixel_values" in s]
        if with_images:
            out["pixel_values"] = torch.cat([s["pixel_values"] for s in with_images])
            out["image_grid_thw"] = torch.cat([s["image_grid_thw"] for s in with_images])
        return out

    def save(self, directory: str | Path) -> None:
        """Write the tokenizer (when it is a BPE one) and ``preprocessor_config.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if isinstance(self.tokenizer, BPETokenizer):
            self.tokenizer.save(directory)
        (directory / "preprocessor_config.json").write_text(self.image_processor.to_json_string())


def _as_list(images: Sequence[ImageLike] | ImageLike | None) -> list[ImageLike]:
    if images is None:
        return []
    if isinstance(images, (Image.Image, np.ndarray, torch.Tensor)):
        return [images]
    return list(images)
