"""One report of a model on every ShapesWorld task: what ``vargpt eval --json PATH`` writes.

`evaluate_model` takes one loaded `VARGPTPipeline` and one held-out split and runs, in turn: the model's own VAE
on the split's images at the model's image size (`vargpt.eval.vae.evaluate_vae`), VQA exact match, GenEval-style
text-to-image and editing (`vargpt.eval.tasks`). It recomputes nothing: it lifts their headline numbers to
top-level keys (``vae_psnr_db``, ``understanding_accuracy``, ``geneval_overall``, ``edit_success``, ...), each
sampled score with its per-seed spread (``<key>_seeds``), the VAE ceilings beside them, and keeps every task's
own report under ``"details"``. Beside the JSON it writes `markdown_table` (PATH.md) and the text-to-image and
edit sample sheets (PATH stem + ``_t2i.png`` / ``_edit.png``).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vargpt.eval import tasks
from vargpt.eval.vae import eval_images, evaluate_vae

# (top-level key, table label, (task, metric) of its VAE ceiling): the report's headline numbers, in table order
HEADLINE: tuple[tuple[str, str, tuple[str, str] | None], ...] = (
    ("vae_psnr_db", "VAE reconstruction PSNR (dB)", None),
    ("vae_ssim", "VAE reconstruction SSIM", None),
    ("understanding_accuracy", "understanding: VQA exact match", None),
    ("geneval_overall", "text-to-image: GenEval overall", ("t2i", "score")),
    ("edit_success", "editing: applied and the rest preserved", ("edit", "score")),
    ("edit_applied", "editing: instruction applied", ("edit", "satisfied")),
    ("edit_preservation", "editing: rest preserved", ("edit", "preserved")),
)


def _with_seeds(rep: dict[str, Any], metric: str) -> dict[str, Any]:
    """``rep[metric]``'s spread over the sampling seeds (mean, min, max, spread, std) and its value per seed."""
    return rep[metric] | {"by_seed": {str(r["seed"]): r[metric] for r in rep["per_seed"]}}


@torch.no_grad()
def evaluate_model(pipe: Any, json_path: str | Path, *, model_name: str = "embedded default", split: str = "test",
                   n: int = 64, seeds: Sequence[int] = (0, 1, 2), batch: int = 16, vqa_size: int = 64
                   ) -> dict[str, Any]:
    """Score ``pipe`` (a `VARGPTPipeline`) on the first ``n`` records of ``split`` for every task, write the JSON,
    the markdown table and the sample sheets (see the module docstring); returns the report."""
    t0 = time.perf_counter()
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    model, size, progress = pipe.model, pipe.model.config.image_size, pipe.progress
    vae = model.vae_local  # measured in fp32 (a bf16 model on CUDA gets an fp32 copy): the VAE's own quality
    vae = vae if next(vae.parameters()).dtype == torch.float32 else copy.deepcopy(vae).float()
    vae_rep = evaluate_vae(vae, eval_images(f"shapesworld:{n}", json_path.parent / "data", size, split=split))
    vqa = tasks.evaluate_vqa(pipe, tasks.vqa_cases(n, split=split, size=vqa_size), progress=progress)
    kw = dict(seeds=seeds, batch=batch, progress=progress, keep_images=32)
    t2i = tasks.evaluate_t2i(pipe.engine, tasks.t2i_cases(n, split=split), **kw)
    edit_cases = tasks.edit_cases(n, split=split, size=size)
    edit = tasks.evaluate_edit(pipe.engine, edit_cases, **kw)

    stem = json_path.with_suffix("")
    sheets = {"t2i": str(tasks.sample_sheet(t2i.pop("images"), f"{stem}_t2i.png")),
              "edit": str(tasks.sample_sheet(edit.pop("images"), f"{stem}_edit.png",
                                             sources=[c.source for c in edit_cases]))}
    rep = {
        "model": model_name, "split": split, "n": n, "seeds": list(seeds), "size": size,
        "vae_psnr_db": vae_rep["psnr_db"], "vae_ssim": vae_rep["ssim"],
        "understanding_accuracy": vqa["accuracy"], "understanding_by_type": vqa["by_group"],
        "geneval_overall": t2i["score"]["mean"], "geneval_overall_seeds": _with_seeds(t2i, "score"),
        "geneval": t2i["by_group"],
        "edit_success": edit["score"]["mean"], "edit_success_seeds": _with_seeds(edit, "score"),
        "edit_applied": edit["satisfied"]["mean"], "edit_applied_seeds": _with_seeds(edit, "satisfied"),
        "edit_preservation": edit["preserved"]["mean"], "edit_preservation_seeds": _with_seeds(edit, "preserved"),
        "edit_by_kind": edit["by_group"],
        "vae_ceiling": {"t2i": t2i["vae_ceiling"], "edit": edit["vae_ceiling"]},
        "sample_sheets": sheets,
        "details": {"vae": vae_rep, "vqa": vqa, "t2i": t2i, "edit": edit},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    json_path.write_text(json.dumps(rep, indent=2) + "\n")
    json_path.with_suffix(".md").write_text(markdown_table(rep))
    return rep


def markdown_table(rep: dict[str, Any]) -> str:
    """The headline numbers of an `evaluate_model` report, then the per-category ones, as a markdown table."""
    def num(v: float | None) -> str:
        return "" if v is None else f"{v:.3f}"

    def ceiling(task: str, metric: str, group: str | None = None) -> float | None:
        c = rep["vae_ceiling"][task]  # None for a model without a VAE
        if c is None:
            return None
        return c["by_group"].get(group) if group else c[metric]

    rows = []
    for key, label, ceil in HEADLINE:
        s = rep.get(f"{key}_seeds")
        spread = f"{s['min']:.3f}-{s['max']:.3f} (std {s['std']:.3f})" if s else ""
        rows.append((label, num(rep[key]), spread, num(ceiling(*ceil)) if ceil else ""))
    rows += [(f"GenEval {g}", num(v), "", num(ceiling("t2i", "score", g))) for g, v in rep["geneval"].items()]
    rows += [(f"editing {k}", num(v), "", num(ceiling("edit", "score", k))) for k, v in rep["edit_by_kind"].items()]
    rows += [(f"VQA {t}", num(v), "", "") for t, v in rep["understanding_by_type"].items()]
    head = (f"`vargpt eval`: {rep['model']}, {rep['split']} split, {rep['n']} records, seeds "
            f"{','.join(map(str, rep['seeds']))}, {rep['size']} px, {rep['seconds']} s\n\n"
            "| metric | score (mean over seeds) | over seeds: min-max (std) | VAE ceiling |\n|---|---|---|---|\n")
    return head + "".join(f"| {' | '.join(r)} |\n" for r in rows)
