"""Optional source conditioning of the visual decoder for editing (``decoder.source_condition``, VAREdit-style):
off by default and in the released layout; zero-initialised (a model that turns it on starts equal to one without
it); the source's scale-k bits sit at the positions predicting scale k (and, with source_copy, reach the bit logits
through a gate that starts open, so a large copy gain makes the model a copier); training batches carry the source of
edit rows only; both CFG rows of sampling get it; checkpoints keep it; the residual source input is the same in
training and sampling."""

from __future__ import annotations

import dataclasses
import json
from contextlib import contextmanager
from unittest import mock

import pytest
import torch

from conftest import write_shapesworld
from vargpt.config import DecoderConfig, SamplingConfig, VARGPTConfig, official_config, tiny_config
from vargpt.data.records import Collator, RecordDataset, gen_image_tensor, read_records
from vargpt.engine import Engine
from vargpt.engine.loop import sample_image_tokens
from vargpt.errors import ConfigError, InputError
from vargpt.models.generation import source_codes
from vargpt.models.vargpt import VARGPT
from vargpt.models.visual_decoder import GATE_OPEN, DecoderCondition, VisualDecoder
from vargpt.processing import ByteTokenizer, VARGPTProcessor
from vargpt.scales import schedule_for_grid
from vargpt.training import objective
from vargpt.training.losses import bit_loss
from vargpt.training.objective import image_logprobs, training_losses
from vargpt.training.recipe import recipe_from_dict
from vargpt.training.trainer import build_model

CFG = tiny_config()
ON = dataclasses.replace(CFG, decoder=dataclasses.replace(CFG.decoder, source_condition=True))
SIZE = 64


@pytest.fixture(scope="module")
def models() -> tuple[VARGPT, VARGPT]:
    """The same seeded tiny model without and with source conditioning."""
    torch.manual_seed(0)
    off = VARGPT(CFG)
    torch.manual_seed(0)
    on = VARGPT(ON)
    return off, on


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """One ShapesWorld edit record, then one text-to-image record (records.jsonl + images)."""
    recs = write_shapesworld(tmp_path_factory.mktemp("sw"), ["edit", "t2i"], SIZE)
    assert [r.task for r in recs] == ["edit", "t2i"]
    return recs


def _dataset(model: VARGPT, recs, source_condition: bool = True) -> RecordDataset:
    return RecordDataset(recs, model.require_processor(), image_size=SIZE, stride=model.config.vae.stride,
                         pad_multiple=model.config.decoder.pad_to_multiplier, source_condition=source_condition)


def _edit(recs) -> tuple:
    from vargpt.imageio import load_image

    rec = recs[0]
    instruction = rec.messages[0]["content"].removeprefix("<image>\n")
    return load_image(rec.images[0]), load_image(rec.images[1]), instruction


def test_source_gets_the_target_crop(records, tmp_path):
    """``gen_transform: released`` crops at random: the source is cropped like its target (same offsets)."""
    rec = records[0]
    row = {"id": "same", "messages": rec.messages, "images": [str(rec.images[0])] * 2}
    (tmp_path / "r.jsonl").write_text(json.dumps(row) + "\n")
    root = rec.images[0].parents[1]  # the images stay in the dataset: its directory is the data root
    ds = RecordDataset(read_records(tmp_path / "r.jsonl", root=root), VARGPTProcessor(ByteTokenizer(CFG.tokens), CFG),
                       image_size=SIZE, stride=CFG.vae.stride, gen_transform="released", source_condition=True)
    crops = set()
    for epoch in range(4):
        s = ds[(0, epoch)]["sample"]
        assert torch.equal(s["gen_source_pixel_values"], s["gen_pixel_values"])
        assert s["gen_source_mask"].tolist() == [True]
        crops.add(s["gen_pixel_values"].sum().item())
    assert len(crops) > 1  # the crop did move between epochs


def _schedule(model: VARGPT):
    return Engine(model).schedule_for(SIZE)


