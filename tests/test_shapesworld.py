"""ShapesWorld: scenes, rendering, text round-trips, determinism, splits and held-out combinations."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest
from PIL import Image

from vargpt.data.scene import (
    BACKGROUNDS,
    CELL_MARGIN,
    COLOURS,
    IMAGE_SIZES,
    SHAPES,
    Obj,
    Scene,
    render,
    sample_scene,
)
from vargpt.data.shapesworld import (
    CATEGORIES,
    EDIT_KINDS,
    HELDOUT_COMPOSITIONS,
    HELDOUT_PAIRS,
    TASKS,
    PromptSpec,
    composition,
    edit_text,
    make_record,
    parse_edit,
    parse_prompt,
    prompt_text,
    sample_edit,
    sample_prompt,
    write_dataset,
)
from vargpt.errors import InputError
from vargpt.processing import render_training_turns


def _all_scenes(rec: dict) -> list[Scene]:
    scenes = [Scene.from_dict(rec["scene"])]
    for key in ("target_scene", "rejected_scene"):
        if key in rec["meta"]:
            scenes.append(Scene.from_dict(rec["meta"][key]))
    return scenes


def test_palette_is_well_separated_from_itself_and_backgrounds():
    assert len(COLOURS) >= 8 and len(SHAPES) >= 5
    pal = np.array(list(COLOURS.values()), float)
    bgs = np.array(list(BACKGROUNDS.values()), float)
    pairwise = [np.linalg.norm(a - b) for a, b in itertools.combinations(pal, 2)]
    assert min(pairwise) > 80
    assert np.linalg.norm(pal[:, None] - bgs[None], axis=-1).min() > 120


def test_same_scene_at_every_resolution_and_antialiased():
    scene = sample_scene(random.Random(3), n_objects=4)
    big = render(scene, 512)
    for size in IMAGE_SIZES:
        img = render(scene, size)
        assert img.mode == "RGB" and img.size == (size, size)
        down = np.asarray(big.resize((size, size), Image.Resampling.BOX), float)
        assert np.abs(down - np.asarray(img, float)).mean() < 2.0  # same geometry, only rasterisation differs
    pixels = {tuple(p) for p in np.asarray(render(scene, 64)).reshape(-1, 3)}
    pure = {tuple(c) for c in COLOURS.values()} | {tuple(c) for c in BACKGROUNDS.values()}
    assert pixels - pure, "edges should be blended (antialiased)"


@pytest.mark.parametrize("seed", range(40))
def test_sampled_scenes_keep_objects_in_distinct_cells_with_margin(seed):
    scene = sample_scene(random.Random(seed))
    assert 1 <= len(scene.objects) <= 4
    assert len({o.cell for o in scene.objects}) == len(scene.objects)
    for o in scene.objects:
        half = o.extent / 2
        assert o.col / 3 + CELL_MARGIN - 1e-4 <= o.cx - half and o.cx + half <= (o.col + 1) / 3 - CELL_MARGIN + 1e-4
        assert o.row / 3 + CELL_MARGIN - 1e-4 <= o.cy - half and o.cy + half <= (o.row + 1) / 3 - CELL_MARGIN + 1e-4
    assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene


def test_scene_from_dict_rejects_unknown_attributes():
    with pytest.raises(InputError, match="hexagon"):
        Scene.from_dict({"background": "white", "objects": [{"shape": "hexagon", "colour": "red", "size": "small",
                                                             "cx": 0.5, "cy": 0.5}]})
    with pytest.raises(InputError, match="malformed"):
        Scene.from_dict({"objects": [{"shape": "circle"}]})


def test_prompts_round_trip_through_text_for_every_category():
    for i in range(300):
        rng = random.Random(i)
        spec = sample_prompt(rng, CATEGORIES[i % len(CATEGORIES)], train=False)
        assert parse_prompt(prompt_text(spec, rng)) == spec


def test_parse_prompt_categories_and_errors():
    assert parse_prompt("a circle").category == "single_object"
    assert parse_prompt("An orange square!").objects[0].colour == "orange"
    spec = parse_prompt("Draw 3 triangles.")
    assert spec.category == "counting" and spec.objects[0].count == 3 and spec.objects[0].shape == "triangle"
    assert parse_prompt("a red circle and a blue cross").category == "color_attr"
    assert parse_prompt("a red circle and a cross").category == "two_object"
    spec = parse_prompt("a photo of a diamond below a square")
    assert spec.category == "position" and spec.relation == "below"
    with pytest.raises(InputError, match="understood only: circle"):
        parse_prompt("a circle riding a bicycle")
    with pytest.raises(InputError, match="empty"):
        parse_prompt("  ")


def test_edits_round_trip_and_cover_every_kind():
    kinds = set()
    for i in range(200):
        rng = random.Random(i)
        scene = sample_scene(rng)
        spec, edited = sample_edit(scene, rng, train=False)
        kinds.add(spec.kind)
        assert parse_edit(edit_text(spec, rng)) == spec
        assert edited != scene
    assert kinds == set(EDIT_KINDS)


def test_same_seed_gives_byte_identical_dataset(tmp_path):
    summaries = [write_dataset(tmp_path / d, n=10, split="train", size=64, seed=s, progress=False)
                 for d, s in (("a", 7), ("b", 7), ("c", 8))]
    assert summaries[0]["tasks"] == {t: 2 for t in TASKS}
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 1 + 3 * 2 + 2 * 2 * 2  # records + one image per caption/vqa/t2i, two per edit/dpo
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert (tmp_path / "a" / "records.jsonl").read_bytes() != (tmp_path / "c" / "records.jsonl").read_bytes()
    assert not list(tmp_path.rglob("*.tmp"))


def test_records_follow_the_chat_format(tmp_path):
    write_dataset(tmp_path, n=15, split="val", size=128, seed=0, progress=False)
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert len(records) == 15
    for rec in records:
        assert set(rec) >= {"id", "task", "messages", "images", "scene", "meta"}
        for rel in rec["images"]:
            assert Image.open(tmp_path / rel).size == (128, 128)
        roles = [m["role"] for m in rec["messages"]]
        user = rec["messages"][0]["content"]
        if rec["task"] in ("caption", "vqa"):
            assert roles == ["user", "assistant"] and user.startswith("<image>\n") and len(rec["images"]) == 1
        elif rec["task"] == "t2i":
            assert rec["messages"][1]["content"] == "<image_gen>" and len(rec["images"]) == 1
            assert parse_prompt(user) == PromptSpec.from_dict(rec["meta"]["spec"])
        elif rec["task"] == "edit":
            assert user.startswith("<image>\n") and rec["messages"][1]["content"] == "<image_gen>"
            assert len(rec["images"]) == 2 and rec["images"][0].endswith("_src.png")
        else:
            assert roles == ["user"] and rec["chosen"]["content"] == rec["rejected"]["content"] == "<image_gen>"
            assert rec["images"][0].endswith("_chosen.png") and rec["images"][1].endswith("_rejected.png")


def test_splits_are_disjoint():
    scenes = {}
    for split in ("train", "val", "test"):
        recs = [make_record(i, split=split, seed=0, size=64)[0] for i in range(60)]
        scenes[split] = {json.dumps(rec["scene"], sort_keys=True) for rec in recs}
        assert len({rec["id"] for rec in recs}) == 60
    for a, b in itertools.combinations(scenes, 2):
        assert not scenes[a] & scenes[b], (a, b)


def test_heldout_combinations_never_appear_in_train_but_do_in_test():
    heldout_in_test = 0
    for i in range(500):
        rec, _ = make_record(i, split="train", seed=0, size=64)
        assert not rec["meta"]["heldout"]
        for scene in _all_scenes(rec):
            assert not {(o.shape, o.colour) for o in scene.objects} & HELDOUT_PAIRS, rec["id"]
        if "spec" in rec["meta"]:
            spec = PromptSpec.from_dict(rec["meta"]["spec"])
            assert composition(spec) not in HELDOUT_COMPOSITIONS
            assert not {(o.shape, o.colour) for o in spec.objects} & HELDOUT_PAIRS
        test_rec, _ = make_record(i, split="test", seed=0, size=64)
        heldout_in_test += test_rec["meta"]["heldout"]
    assert heldout_in_test > 25


def test_write_dataset_rejects_bad_arguments(tmp_path):
    with pytest.raises(InputError, match="size 100"):
        write_dataset(tmp_path, n=2, size=100)
    with pytest.raises(InputError, match="split"):
        write_dataset(tmp_path, n=2, split="dev")
    with pytest.raises(InputError, match="task"):
        write_dataset(tmp_path, n=2, tasks=("painting",))


def test_render_rejects_unsupported_size():
    with pytest.raises(InputError, match="64, 128, 256"):
        render(Scene((Obj("circle", "red", "small", 0.5, 0.5),)), 100)


def test_canonical_layout_is_one_checker_passing_picture_per_prompt():
    from vargpt.data.shapesworld import CANONICAL_COLOUR, HELDOUT_PAIRS, canonical_scene
    from vargpt.eval.checker import parse_scene, score_prompt

    rng = random.Random(0)
    for category in CATEGORIES:
        for _ in range(6):
            spec = sample_prompt(rng, category, train=False)
            scene = canonical_scene(spec)
            assert scene == canonical_scene(spec)  # deterministic
            assert scene.background == "white" and all(o.size == "large" for o in scene.objects)
            assert all(o.colour == (s.colour or CANONICAL_COLOUR) for o, s in
                       zip(scene.objects, [s for s in spec.objects for _ in range(s.count)], strict=True))
            assert score_prompt(parse_scene(render(scene, 64)), prompt_text(spec)).score == 1, prompt_text(spec)
    assert all(CANONICAL_COLOUR != c for _, c in HELDOUT_PAIRS)


def test_canonical_layout_changes_only_training_targets_it_is_asked_for():
    for i in range(12):
        plain, _ = make_record(i, split="train", size=64, tasks=("t2i",))
        canon, images = make_record(i, split="train", size=64, tasks=("t2i",), t2i_layout="canonical")
        assert canon["messages"] == plain["messages"] and canon["meta"]["spec"] == plain["meta"]["spec"]
        assert canon["meta"]["layout"] == "canonical" and "layout" not in plain["meta"]
        assert Scene.from_dict(canon["scene"]).background == "white"
        assert list(images) == canon["images"]
    assert make_record(3, split="test", tasks=("vqa",), t2i_layout="canonical")[0] == \
        make_record(3, split="test", tasks=("vqa",))[0]
    with pytest.raises(InputError, match="unknown t2i layout"):
        make_record(0, split="train", t2i_layout="grid")


def test_position_colours_name_both_colours_in_train_prompts_only_when_asked():
    from vargpt.data.shapesworld import canonical_scene, parse_prompt, uses_heldout
    from vargpt.eval.checker import parse_scene, score_prompt

    rng = random.Random(1)
    plain = [sample_prompt(rng, "position", train=True) for _ in range(50)]
    assert all(o.colour is None for s in plain for o in s.objects)
    rng = random.Random(1)
    coloured = [sample_prompt(rng, "position", train=True, position_colours=1.0) for _ in range(50)]
    for spec in coloured:
        assert spec.category == "position" and all(o.colour for o in spec.objects)
        assert not uses_heldout([], spec)
        text = prompt_text(spec, random.Random(0))
        assert parse_prompt(text) == spec, text  # the checker reads the colours back
        assert score_prompt(parse_scene(render(canonical_scene(spec), 64)), text).score == 1, text
    # the default draws exactly what it drew before the option existed (the shipped data stays byte-identical)
    for i in range(20):
        assert make_record(i, split="train", tasks=("t2i",), position_colours=0.0) == \
            make_record(i, split="train", tasks=("t2i",))
    mixed = [make_record(i, split="train", tasks=("t2i",), position_colours=0.5)[0]["meta"] for i in range(300)]
    named = [m["spec"]["objects"][0].get("colour") is not None for m in mixed if m["category"] == "position"]
    assert 0 < sum(named) < len(named)
    with pytest.raises(InputError, match="position_colours"):
        make_record(0, split="train", tasks=("t2i",), position_colours=1.5)


def test_categories_restrict_text_to_image_prompts_and_default_to_all(tmp_path):
    from vargpt.data.shapesworld import CATEGORIES, write_dataset

    only = [make_record(i, split="train", tasks=("t2i",), categories=("position",))[0] for i in range(40)]
    assert {r["meta"]["category"] for r in only} == {"position"}
    assert all(not r["meta"]["heldout"] for r in only)  # the training split still keeps held-out pairs out
    two = {make_record(i, split="train", tasks=("t2i",), categories=("counting", "colors"))[0]["meta"]["category"]
           for i in range(60)}
    assert two == {"counting", "colors"}
    for i in range(20):  # the default is every category, as before the option existed
        assert make_record(i, split="train", tasks=("t2i",), categories=CATEGORIES) == \
            make_record(i, split="train", tasks=("t2i",))
    for bad in (("position", "shading"), (), "position"):  # a bare string is not a list of categories
        with pytest.raises(InputError, match="categor"):
            make_record(0, split="train", tasks=("t2i",), categories=bad)
    summary = write_dataset(tmp_path / "pos", n=6, tasks=("t2i",), categories=("position",), progress=False)
    assert summary["categories"] == ["position"]
    lines = (tmp_path / "pos" / "records.jsonl").read_text().splitlines()
    assert [json.loads(line)["meta"]["category"] for line in lines] == ["position"] * 6


def test_multi_turn_question_records_keep_the_first_turn_and_ask_distinct_questions():
    for i in range(12):
        one, img1 = make_record(i, split="train", tasks=("vqa",))
        many, img4 = make_record(i, split="train", tasks=("vqa",), vqa_turns=4)
        assert many["messages"][:2] == one["messages"] and many["scene"] == one["scene"]
        assert img1.keys() == img4.keys()
        users = [m["content"] for m in many["messages"][0::2]]
        roles = [m["role"] for m in many["messages"]]
        assert roles == ["user", "assistant"] * len(users) and 2 <= len(users) <= 4
        assert len(set(users)) == len(users) and all("<image>" not in u for u in users[1:])
        assert many["meta"]["qtypes"][0] == many["meta"]["qtype"] and len(many["meta"]["qtypes"]) == len(users)
        render_training_turns(many["messages"])  # a valid training conversation
    assert sum(len(make_record(i, split="train", tasks=("vqa",), vqa_turns=4)[0]["messages"]) == 8
               for i in range(12)) >= 10
    with pytest.raises(InputError, match="vqa_turns"):
        make_record(0, split="train", tasks=("vqa",), vqa_turns=0)


def test_question_types_and_object_count_restrict_question_records(tmp_path):
    from vargpt.data.shapesworld import QTYPES, relation_holds, write_dataset

    rel = [make_record(i, split="train", tasks=("vqa",), qtypes=("relative",), vqa_objects=2, vqa_turns=2)[0]
           for i in range(30)]
    for r in rel:
        assert len(r["scene"]["objects"]) == 2 and set(r["meta"]["qtypes"]) == {"relative"}
        assert all(m["content"].removeprefix("<image>\n").startswith("Is the") for m in r["messages"][0::2])
    assert {r["messages"][1]["content"] for r in rel} == {"yes", "no"}
    scene = Scene.from_dict(rel[0]["scene"])
    a, b = scene.objects
    assert relation_holds(a, b, "left of") == relation_holds(b, a, "right of")  # the answers follow the scene
    three = [make_record(i, split="train", tasks=("caption",), vqa_objects=3)[0] for i in range(10)]
    assert all(len(r["scene"]["objects"]) == 3 for r in three)
    for i in range(20):  # the defaults are every type and 1-4 objects, as before the options existed
        assert make_record(i, split="train", tasks=("vqa",), qtypes=QTYPES) == make_record(i, split="train",
                                                                                             tasks=("vqa",))
    for kwargs, match in (({"qtypes": ("relative",)}, "two or more"), ({"qtypes": ("relative",), "vqa_objects": 1},
                          "two or more"), ({"qtypes": ("colour", "size")}, "question type"),
                          ({"qtypes": "where"}, "qtypes"), ({"vqa_objects": 5}, "vqa_objects")):
        with pytest.raises(InputError, match=match):
            make_record(0, split="train", tasks=("vqa",), **kwargs)
    summary = write_dataset(tmp_path / "rel", n=4, tasks=("vqa",), qtypes=("relative",), vqa_objects=2,
                            progress=False)
    assert summary["qtypes"] == ["relative"] and summary["vqa_objects"] == 2


def test_edit_kinds_restrict_edit_records_and_default_to_all(tmp_path):
    from vargpt.data.shapesworld import edit_fits

    swaps = [make_record(i, split="train", tasks=("edit",), edit_kinds=("swap",))[0] for i in range(20)]
    for r in swaps:  # one-object scenes fit no swap: they are drawn again
        assert r["meta"]["category"] == "swap" and len(r["scene"]["objects"]) >= 2
        src, tgt = Scene.from_dict(r["scene"]), Scene.from_dict(r["meta"]["target_scene"])
        i, j = [k for k, (a, b) in enumerate(zip(src.objects, tgt.objects, strict=True)) if a.cell != b.cell]
        assert (tgt.objects[i].cell, tgt.objects[j].cell) == (src.objects[j].cell, src.objects[i].cell)
    kinds = {make_record(i, split="train", tasks=("edit",), edit_kinds=("move", "swap"))[0]["meta"]["category"]
             for i in range(40)}
    assert kinds == {"move", "swap"}
    for i in range(20):  # the default is every kind, byte for byte as before the option existed
        assert make_record(i, split="train", tasks=("edit",), edit_kinds=EDIT_KINDS) == \
            make_record(i, split="train", tasks=("edit",))
    one = Scene((Obj("circle", "red", "small", 0.5, 0.5),), "white")
    assert not edit_fits("swap", one) and not edit_fits("remove", one) and edit_fits("move", one)
    with pytest.raises(InputError, match="no edit of kind"):
        sample_edit(one, random.Random(0), train=True, kinds=("swap", "remove"))
    with pytest.raises(InputError, match="edit kind"):
        make_record(0, split="train", tasks=("edit",), edit_kinds=("rotate",))
    summary = write_dataset(tmp_path / "ms", n=4, tasks=("edit",), edit_kinds=("move",), progress=False)
    assert summary["edit_kinds"] == ["move"] and summary["tasks"] == {"edit": 4}
