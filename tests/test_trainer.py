"""The trainer in-process with the toy model: loss falls, freezing, DPO, bad records, errors before training."""

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import toy_model  # noqa: E402
from vargpt.data.shapesworld import write_dataset  # noqa: E402
from vargpt.errors import ConfigError  # noqa: E402
from vargpt.training.checkpoint import list_checkpoints  # noqa: E402
from vargpt.training.recipe import FREEZE_PRESETS, MODULES, OPTIONAL_MODULES, recipe_from_dict  # noqa: E402
from vargpt.training.schedule import lr_factor, warmup_steps  # noqa: E402
from vargpt.training.trainer import apply_freezing, train  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sw")
    write_dataset(root / "sft", n=14, size=64, tasks=("t2i", "caption"), progress=False)
    write_dataset(root / "dpo", n=8, size=64, tasks=("dpo",), progress=False)
    # two bad records: a missing image and a corrupt one
    (root / "sft" / "images" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with (root / "sft" / "records.jsonl").open("a") as f:
        for rid, img in (("bad-missing", "images/nope.png"), ("bad-corrupt", "images/bad.png")):
            messages = [{"role": "user", "content": "Draw a circle."}, {"role": "assistant", "content": "<image_gen>"}]
            f.write(json.dumps({"id": rid, "task": "t2i", "images": [img], "messages": messages}) + "\n")
    return root


def _recipe(root, out, **over):
    d = {"name": "toy", "stage": "sft_mixed", "model": {"factory": "toy_model:build", "preset": None},
         "data": {"sources": [{"path": str(root / "sft"), "format": "shapesworld"}], "image_size": 64},
         "trainable": "all", "optim": {"lr": 0.01}, "batch_size": 4, "max_steps": 12, "log_every": 2,
         "checkpoint": {"every": 4, "keep_last": 2}, "out_dir": str(out), "progress": False}
    for k, v in over.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    return recipe_from_dict(d)


def _rows(run):
    with (run / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_toy_run_loss_falls_and_writes_everything(data, tmp_path):
    res = train(_recipe(data, tmp_path / "run"))
    rows = _rows(res.run_dir)
    assert res.steps == 12 and len(rows) == 6
    assert float(rows[-1]["loss"]) < 0.7 * float(rows[0]["loss"])
    assert {"loss", "text_loss", "bit_loss", "lr", "samples_per_s", "grad_norm"} <= set(rows[0])
    assert res.skipped_records >= 2 and int(rows[-1]["skipped_records"]) == res.skipped_records  # counted, logged
    assert [c.step for c in list_checkpoints(res.run_dir)] == [8, 12]  # keep-last-2
    assert (res.run_dir / "loss.png").stat().st_size > 1000 and (res.model_dir / "model.safetensors").is_file()
    assert (res.run_dir / "recipe.yaml").is_file()


def test_freezing_keeps_frozen_weights_and_checkpoints_trainable_only(data, tmp_path):
    toy_model.BUILT.clear()
    res = train(_recipe(data, tmp_path / "run", trainable="released_stage3", max_steps=3, gradient_checkpointing=True))
    trained = toy_model.BUILT[0]
    assert trained.checkpointing  # the recipe's switch reached the model
    torch.manual_seed(0)
    init = toy_model.ToyVARGPT()  # what the trainer built under seed 0
    final = load_file(res.model_dir / "model.safetensors")
    for name, p in init.state_dict().items():
        changed = not torch.equal(final[name], p)
        assert changed == (name.split(".")[0] in FREEZE_PRESETS["released_stage3"]), name
    ckpt = load_file(list_checkpoints(res.run_dir)[-1].path / "model.safetensors")
    assert {k.split(".")[0] for k in ckpt} == set(FREEZE_PRESETS["released_stage3"])


@pytest.mark.parametrize("preset", sorted(FREEZE_PRESETS))
def test_freezing_presets_by_name(preset):
    model = toy_model.ToyVARGPT()
    apply_freezing(model, FREEZE_PRESETS[preset])
    for name, p in model.named_parameters():
        assert p.requires_grad == (name.split(".")[0] in FREEZE_PRESETS[preset]), name
    assert set(FREEZE_PRESETS[preset]) <= set(MODULES) | set(OPTIONAL_MODULES)  # the toy model has no image_place


def test_errors_come_before_training(data, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="visual.merger"):  # a sub-module the toy model does not have
        train(_recipe(data, run, trainable=["visual.merger"]))
    with pytest.raises(ConfigError, match="model.factory"):
        train(_recipe(data, run, model={"factory": "toy_model:nothing"}))
    with pytest.raises(ConfigError, match="data.image_size"):
        train(_recipe(data, run, data={"image_size": 60}))
    assert not run.exists()


def test_per_source_task_filters_mix_tasks(data, tmp_path):
    toy_model.BUILT.clear()
    sft = str(data / "sft")
    train(_recipe(data, tmp_path / "run", max_steps=8, data={"sources": [
        {"path": sft, "format": "shapesworld", "tasks": ["t2i"]},
        {"path": sft, "format": "shapesworld", "weight": 0.5, "tasks": ["caption"]}]}))
    seen = toy_model.BUILT[0].seen_tasks
    assert len(seen) == 32 and set(seen) == {"t2i", "caption"}
    assert seen.count("t2i") > seen.count("caption")  # 7 t2i records per epoch + half of the 7 captions
    with pytest.raises(Exception, match="no non-preference records left.*tasks edit"):
        train(_recipe(data, tmp_path / "run2", data={"sources": [
            {"path": sft, "format": "shapesworld", "tasks": ["edit"]}]}))


def test_cli_rejects_unknown_field_before_training(data, tmp_path, capsys):
    from vargpt.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{factory: 'toy_model:build', preset: null}}\nout_dir: {tmp_path / 'run'}\n"
                      f"data: {{sources: [{{path: {data / 'sft'}}}]}}\n")
    with pytest.raises(SystemExit) as e:
        main(["train", "--recipe", str(recipe), "optim.learning_rate=1"])
    assert e.value.code == 2 and "optim.learning_rate" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_dpo_run_learns_preferences_and_caches_reference(data, tmp_path):
    r = _recipe(data, tmp_path / "run", stage="dpo", trainable="generation", max_steps=8, optim={"lr": 0.003},
                dpo={"beta": 0.5}, data={"sources": [{"path": str(data / "dpo"), "format": "shapesworld"}]})
    res = train(r)
    rows = _rows(res.run_dir)
    assert float(rows[0]["loss"]) < 0.75 and float(rows[-1]["loss"]) < float(rows[0]["loss"])
    assert float(rows[-1]["rewards_accuracy"]) == 1.0 and float(rows[-1]["rewards_margin"]) > 0
    blob = list_checkpoints(res.run_dir)[-1].optimizer_state()
    assert len(blob["ref_cache"]) == 8  # one (chosen, rejected) pair of reference log-probs per record


