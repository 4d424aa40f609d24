"""The `vargpt` command line: thin entry points over the library.

Each command parses its arguments, calls one library function and prints or writes the result.
Errors a user can cause are `VargptError`s: printed as one line on stderr with a non-zero exit and no
traceback (``--debug`` anywhere on the command line shows the traceback instead).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from vargpt import __version__
from vargpt.errors import VargptError

app = typer.Typer(
    name="vargpt",
    help="VARGPT-v1.1: understand images, generate and edit them. With no --model, the embedded default.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Build datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")


class _RecipeGroup(typer.core.TyperGroup):
    """``vargpt train --recipe FILE key.sub=value ...``: words holding ``=`` are recipe overrides, unless the first
    word names a subcommand (``vargpt train vae ...``), whose arguments stay untouched."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands:
            ctx.meta["recipe_overrides"] = [a for a in args if "=" in a and not a.startswith("-")]
            args = [a for a in args if not ("=" in a and not a.startswith("-"))]
        return super().parse_args(ctx, args)


train_app = typer.Typer(help="Train models: `vargpt train --recipe FILE key.sub=value ... --resume`, or the VAE.",
                        no_args_is_help=True, cls=_RecipeGroup)
app.add_typer(train_app, name="train")
eval_app = typer.Typer(help="Evaluate models and write JSON reports: `vargpt eval --json PATH` scores every task "
                       "in one report; the subcommands score one.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")