@contextmanager
def _embed(model: VARGPT, seed: int = 0, std: float = 0.5):
    """``source_embed`` set to random weights for the block; zero again afterwards."""
    emb = model.vargpt_gen.source_embed
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(emb.weight.shape, generator=g) * std)
        emb.bias.copy_(torch.randn(emb.bias.shape, generator=g) * std)
    try:
        yield emb
    finally:
        with torch.no_grad():
            emb.weight.zero_()
            emb.bias.zero_()


@contextmanager
def _capture(decoder: VisualDecoder, method: str):
    """Record the `DecoderCondition` each call of ``decoder.<method>`` gets."""
    seen: list[DecoderCondition] = []
    orig = getattr(decoder, method)

    def spy(x, cond, *args, **kwargs):
        seen.append(cond)
        return orig(x, cond, *args, **kwargs)

    with mock.patch.object(decoder, method, side_effect=spy):
        yield seen


# ----------------------------------------------------------------------------------------------- off by default


def test_off_by_default_and_absent_from_the_released_layout(models):
    off, on = models
    assert not DecoderConfig().source_condition
    assert not CFG.decoder.source_condition and not official_config().decoder.source_condition
    with torch.device("meta"):
        official = VisualDecoder(official_config().decoder, official_config().vae.codebook_dim)
    assert not any("source_embed" in k for k in official.state_dict())
    assert not any("source_embed" in k for k in off.state_dict())
    assert {k for k in on.state_dict() if "source_embed" in k} == {"vargpt_gen.source_embed.weight",
                                                                   "vargpt_gen.source_embed.bias"}
    # config round trip; configs written before the field existed read as off
    assert VARGPTConfig.from_dict(json.loads(json.dumps(ON.to_dict()))).decoder.source_condition
    old = CFG.to_dict()
    del old["decoder"]["source_condition"]
    assert VARGPTConfig.from_dict(old) == CFG
    with pytest.raises(InputError, match="source_condition"):
        off.vargpt_gen.source_term(torch.zeros(1, 5, CFG.vae.codebook_dim))


# ----------------------------------------------------------------------------------------------- zero init


def test_zero_init_equals_the_model_without_it(models, records):
    off, on = models
    sd_off, sd_on = off.state_dict(), on.state_dict()
    assert all(torch.equal(sd_off[k], sd_on[k]) for k in sd_off)  # the same seeded build otherwise
    assert not on.vargpt_gen.source_embed.weight.any() and not on.vargpt_gen.source_embed.bias.any()
    src, _, instruction = _edit(records)
    a = Engine(off).edit_images([src], [instruction], size=SIZE, seed=0)
    b = Engine(on).edit_images([src], [instruction], size=SIZE, seed=0)
    assert torch.equal(a.images, b.images)
    assert all(torch.equal(x, y) for x, y in zip(a.bits, b.bits, strict=True))
    batch = Collator(on.require_processor())([_dataset(on, records)[i] for i in (0, 1)])
    losses = []
    for model in (off, on):
        model.train()
        try:
            with torch.no_grad():
                losses.append(training_losses(model, batch, generator=torch.Generator().manual_seed(3)))
        finally:
            model.eval()
    assert all(losses[0][k].item() == losses[1][k].item() for k in ("loss", "text_loss", "bit_loss"))
    assert torch.equal(image_logprobs(off, batch), image_logprobs(on, batch))


# ----------------------------------------------------------------------------------------------- behaviour


