"""Chat-style JSONL records -> training batches: reading, mixing, bucketing, collation.

Contract
--------
* Formats (`read_records`): our chat JSONL (``{"id", "task", "messages": [{"role", "content"}], "images": [...]}``,
  what `vargpt data shapesworld` writes; ShapesWorld is just one source in this format) and the released
  LLaMA-Factory sharegpt format (JSON list or JSONL; ``messages`` or ``conversations``; role/content or from/value
  with the tags human/gpt/user/assistant/system; an optional ``system`` column). ``<image>`` marks an input image,
  ``<image_gen>`` a generated one; ``images`` fill them in reading order and are resolved relative to the records
  file, whose directory is the data root (unless ``root`` names a wider one): a path that leaves it (absolute
  elsewhere, or ``../``) is an `InputError` naming file and line, an image that is a symlink out of it is skipped
  when read (below). Preference records
  carry the prompt in ``messages`` plus ``chosen`` and ``rejected`` assistant messages; their images are
  [prompt images..., chosen images..., rejected images...] (for the released DPO data: [chosen, rejected]). A
  malformed record, a line that is not UTF-8 or not JSON raise `InputError` naming file and line, before training.
* `RecordDataset[(index, epoch)]` loads the images and runs `VARGPTProcessor.training_inputs`: understanding
  images go through the Qwen2-VL image processor, generated images (targets) become ``gen_pixel_values``
  ``[n, 3, H, W]`` in [-1, 1] at the recipe's size; the model encodes them with its VAE. With ``source_condition``
  (a decoder conditioned on the edit's source) each target also gets its source (the last ``<image>`` before its
  slot, the same transform and crop as the target) as ``gen_source_pixel_values`` ``[n, 3, H, W]`` and
  ``gen_source_mask`` ``[n]`` (False, zero pixels: no source, e.g. text-to-image). A record whose image is
  missing, corrupt or a symlink out of the data root (or does not fit its placeholders) is skipped: a warning is
  logged once per record and the next record takes its place, so batches keep their size (DDP ranks stay in step);
  the skipped ids travel with the batch (``batch["skipped"]``) and the trainer counts and logs them.
* `MixtureBatchSampler` makes the global, seeded order of batches of an epoch: each source contributes
  ``weight`` x its size draws (whole copies, then a random subset for the fraction), everything is shuffled,
  batches are filled per resolution bucket (one target size per batch), and global batch g goes to rank
  g mod world_size. Resuming at a batch index replays exactly the same batches.
* `Collator` pads (right, ``<|endoftext|>``, labels -100) with `VARGPTProcessor.pad`; preference batches hold the
  chosen samples first, then the rejected ones (``n_pairs`` = B), as the published collator does. The source keys,
  when present, stay aligned with ``gen_pixel_values`` (one row per target).

Differences from the published LLaMA-Factory pipeline: paths are relative to the records file (not a global
``media_dir``), a bad image skips one record instead of killing the run, the mixture is reproducible from the
seed, the generated-image transform may be a plain resize (``resize``, exact for ShapesWorld) besides the
published resize-and-random-crop (``released``, seeded per record and epoch), and targets may keep their aspect
ratio (bucketed) instead of always being square.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from vargpt.errors import InputError
from vargpt.imageio import load_image
from vargpt.processing import IMAGE_GEN_PLACEHOLDER, IMAGE_PLACEHOLDER, VARGPTProcessor
from vargpt.scales import TEMPLATES, nearest_template, padded_tokens

log = logging.getLogger("vargpt.data")

__all__ = ["Collator", "MixtureBatchSampler", "Record", "RecordDataset", "gen_image_tensor", "read_records"]

_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}
Format = Literal["chat", "released", "shapesworld"]


@dataclass
class Record:
    id: str
    task: str  # caption, vqa, t2i, edit, dpo, chat
    messages: list[dict[str, Any]]
    images: list[Path]
    chosen: dict[str, Any] | None = None
    rejected: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    root: Path | None = None  # the data root its images must stay under (the records file's directory)

    @property
    def is_pair(self) -> bool:
        return self.chosen is not None


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(it.get("text", "") if it.get("type") == "text" else
                       {"image": IMAGE_PLACEHOLDER, "image_gen": IMAGE_GEN_PLACEHOLDER}.get(it.get("type"), "")
                       for it in content if isinstance(it, dict))
    return ""


def _message(m: Any, where: str) -> dict[str, Any]:
    if not isinstance(m, dict):
        raise InputError(f"{where}: a message must be an object with role/content (or from/value)")
    role = m.get("role", m.get("from"))
    content = m.get("content", m.get("value"))
    if role not in _ROLES:
        raise InputError(f"{where}: message role {role!r} is not supported; use user/assistant/system "
                         "(human/gpt in the sharegpt format)")
    if not isinstance(content, (str, list)):
        raise InputError(f"{where}: message content must be text (or a list of content items)")
    return {"role": _ROLES[role], "content": content}


def _infer_task(messages: list[dict[str, Any]], pair: bool) -> str:
    text = "".join(_text(m["content"]) for m in messages)
    if pair:
        return "dpo"
    if IMAGE_GEN_PLACEHOLDER in text:
        return "edit" if IMAGE_PLACEHOLDER in text.replace(IMAGE_GEN_PLACEHOLDER, "") else "t2i"
    return "chat"


def _record(raw: Any, base: Path, root: Path, where: str, default_id: str, dirs: tuple[str, str]) -> Record:
    if not isinstance(raw, dict):
        raise InputError(f"{where}: a record must be a JSON object")
    msgs = raw.get("messages", raw.get("conversations"))
    if not isinstance(msgs, list) or not msgs:
        raise InputError(f"{where}: the record has no 'messages' (or 'conversations') list")
    messages = [_message(m, where) for m in msgs]
    if isinstance(raw.get("system"), str) and raw["system"] and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": raw["system"]})
    chosen = rejected = None
    if "chosen" in raw or "rejected" in raw:
        if not (isinstance(raw.get("chosen"), dict) and isinstance(raw.get("rejected"), dict)):
            raise InputError(f"{where}: a preference record needs both 'chosen' and 'rejected' messages")
        chosen, rejected = _message(raw["chosen"], where), _message(raw["rejected"], where)
    images = raw.get("images") or []
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise InputError(f"{where}: 'images' must be a list of paths")
    task = raw.get("task") or _infer_task(messages + [m for m in (chosen,) if m], chosen is not None)
    return Record(id=str(raw.get("id", default_id)), task=task, messages=messages,
                  images=[_image_path(base, root, dirs, p, where) for p in images], chosen=chosen, rejected=rejected,
                  meta=raw.get("meta") if isinstance(raw.get("meta"), dict) else {}, root=root)


def _image_path(base: Path, root: Path, dirs: tuple[str, str], path: str, where: str) -> Path:
    """``base / path``, unless it (absolute, or climbing with ``..``) leaves ``root``: a records file may only name
    images under its data root (a record must not make the trainer read, say, /etc/passwd or ~/.ssh). ``dirs``:
    (base, root) made absolute and normalised once per file (`_abs_dirs`; per image it was most of the reading)."""
    full, top = os.path.normpath(os.path.join(dirs[0], path)), dirs[1]
    if os.path.commonpath([full, top]) != top:
        raise InputError(f"{where}: image path {path!r} leaves the data root {root}; put the images under it "
                         "(a recipe source's `root` can name a wider data root)")
    return base / path


def _inside_root(path: Path, root: Path | None) -> Path:
    """``path`` unless it resolves (following symlinks) outside ``root``; checked when the image is read."""
    if root is not None and not path.resolve().is_relative_to(root.resolve()):
        raise InputError(f"{path}: a symlink out of the data root {root} (to {path.resolve()}); copy the image "
                         "into the data root (linking the whole data directory is fine)")
    return path


def _abs_dirs(base: Path, root: Path) -> tuple[str, str]:
    return os.path.abspath(base), os.path.abspath(root)


def _lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of a UTF-8 file (a byte-order mark is allowed); `InputError` naming the first line
    that is not UTF-8."""
    out = []
    for n, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            out.append((n, raw.decode("utf-8-sig" if n == 1 else "utf-8")))
        except UnicodeDecodeError as e:
            raise InputError(f"{path}:{n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                             "re-save the file as UTF-8") from None
    return out


def read_records(path: str | Path, fmt: Format = "chat", *, root: str | Path | None = None) -> list[Record]:
    """The records of a JSONL file, a JSON list (sharegpt) or a directory holding ``records.jsonl``; their images
    must be under ``root`` (default: the records file's directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / "records.jsonl"
    if not path.is_file():
        hint = " (write one with `vargpt data shapesworld --out DIR`)" if fmt == "shapesworld" else ""
        raise InputError(f"{path}: no such records file{hint}")
    base = path.parent
    root = Path(root) if root is not None else base
    lines = _lines(path)
    dirs = _abs_dirs(base, root)
    if path.suffix == ".json" or next((t for _, t in lines if t.strip()), "").lstrip().startswith("["):
        try:
            rows = json.loads("\n".join(t for _, t in lines))
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rows, list):
            raise InputError(f"{path}: a JSON records file must hold a list of records")
        return [_record(r, base, root, f"{path}: record {i}", f"{path.stem}:{i}", dirs) for i, r in enumerate(rows)]
    out = []
    for n, line in lines:
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}); one record per line") from None
        out.append(_record(raw, base, root, f"{path}:{n}", f"{path.stem}:{n}", dirs))
    return out


# ----------------------------------------------------------------------------------------------- images


def _target_size(width: int, height: int, image_size: int, stride: int, keep_aspect: bool) -> tuple[int, int]:
    """(height, width) in pixels of a generated-image target: square, or the nearest aspect template's grid at
    the same scale index as the square ``image_size`` grid."""
    if not keep_aspect:
        return image_size, image_size
    square = TEMPLATES[1.0]
    g = image_size // stride
    idx = next((i for i, hw in enumerate(square) if hw == (g, g)), None)
    if idx is None:
        return image_size, image_size
    gh, gw = TEMPLATES[nearest_template(height / width)][idx]
    return gh * stride, gw * stride


def gen_image_tensor(image: Image.Image, size_hw: tuple[int, int], transform: str,
                     rng: random.Random | None = None) -> torch.Tensor:
    """A target image as ``[3, H, W]`` in [-1, 1]: plain resize, or the published resize + random crop."""
    h, w = size_hw
    if transform == "released":
        if image.width * image.height > h * w:  # published: first shrink to the pixel budget (nearest)
            s = math.sqrt(h * w / (image.width * image.height))
            image = image.resize((max(1, int(image.width * s)), max(1, int(image.height * s))),
                                 Image.Resampling.NEAREST)
        scale = round(1.125 * max(h, w)) / min(image.width, image.height)
        image = image.resize((max(w, round(image.width * scale)), max(h, round(image.height * scale))),
                             Image.Resampling.LANCZOS)
        rng = rng or random.Random(0)
        x0, y0 = rng.randint(0, image.width - w), rng.randint(0, image.height - h)
        image = image.crop((x0, y0, x0 + w, y0 + h))
    elif image.size != (w, h):
        image = image.resize((w, h), Image.Resampling.LANCZOS)
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return x / 255.0 * 2.0 - 1.0


# ----------------------------------------------------------------------------------------------- dataset


class RecordDataset(Dataset):
    """Records -> processed samples; indexed by ``(index, epoch)`` (the epoch seeds the random crop)."""

    def __init__(self, records: Sequence[Record], processor: VARGPTProcessor, *, image_size: int, stride: int,
                 gen_transform: str = "resize", keep_aspect: bool = False, pad_multiple: int = 128,
                 seed: int = 0, pairs: bool = False, source_condition: bool = False) -> None:
        if not records:
            raise InputError("no training records (check data.sources and data.tasks)")
        self.records = list(records)
        self.processor = processor
        self.image_size, self.stride = image_size, stride
        self.gen_transform, self.keep_aspect = gen_transform, keep_aspect
        self.pad_multiple, self.seed, self.pairs = pad_multiple, seed, pairs
        self.source_condition = source_condition
        self._processors: dict[int, VARGPTProcessor] = {}
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.records)

    def bucket_key(self, index: int) -> tuple[int, int]:
        """Target (height, width) of a record's generated images (reads one image header when keeping aspect)."""
        if not self.keep_aspect:
            return self.image_size, self.image_size
        rec = self.records[index]
        try:
            with Image.open(_inside_root(rec.images[-1], rec.root)) as im:  # the header only
                w, h = im.size
        except (OSError, IndexError, ValueError, InputError, Image.DecompressionBombError):
            return self.image_size, self.image_size  # unreadable: fails (and is skipped) when loaded
        return _target_size(w, h, self.image_size, self.stride, True)

    def _processor_for(self, size_hw: tuple[int, int]) -> VARGPTProcessor:
        from vargpt.scales import schedule_for_size

        n = padded_tokens(schedule_for_size(size_hw[0], size_hw[1], self.stride), self.pad_multiple)
        if n == self.processor.image_gen_token_num:
            return self.processor
        if n not in self._processors:
            p = copy.copy(self.processor)
            p.image_gen_token_num = n
            self._processors[n] = p
        return self._processors[n]

    def _sample(self, messages: list[dict[str, Any]], images: list[Image.Image], rng: random.Random) -> dict:
        proc = self.processor
        size_hw = (self.image_size, self.image_size)
        n_gen = sum(_text(m["content"]).count(IMAGE_GEN_PLACEHOLDER) for m in messages)
        if n_gen and self.keep_aspect:
            size_hw = _target_size(images[-1].width, images[-1].height, self.image_size, self.stride, True)
        if n_gen:
            proc = self._processor_for(size_hw)
        s = proc.training_inputs(messages, images)
        gen, sources = s.pop("gen_images"), s.pop("gen_sources")
        targets, source_px = [], []
        for im, src in zip(gen, sources, strict=True):
            crop = copy.deepcopy(rng)  # the source gets the target's crop; rng advances as without sources
            targets.append(gen_image_tensor(im, size_hw, self.gen_transform, rng))
            if self.source_condition:
                source_px.append(gen_image_tensor(src, size_hw, self.gen_transform, crop) if src is not None
                                 else torch.zeros_like(targets[-1]))
        if gen:
            s["gen_pixel_values"] = torch.stack(targets)
        if gen and self.source_condition:
            s["gen_source_pixel_values"] = torch.stack(source_px)
            s["gen_source_mask"] = torch.tensor([src is not None for src in sources])
        return s

    def _build(self, rec: Record, epoch: int, index: int) -> dict[str, Any]:
        if self.pairs and not rec.is_pair:
            raise InputError(f"record {rec.id} has no chosen/rejected answers; a DPO recipe needs preference data")
        rng = random.Random(f"{self.seed}/{epoch}/{index}")
        images = [load_image(_inside_root(p, rec.root)) for p in rec.images]
        if not rec.is_pair:
            return {"sample": self._sample(rec.messages, images, rng), "id": rec.id, "task": rec.task}
        n_prompt = sum(_text(m["content"]).count(IMAGE_PLACEHOLDER) for m in rec.messages)
        n_chosen = _text(rec.chosen["content"]).count(IMAGE_PLACEHOLDER) + _text(rec.chosen["content"]).count(
            IMAGE_GEN_PLACEHOLDER)
        prompt_imgs, rest = images[:n_prompt], images[n_prompt:]
        # the same crop for both answers: the pair differs in content only
        crop_seed = rng.random()
        chosen = self._sample(rec.messages + [rec.chosen], prompt_imgs + rest[:n_chosen], random.Random(crop_seed))
        rejected = self._sample(rec.messages + [rec.rejected], prompt_imgs + rest[n_chosen:],
                                random.Random(crop_seed))
        return {"chosen": chosen, "rejected": rejected, "id": rec.id, "task": rec.task}

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch = (key, 0) if isinstance(key, int) else key
        skipped: list[str] = []
        for attempt in range(len(self.records)):
            i = (index + attempt) % len(self.records)
            rec = self.records[i]
            try:
                out = self._build(rec, epoch, i)
            except InputError as e:
                if self.pairs and not rec.is_pair:
                    raise
                skipped.append(rec.id)
                if rec.id not in self._warned:
                    self._warned.add(rec.id)
                    log.warning("skipping record %s: %s", rec.id, e)
                continue
            out["skipped"] = skipped
            return out
        raise InputError(f"none of the {len(self.records)} records could be loaded (missing or corrupt images); "
                         "check the image paths in the records files")


# ----------------------------------------------------------------------------------------------- sampler


class MixtureBatchSampler:
    """The seeded global batch order of a weighted mixture of sources, bucketed, sharded by rank.

    Indices are ``(record index, epoch)`` pairs into the concatenation of the sources. Vectorised (numpy): an
    epoch of millions of draws costs one permutation and a sort, and its batches are one int array.
    """

    def __init__(self, source_sizes: Sequence[int], weights: Sequence[float], bucket_keys: Sequence[Any], *,
                 batch_size: int, seed: int = 0, shuffle: bool = True, bucket: bool = True) -> None:
        self.offsets = np.cumsum([0, *source_sizes])
        self.sizes, self.weights = list(source_sizes), list(weights)
        keys = list(bucket_keys) if bucket else [0] * int(self.offsets[-1])
        ids: dict[Any, int] = {}
        self.key_ids = np.array([ids.setdefault(k, len(ids)) for k in keys], dtype=np.int64)
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self._cache: tuple[int, np.ndarray] | None = None

    def _epoch_array(self, epoch: int) -> np.ndarray:
        """``[n_batches, batch_size]`` record indices of an epoch, in global order."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        parts = []
        for off, n, w in zip(self.offsets[:-1], self.sizes, self.weights, strict=True):
            whole, extra = int(w), int(round((w - int(w)) * n))
            parts += [np.arange(off, off + n)] * whole
            if extra:
                parts.append(off + rng.choice(n, size=extra, replace=False))
        draws = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        order = draws[rng.permutation(len(draws))] if self.shuffle else draws
        # fill one batch per bucket in reading order; a batch is emitted when its last element arrives
        chunks, done_at = [], []
        keys = self.key_ids[order]
        for k in np.unique(keys):
            pos = np.flatnonzero(keys == k)
            n = len(pos) // self.batch_size * self.batch_size
            pos = pos[:n].reshape(-1, self.batch_size)
            chunks.append(order[pos])
            done_at.append(pos[:, -1])
        if not chunks:
            batches = np.zeros((0, self.batch_size), dtype=np.int64)
        else:
            batches = np.concatenate(chunks)[np.argsort(np.concatenate(done_at), kind="stable")]
        self._cache = (epoch, batches)
        return batches

    def epoch_batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        """All batches of an epoch (every rank's), in global order; incomplete buckets are dropped."""
        return [[(int(i), epoch) for i in b] for b in self._epoch_array(epoch)]

    def num_batches(self, epoch: int = 0) -> int:
        return len(self._epoch_array(epoch))

    def rank_batches(self, epoch: int, rank: int, world_size: int, start: int = 0) -> _RankBatches:
        """Rank ``rank``'s batches of an epoch from global batch ``start`` on (a multiple of world_size); every
        rank gets the same count (the tail that does not divide evenly is dropped)."""
        arr = self._epoch_array(epoch)
        usable = len(arr) - len(arr) % world_size
        return _RankBatches(arr[start + rank:usable:world_size], epoch)


class _RankBatches:
    """A lazy list of ``[(index, epoch), ...]`` batches (a DataLoader ``batch_sampler``)."""

    def __init__(self, arr: np.ndarray, epoch: int) -> None:
        self.arr, self.epoch = arr, epoch

    def __len__(self) -> int:
        return len(self.arr)

    def __getitem__(self, k: int | slice) -> Any:
        if isinstance(k, slice):
            return _RankBatches(self.arr[k], self.epoch)
        return [(int(i), self.epoch) for i in self.arr[k]]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return (self[k] for k in range(len(self)))

    def __eq__(self, other: object) -> bool:
        return list(self) == list(other) if isinstance(other, (list, _RankBatches)) else NotImplemented


# ----------------------------------------------------------------------------------------------- collation


class Collator:
    """Samples -> one padded batch (right padding). Preference batches: chosen rows first, then rejected."""

    def __init__(self, processor: VARGPTProcessor) -> None:
        self.processor = processor

    def _batch(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = self.processor.pad(samples, padding_side="right")
        gens = [s for s in samples if "gen_pixel_values" in s]
        if gens:
            out["gen_pixel_values"] = torch.cat([s["gen_pixel_values"] for s in gens])
        if any("gen_source_pixel_values" in s for s in gens):  # aligned with gen_pixel_values, one row per target
            out["gen_source_pixel_values"] = torch.cat([s.get("gen_source_pixel_values",
                                                              torch.zeros_like(s["gen_pixel_values"])) for s in gens])
            out["gen_source_mask"] = torch.cat([s.get("gen_source_mask",
                                                      torch.zeros(len(s["gen_pixel_values"]), dtype=torch.bool))
                                                for s in gens])
        return out

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        if "chosen" in items[0]:
            batch = self._batch([it["chosen"] for it in items] + [it["rejected"] for it in items])
            batch["n_pairs"] = len(items)
        else:
            batch = self._batch([it["sample"] for it in items])
        batch["ids"] = [it["id"] for it in items]
        batch["tasks"] = [it["task"] for it in items]
        batch["skipped"] = [s for it in items for s in it["skipped"]]
        return batch


def iterate_batches(loader_factory: Any, sampler: MixtureBatchSampler, *, rank: int, world_size: int,
                    epoch: int, start: int) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """Endless ``(epoch, next global batch index, batch)`` from ``(epoch, start)`` on, epoch after epoch."""
    while True:
        batches = sampler.rank_batches(epoch, rank, world_size, start)
        if not batches and start == 0:
            raise InputError(f"the data make no full batch for {world_size} process(es); lower batch_size or add "
                             "records")
        for k, batch in enumerate(loader_factory(batches)):
            yield epoch, start + (k + 1) * world_size, batch
        epoch, start = epoch + 1, 0