EXIT_USER_ERROR = 2


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"vargpt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """VARGPT-v1.1 command line."""


# ----------------------------------------------------------------------------------------------- data


@data_app.command("shapesworld")
def data_shapesworld(
    out: Annotated[Path, typer.Option("--out", help="Output directory (records.jsonl + images).")],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of scenes.")] = 1000,
    split: Annotated[str, typer.Option("--split", help="train, val or test.")] = "train",
    size: Annotated[int, typer.Option("--size", help="Image size in pixels: 64, 128, 256 or 512.")] = 64,
    seed: Annotated[int, typer.Option("--seed", help="Dataset seed (same seed -> same bytes).")] = 0,
    tasks: Annotated[str, typer.Option("--tasks", help="Comma-separated: caption,vqa,t2i,edit,dpo.")] = "",
    t2i_layout: Annotated[str, typer.Option("--t2i-layout", help="Text-to-image targets: random (any scene that "
                                            "satisfies the prompt) or canonical (one fixed layout per prompt).")
                          ] = "random",
    vqa_turns: Annotated[int, typer.Option("--vqa-turns", min=1, help="Questions per question record (a "
                                           "multi-turn chat about one picture; the first turn is unchanged).")] = 1,
    position_colours: Annotated[float, typer.Option("--position-colours", min=0.0, max=1.0, help="Share of "
                                                    "text-to-image position prompts that name both colours.")] = 0.0,
    categories: Annotated[str, typer.Option("--categories", help="Comma-separated prompt categories of the "
                                            "text-to-image and dpo records (default: all six), e.g. position.")] = "",
    qtypes: Annotated[str, typer.Option("--qtypes", help="Comma-separated question types of the vqa records "
                                        "(default: all six: exist,count,colour,shape,where,relative).")] = "",
    vqa_objects: Annotated[int | None, typer.Option("--vqa-objects", min=1, help="Objects in each caption and vqa "
                                                    "picture (default: 1-4 at random).")] = None,
    edit_kinds: Annotated[str, typer.Option("--edit-kinds", help="Comma-separated edit kinds of the edit records "
                                            "(default: all six: recolour,move,add,remove,resize,swap).")] = "",
) -> None:
    """Write a ShapesWorld dataset: DIR/records.jsonl and the images beside it."""
    from vargpt.data.shapesworld import CATEGORIES, EDIT_KINDS, QTYPES, TASKS, write_dataset

    chosen = tuple(t.strip() for t in tasks.split(",") if t.strip()) or TASKS
    cats = tuple(c.strip() for c in categories.split(",") if c.strip()) or CATEGORIES
    summary = write_dataset(out, n=n, split=split, size=size, seed=seed, tasks=chosen, t2i_layout=t2i_layout,
                            vqa_turns=vqa_turns, position_colours=position_colours, categories=cats,
                            qtypes=tuple(q.strip() for q in qtypes.split(",") if q.strip()) or QTYPES,
                            vqa_objects=vqa_objects,
                            edit_kinds=tuple(k.strip() for k in edit_kinds.split(",") if k.strip()) or EDIT_KINDS)
    typer.echo(json.dumps(summary))


@data_app.command("preferences")
def data_preferences(
    out: Annotated[Path, typer.Option("--out", help="Output directory (records.jsonl, images, summary.json).")],
    model: Annotated[Path | None, typer.Option("--model", help="Model to sample (default: the embedded one).")] = None,
    n: Annotated[int, typer.Option("--n", min=1, help="Prompts (editing records with --task edit).")] = 1024,
    task: Annotated[str, typer.Option("--task", help="t2i (text-to-image prompts) or edit (source picture + "
                                      "instruction; the chosen render is the edit's target).")] = "t2i",
    samples: Annotated[int, typer.Option("--samples", min=2, help="Images drawn per prompt.")] = 4,
    size: Annotated[int, typer.Option("--size", help="Image size in pixels.")] = 64,
    split: Annotated[str, typer.Option("--split", help="ShapesWorld split of the prompts.")] = "train",
    seed: Annotated[int, typer.Option("--seed", help="Prompt-set and sampling seed.")] = 0,
    cfg: Annotated[float | None, typer.Option("--cfg", help="CFG scale (default: the model's).")] = None,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Images per generation call.")] = 32,
    render_chosen: Annotated[bool, typer.Option("--render-chosen", help="Where no sample passes, use the "
                                                "faithful render as the chosen image.")] = False,
    categories: Annotated[str | None, typer.Option("--categories", help="Comma-separated prompt categories (edit "
                                                   "kinds with --task edit) to keep, e.g. position,counting "
                                                   "(default: all).")] = None,
    tau: Annotated[float | None, typer.Option("--tau", help="Sampling temperature (default: the model's).")] = None,
    allow_empty: Annotated[bool, typer.Option("--allow-empty", help="No pair at all (e.g. every sample passed): "
                                              "write an empty records.jsonl and the summary, exit 0.")] = False,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
) -> None:
    """On-policy DPO pairs: the model's passing vs failing samples on ShapesWorld prompts or edits, judged by the
    checker."""
    from vargpt.training.preferences import PreferenceConfig, build_preferences

    pipe = _pipeline(model, device, "auto")
    summary = build_preferences(pipe.engine, PreferenceConfig(
        out=str(out), n=n, task=task, samples=samples, size=size, split=split, seed=seed, batch=batch,
        render_chosen=render_chosen, allow_empty=allow_empty,
        categories=tuple(c.strip() for c in categories.split(",") if c.strip()) if categories is not None else None),
        sampling=pipe.sampling_config(cfg, tau=tau))
    typer.echo(json.dumps({k: v for k, v in summary.items() if k not in ("config", "sampling")}))


# ----------------------------------------------------------------------------------------------- check


@app.command("check")
def check(
    images: Annotated[list[Path], typer.Argument(help="Images to score.")],
    prompt: Annotated[str | None, typer.Option("--prompt", help="Generation prompt the images should show.")] = None,
    source: Annotated[Path | None, typer.Option("--source", help="Edit mode: the image before the edit.")] = None,
    instruction: Annotated[str | None, typer.Option("--instruction", help="Edit mode: the edit instruction.")] = None,
) -> None:
    """Score images with the ShapesWorld checker: one JSON verdict per image (image, score, category)."""
    from vargpt.errors import InputError
    from vargpt.eval.checker import check_image, score_edit
    from vargpt.imageio import load_image
    from vargpt.validation import check_text

    if (source is None) != (instruction is None):
        raise InputError("edit mode needs both --source IMAGE and --instruction TEXT")
    if (source is None) == (prompt is None):
        raise InputError("give either --prompt TEXT or --source IMAGE --instruction TEXT (to check edits)")
    if prompt is not None:
        check_text(prompt)
    if instruction is not None:
        check_text(instruction, "instruction")
    src = load_image(source) if source is not None else None
    loaded = [load_image(path) for path in images]  # every input is checked before anything is printed
    for path, image in zip(images, loaded, strict=True):
        if src is not None:
            v = score_edit(src, instruction, image)
            verdict = {"score": v.score, "category": v.kind, "satisfied": v.satisfied, "preserved": v.preserved}
        else:
            verdict = check_image(image, prompt)
        typer.echo(json.dumps({"image": str(path), **verdict}))


# ----------------------------------------------------------------------------------------------- vae


@train_app.callback(invoke_without_command=True)
def train_cmd(
    ctx: typer.Context,
    recipe: Annotated[Path | None, typer.Option("--recipe", help="Recipe YAML (see recipes/); then key.sub=value "
                                                "overrides, e.g. optim.lr=1e-4 max_steps=100.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest complete checkpoint.")] = False,
    model: Annotated[str | None, typer.Option("--model", help="Start from this model directory "
                                              "(= model.checkpoint=DIR).")] = None,
    device: Annotated[str, typer.Option("--device", help="auto (GPUs per the launcher) or cpu.")] = "auto",
    dtype: Annotated[str | None, typer.Option("--dtype", help="fp32 or bf16 (= precision=...).")] = None,
) -> None:
    """Train the unified model with a recipe (`--recipe`), or a component (subcommands)."""
    if ctx.invoked_subcommand is not None:
        if recipe is not None:
            from vargpt.errors import InputError

            raise InputError("--recipe runs the main trainer; do not combine it with a subcommand")
        return
    if recipe is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(2)
    from vargpt.training.recipe import load_recipe
    from vargpt.training.trainer import train

    overrides = list(ctx.meta.get("recipe_overrides", []))
    overrides += [f"model.checkpoint={model}"] if model else []
    overrides += [f"precision={dtype}"] if dtype else []
    res = train(load_recipe(recipe, overrides), resume=resume, device=device)
    if res.main_process:
        typer.echo(json.dumps({"out": str(res.run_dir), "model": str(res.model_dir), "steps": res.steps,
                               "final_loss": res.final_loss, "skipped_records": res.skipped_records,
                               "seconds": round(res.seconds, 1)}))


@train_app.command("vae")
def train_vae_cmd(
    data: Annotated[str, typer.Option("--data", help="Folder of .png/.jpg images (recursive) or shapesworld:N.")],
    out: Annotated[Path, typer.Option("--out", help="Run directory: checkpoints/, model/, log.csv, loss.png.")],
    preset: Annotated[str, typer.Option("--preset", help="VAE sizes from this preset: tiny or official.")] = "tiny",
    steps: Annotated[int, typer.Option("--steps", min=1, help="Optimiser steps in total.")] = 2000,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 16,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW, cosine decay).")] = 1e-3,
    size: Annotated[str, typer.Option("--size", help="Square training size in pixels; several, e.g. 64,128, "
                                      "alternate step by step (a size listed twice gets twice the steps).")] = "64",
    recon: Annotated[str, typer.Option("--recon", help="Reconstruction loss: l1, l2 or l1+l2.")] = "l1+l2",
    adversarial_weight: Annotated[float, typer.Option("--adversarial-weight", help="PatchGAN term (0 = off).")] = 0.0,
    entropy_weight: Annotated[float, typer.Option("--entropy-weight", help="BSQ entropy term; it grows with the "
                                                  "bits per token, so scale it down for wide codes.")] = 0.1,
    prefix_weight: Annotated[float, typer.Option("--prefix-weight", help="Weight of the reconstruction from the "
                                                 "first k scales (k random), which makes coarse scales carry "
                                                 "a coarse image (0 = off).")] = 0.5,
    foreground_weight: Annotated[float, typer.Option("--foreground-weight", help="Extra loss weight on pixels off "
                                                     "the background colour (sharper small shapes; 0 = off).")] = 0.0,
    edge_weight: Annotated[float, typer.Option("--edge-weight", help="Extra loss weight on pixels at colour "
                                               "boundaries (crisper corners of small shapes; 0 = off).")] = 0.0,
    detail_weight: Annotated[float, typer.Option("--detail-weight", help="Extra loss weight on fine structure: "
                                                 "parts and gaps thinner than --detail-kernel (0 = off).")] = 0.0,
    detail_kernel: Annotated[int, typer.Option("--detail-kernel", help="Window (odd, pixels) of --detail-weight.")
                             ] = 5,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="Autocast dtype: auto (bf16 on CUDA), fp32, bf16.")] = "auto",
    ckpt_every: Annotated[int, typer.Option("--ckpt-every", min=1)] = 500,
    keep_last: Annotated[int, typer.Option("--keep-last", min=1, help="Checkpoints kept.")] = 3,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest complete checkpoint.")] = False,
    init: Annotated[Path | None, typer.Option("--init", help="Start from the weights of an earlier run "
                                              "(its OUT or OUT/model); fresh optimiser and schedule.")] = None,
    decoder_only: Annotated[bool, typer.Option("--decoder-only", help="With --init: train only the decoder, so the "
                                               "codes (and models trained on them) stay valid.")] = False,
    max_minutes: Annotated[float | None, typer.Option("--max-minutes", help="Shrink --steps to fit this time.")] = None,
    crop: Annotated[int | None, typer.Option("--crop", help="Train on random CROP x CROP windows (a multiple of "
                                             "the VAE stride): cheaper steps; finish at full size with --init.")
                    ] = None,
    vae: Annotated[list[str] | None, typer.Option("--vae", help="Override a VAE field: KEY=VALUE, repeatable (e.g. "
                                                  "--vae base_ch=64 --vae ch_mult=1,1,2,2 --vae arch=patch).")] = None,
) -> None:
    """Train the BSQ VAE (reconstruction + commitment/entropy); writes OUT/model for `vargpt eval vae`."""
    from vargpt.errors import InputError
    from vargpt.training.vae import VAETrainConfig, train_vae

    try:
        sizes = [int(v) for v in size.split(",")]
    except ValueError:
        raise InputError(f"--size {size!r}: expected an integer or a comma-separated list, e.g. 64,128") from None
    overrides = {}
    for item in vae or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"--vae {item!r}: expected KEY=VALUE, e.g. --vae base_ch=64")
        nums = [int(v) for v in value.split(",") if v.strip().lstrip("-").isdigit()]
        if key == "arch":
            overrides[key] = value
            continue
        if len(nums) != len(value.split(",")):
            raise InputError(f"--vae {item!r}: VALUE must be an integer or a comma-separated list of integers")
        overrides[key] = tuple(nums) if "," in value else nums[0]
    res = train_vae(VAETrainConfig(data=data, out=str(out), preset=preset, steps=steps, batch_size=batch_size,
                                   lr=lr, size=sizes[0], extra_sizes=tuple(sizes[1:]), recon_loss=recon,
                                   adversarial_weight=adversarial_weight, entropy_weight=entropy_weight,
                                   prefix_weight=prefix_weight, foreground_weight=foreground_weight,
                                   edge_weight=edge_weight, detail_weight=detail_weight,
                                   detail_kernel=detail_kernel,
                                   device=device, dtype=dtype, ckpt_every=ckpt_every, keep_last=keep_last,
                                   seed=seed, resume=resume, init=str(init) if init else None,
                                   max_minutes=max_minutes, crop=crop, vae_overrides=overrides or None,
                                   decoder_only=decoder_only))
    typer.echo(json.dumps({"out": str(res.out), "steps": res.steps, "final_loss": res.final_loss,
                           "final_train_psnr_db": res.final_psnr_db, "seconds": round(res.seconds, 1)}))


@eval_app.command("vae")
def eval_vae_cmd(
    json_path: Annotated[Path, typer.Option("--json", help="Report path; pictures are written beside it.")],
    model: Annotated[Path, typer.Option("--model", help="Output directory of `vargpt train vae`.")] = Path(
        "runs/vae"),
    data: Annotated[str, typer.Option("--data", help="Image folder or shapesworld:N (of --split).")] = (
        "shapesworld:64"),
    split: Annotated[str, typer.Option("--split", help="ShapesWorld split: test (report) or val.")] = "test",
    size: Annotated[int, typer.Option("--size", help="Square evaluation size in pixels.")] = 64,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many images.")] = 256,
    device: Annotated[str, typer.Option("--device")] = "auto",
) -> None:
    """PSNR/SSIM per number of scales, bit usage, reconstruction pictures and a PSNR-vs-k plot."""
    from vargpt.eval.vae import run_eval

    _check_split(split)
    rep = run_eval(model, data, json_path, split=split, size=size, limit=limit, device=device)
    typer.echo(json.dumps({k: rep[k] for k in ("psnr_db", "ssim", "psnr_db_by_scales", "n_images", "size")}))


def _check_split(split: str) -> None:
    """Evaluations read held-out records only: val to choose settings, test to report (models learn from train)."""
    from vargpt.errors import InputError

    if split not in ("val", "test"):
        raise InputError(f"--split {split!r}: use val (to choose settings) or test (to report)")


def _seed_list(seeds: str) -> list[int]:
    from vargpt.errors import InputError

    try:
        return [int(v) for v in seeds.split(",")]
    except ValueError:
        raise InputError(f"--seeds {seeds!r}: expected comma-separated integers, e.g. 0,1,2") from None


def _eval_task(kind: str, model: Path | None, n: int, seeds: str, size: int | None, cfg: float | None,
               batch: int, device: str, json_path: Path, split: str = "test", tau: float | None = None) -> None:
    """`vargpt eval t2i|edit|vqa`: score the model with `vargpt.eval.tasks`, write the JSON (+ a PNG of samples)."""
    from vargpt.eval import tasks

    seed_list = _seed_list(seeds)
    _check_split(split)
    pipe = _pipeline(model, device, "auto")
    kw = dict(seeds=seed_list, size=size, sampling=pipe.sampling_config(cfg, tau), batch=batch, keep_images=32)
    sources = None
    if kind == "vqa":
        rep = tasks.evaluate_vqa(pipe, tasks.vqa_cases(n, split=split, size=size))
    elif kind == "t2i":
        rep = tasks.evaluate_t2i(pipe.engine, tasks.t2i_cases(n, split=split), **kw)
    else:
        cases = tasks.edit_cases(n, split=split, size=size or pipe.model.config.image_size)
        rep = tasks.evaluate_edit(pipe.engine, cases, **kw)
        sources = [c.source for c in cases]
    kept = rep.pop("images", [])
    rep["model"] = str(model) if model else "embedded default"
    rep["split"] = split
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(rep, indent=2) + "\n")
    if kept:
        tasks.sample_sheet(kept, json_path.with_suffix(".png"), sources=sources)
    summary = {k: rep[k] for k in ("score", "accuracy", "n", "seeds") if k in rep}
    if rep.get("vae_ceiling"):  # the best any generator on this VAE can score on the same cases
        summary["vae_ceiling"] = rep["vae_ceiling"]["score"]
    typer.echo(json.dumps(summary | {"json": str(json_path)}))


_EvalJson = Annotated[Path, typer.Option("--json", help="Report path; a PNG of samples is written beside it.")]
_EvalModel = Annotated[Path | None, typer.Option("--model", help="Model directory (default: the embedded one).")]
_EvalN = Annotated[int, typer.Option("--n", min=1, help="Held-out records (the first N of the split).")]
_EvalSplit = Annotated[str, typer.Option("--split", help="test (report) or val (choose settings such as --cfg).")]
_EvalTau = Annotated[float | None, typer.Option("--tau", help="Sampling temperature (default: the model's).")]
_EvalSeeds = Annotated[str, typer.Option("--seeds", help="Sampling seeds, comma-separated; the score is reported "
                                         "per seed, with mean and spread.")]
_EvalSize = Annotated[int | None, typer.Option("--size", help="Image size (default: the model's).")]
_EvalCfg = Annotated[float | None, typer.Option("--cfg", help="CFG scale (default: the model's).")]
_EvalBatch = Annotated[int, typer.Option("--batch", min=1)]
_EvalDevice = Annotated[str, typer.Option("--device")]


@eval_app.callback(invoke_without_command=True)
def eval_report_cmd(ctx: typer.Context, model: _EvalModel = None, n: _EvalN = 64, seeds: _EvalSeeds = "0,1,2",
                    split: _EvalSplit = "test", device: _EvalDevice = "auto",
                    json_path: Annotated[Path | None, typer.Option("--json", help="Report path; a .md table and "
                                                                   "sample sheets are written beside it.")] = None,
                    ) -> None:
    """Without a subcommand: one report of every task (VAE, VQA, text-to-image, editing), one model load."""
    from vargpt.errors import InputError

    if ctx.invoked_subcommand is not None:
        given = [p.opts[0] for p in ctx.command.params
                 if getattr(ctx.get_parameter_source(p.name), "name", None) == "COMMANDLINE"]
        if given:
            raise InputError(f"{', '.join(given)} before `{ctx.invoked_subcommand}` belongs to the full report; put "
                             f"it after the subcommand: vargpt eval {ctx.invoked_subcommand} {given[0]} ...")
        return
    from vargpt.eval.report import HEADLINE, evaluate_model

    if json_path is None:
        raise InputError("vargpt eval needs --json PATH for the full report, or a subcommand: vae, t2i, edit, vqa")
    seed_list = _seed_list(seeds)
    _check_split(split)
    rep = evaluate_model(_pipeline(model, device, "auto"), json_path, model_name=str(model or "embedded default"),
                         split=split, n=n, seeds=seed_list)
    summary = {key: rep[key] for key, _, _ in HEADLINE} | {k: rep[k] for k in ("n", "seeds", "seconds")}
    typer.echo(json.dumps(summary | {"json": str(json_path)}))


@eval_app.command("t2i")
def eval_t2i_cmd(json_path: _EvalJson, model: _EvalModel = None, n: _EvalN = 64, seeds: _EvalSeeds = "0,1,2",
                 size: _EvalSize = None, cfg: _EvalCfg = None, tau: _EvalTau = None, batch: _EvalBatch = 16,
                 split: _EvalSplit = "test", device: _EvalDevice = "auto") -> None:
    """GenEval-style text-to-image score on held-out ShapesWorld prompts, checked by the deterministic checker."""
    _eval_task("t2i", model, n, seeds, size, cfg, batch, device, json_path, split, tau)


@eval_app.command("edit")
def eval_edit_cmd(json_path: _EvalJson, model: _EvalModel = None, n: _EvalN = 64, seeds: _EvalSeeds = "0,1,2",
                  size: _EvalSize = None, cfg: _EvalCfg = None, tau: _EvalTau = None, batch: _EvalBatch = 16,
                  split: _EvalSplit = "test", device: _EvalDevice = "auto") -> None:
    """Edit success (instruction applied and nothing else moved) on held-out ShapesWorld edits."""
    _eval_task("edit", model, n, seeds, size, cfg, batch, device, json_path, split, tau)


@eval_app.command("vqa")
def eval_vqa_cmd(json_path: _EvalJson, model: _EvalModel = None, n: _EvalN = 64,
                 size: Annotated[int, typer.Option("--size", help="Size of the pictures asked about.")] = 64,
                 split: _EvalSplit = "test", device: _EvalDevice = "auto") -> None:
    """Exact-match accuracy of greedy answers to held-out ShapesWorld questions."""
    _eval_task("vqa", model, n, "0", size, None, 1, device, json_path, split)


# ----------------------------------------------------------------------------------------------- model commands

_MODEL_HELP = "Checkpoint directory (ours or the released layout); default: the embedded model."
_DEVICE_HELP = "auto, cpu, cuda or cuda:N."
_DTYPE_HELP = "auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16."


def _pipeline(model: Path | None, device: str, dtype: str):
    from vargpt.pipeline import VARGPTPipeline

    return VARGPTPipeline.from_pretrained(model, device=device, dtype=dtype)


_Size = Annotated[str | None, typer.Option("--size", help="N (square) or WIDTHxHEIGHT, e.g. 768x384, in pixels "
                                            "(default: the model's); any size the scale templates define.")]
_Aspect = Annotated[str | None, typer.Option("--aspect", help="WIDTH:HEIGHT, e.g. 2:1: that aspect at the pixel "
                                             "budget of the square --size.")]


def _resolve_size(pipe, size: str | None, aspect: str | None) -> tuple[int, int] | None:
    """--size / --aspect as (height, width) for the pipeline; None = the model's own size."""
    from vargpt.scales import resolve_size

    if size is None and aspect is None:
        return None
    return resolve_size(size or pipe.model.config.image_size, pipe.model.config.vae.stride, aspect)


