"""On-policy preference pairs for DPO: sample the model on training prompts, judge with the checker, keep contrasts.

The released DPO stage trains on (prompt, chosen image, rejected image) records; how the released pairs were
made is not in the code (reference-facts section 9). ShapesWorld's own DPO records pair a faithful render with
a structured corruption of it: both images are far from what a small generator draws, so their log-probability
gap says little about the model's own mistakes. Here the pairs come from the model itself, judged by the
deterministic checker (`vargpt.eval.checker`), so DPO moves probability from the model's failing samples to its
passing ones:

* for each of ``n`` text-to-image prompts (``task="edit"``: editing records, a source picture and an instruction)
  of a ShapesWorld split (``train`` by default, so no held-out colour-shape
  pair or composition is ever seen; ``categories`` keeps only prompts of those categories, so a model that passes
  most prompts still yields pairs where it is weak), draw ``samples`` images with the model's sampling settings;
* score each (text-to-image: GenEval-style 0/1 score first, `object_recall` to break ties; editing: the edit
  checker's success first, then how many of "applied" and "preserved" hold);
* chosen = best sample, rejected = worst; the pair is kept when the chosen one is strictly better (it passes and
  the rejected one fails, or neither passes and it shows more of the requested objects). With ``render_chosen``, a
  prompt where no sample passes pairs the faithful render (chosen) with the worst sample instead; prompts whose
  samples all tie (every one passes, or all equally wrong) give no pair. (The render of an edit is its target
  scene.) A model that passes every sample of the training prompts (a text-to-image generator trained on canonical
  layouts does) leaves nothing to prefer; its edits, still failing most of the time, do.

Output: ``DIR/records.jsonl`` in our chat format (``task: dpo``, ``messages`` = the prompt, ``chosen`` /
``rejected`` = ``<image_gen>``, ``images`` = [chosen, rejected] (editing: [source, chosen, rejected], the user turn
``<image>`` + instruction), ``meta`` with both scores) and the PNGs beside it,
plus ``DIR/summary.json`` (pass rate of all samples, pairs kept, prompts without contrast). A recipe reads it as a
``format: chat`` source. Everything is seeded: same model, arguments and seed -> same bytes.

Command line: ``vargpt data preferences --model M --out DIR`` (see `vargpt.cli`).
"""

from __future__ import annotations

import itertools
import json
import statistics
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from vargpt.config import SamplingConfig
from vargpt.data.shapesworld import CATEGORIES, EDIT_KINDS, make_record
from vargpt.engine import to_pil
from vargpt.errors import InputError
from vargpt.eval import tasks
from vargpt.training.checkpoint import atomic_write_bytes, atomic_write_json

__all__ = ["PreferenceConfig", "build_preferences"]


@dataclass(frozen=True)
class PreferenceConfig:
    out: str
    n: int = 1024  # prompts (editing records with task "edit")
    task: str = "t2i"  # t2i: text-to-image prompts; edit: editing records (source picture + instruction)
    samples: int = 4  # images per prompt
    size: int = 64
    split: str = "train"
    seed: int = 0  # prompt set (ShapesWorld seed) and sampling seeds
    batch: int = 32  # images per generation call
    render_chosen: bool = False  # no passing sample: pair the faithful render with the worst sample
    categories: tuple[str, ...] | None = None  # prompt categories (edit kinds) to keep (None: all, natural mix)
    allow_empty: bool = False  # no pair at all: write an empty set and its summary instead of raising (a model that
    # passes every sample of the training prompts leaves DPO nothing to prefer; a build can then skip DPO)

    def validate(self) -> None:
        if self.n < 1 or self.samples < 2 or self.batch < 1:
            raise InputError(f"preferences: need n >= 1, samples >= 2 and batch >= 1 (got n={self.n}, "
                             f"samples={self.samples}, batch={self.batch})")
        if self.task not in ("t2i", "edit"):
            raise InputError(f"preferences: unknown task {self.task!r}; choose t2i or edit")
        known = CATEGORIES if self.task == "t2i" else EDIT_KINDS
        unknown = set(self.categories or ()) - set(known)
        if unknown or self.categories == ():
            raise InputError(f"preferences: unknown or no {'prompt categories' if self.task == 't2i' else 'edit kinds'}"
                             f" {sorted(unknown)}; choose from {', '.join(known)}")


def _prompt_records(cfg: PreferenceConfig) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """The split's records of ``cfg.task`` in index order, those of ``cfg.categories`` only (all when None)."""
    for i in itertools.count():
        rec = make_record(i, split=cfg.split, seed=cfg.seed, size=cfg.size, tasks=(cfg.task,))
        if cfg.categories is None or rec[0]["meta"]["category"] in cfg.categories:
            yield rec


_BEST_TIE = {"t2i": 1.0, "edit": 2.0}  # the tie-breaker of a faithful render (full recall; applied and preserved)