@torch.no_grad()
def test_source_reaches_the_output_through_the_decoder_only(models, records):
    off, on = models
    src, tgt, instruction = _edit(records)
    prompt = Engine(on).encode_prompts([f"<image>\n{instruction}"], [src])
    ids = {k: getattr(prompt, k) for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}

    def run(source, model=on):  # same prompt (vision tower sees src); the decoder's source varies
        return Engine(model).generate_images(**ids, source_images=[source], size=SIZE, seed=0)

    same_zero = run(tgt)
    assert all(torch.equal(x, y) for x, y in zip(run(src).bits, same_zero.bits, strict=True))
    with _embed(on):
        with _capture(on.vargpt_gen, "forward_step") as conds:
            from_src = run(src)
        from_tgt = run(tgt)
        assert any(not torch.equal(x, y) for x, y in zip(from_src.bits, from_tgt.bits, strict=True))
        assert any(not torch.equal(x, y) for x, y in zip(from_src.bits, same_zero.bits, strict=True))
        # both CFG rows (cond, then uncond) carry the same non-zero source term
        s = conds[0].source_BLD
        assert s.shape[0] == 2 and s[0].abs().sum() > 0 and torch.equal(s[0], s[1])
        assert torch.equal(Engine(on).edit_images([src], [instruction], size=SIZE, seed=0).images, from_src.images)
        # text-to-image has no source: unchanged
        t2i_on = Engine(on).generate_images(["a red circle", "two blue squares"], size=SIZE, seed=5)
    t2i_off = Engine(off).generate_images(["a red circle", "two blue squares"], size=SIZE, seed=5)
    assert torch.equal(t2i_on.images, t2i_off.images)
    with pytest.raises(InputError, match="source image"):
        Engine(on).generate_images(**ids, source_images=[src, tgt], size=SIZE, seed=0)


def test_training_batch_carries_edit_sources_and_trains_source_embed(models, records):
    off, on = models
    ds = _dataset(on, records)
    batch = Collator(on.require_processor())([ds[0], ds[1]])  # an edit row, then a t2i row
    src, _, _ = _edit(records)
    assert batch["tasks"] == ["edit", "t2i"]
    assert batch["gen_source_mask"].tolist() == [True, False]
    assert batch["gen_source_pixel_values"].shape == batch["gen_pixel_values"].shape == (2, 3, SIZE, SIZE)
    assert torch.equal(batch["gen_source_pixel_values"][0], gen_image_tensor(src, (SIZE, SIZE), "resize"))
    assert not batch["gen_source_pixel_values"][1].any()
    no_source = Collator(on.require_processor())([_dataset(on, records, False)[i] for i in (0, 1)])
    assert not any(k.startswith("gen_source") for k in no_source)  # built only for source-conditioned models
    assert torch.equal(no_source["gen_pixel_values"], batch["gen_pixel_values"])

    on.train()
    try:
        out = training_losses(on, batch, generator=torch.Generator().manual_seed(1))
        out["loss"].backward()
        emb = on.vargpt_gen.source_embed
        assert emb.weight.grad is not None and emb.weight.grad.abs().sum() > 0 and emb.bias.grad.abs().sum() > 0
        # condition dropout replaces the prompt, not the source: the dropped row keeps its term, the t2i row has none
        dropped = []
        drop = objective.drop_prompts

        def spy(model, b, drop_B):
            dropped.append(drop_B.tolist())
            return drop(model, b, drop_B)

        with _embed(on), torch.no_grad(), _capture(on.vargpt_gen, "forward_train") as conds, \
                mock.patch.object(on.config.decoder, "cond_drop_rate", 0.99), \
                mock.patch.object(objective, "drop_prompts", side_effect=spy):
            training_losses(on, batch, generator=torch.Generator().manual_seed(1))
            want = source_codes(on.vae_local, on.vargpt_gen, batch["gen_source_pixel_values"], _schedule(on),
                                batch["gen_source_mask"])
        assert dropped and dropped[0][0]  # the edit row's prompt was replaced by the null prompt
        got = conds[0].source_BLD
        assert got[0].abs().sum() > 0 and not got[1].any()
        torch.testing.assert_close(got, want)
    finally:
        on.zero_grad(set_to_none=True)
        on.eval()


@torch.no_grad()
def test_source_codes_sit_at_the_positions_predicting_their_scale(models, records):
    """source == target: the codes at block k are the target's scale-k bit labels as +-1 (what block k is trained to
    predict); the block input gets source_embed of them."""
    _, on = models
    batch = Collator(on.require_processor())([_dataset(on, records)[0]])
    batch["gen_source_pixel_values"] = batch["gen_pixel_values"].clone()
    schedule = _schedule(on)
    with _embed(on) as emb, _capture(on.vargpt_gen, "forward_train") as conds:
        out, _ = objective.teacher_forced(on, batch)
        logits, labels, sched = out.gen_logits_BLV, out.bit_labels_BLD, out.schedule
        codes = conds[0].source_BLD
        assert tuple(sched) == tuple(schedule) and codes.shape == labels.shape and codes.shape[:2] == logits.shape[:2]
        bits = on.vae_local.encode(batch["gen_pixel_values"], schedule).bits
        start = 0
        for k, (_, h, w) in enumerate(schedule):
            block = slice(start, start + h * w)
            assert torch.equal(labels[:, block], bits[k].flatten(1, 2))  # block k predicts scale k
            assert torch.equal(codes[:, block], bits[k].flatten(1, 2).float() * 2 - 1)
            start += h * w
        assert start == codes.shape[1]
        torch.testing.assert_close(on.vargpt_gen.source_term(codes), emb(codes))