def _out_paths(out: Path, count: int) -> list[Path]:
    """One image: ``out`` is the file (``.png`` added if it has no suffix). More: ``out`` is a directory."""
    if count == 1 and not out.is_dir():
        return [out if out.suffix else out.with_suffix(".png")]
    return [out / f"{i:04d}.png" for i in range(count)]


def _save(images: list, out: Path) -> None:
    from vargpt.errors import InputError

    paths = _out_paths(out, len(images))
    try:
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        for img, path in zip(images, paths, strict=True):
            img.save(path, format="PNG")
    except OSError as e:
        raise InputError(f"cannot write {paths[0].parent}: {e.strerror or e}; choose another --out") from None
    for path in paths:
        typer.echo(str(path))


@app.command("generate")
def generate_cmd(
    prompts: Annotated[list[str], typer.Argument(help="One or more prompts.")],
    out: Annotated[Path, typer.Option("--out", help="PNG file for one image, else a directory.")],
    size: _Size = None,
    aspect: _Aspect = None,
    seed: Annotated[int, typer.Option("--seed", help="Image i uses seed + i.")] = 0,
    cfg: Annotated[float | None, typer.Option("--cfg", help="Classifier-free guidance (default: the model's).")] = None,
    n: Annotated[int, typer.Option("--n", min=1, help="Images per prompt.")] = 1,
    model: Annotated[Path | None, typer.Option("--model", help=_MODEL_HELP)] = None,
    device: Annotated[str, typer.Option("--device", help=_DEVICE_HELP)] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help=_DTYPE_HELP)] = "auto",
) -> None:
    """Generate images from text prompts and write them as PNG."""
    from vargpt.validation import check_text

    for prompt in prompts:  # before the model loads: a typo costs no wait
        check_text(prompt)
    pipe = _pipeline(model, device, dtype)
    _save(pipe.generate(prompts, seed=seed, cfg_scale=cfg, size=_resolve_size(pipe, size, aspect), n=n), out)


