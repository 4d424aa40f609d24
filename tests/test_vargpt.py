"""The unified model: released checkpoints, the conformance fixtures through its public methods, round trips,
mixed turns, batching and bad input.

Fixtures (../shared/fixtures/official, published code on tiny random weights): (a) understanding logits through
``model(**inputs).logits``; (b) sampled bits through ``Engine.generate_images`` (published settings, seed 1234567);
(d) teacher-forced generation loss through ``objective.training_losses`` with the published compat switches.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LogitsProcessor

from conftest import VAE_DECODE_TOL, assert_close_recorded, load_fixture
from vargpt.config import SamplingConfig, official_config
from vargpt.engine import Engine
from vargpt.errors import CheckpointError, ConfigError, InputError
from vargpt.models.generation import null_prompt_ids
from vargpt.models.vargpt import VARGPT
from vargpt.processing import VARGPTProcessor
from vargpt.scales import padded_tokens, schedule_for_size
from vargpt.training.objective import drop_prompts, image_logprobs, text_ce, training_losses
from vargpt.weights import convert_checkpoint, read_config


@pytest.fixture(scope="module")
def tiny_dir(tiny_model, tmp_path_factory):
    return tiny_model.save_pretrained(tmp_path_factory.mktemp("tiny") / "model", max_shard_size="2MB")


# ----------------------------------------------------------------------------------------------- fixtures


def test_fixture_weights_load_with_no_missing_or_unexpected_keys(fixture_model, fixture_weights):
    sd = fixture_model.state_dict()
    assert set(sd) == set(fixture_weights) and len(sd) == 316
    for k, v in fixture_weights.items():
        assert torch.equal(sd[k], v), k
    tops = {k.split(".")[0] for k, _ in fixture_model.named_parameters()}
    assert tops == {"visual", "model", "lm_head", "vae_local", "vargpt_gen", "image_gen_projector",
                    "image_gen_projector_out", "sos_embedding"}  # trainers freeze by these names


@torch.no_grad()
def test_fixture_a_understanding_logits(fixture_model, fixtures_dir, record_property):
    a = load_fixture(fixtures_dir, "a_understanding")
    out = fixture_model(input_ids=a["input_ids"], attention_mask=a["attention_mask"], pixel_values=a["pixel_values"],
                        image_grid_thw=a["image_grid_thw"])
    assert_close_recorded(record_property, "a.logits(model)", out.logits, a["logits"], atol=1e-5, rtol=1e-4)


def test_fixture_d_training_loss(fixtures_dir, fixture_config, record_property):
    d = load_fixture(fixtures_dir, "d_train")
    c = fixture_config  # the fixture switched condition dropout, DropPath and self-correction noise off
    cfg = dataclasses.replace(c, compat=dataclasses.replace(c.compat, published_text_loss=True),
                              decoder=dataclasses.replace(c.decoder, cond_drop_rate=0.0, drop_path_rate=0.0),
                              self_correction=dataclasses.replace(c.self_correction, strength=0.0))
    model = VARGPT.from_pretrained(fixtures_dir, config=cfg, weights=fixtures_dir / "tiny_weights.safetensors",
                                   device="cpu").train()
    batch = {"input_ids": d["input_ids"], "attention_mask": d["attention_mask"], "labels": d["labels"],
             "gen_pixel_values": d["pixel_gen_values"]}
    losses = training_losses(model, batch)
    record_property("d.loss(model)", f"rel diff {abs(losses['loss'].item() / d['loss'].item() - 1):.3g} (bound 1e-4)")
    assert losses["loss"].item() == pytest.approx(d["loss"].item(), rel=1e-4)
    assert losses["loss"].requires_grad
    # DPO log-prob of the image = -(sum of the bit CEs): consistent with the mean bit loss over 521 x 32 bits
    logp = image_logprobs(model, batch)
    assert logp.shape == (1,)
    assert logp.item() == pytest.approx(-losses["bit_loss"].item() * 521 * 32, rel=1e-4)
    # scale-weighted (DPO's dpo.scale_weighted): the same tie to Infinity's scale-reweighted bit loss
    model.config.compat.bit_loss = "scale_reweighted"
    try:
        reweighted = training_losses(model, batch)["bit_loss"].item()
    finally:
        model.config.compat.bit_loss = c.compat.bit_loss
    assert image_logprobs(model, batch, scale_weighted=True).item() == pytest.approx(-reweighted * 521 * 32, rel=1e-4)
    assert reweighted != pytest.approx(losses["bit_loss"].item(), rel=1e-3)
    # our default text loss (answer tokens only) differs from the published whole-sequence one
    model.config.compat.published_text_loss = False
    try:
        assert training_losses(model, batch)["text_loss"].item() != pytest.approx(losses["text_loss"].item())
    finally:
        model.config.compat.published_text_loss = True


@torch.no_grad()
def test_fixture_b_sampled_bits(fixture_model, fixtures_dir, record_property):
    b = load_fixture(fixtures_dir, "b_t2i")
    assert fixture_model.config.compat.published_uncond_branch
    out = Engine(fixture_model).generate_images(input_ids=b["generated_ids"][:, :-1], size=256, seed=[1234567],
                                        sampling=SamplingConfig(cfg_scale=3.0, tau=0.5, top_k=900, top_p=0.97))
    flips = sum(int((out.bits[k] != b[f"bits_scale{k:02d}"][:, 0].long()).sum()) for k in range(7))
    assert flips == 0  # measured: 0 of 16,672 bits
    assert out.images.shape == (1, 3, 256, 256)
    ref = torch.from_numpy(b["image_uint8_bgr"].numpy()[..., ::-1].copy()).permute(2, 0, 1).float()
    mine = out.images[0].add(1).mul(127.5)
    # The published code truncates (x+1)/2*255 to uint8, we keep floats: with equal decodes mine - ref lies in
    # [0, 1). The decodes themselves may differ by the VAE decode tolerance (times 127.5 in pixel units).
    slack = 127.5 * (VAE_DECODE_TOL["atol"] + VAE_DECODE_TOL["rtol"])  # |x| <= 1
    gap = mine - ref
    record_property("b.image(model) - published uint8", f"in [{gap.min().item():.4g}, {gap.max().item():.4g}] "
                    f"(bound [-{slack:.3g}, 1 + {slack:.3g}))")
    assert gap.min() >= -slack and gap.max() < 1 + slack, (gap.min().item(), gap.max().item(), slack)


# ----------------------------------------------------------------------------------------------- released layout


def _structure(keys) -> set[str]:
    return {re.sub(r"\.\d+\.", ".N.", k) for k in keys}


def test_official_preset_matches_released_layout(fixture_weights):
    model = VARGPT(official_config(), device="meta")
    sd = model.state_dict()
    counts: dict[str, int] = {}
    for k, v in model.named_parameters():
        counts[k.split(".")[0]] = counts.get(k.split(".")[0], 0) + v.numel()
    expected_m = {"visual": 675.8, "model": 7070.6, "lm_head": 545.0, "vae_local": 110.1, "vargpt_gen": 2204.6,
                  "image_gen_projector": 11.5, "image_gen_projector_out": 20.2, "sos_embedding": 310.6}
    assert {k: round(v / 1e6, 1) for k, v in counts.items()} == expected_m
    assert sum(counts.values()) == 10_948_395_235
    # same key structure as the released (fixture) state dict; the full VAE adds the channel-changing shortcuts
    extra = _structure(sd) - _structure(fixture_weights)
    assert extra and all(".nin_shortcut." in k and k.startswith("vae_local.") for k in extra)
    assert _structure(fixture_weights) <= _structure(sd)
    shapes = {"visual.patch_embed.proj.weight": (1280, 3, 2, 14, 14), "visual.merger.mlp.0.weight": (5120, 5120),
              "model.embed_tokens.weight": (152064, 3584), "model.layers.27.self_attn.k_proj.weight": (512, 3584),
              "lm_head.weight": (152064, 3584), "vargpt_gen.cfg_uncond": (512, 2048),
              "vargpt_gen.block_chunks.7.module.3.ffn.fc1.weight": (8192, 2048),
              "vargpt_gen.text_proj_for_sos.ca.mat_q": (1, 16, 128), "vargpt_gen.head.weight": (64, 2048),
              "vargpt_gen.lvl_embed.weight": (15, 2048), "vae_local.quantizer.lfq.mask": (32,),
              "image_gen_projector.mlp.2.weight": (3584, 2048), "image_gen_projector_out.mlp.2.weight": (2048, 3584),
              "sos_embedding.weight": (151658, 2048)}
    for k, shape in shapes.items():
        assert tuple(sd[k].shape) == shape, k


# ----------------------------------------------------------------------------------------------- checkpoints


def test_save_load_round_trip_ours(tiny_model, tiny_dir):
    assert (tiny_dir / "model.safetensors.index.json").is_file()  # sharded
    assert json.loads((tiny_dir / "config.json").read_text())["preset"] == "tiny"
    loaded = VARGPT.from_pretrained(tiny_dir, device="cpu")
    assert loaded.config == tiny_model.config
    a, b = tiny_model.state_dict(), loaded.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    bf16 = VARGPT.from_pretrained(tiny_dir, device="cpu", dtype="bf16")
    assert bf16.dtype == torch.bfloat16 and bf16.vargpt_gen.head.weight.dtype == torch.bfloat16


def test_convert_both_ways(fixture_model, tmp_path):
    released = tmp_path / "released"
    fixture_model.save_pretrained(released, layout="released")
    cfg, layout = read_config(released / "config.json")
    assert layout == "released" and cfg == fixture_model.config
    assert json.loads((released / "config.json").read_text())["special_tokens"]["image_gen_start_token_id"] == 264
    assert convert_checkpoint(released, tmp_path / "ours") == "vargpt"
    assert read_config(tmp_path / "ours" / "config.json")[1] == "vargpt"
    assert convert_checkpoint(tmp_path / "ours", tmp_path / "back") == "released"
    back = VARGPT.from_pretrained(tmp_path / "back", device="cpu")
    a, b = fixture_model.state_dict(), back.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # a released config.json without our extra entry: decoder/VAE sizes from the official preset
    d = json.loads((released / "config.json").read_text())
    del d["vargpt_config"]
    (released / "config.json").write_text(json.dumps(d))
    cfg, _ = read_config(released / "config.json")
    assert cfg.decoder == official_config().decoder and cfg.llm == fixture_model.config.llm


def test_checkpoint_errors(tiny_dir, tmp_path):
    broken = tmp_path / "missing_shard"
    shutil.copytree(tiny_dir, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=re.escape(shard.name)):
        VARGPT.from_pretrained(broken, device="cpu")

    mismatched = tmp_path / "mismatched"
    shutil.copytree(tiny_dir, mismatched)
    d = json.loads((mismatched / "config.json").read_text())
    d["llm"]["intermediate_size"] = 256
    (mismatched / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\..*config section llm"):
        VARGPT.from_pretrained(mismatched, device="cpu")

    d["llm"]["intermediate_size"] = 384
    d["decoder"]["colour"] = 1
    (mismatched / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="colour"):
        VARGPT.from_pretrained(mismatched, device="cpu")

    no_config = tmp_path / "no_config"
    shutil.copytree(tiny_dir, no_config)
    (no_config / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        VARGPT.from_pretrained(no_config, device="cpu")


# ----------------------------------------------------------------------------------------------- generation


class ScriptedTurn(LogitsProcessor):
    """Forces the answer "hi" <|image_gen_start|>, and after the image "ok" <|im_end|> (random weights would
    never emit the start token). Positions are counted from the prompt end, then from <|image_gen_end|>."""

    def __init__(self, prompt_len: int, tokens) -> None:
        self.prompt_len, self.t = prompt_len, tokens

    def __call__(self, input_ids, scores):
        out = torch.full_like(scores, -torch.inf)
        for b, row in enumerate(input_ids.tolist()):
            if self.t.image_gen_end in row:
                start, script = len(row) - row[::-1].index(self.t.image_gen_end), [ord("o"), ord("k"), self.t.im_end]
            else:
                start, script = self.prompt_len, [ord("h"), ord("i"), self.t.image_gen_start]
            out[b, script[min(len(row) - start, len(script) - 1)]] = 0
        return out


@torch.no_grad()
def test_mixed_turn_text_image_text(tiny_model):
    inputs = tiny_model.processor("Say hi, draw a circle, then say ok.")
    script = ScriptedTurn(inputs["input_ids"].shape[1], tiny_model.config.tokens)
    parts = Engine(tiny_model).generate_text(inputs["input_ids"], inputs["attention_mask"], max_new_tokens=12,
                                logits_processor=[script], image_size=64)[0]
    assert [type(p) for p in parts] == [str, torch.Tensor, str]
    assert parts[0] == "hi" and parts[2] == "ok" and parts[1].shape == (3, 64, 64)
    assert parts[1].min() >= -1 and parts[1].max() <= 1
    # without images the start token is suppressed and the text is plain transformers generate
    text = Engine(tiny_model).generate_text(inputs["input_ids"], max_new_tokens=4, images=False)[0]
    assert all(isinstance(p, str) for p in text)


@torch.no_grad()
@pytest.mark.parametrize("published", [False, True])
def test_batch_of_four_equals_single_calls(tiny_model, published):
    model = tiny_model
    model.config.compat.published_uncond_branch = published
    try:
        prompts = ["a red circle", "two blue squares on the left", "a green triangle", "three circles"]
        sampling = SamplingConfig(cfg_scale=3.0, tau=1.0, top_k=0, top_p=0.0)
        batch = Engine(model).generate_images(prompts, size=64, seed=100, sampling=sampling)
        assert batch.images.shape == (4, 3, 64, 64)
        for i, p in enumerate(prompts):
            single = Engine(model).generate_images(p, size=64, seed=[100 + i], sampling=sampling)
            for k in range(len(batch.bits)):
                assert torch.equal(batch.bits[k][i], single.bits[k][0]), (i, k)
            torch.testing.assert_close(batch.images[i], single.images[0], atol=1e-4, rtol=0)
        assert not torch.equal(batch.bits[-1][0], batch.bits[-1][1])
    finally:
        model.config.compat.published_uncond_branch = False


@torch.no_grad()
def test_editing_and_sizes(tiny_model):
    src = Image.fromarray(np.full((64, 64, 3), 200, dtype=np.uint8))
    out = Engine(tiny_model).edit_images([src], ["make it blue"], size=128, seed=0)
    assert out.images.shape == (1, 3, 128, 128)
    with pytest.raises(InputError, match="supported sizes"):
        Engine(tiny_model).generate_images("a circle", size=100)


# ----------------------------------------------------------------------------------------------- training


def _gen_batch(model: VARGPT, prompts: list[str], size: int = 64) -> dict:
    proc = VARGPTProcessor(model.processor.tokenizer, dataclasses.replace(
        model.config, image_gen_token_num=padded_tokens(schedule_for_size(size, size, model.config.vae.stride))))
    g = torch.Generator().manual_seed(0)
    samples = [proc.training_inputs([{"role": "user", "content": p}, {"role": "assistant", "content": "<image_gen>"}],
                                    [Image.new("RGB", (size, size))]) for p in prompts]
    batch = proc.pad(samples, padding_side="right")
    batch["gen_pixel_values"] = torch.rand(len(prompts), 3, size, size, generator=g) * 2 - 1
    return batch


def test_training_losses_consistent_condition_dropout(tiny_model):
    model = tiny_model
    batch = _gen_batch(model, ["a red circle", "two blue squares"])
    drop = drop_prompts(model, batch, torch.tensor([True, False]))
    null = null_prompt_ids(model.processor)
    assert drop["input_ids"][0, :len(null)].tolist() == null  # the null prompt replaces the prefix
    assert drop["input_ids"][0, len(null)] == model.config.tokens.image_gen_start
    assert torch.equal(drop["input_ids"][1, :batch["input_ids"].shape[1]], batch["input_ids"][1])
    model.train()
    try:
        a = training_losses(model, batch, generator=torch.Generator().manual_seed(3))
        b = training_losses(model, batch, generator=torch.Generator().manual_seed(3))
        assert set(a) >= {"loss", "text_loss", "bit_loss"} and torch.isfinite(a["loss"])
        assert a["loss"].item() == b["loss"].item()  # explicit generator: reproducible noise and dropout
        a["loss"].backward()
        assert model.vargpt_gen.head.weight.grad is not None and model.model.embed_tokens.weight.grad is not None
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    lp = image_logprobs(model, batch)
    assert lp.shape == (2,) and bool((lp < 0).all())
    with pytest.raises(InputError, match="gen_pixel_values"):
        training_losses(model, {k: v for k, v in batch.items() if k != "gen_pixel_values"})


def test_bad_prompt_inputs(tiny_model):
    img = Image.new("RGB", (32, 32))
    with pytest.raises(InputError, match="no <image> placeholder"):
        tiny_model.processor([{"role": "user", "content": "what is this?"}], [img])
    with pytest.raises(InputError, match="only 1 image placeholder"):
        tiny_model.processor([{"role": "user", "content": "<image> what?"}], [img, img])
    with pytest.raises(InputError, match="at most 4096"):
        Engine(tiny_model).generate_images("a " * 3000, size=64)


@torch.no_grad()
def test_cfg_one_skips_the_unconditional_rows(tiny_model):
    """cfg 1 at every scale: no unconditional branch, also in the default (cached) unconditional mode."""
    assert not tiny_model.config.compat.published_uncond_branch
    ids = torch.tensor([[5, 6, 7, tiny_model.config.tokens.image_gen_start]])
    one = SamplingConfig(cfg_scale=1.0, tau=0.5, top_k=900, top_p=0.97)
    a = Engine(tiny_model).generate_images(input_ids=ids, size=64, seed=3, sampling=one)
    b = Engine(tiny_model).generate_images(input_ids=ids, size=64, seed=3, sampling=one)
    guided = Engine(tiny_model).generate_images(input_ids=ids, size=64, seed=3,
                                        sampling=SamplingConfig(cfg_scale=3.0, tau=0.5, top_k=900, top_p=0.97))
    assert a.images.shape == (1, 3, 64, 64) and torch.equal(a.images, b.images)
    assert any(not torch.equal(x, y) for x, y in zip(a.bits, guided.bits, strict=True))


def test_text_loss_mean_per_sample(tiny_model):
    """``text_loss_mean='sample'``: each sample's CE averaged over its own tokens, then over samples."""
    model = tiny_model
    torch.manual_seed(1)
    H = model.config.llm.hidden_size
    hidden = torch.randn(2, 6, H)
    labels = torch.full((2, 6), -100)
    labels[0, 1:5] = torch.tensor([5, 6, 7, 8])  # 4 supervised tokens
    labels[1, 3] = 9  # 1 supervised token
    logits = model.lm_head(hidden).float()
    ce0 = torch.nn.functional.cross_entropy(logits[0, :4], labels[0, 1:5], reduction="none")
    ce1 = torch.nn.functional.cross_entropy(logits[1, 2:3], labels[1, 3:4])
    try:
        assert text_ce(model, hidden, labels).item() == pytest.approx(torch.cat([ce0, ce1[None]]).mean().item())
        model.config.text_loss_mean = "sample"
        assert text_ce(model, hidden, labels).item() == pytest.approx(((ce0.mean() + ce1) / 2).item())
    finally:
        model.config.text_loss_mean = "token"