# ----------------------------------------------------------------------------------------------- decoder level


def _decoder() -> VisualDecoder:
    torch.manual_seed(0)
    cfg = DecoderConfig(depth=2, embed_dim=64, num_heads=2, block_chunks=1, text_channels=64, text_maxlen=32,
                        drop_path_rate=0.0, source_condition=True, source_copy=3.0)
    dec = VisualDecoder(cfg, codebook_dim=8).eval()
    with torch.no_grad():
        for p in dec.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return dec


@torch.no_grad()
def test_decoder_adds_the_source_term_to_the_block_input_of_each_scale():
    dec = _decoder()
    sched = schedule_for_grid(8, 8)
    L = sum(t * h * w for t, h, w in sched)
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 2, (2, L, 8), generator=g).float() * 2 - 1
    codes[1] = 0  # the second sample has no source
    term = dec.source_term(codes)
    assert term[0].abs().sum() > 0 and not term[1].any()
    ctx = torch.randn(2, 3, 64, generator=g)
    plain = dec.condition(dec.encode_condition(torch.randn(2, 1, 64, generator=g)), ctx)
    with_src = dataclasses.replace(plain, source_BLD=codes)
    x = torch.randn(2, L, 64, generator=g)
    # the copy gate on a hidden state: sigmoid(GATE_OPEN + source_gate(head_nm(h))) per position
    h = torch.randn(2, L, 64, generator=g)
    gate = torch.sigmoid(dec.source_gate(dec.head_nm(h, plain.cond_BD)) + GATE_OPEN)
    assert gate.std() > 0  # depends on the position
    half = 0.5 * 3.0 * gate * codes
    torch.testing.assert_close(dec.get_logits(h, plain.cond_BD, codes) - dec.get_logits(h, plain.cond_BD),
                               torch.stack([-half, half], dim=-1).flatten(-2))
    with torch.no_grad():  # a constant gate, so the copy term of the whole forward is known
        dec.source_gate.weight.zero_()
    half = 0.5 * 3.0 * torch.sigmoid(dec.source_gate.bias + GATE_OPEN) * codes
    copy = torch.stack([-half, half], dim=-1).flatten(-2)
    full = dec.forward_train(x, with_src, sched)
    assert copy[0].abs().sum() > 0 and not copy[1].any()
    torch.testing.assert_close(full, dec.forward_train(x + term, plain, sched) + copy)
    cache, start = dec.new_cache(2, sched), 0
    for k, (_, h, w) in enumerate(sched):  # the KV-cached step adds exactly its scale's slice
        step = dec.forward_step(x[:, start:start + h * w], with_src, sched, k, cache)
        torch.testing.assert_close(step, full[:, start:start + h * w], atol=1e-5, rtol=1e-5)
        start += h * w
    # CFG batches: a condition without a source gets zero rows when concatenated with one that has it
    both = DecoderCondition.cat(with_src, plain)
    assert torch.equal(both.source_BLD[:2], codes) and not both.source_BLD[2:].any()
    sampling = SamplingConfig(cfg_scale=2.0, tau=1.0, top_k=0, top_p=0.0)
    runs = [sample_image_tokens(dec, DecoderCondition.cat(with_src, with_src), sched, sampling, use_cache=c,
                                return_logits=True, generator=torch.Generator().manual_seed(3)) for c in (True, False)]
    for a, b in zip(runs[0].logits, runs[1].logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- checkpoints


def test_checkpoints_keep_the_flag_and_weights_and_old_weights_start_at_zero(models, tmp_path):
    off, on = models
    with _embed(on, seed=4) as emb:
        on.save_pretrained(tmp_path / "on")
        back = VARGPT.from_pretrained(tmp_path / "on")
        assert back.config.decoder.source_condition
        assert json.loads((tmp_path / "on" / "config.json").read_text())["decoder"]["source_condition"] is True
        assert torch.equal(back.vargpt_gen.source_embed.weight, emb.weight)
        assert torch.equal(back.vargpt_gen.source_embed.bias, emb.bias)
    # weights saved without the term, loaded into a config with it: zero term, the rest unchanged
    off.save_pretrained(tmp_path / "off")
    grown = VARGPT.from_pretrained(tmp_path / "off", config=ON)
    assert not grown.vargpt_gen.source_embed.weight.any() and not grown.vargpt_gen.source_embed.bias.any()
    assert torch.equal(grown.vargpt_gen.head.weight, off.vargpt_gen.head.weight)
    # a recipe turns it on over a checkpoint with model.config_overrides
    recipe = recipe_from_dict({
        "name": "edit_src", "stage": "edit", "out_dir": str(tmp_path / "runs"),
        "model": {"checkpoint": str(tmp_path / "off"), "preset": None,
                  "config_overrides": {"decoder": {"source_condition": True}}},
        "data": {"sources": [{"path": str(tmp_path / "data"), "format": "shapesworld"}], "image_size": SIZE}})
    model = build_model(recipe)
    assert model.config.decoder.source_condition and model.vargpt_gen.cfg.source_condition
    assert not model.vargpt_gen.source_embed.weight.any()


# ----------------------------------------------------------------------------------------------- residual source input

RES = dataclasses.replace(CFG, decoder=dataclasses.replace(CFG.decoder, source_condition=True, source_input="residual",
                                                          source_copy=3.0))


def test_source_input_is_validated():
    with pytest.raises(ConfigError, match="source_input"):
        dataclasses.replace(CFG.decoder, source_input="pixels").validate()
    with pytest.raises(ConfigError, match="source_copy"):
        dataclasses.replace(CFG.decoder, source_copy=-1.0).validate()


@torch.no_grad()
def test_a_large_copy_gain_makes_the_edit_path_a_copier(records, tmp_path):
    """Residual source input with a huge copy gain and the gate at its start (open): whatever the (random) model
    says, every scale's drawn bits are the source's own multi-scale bits, through the engine's edit path with CFG.
    A checkpoint saved without the gate loads with it open."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(RES, decoder=dataclasses.replace(RES.decoder, source_copy=1e4))
    plain = VARGPT(dataclasses.replace(RES, decoder=dataclasses.replace(RES.decoder, source_copy=0.0)))
    plain.save_pretrained(tmp_path / "plain")
    model = VARGPT.from_pretrained(tmp_path / "plain", config=cfg).eval()
    assert not model.vargpt_gen.source_gate.weight.any() and not model.vargpt_gen.source_gate.bias.any()
    src, _, instruction = _edit(records)
    sampling = SamplingConfig(cfg_scale=3.0, tau=1.0)
    out = Engine(model).edit_images([src], [instruction], size=SIZE, seed=0, sampling=sampling)
    px = gen_image_tensor(src, (SIZE, SIZE), "resize")[None]
    own = model.vae_local.encode(px, _schedule(model)).bits
    assert all(torch.equal(a, b) for a, b in zip(out.bits, own, strict=True))
    free = Engine(plain).edit_images([src], [instruction], size=SIZE, seed=0, sampling=sampling)
    assert any(not torch.equal(a, b) for a, b in zip(free.bits, own, strict=True))  # not a copier without it


@torch.no_grad()
def test_residual_of_an_unchanged_picture_is_its_labels():
    """source == target: at every scale the residual source term points where the labels do (its signs are the
    bits the scale must draw), also with self-correction's corrupted running sums."""
    from vargpt.config import SelfCorrectionConfig
    from vargpt.models.quantizer import multiscale_bits, source_residual

    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 8, 8, 8, generator=g)
    sched = schedule_for_grid(8, 8)
    for sc in (None, SelfCorrectionConfig(strength=0.3)):
        tok = multiscale_bits(z, sched, self_correction=sc, generator=torch.Generator().manual_seed(1), source_BDHW=z)
        assert torch.equal((tok.source_BLD > 0).to(torch.uint8), tok.labels_BLD)
    assert multiscale_bits(z, sched).source_BLD is None
    r = source_residual(z, torch.zeros_like(z), (2, 2))
    assert r.shape == (3, 4, 8) and torch.allclose(r.norm(dim=-1), torch.full((3, 4), 8**0.5))