@app.command("edit")
def edit_cmd(
    instruction: Annotated[str, typer.Argument(help="What to change, e.g. 'make the circle blue'.")],
    image: Annotated[Path, typer.Option("--image", help="The image to edit.")],
    out: Annotated[Path, typer.Option("--out", help="Output PNG file.")],
    seed: Annotated[int, typer.Option("--seed")] = 0,
    cfg: Annotated[float | None, typer.Option("--cfg", help="Classifier-free guidance (default: the model's).")] = None,
    size: _Size = None,
    aspect: _Aspect = None,
    model: Annotated[Path | None, typer.Option("--model", help=_MODEL_HELP)] = None,
    device: Annotated[str, typer.Option("--device", help=_DEVICE_HELP)] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help=_DTYPE_HELP)] = "auto",
) -> None:
    """Edit an image by an instruction and write the result as PNG."""
    from vargpt.imageio import load_image
    from vargpt.validation import check_text

    check_text(instruction, "instruction")
    source = load_image(image)
    pipe = _pipeline(model, device, dtype)
    _save([pipe.edit(source, instruction, seed=seed, cfg_scale=cfg, size=_resolve_size(pipe, size, aspect))], out)


@app.command("chat")
def chat_cmd(
    question: Annotated[str | None, typer.Argument(help="The question; none: an interactive session.")] = None,
    image: Annotated[list[Path] | None, typer.Option("--image", help="Image(s) to talk about (repeatable).")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 256,
    model: Annotated[Path | None, typer.Option("--model", help=_MODEL_HELP)] = None,
    device: Annotated[str, typer.Option("--device", help=_DEVICE_HELP)] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help=_DTYPE_HELP)] = "auto",
) -> None:
    """Answer a question about image(s); without a question, an interactive chat (empty line or Ctrl-D ends it)."""
    from vargpt.imageio import load_image
    from vargpt.processing import IMAGE_PLACEHOLDER
    from vargpt.validation import check_text

    if question is not None:
        check_text(question, "question")
    images = [load_image(p) for p in image or []]
    pipe = _pipeline(model, device, dtype)
    if question is not None:
        typer.echo(pipe.chat(question, images, max_new_tokens=max_new_tokens))
        return
    history: list[dict] = []
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        except UnicodeDecodeError as e:  # the terminal sent bytes that are not UTF-8: this line only
            typer.echo(f"error: the line is not valid UTF-8 ({e.reason}); type it again", err=True)
            continue
        if not line:
            break
        content = line
        if not history and images and IMAGE_PLACEHOLDER not in line:
            content = IMAGE_PLACEHOLDER * len(images) + "\n" + line
        history.append({"role": "user", "content": content})
        answer = ""
        for piece in pipe.chat_stream(history, images, max_new_tokens=max_new_tokens):
            answer += piece
            typer.echo(piece, nl=False)
        typer.echo("")
        history.append({"role": "assistant", "content": answer})


