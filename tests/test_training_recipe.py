"""Recipes: YAML + overrides, typed validation, presets, the shipped recipes."""

from pathlib import Path

import pytest
import torch

from vargpt.errors import ConfigError
from vargpt.training.recipe import FREEZE_PRESETS, MODULES, OPTIONAL_MODULES, load_recipe, trainable_modules

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
BASE = """
name: t
model: {preset: tiny}
data:
  sources: [{path: data/x, format: shapesworld}]
trainable: generation
"""


def _write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(path):
    r = load_recipe(path)
    assert r.name == path.stem and set(trainable_modules(r)) <= {*MODULES, *OPTIONAL_MODULES}


@pytest.mark.parametrize("path", sorted((RECIPES / "tiny").glob("*.yaml")), ids=lambda p: p.name)
def test_embedded_default_recipes_are_valid(path):
    r = load_recipe(path)  # scripts/build_embedded_default.sh's stages
    modules = {m.split(".")[0] for m in trainable_modules(r)}
    assert r.name == f"tiny_{path.stem}" and modules <= {*MODULES, *OPTIONAL_MODULES}
    assert r.out_dir == f"runs/tiny/{path.stem}" and r.data.image_size == 64


def test_shipped_recipe_set_is_complete():
    names = {p.stem for p in RECIPES.glob("*.yaml")}
    assert {"stage1_projector_pretrain", "stage2_instruction_tuning", "stage3a_256px", "stage3b_512px",
            "stage3c_dpo", "stage3d_edit"} == names
    assert {p.stem for p in (RECIPES / "tiny").glob("*.yaml")} == {"understanding", "understanding2", "gen", "dpo",
                                                                 "edit", "edit2", "edit5"}
    r = load_recipe(RECIPES / "stage3a_256px.yaml")  # shipped SFT yaml values (reference-facts 8.4)
    assert (r.optim.lr, r.schedule.kind, r.schedule.warmup_ratio, r.grad_accum, r.precision, r.max_steps) == (
        5e-5, "cosine", 0.1, 2, "bf16", 40000)
    assert load_recipe(RECIPES / "stage3b_512px.yaml").data.image_size == 512


def test_overrides_are_typed(tmp_path):
    r = load_recipe(_write(tmp_path, BASE), ["optim.lr=3e-4", "data.sources.0.weight=2", "trainable=[model,lm_head]",
                                             "optim.betas=[0.9,0.95]", "max_steps=7", "precision=bf16"])
    assert r.optim.lr == 3e-4 and r.data.sources[0].weight == 2.0 and r.trainable == ["model", "lm_head"]
    assert r.optim.betas == (0.9, 0.95) and r.max_steps == 7 and r.precision == "bf16"


@pytest.mark.parametrize("override, words", [
    ("optim.lrr=1", ["optim.lrr"]),
    ("bogus=1", ["bogus"]),
    ("data.sources.0.colour=red", ["data.sources.0.colour"]),
    ("trainable=[model,decoder]", ["decoder"]),
    ("trainable=stage9", ["stage9"]),
    ("optim.lr=fast", ["optim.lr"]),
    ("precision=fp8", ["precision", "bf16"]),
    ("batch_size=0", ["batch_size"]),
    ("data.sources.3.weight=1", ["data.sources.3"]),
    ("stage=rlhf", ["stage"]),
    ("optim.lr_scale={decoder: 0.5}", ["optim.lr_scale", "decoder"]),
    ("optim.lr_scale={visual: 0}", ["optim.lr_scale.visual"]),
    ("optim.lr_scale={visual: slow}", ["optim.lr_scale.visual"]),
    ("dpo.dpop_lambda=-1", ["dpo.dpop_lambda", ">= 0"]),
])
def test_bad_fields_name_themselves(tmp_path, override, words):
    with pytest.raises(ConfigError) as e:
        load_recipe(_write(tmp_path, BASE), [override])
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words)


def test_unknown_field_in_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="schedule.warmup"):
        load_recipe(_write(tmp_path, BASE + "schedule: {warmup: 0.1}\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(_write(tmp_path, "a: [\n"))
    with pytest.raises(ConfigError, match="no such recipe"):
        load_recipe(tmp_path / "missing.yaml")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"name: x\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1.yaml:2: not UTF-8 text \(byte 0xe9\)"):
        load_recipe(latin1)
    with pytest.raises(ConfigError, match="is a directory"):
        load_recipe(tmp_path)


def test_released_freezing_table_presets():
    frozen = {  # reference-facts 8.3: vargpt_train_stage -> frozen modules
        0: {"model", "lm_head", "visual", "vae_local"},
        1: {"model", "lm_head", "visual", "vae_local", "vargpt_gen"},
        2: {"visual", "vae_local", "vargpt_gen", "sos_embedding", "image_gen_projector", "image_gen_projector_out"},
        3: {"model", "lm_head", "visual", "vae_local"},
        4: {"visual", "vae_local"},
        5: {"vae_local"},
    }
    for stage, names in frozen.items():
        assert set(FREEZE_PRESETS[f"released_stage{stage}"]) == set(MODULES) - names


def test_lr_scale_sets_each_module_group_lr(tmp_path):
    from torch import nn

    from vargpt.training.trainer import param_groups

    r = load_recipe(_write(tmp_path, BASE), ["optim.lr=1e-3", "optim.weight_decay=0.1",
                                             "optim.lr_scale={visual: 3e-1, visual.merger: 2}"])
    assert r.optim.lr_scale == {"visual": 0.3, "visual.merger": 2.0}
    params = [(n, nn.Parameter(torch.zeros(shape))) for n, shape in [
        ("visual.blocks.0.w", (2, 2)), ("visual.blocks.0.b", (2,)), ("visual.merger.w", (2, 2)),
        ("visual_x.w", (2, 2)), ("model.w", (2, 2))]]
    groups = param_groups(params, r.optim)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    got = {n: lr_of[id(p)] for n, p in params}
    # the most specific entry wins; "visual_x" is not under "visual"
    assert got == {"visual.blocks.0.w": (3e-4, 0.1), "visual.blocks.0.b": (3e-4, 0.0),
                   "visual.merger.w": (2e-3, 0.1), "visual_x.w": (1e-3, 0.1), "model.w": (1e-3, 0.1)}
    # optional modules (here the image place tables) take a multiplier too
    r = load_recipe(_write(tmp_path, BASE), ["optim.lr=1e-3", "optim.lr_scale={image_place: 30}"])
    groups = param_groups([("image_place.row.weight", nn.Parameter(torch.zeros(4, 2)))], r.optim)
    assert groups[0]["lr"] == pytest.approx(3e-2)