def test_lr_schedule():
    f = [lr_factor(s, 10, warmup=2, min_lr_ratio=0.1) for s in range(10)]
    assert f[:3] == [1 / 3, 2 / 3, 1.0] and f[-1] > 0.1 and all(a >= b for a, b in zip(f[2:], f[3:], strict=False))
    assert lr_factor(10, 10, warmup=2, min_lr_ratio=0.1) == pytest.approx(0.1)  # the floor at the end
    assert lr_factor(5, 10, warmup=0, kind="constant") == 1.0
    assert warmup_steps(0.2, 10) == 2 and warmup_steps(0.05, 30) == 2  # rounded up


def test_unified_model_smoke(data, tmp_path):
    """The default model (vargpt's VARGPT, tiny preset) through the same loop: 2 steps of text-to-image SFT."""
    pytest.importorskip("vargpt.models.vargpt")
    r = _recipe(data, tmp_path / "run", model={"factory": None, "preset": "tiny"}, stage="sft_gen",
                trainable="generation", max_steps=2, batch_size=2, data={"tasks": ["t2i"]}, optim={"lr": 1e-3})
    res = train(r)
    rows = _rows(res.run_dir)
    assert res.steps == 2 and all(torch.isfinite(torch.tensor(float(x["bit_loss"]))) for x in rows)
    assert {k.split(".")[0] for k in load_file(list_checkpoints(res.run_dir)[-1].path / "model.safetensors")} == set(
        FREEZE_PRESETS["generation"])