@app.command("convert")
def convert_cmd(
    src: Annotated[Path, typer.Argument(help="Checkpoint directory (released layout or ours).")],
    dst: Annotated[Path, typer.Argument(help="Output directory.")],
    to: Annotated[str | None, typer.Option("--to", help="Target layout: released or vargpt (default: the other).")]
    = None,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="e.g. 5GB, 500MB.")] = "5GB",
    device: Annotated[str, typer.Option("--device", help="Where the weights pass through (cpu is enough).")] = "cpu",
    dtype: Annotated[str | None, typer.Option("--dtype", help="Cast to fp32, bf16 or fp16 (default: keep).")] = None,
) -> None:
    """Convert a checkpoint between the released VARGPT-v1.1 layout and ours (weights keep their dtype)."""
    from vargpt.errors import InputError
    from vargpt.weights import convert_checkpoint

    if to not in (None, "released", "vargpt"):
        raise InputError(f"--to {to!r}: use released or vargpt")
    layout = convert_checkpoint(src, dst, layout=to, max_shard_size=max_shard_size, dtype=dtype, device=device)
    typer.echo(json.dumps({"src": str(src), "dst": str(dst), "layout": layout}))


@app.command("bench")
def bench_cmd(
    json_path: Annotated[Path, typer.Option("--json", help="Report path; a markdown table is written beside it "
                                            "(.md).")],
    preset: Annotated[str, typer.Option("--preset", help="tiny (the embedded default, or --model), fixture (the "
                                        "conformance weights, 256 px) or official (full size, random weights, "
                                        "512 px; for a GPU).")] = "tiny",
    baseline_python: Annotated[Path | None, typer.Option("--baseline-python", help="Python of the published "
                                                         "code's environment (../shared/official-harness/setup.sh "
                                                         "builds one): times it in the same run.")] = None,
    baseline_src: Annotated[Path | None, typer.Option("--baseline-src", help="The published source (the folder "
                                                      "holding VARGPT-family-training/).")] = None,
    baseline_harness: Annotated[Path | None, typer.Option("--baseline-harness", help="Folder of official_env.py "
                                                          "(default: ../shared/official-harness).")] = None,
    baseline_variant: Annotated[str, typer.Option("--baseline-variant", help="Published side: fp32 (its default) "
                                                  "or autocast_bf16.")] = "fp32",
    baseline_timeout: Annotated[float | None, typer.Option("--baseline-timeout", min=1, help="Seconds the published "
                                                           "side may run; past them it is stopped and the report "
                                                           "keeps our rows (default: no limit).")] = None,
    device: Annotated[str, typer.Option("--device", help=_DEVICE_HELP)] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help=_DTYPE_HELP)] = "auto",
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="Torch intra-op threads, both sides "
                                                "(default: torch's).")] = None,
    runs: Annotated[int, typer.Option("--runs", min=1, help="Timed runs per row (the median is reported).")] = 5,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed runs before each row.")] = 1,
    quick: Annotated[bool, typer.Option("--quick", help="Batch 1 only and 8 answer tokens (a smoke run).")] = False,
    size: Annotated[int | None, typer.Option("--size", help="Image size in pixels (default: the preset's).")] = None,
    new_tokens: Annotated[int | None, typer.Option("--new-tokens", min=2, help="Understanding answer length "
                                                   "(default 32; official 64).")] = None,
    model: Annotated[Path | None, typer.Option("--model", help="With --preset tiny: this model directory instead "
                                               "of the embedded default.")] = None,
    fixtures: Annotated[Path | None, typer.Option("--fixtures", help="Conformance fixture set for --preset fixture "
                                                  "(default: ../shared/fixtures/official).")] = None,
    peak: Annotated[str | None, typer.Option("--peak", help="Official preset's bound: a GPU (H100, H200, A100, "
                                             "L40S, 4090) or TFLOPS,TB/s (default: the device's, else H100).")]
    = None,
    skip_train: Annotated[bool, typer.Option("--skip-train", help="Leave out the training step.")] = False,
    profile: Annotated[Path | None, typer.Option("--profile", help="Also write a torch.profiler summary of one "
                                                 "batch-1 text-to-image call (kernel launches, device busy time, "
                                                 "top operators) to this file.")] = None,
) -> None:
    """Time text-to-image, understanding, the VAE and a training step; with --baseline-python/--baseline-src the
    published code too, on the same weights and inputs. Writes JSON + a markdown table."""
    from vargpt.bench import BenchConfig, run_bench

    report = run_bench(BenchConfig(
        json_path=json_path, preset=preset, device=device, dtype=dtype, threads=threads, runs=runs, warmup=warmup,
        quick=quick, size=size, new_tokens=new_tokens, model_dir=model, fixtures=fixtures,
        baseline_python=baseline_python, baseline_src=baseline_src, baseline_harness=baseline_harness,
        baseline_variant=baseline_variant, baseline_timeout=baseline_timeout, peak=peak, skip_train=skip_train,
        profile=profile))
    t1 = report["ours"]["derived"]["t2i"].get("1", {})
    typer.echo(json.dumps({"json": str(json_path), "markdown": str(json_path.with_suffix(".md")),
                           "t2i_batch1_s": t1.get("latency_s"),
                           "speedup_vs_published": report["speedup_vs_published"]}))


