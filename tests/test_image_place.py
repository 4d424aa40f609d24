"""``vision.place_embed`` (not in the released layout): learned row/column embeddings added to merged image tokens.
Off by default and in every released preset; zero-initialised (a model that gains it starts equal to one without
it); every path that embeds an image (training forward, transformers-style forward, text generation) adds it; old
weights load into a config with it; a recipe override that changes a config rebuilds the model around the weights."""

from __future__ import annotations

import dataclasses
from unittest import mock

import pytest
import torch
from PIL import Image

from vargpt.config import official_config, tiny_config
from vargpt.engine import Engine
from vargpt.engine import llm as fast_llm
from vargpt.errors import ConfigError, InputError
from vargpt.models import vlm as V
from vargpt.models.projectors import ImagePlaceEmbedding
from vargpt.models.vargpt import VARGPT
from vargpt.training.recipe import recipe_from_dict
from vargpt.training.trainer import build_model

CFG = tiny_config()
ON = dataclasses.replace(CFG, vision=dataclasses.replace(CFG.vision, place_embed=8))


def _prompt(engine: Engine):
    img = Image.new("RGB", (64, 64), (240, 240, 240))
    img.paste((200, 30, 30), (8, 40, 24, 56))
    return engine.encode_prompts(["<image>\nWhat colour is the square?"], [img])


def test_rows_and_columns_follow_the_merged_grid():
    place = ImagePlaceEmbedding(4, 2, merge=2)
    with torch.no_grad():
        place.row.weight.copy_(torch.tensor([[1.0, 0], [2, 0], [3, 0], [4, 0]]))
        place.col.weight.copy_(torch.tensor([[0, 10.0], [0, 20], [0, 30], [0, 40]]))
    # two images: patch grids 4x6 (-> 2x3 merged tokens) and, over two frames, 2x2 (-> 1x1)
    got = place(torch.tensor([[1, 4, 6], [2, 2, 2]]))
    assert got[:, 0].tolist() == [1, 1, 1, 2, 2, 2, 1, 1]
    assert got[:, 1].tolist() == [10, 20, 30, 10, 20, 30, 10, 10]
    with pytest.raises(InputError, match="place_embed"):
        place(torch.tensor([[1, 10, 2]]))
    scaled = ImagePlaceEmbedding(4, 2, merge=2, scale=16.0)  # vision.place_scale multiplies what the tables give
    scaled.load_state_dict(place.state_dict())
    torch.testing.assert_close(scaled(torch.tensor([[1, 4, 6]])), 16 * place(torch.tensor([[1, 4, 6]])))


def test_place_scale_reaches_the_model_and_is_checked():
    assert CFG.vision.place_scale == 1.0 and official_config().vision.place_scale == 1.0
    cfg = dataclasses.replace(ON, vision=dataclasses.replace(ON.vision, place_scale=64.0))
    assert VARGPT(cfg).image_place.scale == 64.0
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="place_scale"):
            dataclasses.replace(ON.vision, place_scale=bad).validate()


@torch.no_grad()
def test_off_by_default_and_zero_init_changes_nothing():
    assert CFG.vision.place_embed == 0 and official_config().vision.place_embed == 0
    torch.manual_seed(0)
    off = VARGPT(CFG)
    torch.manual_seed(0)
    on = VARGPT(ON)
    assert off.image_place is None and not any("place" in k for k in off.state_dict())
    assert {k for k in on.state_dict() if "place" in k} == {"image_place.row.weight", "image_place.col.weight"}
    b = _prompt(Engine(on))
    args = (b.input_ids, b.attention_mask, b.pixel_values, b.image_grid_thw)
    torch.testing.assert_close(on(*args).logits, off(*args).logits)
    assert Engine(on).generate_text(*args, max_new_tokens=4) == Engine(off).generate_text(*args, max_new_tokens=4)


@torch.no_grad()
def test_every_path_adds_the_place():
    torch.manual_seed(0)
    on = VARGPT(ON)
    torch.nn.init.normal_(on.image_place.row.weight)
    torch.nn.init.normal_(on.image_place.col.weight)
    engine = Engine(on)
    b = _prompt(engine)
    args = (b.input_ids, b.attention_mask, b.pixel_values, b.image_grid_thw)
    logits = on(*args).logits
    batch = {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "pixel_values": b.pixel_values,
             "image_grid_thw": b.image_grid_thw}
    trained = on.lm_head(on.forward_generation(batch).hidden_BSH)  # what the training loss reads
    torch.testing.assert_close(trained, logits, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        on.image_place.row.weight.zero_()
        on.image_place.col.weight.zero_()
    assert (on(*args).logits - logits).abs().max() > 1e-3  # the place did reach the logits
    torch.nn.init.normal_(on.image_place.row.weight, generator=torch.Generator().manual_seed(1))
    # transformers' generate (the engine's path without SDPA; the lean path: tests/test_engine_llm.py)
    with (mock.patch.object(fast_llm, "supported", lambda vlm: False),
          mock.patch.object(on.vlm, "generate", wraps=on.vlm.generate) as gen):
        engine.generate_text(*args, max_new_tokens=1, images=False)
    kw = gen.call_args.kwargs
    assert "pixel_values" not in kw  # transformers would embed the image itself, without its places
    torch.testing.assert_close(kw["inputs_embeds"], V.embed_inputs(on.vlm, *args[:1], *args[2:], on.image_place))


def test_old_weights_load_with_zero_places_and_overrides_rebuild_the_model(tmp_path):
    torch.manual_seed(0)
    VARGPT(CFG).save_pretrained(tmp_path / "old")
    grown = VARGPT.from_pretrained(tmp_path / "old", config=ON)
    assert not grown.image_place.row.weight.any() and not grown.image_place.col.weight.any()
    recipe = recipe_from_dict({
        "name": "place", "stage": "sft_understanding", "out_dir": str(tmp_path / "runs"),
        "model": {"checkpoint": str(tmp_path / "old"), "preset": None,
                  "config_overrides": {"vision": {"place_embed": 8}, "llm": {"rope_theta": 1000.0}}},
        "data": {"sources": [{"path": str(tmp_path / "data"), "format": "shapesworld"}], "image_size": 64},
        "trainable": ["image_place", "model"]})
    model = build_model(recipe)
    assert model.image_place is not None and model.config.llm.rope_theta == 1000.0
    inv = model.model.rotary_emb.inv_freq  # the override reached the LLM, not only the config
    assert inv[1].item() == pytest.approx(1000.0 ** (-2 / (2 * inv.numel())), rel=1e-5)