@torch.no_grad()
def test_residual_source_term_is_the_same_in_training_and_sampling(records):
    """Teacher-forced training and the sampling loop (fed the target's bits) build the same per-scale source term,
    so the decoder sees in sampling what it was trained on; t2i rows of a batch get none."""
    torch.manual_seed(0)
    model = VARGPT(RES).eval()
    batch = Collator(model.require_processor())([_dataset(model, records)[i] for i in (0, 1)])
    with _embed(model) as emb, _capture(model.vargpt_gen, "forward_train") as trained:
        objective.teacher_forced(model, batch)
        term = trained[0].source_BLD
        assert term[0].abs().sum() > 0 and not term[1].any()
        schedule = _schedule(model)
        tokens = model.vae_local.encode(batch["gen_pixel_values"][:1], schedule,
                                        source=batch["gen_source_pixel_values"][:1])
        src, _, _ = _edit(records)
        latent = model.vae_local.encode_latent(batch["gen_source_pixel_values"][:1])
        dec = model.vargpt_gen
        cond = dec.condition(dec.encode_condition(torch.randn(1, 1, RES.decoder.text_channels)),
                             torch.randn(1, 2, RES.decoder.embed_dim))
        with _capture(dec, "forward_step") as steps:
            sample_image_tokens(dec, DecoderCondition.cat(cond, cond), schedule, SamplingConfig(cfg_scale=2.0),
                                teacher_bits=tokens.bits, source_latent=latent,
                                generator=torch.Generator().manual_seed(0))
        sampled = steps[-1].source_BLD
        assert sampled.shape[0] == 2 and torch.equal(sampled[0], sampled[1])  # both CFG rows
        # the training sums add straight-through codes, the loop codes rebuilt from bits: equal up to fp32 rounding,
        # which normalising a small residual amplifies
        torch.testing.assert_close(sampled[:1], term[:1], atol=1e-4, rtol=1e-4)
        # the engine's edit path hands the loop the source latent
        out = Engine(model).edit_images([src], ["Remove the circle."], size=SIZE, seed=0)
        assert out.images.shape[0] == 1
        assert emb.weight.abs().sum() > 0


