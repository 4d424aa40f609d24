"""The checker: scene parsing, prompt scoring (faithful = 1, corruption = 0), answers and edits."""

from __future__ import annotations

import random

import pytest
from PIL import Image, ImageDraw

from vargpt.data.scene import BACKGROUNDS, COLOURS, IMAGE_SIZES, Obj, Scene, render, sample_scene
from vargpt.data.shapesworld import (
    CATEGORIES,
    EDIT_KINDS,
    EditSpec,
    Ref,
    corrupt,
    edit_text,
    make_record,
    prompt_text,
    record_rng,
    sample_edit,
    sample_prompt,
    scene_for_prompt,
)
from vargpt.errors import InputError
from vargpt.eval.checker import object_recall, parse_scene, scenes_match, score_answer, score_edit, score_prompt


@pytest.mark.parametrize("size", [64, 128])
def test_parse_recovers_exact_scene(size):
    for i in range(150):
        scene = sample_scene(record_rng(0, "test", i))
        assert scenes_match(scene, parse_scene(render(scene, size))), (i, scene, parse_scene(render(scene, size)))


def test_parse_is_resolution_independent_and_exact_match_is_strict():
    scene = sample_scene(random.Random(11), n_objects=4)
    for size in IMAGE_SIZES:
        assert scenes_match(scene, parse_scene(render(scene, size)))
    o = scene.objects[0]
    moved = Scene((o.replace(cx=o.cx + 0.05),) + scene.objects[1:], scene.background)
    assert not scenes_match(scene, moved)
    assert not scenes_match(scene, Scene(scene.objects[1:], scene.background))
    assert not scenes_match(scene, Scene(scene.objects, next(b for b in BACKGROUNDS if b != scene.background)))


def test_blank_image_has_no_objects():
    assert parse_scene(Image.new("RGB", (64, 64), BACKGROUNDS["cream"])) == Scene((), "cream")


def test_off_model_shapes_are_unknown_and_any_image_size_parses():
    img = Image.new("RGB", (160, 96), BACKGROUNDS["white"])
    draw = ImageDraw.Draw(img)
    draw.ellipse([10, 10, 40, 40], fill=COLOURS["red"])
    draw.rectangle([100, 50, 140, 90], fill=COLOURS["blue"])
    draw.ellipse([50, 60, 95, 70], fill=COLOURS["green"])  # a flat ellipse is none of our shapes
    scene = parse_scene(img)
    assert [(o.shape, o.colour) for o in scene.objects] == [("circle", "red"), ("unknown", "green"),
                                                            ("square", "blue")]
    assert score_prompt(scene, "a green circle").score == 0.0


@pytest.mark.parametrize("category", CATEGORIES)
def test_faithful_render_scores_one_and_corruption_zero(category):
    kinds = set()
    for i in range(25):
        rng = random.Random(i)
        spec = sample_prompt(rng, category, train=False)
        text = prompt_text(spec, rng)
        scene = scene_for_prompt(spec, rng)
        rejected, kind = corrupt(spec, scene, rng)
        kinds.add(kind)
        good, bad = score_prompt(render(scene, 64), text), score_prompt(render(rejected, 64), text)
        assert (good.score, good.category) == (1.0, category), (text, scene)
        assert (bad.score, bad.category) == (0.0, category), (text, kind, rejected)
    assert kinds <= {"object", "colour", "count", "position"}


def test_dpo_records_chosen_scores_one_rejected_zero():
    for i in range(4, 200, 5):  # task index 4 = dpo
        rec, images = make_record(i, split="test", seed=1, size=64)
        assert rec["task"] == "dpo"
        chosen, rejected = (images[p] for p in rec["images"])
        prompt = rec["messages"][0]["content"]
        assert score_prompt(chosen, prompt).score == 1.0
        assert score_prompt(rejected, prompt).score == 0.0