def _judge(img: Any, prompt: str, source: Any = None) -> tuple[float, float]:
    """(0/1 score, tie-breaker): text-to-image (score, object recall); editing (success, applied + preserved)."""
    if source is None:
        m = tasks.prompt_metrics(img, prompt)
        return m["score"], m["object_recall"]
    m = tasks.edit_metrics(source, prompt.replace("<image>", "").strip(), img)
    return m["score"], m["satisfied"] + m["preserved"]


@torch.no_grad()
def build_preferences(engine: Any, cfg: PreferenceConfig, *, sampling: SamplingConfig | None = None,
                      progress: bool = True) -> dict[str, Any]:
    """Write on-policy DPO records of the model behind ``engine`` (a `vargpt.engine.Engine`, or anything with its
    ``generate_images`` and ``config``) under ``cfg.out``; returns the summary."""
    cfg.validate()
    out = Path(cfg.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    per_call = max(1, cfg.batch // cfg.samples)
    counts: Counter[str] = Counter()
    sample_scores: list[float] = []
    lines: list[str] = []
    bar = tqdm(total=cfg.n, desc="preferences", unit="prompt", disable=not progress, dynamic_ncols=True)
    records = _prompt_records(cfg)
    for start in range(0, cfg.n, per_call):
        idx = range(start, min(cfg.n, start + per_call))
        recs = [next(records) for _ in idx]
        prompts = [r["messages"][0]["content"] for r, _ in recs]
        sources = [truth[rec["images"][0]] for rec, truth in recs] if cfg.task == "edit" else None
        seeds = [cfg.seed * tasks.SEED_STRIDE + i * cfg.samples + j for i in idx for j in range(cfg.samples)]
        extra = {"source_images": sources} if sources else {}
        images = to_pil(engine.generate_images(prompts, n=cfg.samples, size=cfg.size, sampling=sampling,
                                               seed=seeds, **extra).images)
        for k, ((rec, truth), prompt) in enumerate(zip(recs, prompts, strict=True)):
            group = images[k * cfg.samples:(k + 1) * cfg.samples]
            source = sources[k] if sources else None
            judged = [_judge(im, prompt, source) for im in group]
            sample_scores += [s for s, _ in judged]
            best = max(range(len(group)), key=lambda j: judged[j])
            worst = min(range(len(group)), key=lambda j: judged[j])
            chosen_img, chosen_score, origin = group[best], judged[best], "sample"
            if judged[best][0] == 0 and cfg.render_chosen:
                chosen_img, chosen_score, origin = truth[rec["images"][-1]], (1.0, _BEST_TIE[cfg.task]), "render"
            if not chosen_score > judged[worst]:
                counts["all_pass" if judged[worst][0] > 0 else "none_pass"] += 1
                continue
            counts[f"pairs_{origin}"] += 1
            stem = f"images/{rec['id']}"
            chosen_img.save(out / f"{stem}_chosen.png")
            group[worst].save(out / f"{stem}_rejected.png")
            prompt_images = []
            if source is not None:
                source.save(out / f"{stem}_source.png")
                prompt_images = [f"{stem}_source.png"]
            lines.append(json.dumps({
                "id": rec["id"], "task": "dpo", "messages": [{"role": "user", "content": prompt}],
                "chosen": {"role": "assistant", "content": "<image_gen>"},
                "rejected": {"role": "assistant", "content": "<image_gen>"},
                "images": [*prompt_images, f"{stem}_chosen.png", f"{stem}_rejected.png"],
                "meta": {"category": rec["meta"]["category"], "chosen_from": origin,
                         "chosen_score": list(chosen_score), "rejected_score": list(judged[worst]),
                         "sample_scores": [s for s, _ in judged]}}) + "\n")
        bar.update(len(idx))
    bar.close()
    pairs = len(lines)
    if pairs == 0 and not cfg.allow_empty:  # no records.jsonl: a resumed build must not take it for a finished set
        raise InputError(f"preferences: none of {cfg.n} prompts gave a pair (every sample "
                         f"{'passed' if counts['all_pass'] else 'was equally wrong'}); draw more --samples per prompt"
                         + ("" if cfg.render_chosen else " or pass --render-chosen"))
    summary = {"config": asdict(cfg), "sampling": vars(sampling or engine.config.sampling),
               "sample_pass_rate": statistics.fmean(sample_scores), "pairs": pairs,
               "pairs_sample_chosen": counts["pairs_sample"], "pairs_render_chosen": counts["pairs_render"],
               "prompts_all_pass": counts["all_pass"], "prompts_none_pass": counts["none_pass"]}
    atomic_write_json(out / "summary.json", summary)
    atomic_write_bytes(out / "records.jsonl", "".join(lines).encode())  # last: a build's mark of a finished set
    return summary