def test_labels_keep_the_source_latent_where_the_edit_leaves_the_picture():
    """Positions whose patch and neighbours are unchanged take the source's latent (so an edit's labels there are
    what the source implies); positions near a change keep the target's."""
    from vargpt.models.vae import keep_unchanged

    g = torch.Generator().manual_seed(0)
    src_px = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    tgt_px = src_px.clone()
    tgt_px[:, :, 0:4, 0:4] = 1.0  # a change inside patch (0, 0) of an 8-pixel stride
    z_src, z_tgt = torch.randn(2, 1, 5, 4, 4, generator=g)
    mixed = keep_unchanged(z_tgt, z_src, tgt_px, src_px, 8)
    near = torch.zeros(4, 4, dtype=torch.bool)
    near[:2, :2] = True  # the changed patch and its neighbours
    assert torch.equal(mixed[0][:, near], z_tgt[0][:, near]) and torch.equal(mixed[0][:, ~near], z_src[0][:, ~near])
    assert torch.equal(keep_unchanged(z_tgt, z_src, src_px, src_px, 8), z_src)


def test_copy_gate_loss_targets_the_positions_a_copy_gets_right(records):
    """The gate's target is 1 where every label bit is the sign of the source code (0 elsewhere), over rows with a
    source only; training reports it and adds it with ``copy_gate_loss_weight``."""
    from vargpt.training.objective import copy_gate_loss

    source = torch.tensor([[[1.0, -2.0], [0.5, 0.5], [-1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[[1, 0], [1, 0], [0, 1]], [[1, 1], [0, 0], [1, 0]]], dtype=torch.uint8)
    gate = torch.tensor([[3.0, -3.0, 0.0], [9.0, 9.0, 9.0]])  # the source-less row's values must not count
    want = torch.nn.functional.binary_cross_entropy_with_logits(gate[0], torch.tensor([1.0, 0.0, 1.0]))
    torch.testing.assert_close(copy_gate_loss(gate, source, labels), want)
    assert copy_gate_loss(gate, torch.zeros_like(source), labels).item() == 0.0

    torch.manual_seed(0)
    cfg = dataclasses.replace(RES, copy_gate_loss_weight=0.5)
    model = VARGPT(cfg)
    batch = Collator(model.require_processor())([_dataset(model, records)[i] for i in (0, 1)])
    model.train()
    try:
        out = training_losses(model, batch, generator=torch.Generator().manual_seed(1))
        out["loss"].backward()
    finally:
        model.eval()
    assert out["gate_loss"] > 0 and model.vargpt_gen.source_gate.weight.grad.abs().sum() > 0
    torch.testing.assert_close(out["loss"], 1.0 * out["text_loss"] + 3.0 * out["bit_loss"] + 0.5 * out["gate_loss"])
    with pytest.raises(ConfigError, match="copy_gate_loss_weight"):
        dataclasses.replace(RES, copy_gate_loss_weight=-1.0).validate()


# ----------------------------------------------------------------------------------------------- source context

CTX = dataclasses.replace(RES, decoder=dataclasses.replace(RES.decoder, source_copy=0.0, source_context=True))
NO_CTX = dataclasses.replace(CTX, decoder=dataclasses.replace(CTX.decoder, source_context=False))


def test_source_context_needs_the_residual_source_input():
    with pytest.raises(ConfigError, match="source_context"):
        dataclasses.replace(CFG.decoder, source_context=True).validate()
    with pytest.raises(ConfigError, match="source_context"):
        dataclasses.replace(CFG.decoder, source_condition=True, source_context=True).validate()
    CTX.decoder.validate()


def test_source_context_leaves_the_other_weights_of_a_seeded_build_alone():
    torch.manual_seed(0)
    plain = VARGPT(NO_CTX).state_dict()
    torch.manual_seed(0)
    ctx = VARGPT(CTX).state_dict()
    extra = set(ctx) - set(plain)
    assert extra == {"vargpt_gen.source_ctx.weight", "vargpt_gen.source_ctx.bias", "vargpt_gen.source_ctx_row.weight",
                     "vargpt_gen.source_ctx_col.weight"}
    assert all(torch.equal(plain[k], ctx[k]) for k in plain)


def test_source_context_tokens_carry_the_latent_and_its_place():
    torch.manual_seed(0)
    dec = VARGPT(CTX).vargpt_gen
    latent = torch.randn(2, CTX.vae.codebook_dim, 3, 4)
    tokens = dec.source_context_tokens(latent)
    assert tokens.shape == (2, 12, CTX.decoder.embed_dim)
    # token (r, c) = source_ctx(latent[:, :, r, c]) + row r + column c, in reading order
    want = dec.source_ctx(latent[:, :, 2, 1]) + dec.source_ctx_row.weight[2] + dec.source_ctx_col.weight[1]
    torch.testing.assert_close(tokens[:, 2 * 4 + 1], want)
    with pytest.raises(InputError, match="rope_max_grid"):
        dec.source_context_tokens(torch.randn(1, CTX.vae.codebook_dim, 1, CTX.decoder.rope_max_grid + 1))


def test_source_context_is_appended_in_training_and_sampling(records):
    """Teacher forcing appends the edit source's tokens to the context of its row and masks them out for a
    text-to-image row; the engine's edit path appends the same tokens to both CFG rows; they train."""
    torch.manual_seed(0)
    model = VARGPT(CTX)
    batch = Collator(model.require_processor())([_dataset(model, records)[i] for i in (0, 1)])
    grid = SIZE // CTX.vae.stride
    with torch.no_grad(), _capture(model.vargpt_gen, "forward_train") as trained:
        objective.teacher_forced(model, batch)
    cond = trained[0]
    latent = model.vae_local.encode_latent(batch["gen_source_pixel_values"][:1])
    with torch.no_grad():
        tokens = model.vargpt_gen.source_context_tokens(latent)
    torch.testing.assert_close(cond.context_BNC[:1, -grid * grid:], tokens)
    assert cond.context_mask_BN[0, -grid * grid:].all() and not cond.context_mask_BN[1, -grid * grid:].any()

    src, _, instruction = _edit(records)
    with torch.no_grad(), _capture(model.vargpt_gen, "forward_step") as steps:
        Engine(model).edit_images([src], [instruction], size=SIZE, seed=0, sampling=SamplingConfig(cfg_scale=3.0))
    ctx, mask = steps[0].context_BNC, steps[0].context_mask_BN
    assert ctx.shape[0] == 2 and mask is not None  # cond + uncond rows (contexts of different lengths)
    for row, real in zip(ctx, mask, strict=True):  # each ends with the source's tokens, before its padding
        torch.testing.assert_close(row[real][-grid * grid:], tokens[0])

    model.train()
    losses = training_losses(model, batch, generator=torch.Generator().manual_seed(0))
    losses["loss"].backward()
    assert model.vargpt_gen.source_ctx.weight.grad.abs().sum() > 0


def test_a_checkpoint_without_source_context_loads_with_zero_tokens(tmp_path):
    torch.manual_seed(0)
    VARGPT(NO_CTX).save_pretrained(tmp_path / "res")
    model = VARGPT.from_pretrained(tmp_path / "res", config=CTX)
    dec = model.vargpt_gen
    assert not dec.source_context_tokens(torch.randn(1, CTX.vae.codebook_dim, 8, 8)).any()
    model.save_pretrained(tmp_path / "ctx")
    again = VARGPT.from_pretrained(tmp_path / "ctx")
    assert again.config.decoder.source_context
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(),
                                                   strict=True))


