"""Editing guidance whose unconditional row keeps the picture (``decoder.uncond_keeps_image``, InstructPix2Pix-style):
the row is the edit prompt cut after its image, the same in sampling and in training's condition dropout; off by
default (the null prompt), and without guidance nothing changes."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conftest import write_shapesworld
from vargpt.config import SamplingConfig, VARGPTConfig, tiny_config
from vargpt.data.records import Collator, RecordDataset
from vargpt.engine import Engine
from vargpt.errors import InputError
from vargpt.imageio import load_image
from vargpt.models.generation import image_only_prompt_ids, null_prompt_ids
from vargpt.models.vargpt import VARGPT
from vargpt.training.objective import drop_prompts

SIZE = 64
BASE = tiny_config()
SRC = dataclasses.replace(BASE, decoder=dataclasses.replace(BASE.decoder, source_condition=True))
KEEP = dataclasses.replace(SRC, decoder=dataclasses.replace(SRC.decoder, uncond_keeps_image=True))


@pytest.fixture(scope="module")
def models() -> tuple[VARGPT, VARGPT]:
    """The same seeded tiny editing model with the null-prompt and with the image-keeping unconditional row."""
    torch.manual_seed(0)
    null = VARGPT(SRC).eval()
    torch.manual_seed(0)
    keep = VARGPT(KEEP).eval()
    with torch.no_grad():  # a source term that matters, the same in both
        g = torch.Generator().manual_seed(0)
        w = torch.randn(null.vargpt_gen.source_embed.weight.shape, generator=g) * 0.5
        for m in (null, keep):
            m.vargpt_gen.source_embed.weight.copy_(w)
    return null, keep


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """Two ShapesWorld edit records and one text-to-image record."""
    return write_shapesworld(tmp_path_factory.mktemp("sw"), ["edit", "edit", "t2i"], SIZE)


def _edits(records) -> tuple[list, list[str]]:
    edits = [r for r in records if r.task == "edit"]
    return ([load_image(r.images[0]) for r in edits],
            [r.messages[0]["content"].removeprefix("<image>\n") for r in edits])


def test_off_by_default_and_read_from_old_configs():
    assert not BASE.decoder.uncond_keeps_image
    old = KEEP.to_dict()
    assert VARGPTConfig.from_dict(json.loads(json.dumps(old))).decoder.uncond_keeps_image
    del old["decoder"]["uncond_keeps_image"]
    assert not VARGPTConfig.from_dict(old).decoder.uncond_keeps_image


def test_the_image_only_prompt_is_the_chat_prompt_of_the_picture_alone(models, records):
    _, keep = models
    engine, proc = Engine(keep), keep.require_processor()
    sources, instructions = _edits(records)
    edit = engine.encode_prompts([f"<image>\n{instructions[0]}"], sources[:1]).input_ids[0].tolist()
    alone = engine.encode_prompts(["<image>\n"], sources[:1]).input_ids[0].tolist()
    assert image_only_prompt_ids(edit[:-1], proc) + [edit[-1]] == alone
    assert len(alone) < len(edit)
    with pytest.raises(InputError, match="<image>"):
        image_only_prompt_ids(null_prompt_ids(proc), proc)


def test_condition_dropout_of_an_edit_keeps_its_picture_and_drops_its_instruction(models, records):
    null_model, keep = models
    t = KEEP.tokens
    ds = RecordDataset(records, keep.require_processor(), image_size=SIZE, stride=KEEP.vae.stride,
                       pad_multiple=KEEP.decoder.pad_to_multiplier, source_condition=True)
    batch = Collator(keep.require_processor())([ds[0], ds[2]])  # an edit row, then a text-to-image row
    proc = keep.require_processor()
    before = [r[m.bool()].tolist() for r, m in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
    dropped = drop_prompts(keep, batch, torch.tensor([True, True]))
    rows = [r[m.bool()].tolist() for r, m in zip(dropped["input_ids"], dropped["attention_mask"], strict=True)]
    s0, s1 = before[0].index(t.image_gen_start), before[1].index(t.image_gen_start)
    # the edit row: its picture, no instruction, then the same image slots and labels as before
    assert rows[0] == image_only_prompt_ids(before[0][:s0], proc) + before[0][s0:]
    sources, _ = _edits(records)  # ... which is sampling's unconditional row of that picture
    assert rows[0][:rows[0].index(t.image_gen_start) + 1] == Engine(keep).encode_prompts(
        ["<image>\n"], sources[:1]).input_ids[0].tolist()
    assert torch.equal(dropped["pixel_values"], batch["pixel_values"])
    assert torch.equal(dropped["image_grid_thw"], batch["image_grid_thw"])
    # the text-to-image row: the null prompt, as without the switch
    assert rows[1] == null_prompt_ids(proc) + before[1][s1:]
    # without the switch the edit row loses its picture too
    plain = drop_prompts(null_model, batch, torch.tensor([True, False]))
    assert plain.get("pixel_values") is None
    assert plain["input_ids"][0][plain["attention_mask"][0].bool()].tolist() == null_prompt_ids(proc) + before[0][s0:]


@torch.no_grad()
def test_guided_edits_use_it_and_unguided_ones_do_not(models, records):
    null_model, keep = models
    sources, instructions = _edits(records)
    guided, unguided = SamplingConfig(cfg_scale=3.0), SamplingConfig(cfg_scale=1.0)

    def edit(model, sampling, idx=(0, 1), seed=0):
        return Engine(model).edit_images([sources[i] for i in idx], [instructions[i] for i in idx], size=SIZE,
                                         sampling=sampling, seed=seed)

    assert torch.equal(edit(keep, unguided).images, edit(null_model, unguided).images)
    a, b = edit(keep, guided), edit(null_model, guided)
    assert any(not torch.equal(x, y) for x, y in zip(a.bits, b.bits, strict=True))
    # prompts of different lengths are left-padded, the unconditional rows too: a batch equals separate calls
    one, two = edit(keep, guided, (0,), 0), edit(keep, guided, (1,), 1)
    for k in range(len(a.bits)):
        assert torch.equal(a.bits[k], torch.cat([one.bits[k], two.bits[k]]))
    # text-to-image has no picture: the null prompt as before
    t2i = [Engine(m).generate_images(["a red circle"], size=SIZE, sampling=guided, seed=3).images
           for m in (keep, null_model)]
    assert torch.equal(*t2i)