@app.command("serve")
def serve_cmd(
    host: Annotated[str, typer.Option("--host", help="Address to bind; anything but loopback exposes the model "
                                      "to the network (set --api-key).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8000,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="VARGPT_API_KEY",
                                                help="Require 'Authorization: Bearer KEY' on /v1/ (or set "
                                                "VARGPT_API_KEY, which keeps it out of the process list).")] = None,
    model: Annotated[Path | None, typer.Option("--model", help=_MODEL_HELP)] = None,
    device: Annotated[str, typer.Option("--device", help=_DEVICE_HELP)] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help=_DTYPE_HELP)] = "auto",
) -> None:
    """OpenAI-compatible HTTP server: /v1/chat/completions, /v1/images/generations, /v1/images/edits, /v1/models."""
    import logging

    from vargpt.pipeline import VARGPTPipeline
    from vargpt.server import ServerSettings, serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    pipe = VARGPTPipeline.from_pretrained(model, device=device, dtype=dtype, progress=False)
    model_id = model.resolve().name if model is not None else "vargpt-tiny"
    serve(pipe, ServerSettings(model_id=model_id, api_key=api_key or None, host=host, port=port))


@app.command("ui")
def ui_cmd(
    host: Annotated[str, typer.Option("--host", help="Address to bind; anything but loopback exposes the model "
                                      "to the network (the UI has no login).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 7860,
    model: Annotated[Path | None, typer.Option("--model", help=_MODEL_HELP)] = None,
    device: Annotated[str, typer.Option("--device", help=_DEVICE_HELP)] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help=_DTYPE_HELP)] = "auto",
) -> None:
    """Web UI in the browser (needs the ui extra): chat about an image, generate images, edit an image."""
    from vargpt.pipeline import VARGPTPipeline
    from vargpt.ui import launch

    pipe = VARGPTPipeline.from_pretrained(model, device=device, dtype=dtype, progress=False)
    launch(pipe, host=host, port=port)


# ----------------------------------------------------------------------------------------------- entry


def main(argv: list[str] | None = None) -> None:
    import warnings

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    # Pillow warns about an image over vargpt.imageio's pixel limit just before load_image refuses it in one line
    warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit")
    args = [a for a in args if a != "--debug"]
    try:
        app(args=args, prog_name="vargpt", standalone_mode=False)
    except VargptError as e:
        if debug:
            raise
        typer.echo(f"error: {e}", err=True)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # click usage errors and anything unexpected: still one line without --debug
        import click

        # newer typer (0.29 here) raises its own copies of click's exceptions: typer.TyperException (the base of
        # its usage errors), typer.Exit, typer.Abort; older typer raises click's
        usage = (click.exceptions.ClickException, *filter(None, [getattr(typer, "TyperException", None)]))
        if isinstance(e, usage) and hasattr(e, "show"):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, (click.exceptions.Exit, typer.Exit)):
            sys.exit(e.exit_code)
        if isinstance(e, (click.exceptions.Abort, typer.Abort)):
            sys.exit(1)
        if debug:
            raise
        typer.echo(f"error: {type(e).__name__}: {e} (run with --debug for the traceback)", err=True)
        sys.exit(1)