# ----------------------------------------------------------------------------------------------- guided bit loss


def test_guided_loss_is_the_bit_loss_of_the_guided_logits_of_edit_rows(records):
    """guided_loss_weight: the bit loss of cfg * cond + (1 - cfg) * uncond over the edit rows that kept their prompt
    (t2i rows and rows whose prompt was dropped get none), the unconditional logits from the same inputs without
    the prompt and without gradient; at cfg 1 it is the edit rows' own bit loss."""
    torch.manual_seed(0)
    model = VARGPT(dataclasses.replace(RES, guided_loss_weight=1.0, sampling=SamplingConfig(cfg_scale=3.0))).train()
    batch = Collator(model.require_processor())([_dataset(model, records)[i] for i in (0, 1)])  # an edit, a t2i row
    out, seen = objective.teacher_forced(model, batch)
    assert not seen["gen_dropped"].any()
    with torch.no_grad():
        drop = torch.ones(2, dtype=torch.bool)
        u = model.forward_generation(objective.drop_prompts(model, seen, drop),
                                     cond_BD=objective._start_condition(model, drop)).gen_logits_BLV
    guided = objective.guided_bit_loss(model, out, seen)
    want = bit_loss(3 * out.gen_logits_BLV[:1] - 2 * u[:1], out.bit_labels_BLD[:1])
    torch.testing.assert_close(guided, want)
    guided.backward()  # a gradient reaches the conditional row's parameters
    assert model.vargpt_gen.head.weight.grad.abs().sum() > 0
    model.zero_grad()
    model.config.sampling.cfg_scale = 1.0
    torch.testing.assert_close(objective.guided_bit_loss(model, out, seen),
                               bit_loss(out.gen_logits_BLV[:1], out.bit_labels_BLD[:1]))
    dropped = seen | {"gen_dropped": torch.tensor([True, False])}
    assert objective.guided_bit_loss(model, out, dropped).item() == 0.0
    losses = objective.training_losses(model, batch, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(losses["guided_loss"]) and "guided_loss" in losses