def test_prompt_rules():
    left, right = Obj("circle", "red", "small", 0.17, 0.5), Obj("square", "blue", "large", 0.83, 0.2)
    scene = Scene((left, right))
    assert score_prompt(scene, "a circle to the left of a square").score == 1.0
    assert score_prompt(scene, "a circle to the right of a square").score == 0.0
    assert score_prompt(scene, "a square above a circle").score == 1.0
    assert score_prompt(scene, "a red circle and a blue square").score == 1.0
    assert score_prompt(scene, "a blue circle and a red square").score == 0.0
    assert score_prompt(scene, "one circle").score == 1.0
    assert score_prompt(scene, "two circles").score == 0.0
    assert score_prompt(scene, "a large blue square").score == 1.0
    assert score_prompt(scene, "a small blue square").score == 0.0


def test_object_recall_gives_partial_credit():
    left, right = Obj("circle", "red", "small", 0.17, 0.5), Obj("square", "blue", "large", 0.83, 0.2)
    scene = Scene((left, right))
    assert object_recall(scene, "a red circle and a blue square") == 1.0
    assert object_recall(scene, "a red circle and a green square") == 0.5  # score_prompt: 0
    assert object_recall(scene, "a circle to the right of a square") == 1.0  # relation ignored
    assert object_recall(Scene(()), "a red circle") == 0.0


def test_score_answer_normalises():
    assert score_answer("Two.", "two") == 1.0
    assert score_answer("2", "two") == 1.0
    assert score_answer("The Top Left", "top left") == 1.0
    assert score_answer("Yes!", "yes") == 1.0
    assert score_answer("gray", "grey") == 1.0
    assert score_answer("three", "two") == 0.0
    assert score_answer("", "no") == 0.0


def test_vqa_answers_are_recoverable_from_the_parsed_scene():
    # Colour questions about a rendered image: the checker's parse gives the gold answer.
    for i in range(1, 120, 5):  # task index 1 = vqa
        rec, images = make_record(i, split="val", seed=0, size=64)
        parsed = parse_scene(next(iter(images.values())))
        assert scenes_match(Scene.from_dict(rec["scene"]), parsed)


def test_every_edit_kind_scores_one_when_done_and_zero_when_not():
    seen = set()
    for i in range(120):
        rng = random.Random(i)
        scene = sample_scene(rng)
        spec, edited = sample_edit(scene, rng, train=False)
        seen.add(spec.kind)
        text = edit_text(spec, rng)
        done = score_edit(render(scene, 64), text, render(edited, 64))
        assert (done.score, done.satisfied, done.preserved, done.kind) == (1.0, True, True, spec.kind), text
        assert score_edit(render(scene, 64), text, render(scene, 64)).score == 0.0
    assert seen == set(EDIT_KINDS)


def test_edit_that_disturbs_other_objects_is_not_preserving():
    a, b = Obj("circle", "red", "small", 0.17, 0.17), Obj("square", "blue", "large", 0.5, 0.5)
    source = Scene((a, b))
    moved_b = b.replace(cx=0.83)
    verdict = score_edit(source, "make the circle green", Scene((a.replace(colour="green"), moved_b)))
    assert verdict.satisfied and not verdict.preserved and verdict.score == 0.0
    verdict = score_edit(source, "remove the circle", Scene((b, Obj("cross", "pink", "small", 0.83, 0.83))))
    assert verdict.preserved and not verdict.satisfied
    added = Obj("triangle", "pink", "large", 0.83, 0.83)
    assert score_edit(source, "add a triangle at the bottom right", Scene((a, b, added))).score == 1.0
    assert score_edit(source, "add a small triangle at the bottom right", Scene((a, b, added))).score == 0.0
    verdict = score_edit(source, EditSpec("resize", Ref("square"), size="small"),
                         Scene((a, b.replace(size="small"))))
    assert verdict.score == 1.0


def test_edit_reference_must_resolve():
    scene = Scene((Obj("circle", "red", "small", 0.17, 0.17), Obj("circle", "blue", "small", 0.5, 0.5)))
    with pytest.raises(InputError, match="matches 2 objects"):
        score_edit(scene, "remove the circle", scene)
    with pytest.raises(InputError, match="occupied"):
        score_edit(scene, "move the red circle to the center", scene)
