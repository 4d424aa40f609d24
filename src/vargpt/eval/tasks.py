"""A model's scores on ShapesWorld tasks (text-to-image, editing, VQA), judged by the deterministic checker.

* `evaluate_t2i`: GenEval-style. Prompts of ShapesWorld's ``test`` split (its colour-shape pairs and prompt
  compositions never occur in training), one image per prompt and seed, each scored 0/1 by
  `vargpt.eval.checker.score_prompt` (and given partial credit by `object_recall`); per seed the means and the
  per-category means, across seeds the mean and the spread (max - min and standard deviation) of each metric.
  This is how the training stages (DPO, editing SFT) are judged.
* `evaluate_edit`: edit records of the ``test`` split (source scene, instruction); the edited image scores 1 when
  the instruction happened and nothing else moved (`score_edit`), per seed, with satisfied / preserved rates.
* `evaluate_vqa`: questions of the ``test`` split about rendered scenes, greedy answers scored by exact match
  after normalisation (`score_answer`), per question type.
* `vae_ceiling`: the same scores for the VAE's reconstructions of the cases' own targets (the rendered scene the
  prompt or edit asks for): no generator can beat its VAE, so every t2i / edit report carries this ceiling
  (``"vae_ceiling"``) when the model has a VAE.
* `sample_sheet`: a PNG of the first images, a red frame on each failure, for a look instead of a number.

Command line: ``vargpt eval t2i`` / ``vargpt eval edit`` / ``vargpt eval vqa`` (see `vargpt.cli`).
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from vargpt.config import SamplingConfig
from vargpt.data.shapesworld import make_record
from vargpt.engine import to_pil
from vargpt.errors import VargptError
from vargpt.eval.checker import object_recall, parse_scene, score_answer, score_edit, score_prompt

SEED_STRIDE = 1_000_003  # image i under sampling seed s is drawn with seed s * SEED_STRIDE + i


@dataclass(frozen=True)
class T2ICase:
    prompt: str
    category: str
    target: dict[str, Any] | None = None  # the record's scene (what the prompt asks for), for the VAE ceiling


@dataclass(frozen=True)
class EditCase:
    source: Image.Image
    instruction: str
    kind: str
    target: dict[str, Any] | None = None  # the edited scene, for the VAE ceiling


@dataclass(frozen=True)
class VQACase:
    image: Image.Image
    question: str
    answer: str
    kind: str


def _records(task: str, n: int, split: str, seed: int, size: int,
             t2i_layout: str = "random") -> list[tuple[dict[str, Any], Image.Image, str]]:
    """(record, its first image, the user's text without the image placeholder) of the first ``n`` ``task``
    records of a ShapesWorld split."""
    out = []
    for i in range(n):
        rec, images = make_record(i, split=split, seed=seed, size=size, tasks=(task,), t2i_layout=t2i_layout)
        out.append((rec, images[rec["images"][0]], rec["messages"][0]["content"].replace("<image>", "").strip()))
    return out


def t2i_cases(n: int, *, split: str = "test", seed: int = 0, layout: str = "random") -> list[T2ICase]:
    """The first ``n`` text-to-image prompts of a ShapesWorld split; ``layout="canonical"``: the same prompts with
    `canonical_scene` targets (what a model trained on canonical layouts draws; only the VAE ceiling reads them)."""
    return [T2ICase(text, rec["meta"]["category"], rec["scene"])
            for rec, _, text in _records("t2i", n, split, seed, 64, layout)]


def edit_cases(n: int, *, split: str = "test", seed: int = 0, size: int = 64) -> list[EditCase]:
    """The first ``n`` editing records of a ShapesWorld split (source rendered at ``size``)."""
    return [EditCase(src, text, rec["meta"]["category"], rec["meta"]["target_scene"])
            for rec, src, text in _records("edit", n, split, seed, size)]


def vqa_cases(n: int, *, split: str = "test", seed: int = 0, size: int = 64) -> list[VQACase]:
    """The first ``n`` questions of a ShapesWorld split (image rendered at ``size``)."""
    return [VQACase(image, text, rec["messages"][1]["content"], rec["meta"]["qtype"])
            for rec, image, text in _records("vqa", n, split, seed, size)]


def _spread(values: Sequence[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "spread": max(values) - min(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0}


def _batches(n: int, batch: int) -> list[range]:
    return [range(i, min(n, i + batch)) for i in range(0, n, batch)]


def _progress(items: Sequence[Any] | None, desc: str, enabled: bool, total: int | None = None) -> Any:
    from tqdm import tqdm

    return tqdm(items, total=total, desc=desc, disable=not enabled, dynamic_ncols=True)


def _over_seeds(name: str, cases: Sequence[Any], seeds: Sequence[int], batch: int, progress: bool,
                keep_images: int, sample: Callable[[list[Any], list[int]], Tensor],
                score: Callable[[Any, Image.Image], dict[str, float]], group: Callable[[Any], str],
                text: Callable[[Any], str]) -> dict[str, Any]:
    """Run ``sample(cases, seeds) -> images`` batch by batch for each sampling seed and average ``score``'s
    metrics (its ``"score"`` also per ``group``); image i under seed s is drawn with seed s * SEED_STRIDE + i."""
    per_seed, kept = [], []
    t0 = time.perf_counter()
    bar = _progress(None, name, progress, total=len(cases) * len(seeds))
    for s in seeds:
        rows, groups = [], defaultdict(list)
        for idx in _batches(len(cases), batch):
            chunk = [cases[i] for i in idx]
            for c, img in zip(chunk, to_pil(sample(chunk, [s * SEED_STRIDE + i for i in idx])), strict=True):
                row = score(c, img)
                rows.append(row)
                groups[group(c)].append(row["score"])
                if s == seeds[0] and len(kept) < keep_images:
                    kept.append((img, row["score"] > 0, text(c)))
            bar.update(len(chunk))
        per_seed.append({"seed": s, **{k: statistics.fmean(r[k] for r in rows) for k in rows[0]},
                         "by_group": {k: statistics.fmean(v) for k, v in sorted(groups.items())}})
    bar.close()
    groups_seen = sorted({g for r in per_seed for g in r["by_group"]})
    return {"n": len(cases), "seeds": list(seeds), **{k: _spread([r[k] for r in per_seed]) for k in rows[0]},
            "by_group": {g: statistics.fmean(r["by_group"].get(g, 0.0) for r in per_seed) for g in groups_seen},
            "per_seed": per_seed, "seconds": round(time.perf_counter() - t0, 1), "images": kept}


def prompt_metrics(img: Image.Image, prompt: str) -> dict[str, float]:
    """The checker's GenEval-style ``score`` (0/1) of ``img`` for ``prompt``, partial credit ``object_recall``."""
    scene = parse_scene(img)
    return {"score": score_prompt(scene, prompt).score, "object_recall": object_recall(scene, prompt)}


def _t2i_metrics(c: T2ICase, img: Image.Image) -> dict[str, float]:
    return prompt_metrics(img, c.prompt)


@torch.no_grad()
def evaluate_t2i(engine: Any, cases: Sequence[T2ICase], *, seeds: Sequence[int] = (0, 1, 2),
                 size: int | None = None, sampling: SamplingConfig | None = None, batch: int = 16,
                 progress: bool = True, keep_images: int = 0) -> dict[str, Any]:
    """Checker scores of ``engine`` (a `vargpt.engine.Engine`, or anything with its ``generate_images``) on ``cases``
    for each sampling seed, and the partial credit
    `object_recall`; ``by_group`` is per GenEval category. ``keep_images``: the first images of the first seed
    come back under ``"images"``."""
    rep = _over_seeds(
        "t2i", cases, seeds, batch, progress, keep_images,
        lambda chunk, sd: engine.generate_images([c.prompt for c in chunk], size=size, sampling=sampling,
                                                 seed=sd).images,
        _t2i_metrics, lambda c: c.category, lambda c: c.prompt)
    size = size or engine.config.image_size
    return {"size": size, "sampling": vars(sampling or engine.config.sampling), **rep,
            "vae_ceiling": _model_ceiling(engine, cases, size, batch)}


def edit_metrics(source: Image.Image, instruction: str, img: Image.Image) -> dict[str, float]:
    """The checker's verdict on one edited picture: score (satisfied and preserved), satisfied, preserved."""
    try:
        v = score_edit(source, instruction, img)
    except VargptError:  # the checker cannot read the edited picture at all
        return {"score": 0.0, "satisfied": 0.0, "preserved": 0.0}
    return {"score": v.score, "satisfied": float(v.satisfied), "preserved": float(v.preserved)}


def _edit_metrics(c: EditCase, img: Image.Image) -> dict[str, float]:
    return edit_metrics(c.source, c.instruction, img)


@torch.no_grad()
def evaluate_edit(engine: Any, cases: Sequence[EditCase], *, seeds: Sequence[int] = (0, 1, 2),
                  size: int | None = None, sampling: SamplingConfig | None = None, batch: int = 16,
                  progress: bool = True, keep_images: int = 0) -> dict[str, Any]:
    """Edit success of ``engine`` (its ``edit_images``) on ``cases`` for each sampling seed (score = satisfied and
    preserved, also reported apart); ``by_group`` is per edit kind."""
    rep = _over_seeds(
        "edit", cases, seeds, batch, progress, keep_images,
        lambda chunk, sd: engine.edit_images([c.source for c in chunk], [c.instruction for c in chunk], size=size,
                                             sampling=sampling, seed=sd).images,
        _edit_metrics, lambda c: c.kind, lambda c: c.instruction)
    size = size or engine.config.image_size
    return {"size": size, "sampling": vars(sampling or engine.config.sampling), **rep,
            "vae_ceiling": _model_ceiling(engine, cases, size, batch)}


def _model_ceiling(engine: Any, cases: Sequence[T2ICase | EditCase], size: int, batch: int) -> dict[str, Any] | None:
    vae = getattr(getattr(engine, "model", engine), "vae_local", None)
    if vae is None or any(c.target is None for c in cases):
        return None
    return vae_ceiling(vae, cases, size=size, batch=batch)


@torch.no_grad()
def vae_ceiling(vae: Any, cases: Sequence[T2ICase | EditCase], *, size: int, batch: int = 16) -> dict[str, Any]:
    """Checker scores of ``vae``'s reconstructions (all scales) of the cases' targets rendered at ``size``: the
    best any generator on this VAE can score on these cases. Same metrics and ``by_group`` as the evaluations."""
    from vargpt.data.scene import Scene, render

    rows, groups = [], defaultdict(list)
    param = next(vae.parameters())
    for idx in _batches(len(cases), batch):
        chunk = [cases[i] for i in idx]
        x = torch.stack([torch.from_numpy(np.array(render(Scene.from_dict(c.target), size))).permute(2, 0, 1)
                         for c in chunk]).to(param.device).float().div(127.5).sub(1)
        recon = vae.decode(vae.quantize(x.to(param.dtype)).quantized_BDHW)
        for c, img in zip(chunk, to_pil(recon.float()), strict=True):
            if isinstance(c, T2ICase):
                row, group = _t2i_metrics(c, img), c.category
            else:
                row, group = _edit_metrics(c, img), c.kind
            rows.append(row)
            groups[group].append(row["score"])
    return {"size": size, "n": len(cases), **{k: statistics.fmean(r[k] for r in rows) for k in rows[0]},
            "by_group": {k: statistics.fmean(v) for k, v in sorted(groups.items())}}


def sample_sheet(images: Sequence[tuple[Image.Image, bool, str]], path: str | Path, *, per_row: int = 8,
                 sources: Sequence[Image.Image] | None = None) -> Path:
    """A PNG of ``(image, passed, text)`` tiles, failures framed in red; with ``sources``, each source above its
    result. The texts go to a sidecar ``.txt`` (tiles are too small to caption legibly at 64 px)."""
    side = max(im.width for im, _, _ in images)
    rows_per_item = 2 if sources else 1
    n_rows = -(-len(images) // per_row)
    sheet = Image.new("RGB", (per_row * side, n_rows * rows_per_item * side), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (img, ok, _) in enumerate(images):
        x, y = (i % per_row) * side, (i // per_row) * rows_per_item * side
        if sources:
            sheet.paste(sources[i].resize((side, side)), (x, y))
            y += side
        sheet.paste(img.resize((side, side)), (x, y))
        # failures framed red; passes get a hairline so white pictures on the white sheet stay apart
        draw.rectangle((x, y, x + side - 1, y + side - 1), outline=(200, 200, 200) if ok else (220, 0, 0),
                       width=1 if ok else 2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    path.with_suffix(".txt").write_text(
        "\n".join(f"{i}\t{'pass' if ok else 'FAIL'}\t{text}" for i, (_, ok, text) in enumerate(images)) + "\n")
    return path


@torch.no_grad()
def evaluate_vqa(pipe: Any, cases: Sequence[VQACase], *, max_new_tokens: int = 16,
                 progress: bool = True) -> dict[str, Any]:
    """Greedy answers of ``pipe`` (a `VARGPTPipeline`) to ``cases``, exact-match accuracy overall and per type."""
    t0 = time.perf_counter()
    by_kind, answers = defaultdict(list), []
    for c in _progress(cases, "vqa", progress):
        pred = pipe.chat(c.question, c.image, max_new_tokens=max_new_tokens)
        by_kind[c.kind].append(score_answer(pred, c.answer))
        answers.append({"question": c.question, "answer": c.answer, "predicted": pred})
    scores = [s for v in by_kind.values() for s in v]
    return {"n": len(cases), "accuracy": statistics.fmean(scores),
            "by_group": {k: statistics.fmean(v) for k, v in sorted(by_kind.items())},
            "answers": answers[:16], "seconds": round(time.perf_counter() - t0, 1)}