def test_early_exit_text_loss(tiny_model):
    """``early_exit_weight``: the text CE is also taken at an earlier LLM block's output (through the final norm and
    lm_head) and added with its weight; the hook that reads the block is gone afterwards."""
    model, proc = tiny_model, tiny_model.processor
    samples = [proc.training_inputs([{"role": "user", "content": f"<image>\n{q}"},
                                     {"role": "assistant", "content": a}], [Image.new("RGB", (64, 64), rgb)])
               for q, a, rgb in (("What colour is it?", "red", (200, 0, 0)), ("Is there a circle?", "no", (9, 9, 9)))]
    batch = proc.pad(samples, padding_side="right")
    layer, weight = 2, 0.5
    block = model.vlm.model.language_model.layers[layer - 1]
    with torch.no_grad():
        base = training_losses(model, batch)
        hs = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")},
                   output_hidden_states=True).hidden_states
        want = text_ce(model, model.vlm.model.language_model.norm(hs[layer]), batch["labels"])
        hooks = dict(block._forward_hooks)  # transformers adds its own for output_hidden_states
        model.config.early_exit_layer, model.config.early_exit_weight = layer, weight
        try:
            got = training_losses(model, batch)
        finally:
            model.config.early_exit_layer, model.config.early_exit_weight = 0, 0.0
        again = training_losses(model, batch)
    assert "early_loss" not in base and "early_loss" not in again
    assert got["early_loss"].item() == pytest.approx(want.item(), rel=1e-5)
    assert got["early_loss"].item() != pytest.approx(got["text_loss"].item(), rel=1e-3)
    assert got["loss"].item() == pytest.approx(base["loss"].item() + weight * want.item(), rel=1e-5)
    assert dict(block._forward_hooks) == hooks
    n = model.config.llm.num_hidden_layers
    with pytest.raises(ConfigError, match="early_exit_layer"):
        dataclasses.replace(model.config, early_exit_layer=n).validate()
    with pytest.raises(ConfigError, match="early_exit_weight"):
        dataclasses.replace(model.config, early_exit_weight=0.5).validate()
