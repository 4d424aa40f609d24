"""Understanding side vs fixture (a): weights load strictly, every stored tensor is reproduced."""

import pytest
import torch

from conftest import assert_close_recorded, load_fixture
from vargpt.errors import InputError
from vargpt.models.vlm import (
    build_vlm,
    embed_inputs,
    llm_forward,
    mm_token_type_ids,
    new_cache,
    rope_positions,
)
from vargpt.processing import ByteTokenizer, VARGPTProcessor
from vargpt.weights import load_into, load_state_dict_files, released_to_vlm_keys

TOL = dict(atol=1e-5, rtol=1e-4)
VLM_PREFIXES = ("visual.", "model.", "lm_head.")


@pytest.fixture(scope="module")
def fa(fixtures_dir):
    return load_fixture(fixtures_dir, "a_understanding")


@pytest.fixture(scope="module")
def vlm(fixtures_dir, fixture_config):
    model = build_vlm(fixture_config, device="meta")
    sd = load_state_dict_files(fixtures_dir / "tiny_weights.safetensors", prefixes=VLM_PREFIXES)
    report = load_into(model, released_to_vlm_keys(sd), strict=True)
    assert report.missing_keys == [] and report.unexpected_keys == []
    return model


def test_released_keys_map_one_to_one(vlm, fixture_weights):
    released = {k: v for k, v in fixture_weights.items() if k.startswith(VLM_PREFIXES)}
    assert len(released) == 31 + 26 + 1
    mapped = released_to_vlm_keys(released)
    own = vlm.state_dict()
    assert set(mapped) == set(own)
    assert all(mapped[k].shape == own[k].shape for k in own)
    assert not any(t.is_meta for t in list(vlm.parameters()) + list(vlm.buffers()))


@torch.no_grad()
def test_image_embeds(vlm, fa, record_property):
    feats = torch.cat(vlm.model.get_image_features(fa["pixel_values"], fa["image_grid_thw"]).pooler_output)
    assert_close_recorded(record_property, "a.image_embeds", feats, fa["image_embeds"], **TOL)


def test_rope_positions(vlm, fa):
    pos, deltas = rope_positions(vlm, fa["input_ids"], fa["image_grid_thw"], fa["attention_mask"])
    assert torch.equal(pos, fa["position_ids"])
    assert torch.equal(deltas, fa["rope_deltas"])


@torch.no_grad()
def test_hidden_states_and_logits_via_glue(vlm, fa, record_property):
    embeds = embed_inputs(vlm, fa["input_ids"], fa["pixel_values"], fa["image_grid_thw"])
    pos, _ = rope_positions(vlm, fa["input_ids"], fa["image_grid_thw"], fa["attention_mask"])
    hidden = llm_forward(vlm, embeds, position_ids=pos, attention_mask=fa["attention_mask"])
    assert_close_recorded(record_property, "a.last_hidden_state", hidden, fa["last_hidden_state"], **TOL)
    assert_close_recorded(record_property, "a.logits", vlm.lm_head(hidden), fa["logits"], **TOL)


@torch.no_grad()
def test_logits_via_transformers_forward(vlm, fa):
    out = vlm(input_ids=fa["input_ids"], attention_mask=fa["attention_mask"], pixel_values=fa["pixel_values"],
              image_grid_thw=fa["image_grid_thw"], mm_token_type_ids=mm_token_type_ids(vlm, fa["input_ids"]))
    torch.testing.assert_close(out.logits, fa["logits"], **TOL)


@torch.no_grad()
def test_greedy_generate(vlm, fa):
    ids = vlm.generate(input_ids=fa["input_ids"], attention_mask=fa["attention_mask"],
                       pixel_values=fa["pixel_values"], image_grid_thw=fa["image_grid_thw"],
                       mm_token_type_ids=mm_token_type_ids(vlm, fa["input_ids"]), max_new_tokens=8, do_sample=False)
    assert torch.equal(ids, fa["greedy_generated_ids"])


def test_processor_reproduces_fixture_inputs(fixture_config, fa):
    proc = VARGPTProcessor(ByteTokenizer(fixture_config.tokens), fixture_config)
    out = proc("<image>Describe the image.", fa["image_uint8_hwc"], system=None)
    assert torch.equal(out["input_ids"], fa["input_ids"])
    assert torch.equal(out["attention_mask"], fa["attention_mask"])
    assert torch.equal(out["image_grid_thw"], fa["image_grid_thw"])
    torch.testing.assert_close(out["pixel_values"], fa["pixel_values"], atol=1e-6, rtol=0)


@torch.no_grad()
def test_cached_llm_steps_match_one_pass(vlm, fa):
    """Prefill then per-chunk steps through one DynamicCache = one full pass (how the generation side runs)."""
    embeds = embed_inputs(vlm, fa["input_ids"], fa["pixel_values"], fa["image_grid_thw"])
    full = llm_forward(vlm, embeds)
    cache = new_cache(vlm)
    parts = [llm_forward(vlm, embeds[:, :40], cache=cache), llm_forward(vlm, embeds[:, 40:52], cache=cache),
             llm_forward(vlm, embeds[:, 52:], cache=cache)]
    assert cache.get_seq_length() == embeds.shape[1]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, **TOL)


def test_embed_inputs_count_mismatch(vlm, fa):
    ids = fa["input_ids"].clone()
    ids[0, 7] = 65  # one <|image_pad|> slot fewer than the image's 16 tokens
    with pytest.raises(InputError, match="16 tokens but the sequence has 15 image slots"):
        embed_inputs(vlm, ids, fa["pixel_values"], fa["image_grid_thw"])
    with pytest.raises(InputError, match="no image was given"):
        embed_inputs(vlm, fa["input_ids"])


def test_rope_worked_example(fixture_config):
    """The example in `rope_positions`' docstring: 2 text tokens, a 2 x 3 token image, 1 text token."""
    vlm = build_vlm(fixture_config, device="meta")
    t = fixture_config.tokens
    ids = torch.tensor([[65, 66] + [t.image_pad] * 6 + [67]])
    pos, deltas = rope_positions(vlm, ids, torch.tensor([[1, 4, 6]]))
    assert pos[:, 0].tolist() == [[0, 1, 2, 2, 2, 2, 2, 2, 5], [0, 1, 2, 2, 2, 3, 3, 3, 5],
                                  [0, 1, 2, 3, 4, 2, 3, 4, 5]]
    assert deltas.tolist() == [[6 - 9]]
