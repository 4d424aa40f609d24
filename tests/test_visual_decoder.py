"""Visual decoder, generation projectors and the LLM-in-the-loop glue against the published numerics.

Fixtures (../shared/fixtures/official): (d) the teacher-forced training forward (gen logits, loss, gradient
norm) and (b) text-to-image sampling (per-scale logits teacher-forced, summed codes, sampled bits).

Tolerances: the published cross-attention rounds q/k/v and its output to bf16, so an fp32 difference of ~1e-7
upstream (other kernels, other CPUs, transformers 5 here vs 4.46 there) occasionally lands a cross-attention
input on the other side of a bf16 rounding boundary; that token's logits then differ by up to ~1e-3 while all
others agree within atol 1e-5 / rtol 1e-4. The decoder logits are therefore compared within the envelope that
this mechanism produces on our own model (`bf16_envelope`: derivation in its docstring); everything the
rounding does not touch is compared at fp32 precision (text logits, hidden states, codes), and sampled bits,
labels and ids exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from bf16_envelope import bf16_envelope, check_against_reference
from conftest import assert_close_recorded, load_fixture
from vargpt.config import CompatConfig, DecoderConfig, SamplingConfig
from vargpt.engine.loop import (
    LLMScaleHook,
    generation_condition,
    published_uncond_context,
    sample_from_prompt,
    sample_image_tokens,
)
from vargpt.errors import InputError
from vargpt.models import visual_decoder
from vargpt.models import vlm as V
from vargpt.models.generation import prompt_context, start_condition, teacher_forced_forward
from vargpt.models.projectors import GenProjector, SosEmbedding
from vargpt.models.vae import BSQVAE
from vargpt.models.visual_decoder import DecoderCondition, VisualDecoder, block_causal_mask, rope2d_table
from vargpt.scales import scale_schedule, schedule_for_grid
from vargpt.weights import load_into, released_to_vlm_keys, select_prefix

SCHED_256 = scale_schedule("0.06M")  # 7 scales, 521 tokens (fixtures b and d)



# ----------------------------------------------------------------------------------------------- official fixtures


@dataclass
class Official:
    cfg: object
    dec: VisualDecoder
    pin: GenProjector
    pout: GenProjector
    sos: SosEmbedding
    vlm: object
    vae: BSQVAE


@pytest.fixture(scope="module")
def official(fixture_config, fixture_weights) -> Official:
    cfg, W = fixture_config, fixture_weights
    assert cfg.compat.bf16_cross_attention  # the conformance setting
    dec = VisualDecoder(cfg.decoder, cfg.vae.codebook_dim, cfg.compat)
    dec.load_state_dict(select_prefix(W, "vargpt_gen."), strict=True)
    pin = GenProjector(cfg.decoder.embed_dim, cfg.llm.hidden_size)
    pin.load_state_dict(select_prefix(W, "image_gen_projector."), strict=True)
    pout = GenProjector(cfg.llm.hidden_size, cfg.decoder.embed_dim)
    pout.load_state_dict(select_prefix(W, "image_gen_projector_out."), strict=True)
    sos = SosEmbedding(cfg.tokens.image_gen_start, cfg.decoder.embed_dim)
    sos.load_state_dict(select_prefix(W, "sos_embedding."), strict=True)
    vlm = V.build_vlm(cfg, device="meta")
    load_into(vlm, released_to_vlm_keys(W))
    vae = BSQVAE(cfg.vae)
    vae.load_state_dict(select_prefix(W, "vae_local."), strict=True)
    return Official(cfg, dec.eval(), pin, pout, sos, vlm, vae.eval())


def test_released_keys_load_strictly(fixture_config, fixture_weights):
    dec = VisualDecoder(fixture_config.decoder, fixture_config.vae.codebook_dim)
    sd = select_prefix(fixture_weights, "vargpt_gen.")
    assert set(dec.state_dict()) == set(sd)
    assert len(sd) == 64
    sos = SosEmbedding(fixture_config.tokens.image_gen_start, fixture_config.decoder.embed_dim)
    assert sos.weight.shape == fixture_weights["sos_embedding.weight"].shape  # image_gen_start_id + 1 rows
    for name in ("image_gen_projector.", "image_gen_projector_out."):
        keys = set(select_prefix(fixture_weights, name))
        assert keys == {"ln_q.weight", "ln_q.bias", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"}


def _fixture_d_forward(o: Official, d: dict) -> tuple[Callable[[], object], object, VisualDecoder]:
    """Fixture (d)'s teacher-forced forward on a fresh decoder (condition dropout and DropPath off, as in (d)):
    a callable running it, the VAE tokens, the decoder."""
    ids, tok = d["input_ids"], o.cfg.tokens
    tokens = o.vae.encode(d["pixel_gen_values"], SCHED_256)  # fixture (d): self-correction strength 0
    dec = VisualDecoder(dataclasses.replace(o.cfg.decoder, drop_path_rate=0.0, cond_drop_rate=0.0),
                        o.cfg.vae.codebook_dim, o.cfg.compat)
    dec.load_state_dict(o.dec.state_dict())
    dec.train()
    forward = functools.partial(
        teacher_forced_forward, dec, o.pin, o.pout, o.sos, functools.partial(V.llm_forward, o.vlm),
        o.vlm.model.get_input_embeddings()(ids), ids, tokens.x_wo_prefix_BLD, SCHED_256, start_id=tok.image_gen_start,
        pad_id=tok.image_gen_pad, attention_mask_BS=d["attention_mask"])  # 640 slots: the 521 tokens zero-padded
    return forward, tokens, dec


def _fixture_d_gen_logits_envelope(o: Official, d: dict) -> dict[str, float]:
    forward, _, _ = _fixture_d_forward(o, d)
    with torch.no_grad():
        env = bf16_envelope(lambda: forward().gen_logits_BLV[0])
    return check_against_reference(env, d["gen_logits"][0])


def test_fixture_d_training_forward(official, fixtures_dir, record_property):
    """Released training forward: VAE bits -> decoder inputs -> projector -> LLM -> projector_out -> decoder."""
    o, d = official, load_fixture(fixtures_dir, "d_train")
    ids, tok = d["input_ids"], o.cfg.tokens
    forward, tokens, dec = _fixture_d_forward(o, d)
    assert torch.equal(tokens.labels_BLD, d["image_gen_labels"])
    out = forward()
    text_logits, logits = o.vlm.lm_head(out.hidden_BSH), out.gen_logits_BLV

    assert_close_recorded(record_property, "d.text_logits", text_logits, d["text_logits"], atol=1e-5, rtol=1e-4)
    assert logits.shape == d["gen_logits"].shape == (1, 521, 64)
    record_property("d.gen_logits", _fixture_d_gen_logits_envelope(o, d))

    # published loss: text CE over every next-token target with image pads ignored + 3 x mean bit CE
    labels = ids.masked_fill(ids == tok.image_gen_pad, -100)
    text_ce = F.cross_entropy(text_logits[0, :-1], labels[0, 1:])
    bit_ce = F.cross_entropy(logits.unflatten(-1, (-1, 2)).permute(0, 3, 1, 2), tokens.labels_BLD.long())
    loss = text_ce + 3.0 * bit_ce
    record_property("d.loss", f"rel diff {abs(loss.item() / d['loss'].item() - 1):.3g} (bound 1e-4)")
    assert loss.item() == pytest.approx(d["loss"].item(), rel=1e-4)

    modules = (o.vlm, dec, o.pin, o.pout, o.sos, o.vae)  # every parameter of the published model
    for m in modules:
        m.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad for m in modules for p in m.parameters() if p.grad is not None]
    norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads))
    for m in modules:
        m.zero_grad(set_to_none=True)
    record_property("d.grad_global_norm", f"rel diff {abs(norm.item() / d['grad_global_norm'].item() - 1):.3g} "
                    "(bound 1e-4)")
    assert norm.item() == pytest.approx(d["grad_global_norm"].item(), rel=1e-4)


def _mutations() -> dict[str, Callable[[], contextlib.AbstractContextManager]]:
    """One-line bugs that the tolerances above must catch (each patches one function of the decoder)."""
    vd = visual_decoder

    def scale_squared(q, k, v, mask, scale, bf16):  # 1/head_dim instead of 1/sqrt(head_dim)
        return cross_attend(q, k, v, mask, scale * scale, bf16)

    def halves_swapped(*args, **kwargs):  # 2-D RoPE: column angles where the row angles belong and back
        t = rope_table(*args, **kwargs)
        return torch.cat([t[..., t.shape[-1] // 2:], t[..., :t.shape[-1] // 2]], dim=-1)

    cross_attend, rope_table, ids_fn = vd._cross_attend, vd.rope2d_table, vd._scale_ids
    return {
        "cross-attention scale 1/d": lambda: mock.patch.object(vd, "_cross_attend", scale_squared),
        "RoPE row/column halves swapped": lambda: mock.patch.object(vd, "rope2d_table", halves_swapped),
        "block-causal mask sees the next scale": lambda: mock.patch.object(
            vd, "block_causal_mask", lambda s, device=None: ids_fn(s, device)[:, None] + 1 >= ids_fn(s, device)[None]),
        "level embedding of scale k+1": lambda: mock.patch.object(
            vd, "_scale_ids", lambda s, device: ids_fn(s, device) + 1),
    }


@pytest.mark.parametrize("mutation", list(_mutations()))
def test_fixture_d_catches_one_line_bugs(official, fixtures_dir, mutation, record_property):
    """Each one-line bug fails the conformance check of (d)'s decoder logits (item 2 of the tolerance design)."""
    o, d = official, load_fixture(fixtures_dir, "d_train")
    with _mutations()[mutation](), pytest.raises(AssertionError) as failure:
        _fixture_d_gen_logits_envelope(o, d)
    record_property("mutation caught", f"{mutation}: {str(failure.value).splitlines()[0][:200]}")


def _fixture_b_setup(o: Official, b: dict):
    """Prompt + <|image_gen_start|> through the LLM (cache A), cond/uncond conditions, published hook."""
    ids = b["generated_ids"][:, :-1]  # prompt + <|image_gen_start|>; the last generated token never enters
    cache = V.new_cache(o.vlm)
    hidden = V.llm_forward(o.vlm, o.vlm.model.get_input_embeddings()(ids), cache=cache)
    context, mask = prompt_context(hidden, ids, o.cfg.tokens.image_gen_start, o.pout)
    cond = generation_condition(o.dec, o.sos, context, mask)  # uncond rows: published cfg_uncond[:N] context
    hook = LLMScaleHook(functools.partial(V.llm_forward, o.vlm), o.pin, o.pout, cond_cache=cache, batch_size=1,
                        uncond_mode="published")
    return hidden, cond, hook


@torch.no_grad()
def test_fixture_b_teacher_forced_logits_and_codes(official, fixtures_dir, record_property):
    o, b = official, load_fixture(fixtures_dir, "b_t2i")
    hidden, cond, hook = _fixture_b_setup(o, b)
    torch.testing.assert_close(hidden, b["llm_hidden_states_before_image"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat([cond.context_BNC[0], cond.context_BNC[1]]), b["ca_kv_compact"],
                               atol=1e-5, rtol=1e-4)
    teacher = [b[f"bits_scale{k:02d}"][:, 0] for k in range(len(SCHED_256))]

    def run():  # the conditional branch continues the prompt's cache: each run starts from its own copy
        _, cond_, hook_ = _fixture_b_setup(o, b)
        return sample_image_tokens(o.dec, cond_, SCHED_256, SamplingConfig(), hook=hook_, teacher_bits=teacher,
                                   generator=torch.Generator().manual_seed(1234567), return_logits=True)

    out = run()
    refs = [b[f"gen_logits_scale{k:02d}"] for k in range(len(SCHED_256))]  # rows [cond, uncond]
    assert [tuple(x.shape) for x in out.logits] == [tuple(r.shape) for r in refs]
    env = bf16_envelope(lambda: torch.cat(run().logits, 1))  # [2, 521, 64]
    record_property("b.gen_logits (teacher-forced)", check_against_reference(env, torch.cat(refs, 1)))
    # the codes are sums of the teacher bits: exact up to the summation's own rounding
    torch.testing.assert_close(out.summed_codes_BDHW, b["summed_codes"], atol=1e-6, rtol=0)


@torch.no_grad()
def test_fixture_b_sampled_bits_same_seed(official, fixtures_dir):
    """Free sampling with the fixture's seed reproduces its bits (one multinomial per scale, CPU generator)."""
    o, b = official, load_fixture(fixtures_dir, "b_t2i")
    ids = b["generated_ids"][:, :-1]  # prompt + <|image_gen_start|>
    out = sample_from_prompt(o.dec, o.pin, o.pout, o.sos, functools.partial(V.llm_forward, o.vlm),
                             functools.partial(V.new_cache, o.vlm), o.vlm.model.get_input_embeddings()(ids), ids,
                             SCHED_256, SamplingConfig(cfg_scale=3.0, tau=0.5, top_k=900, top_p=0.97),
                             start_id=o.cfg.tokens.image_gen_start, generator=torch.Generator().manual_seed(1234567))
    flips = sum(int((out.bits[k] != b[f"bits_scale{k:02d}"][:, 0].long()).sum()) for k in range(len(SCHED_256)))
    assert flips == 0  # measured: 0 of 16,672 bits
    torch.testing.assert_close(out.summed_codes_BDHW, b["summed_codes"], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------- behaviour


SCHED_64 = schedule_for_grid(8, 8)  # 5 scales, 121 tokens (the tiny preset at 64 px)


def _tiny_decoder(seed: int = 0, **kw) -> VisualDecoder:
    torch.manual_seed(seed)
    kw = {"drop_path_rate": 0.0, **kw}
    cfg = DecoderConfig(depth=2, embed_dim=64, num_heads=2, block_chunks=1, text_channels=64, text_maxlen=32, **kw)
    dec = VisualDecoder(cfg, codebook_dim=8).eval()
    with torch.no_grad():  # released init leaves the heads near zero; make logits non-trivial
        for p in dec.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return dec


def _conditions(dec: VisualDecoder, lengths: list[int], seed: int) -> tuple[DecoderCondition, DecoderCondition]:
    g = torch.Generator().manual_seed(seed)
    C = dec.cfg.embed_dim
    text = torch.randn(len(lengths), 1, C, generator=g)
    ctx = torch.randn(len(lengths), max(lengths), C, generator=g)
    mask = torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]
    cond = dec.condition(dec.encode_condition(text), ctx, mask)
    uncond_ctx = dec.cfg_uncond[:1].expand(len(lengths), 1, C)
    uncond = dec.condition(dec.encode_condition(dec.uncond_text(len(lengths))), uncond_ctx)
    return cond, uncond


def _row(c: DecoderCondition, i: int, n: int) -> DecoderCondition:
    mask = None if c.context_mask_BN is None else c.context_mask_BN[i:i + 1, :n]
    return DecoderCondition(c.cond_BD[i:i + 1], c.gss_B16C[i:i + 1], c.context_BNC[i:i + 1, :n], mask)


@torch.no_grad()
def test_kv_cached_sampling_equals_uncached():
    dec = _tiny_decoder()
    cond, uncond = _conditions(dec, [3, 5], seed=1)
    both = DecoderCondition.cat(cond, uncond)
    lin = torch.nn.Linear(64, 64)

    def hook(k, x):  # stands in for the LLM: any per-scale map of the new tokens
        return x + 0.1 * lin(x)

    sampling = SamplingConfig(cfg_scale=[3.0, 2.0, 1.0, 2.5, 3.0], tau=[1.0, 0.5, 0.5, 1.0, 0.7], top_k=2, top_p=0.9)
    runs = [sample_image_tokens(dec, both, SCHED_64, sampling, hook=hook, use_cache=c, return_logits=True,
                                generator=[torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)])
            for c in (True, False)]
    for a, b in zip(runs[0].logits, runs[1].logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(runs[0].bits, runs[1].bits, strict=True):
        assert torch.equal(a, b)
    assert runs[0].summed_codes_BDHW.shape == (2, 8, 8, 8)


@torch.no_grad()
def test_batch_of_eight_equals_eight_single_calls():
    dec = _tiny_decoder(seed=3)
    lengths = [4, 1, 6, 3, 2, 5, 1, 7]
    cond, uncond = _conditions(dec, lengths, seed=2)
    sampling = SamplingConfig(cfg_scale=3.0, tau=0.5, top_k=900, top_p=0.97)
    seeds = [11, 12, 13, 14, 15, 16, 17, 18]
    batch = sample_image_tokens(dec, DecoderCondition.cat(cond, uncond), SCHED_64, sampling,
                                generator=[torch.Generator().manual_seed(s) for s in seeds])
    for i, (s, n) in enumerate(zip(seeds, lengths, strict=True)):
        single = sample_image_tokens(dec, DecoderCondition.cat(_row(cond, i, n), _row(uncond, i, 1)), SCHED_64,
                                     sampling, generator=torch.Generator().manual_seed(s))
        for k in range(len(SCHED_64)):
            assert torch.equal(batch.bits[k][i:i + 1], single.bits[k]), (i, k)
        torch.testing.assert_close(batch.summed_codes_BDHW[i:i + 1], single.summed_codes_BDHW)
    assert not torch.equal(batch.bits[-1][0], batch.bits[-1][1])  # different conditions, different images


@torch.no_grad()
def test_forward_train_equals_stepwise_forward():
    dec = _tiny_decoder()
    cond, _ = _conditions(dec, [2, 4], seed=4)
    L = sum(t * h * w for t, h, w in SCHED_64)
    x = torch.randn(2, L, 64, generator=torch.Generator().manual_seed(5))
    full = dec.forward_train(x, cond, SCHED_64)
    cache = dec.new_cache(2, SCHED_64)
    steps, start = [], 0
    for k, (_, h, w) in enumerate(SCHED_64):
        steps.append(dec.forward_step(x[:, start:start + h * w], cond, SCHED_64, k, cache))
        start += h * w
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    # block-causal: changing the last scale leaves earlier logits unchanged
    x2 = x.clone()
    x2[:, -64:] += 1.0
    torch.testing.assert_close(dec.forward_train(x2, cond, SCHED_64)[:, :-64], full[:, :-64])


def test_gradient_checkpointing_same_gradients():
    grads = []
    for ckpt in (False, True):
        dec = _tiny_decoder(gradient_checkpointing=ckpt, cond_drop_rate=0.0).train()
        cond, _ = _conditions(dec, [3, 2], seed=6)
        x = torch.randn(2, 121, 64, generator=torch.Generator().manual_seed(1))
        dec.forward_train(x, cond, SCHED_64).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in dec.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


def test_drop_path_and_condition_dropout_train_only_and_seeded():
    dec = _tiny_decoder(cond_drop_rate=0.5, drop_path_rate=0.5)
    assert [b.drop_path for b in dec.blocks] == [0.0, 0.5]  # linear over depth, as released
    text = torch.randn(8, 1, 64)
    with torch.no_grad():
        cond_eval = dec.encode_condition(text, cond_drop_generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(cond_eval, dec.encode_condition(text))  # eval: no dropout
        dec.train()
        a = dec.encode_condition(text, cond_drop_generator=torch.Generator().manual_seed(0))
        b = dec.encode_condition(text, cond_drop_generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(a, b)
        assert not torch.allclose(a, cond_eval)  # some samples dropped to the unconditional condition
        cond, _ = _conditions(dec, [2] * 8, seed=0)
        x = torch.randn(8, 121, 64)
        y1 = dec.forward_train(x, cond, SCHED_64, generator=torch.Generator().manual_seed(3))
        y2 = dec.forward_train(x, cond, SCHED_64, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(y1, y2)
        dec.eval()
        assert not torch.allclose(y1, dec.forward_train(x, cond, SCHED_64))


def test_rope_table_and_mask():
    table = rope2d_table(SCHED_256, 64)
    assert table.shape == (2, 10624, 32)  # the 1:1 template's '1M' schedule, 10521 tokens padded to 128
    torch.testing.assert_close(table[:, 0], torch.stack([torch.ones(32), torch.zeros(32)]))
    # star normalisation: the 2x2 scale sits on rows/cols 0 and 32 of the 64x64 final grid
    inv = 1.0 / (10000 ** (torch.arange(0, 32, 2) / 32))
    torch.testing.assert_close(table[1, 3, :16], torch.sin(32 * inv))  # token (1, 0) of scale 1: row 32
    torch.testing.assert_close(table[1, 3, 16:], torch.zeros(16))
    assert torch.equal(rope2d_table(scale_schedule("0.25M"), 64), table)  # prefixes share the table
    m = block_causal_mask(((1, 1, 1), (1, 2, 2)))
    assert m.tolist() == [[True] + [False] * 4] + [[True] * 5] * 4


def test_rope_and_normalize_round_like_the_released_formulas():
    """The blocks' rotation (x * cos + swap(x) * (-sin, sin)) and l2 normalisation give the released element-wise
    formulas' floats bit for bit, on contiguous and on permuted (the qkv split's) inputs."""
    g = torch.Generator().manual_seed(0)
    table = rope2d_table(SCHED_256, 64)[:, :521]
    cos, sin = visual_decoder._rope_pairs(table).unbind(0)
    for x in (torch.randn(2, 2, 521, 64, generator=g) * 3, torch.randn(2, 521, 2, 64, generator=g).transpose(1, 2)):
        a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
        ref = torch.stack([table[0] * a - table[1] * b, table[1] * a + table[0] * b], dim=-1).flatten(-2)
        assert torch.equal(visual_decoder._apply_rope(x, cos, sin), ref)
        assert torch.equal(visual_decoder._l2_normalize(x), F.normalize(x, dim=-1, eps=1e-12))


def test_compat_bf16_cross_attention_changes_numerics(official):
    """The compat switch matters: without it the released logits are only reproduced to ~1e-3."""
    o = official
    dec = VisualDecoder(o.cfg.decoder, o.cfg.vae.codebook_dim, CompatConfig(bf16_cross_attention=False)).eval()
    dec.load_state_dict(o.dec.state_dict())
    cond_BD = start_condition(o.dec, o.sos, 1)
    ctx = torch.randn(1, 5, 128, generator=torch.Generator().manual_seed(0))
    x = torch.randn(1, 521, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = o.dec.forward_train(x, o.dec.condition(cond_BD, ctx), SCHED_256)
        b = dec.forward_train(x, dec.condition(dec.encode_condition(o.sos.vector(1)), ctx), SCHED_256)
    assert 1e-6 < (a - b).abs().max() < 0.05


@torch.no_grad()
def test_bf16_weights_run():
    dec = _tiny_decoder().to(torch.bfloat16)
    cond, uncond = _conditions(dec, [2, 3], seed=0)
    out = sample_image_tokens(dec, DecoderCondition.cat(cond, uncond), SCHED_64, SamplingConfig(),
                              generator=torch.Generator().manual_seed(0), return_logits=True)
    assert out.logits[-1].dtype == torch.bfloat16 and torch.isfinite(out.logits[-1]).all()
    assert out.summed_codes_BDHW.shape == (2, 8, 8, 8)


def test_cfg_uncond_is_the_released_cpu_draw_on_any_device():
    """Drawn with the released CPU generator on CPU, then placed where the model is built (under a device
    context: here meta; on a GPU, where a CPU generator cannot fill a CUDA tensor)."""
    cfg = DecoderConfig(depth=2, embed_dim=64, num_heads=2, block_chunks=1, text_channels=64, text_maxlen=32)
    ref = torch.empty(cfg.text_maxlen, cfg.text_channels)
    torch.nn.init.trunc_normal_(ref, std=1.2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(VisualDecoder(cfg, codebook_dim=8).cfg_uncond, ref / cfg.text_channels**0.5)
    with torch.device("meta"):
        assert VisualDecoder(cfg, codebook_dim=8).cfg_uncond.is_meta


def test_published_uncond_context_rows():
    dec = _tiny_decoder()
    ctx, mask = published_uncond_context(dec, torch.tensor([3, 5]))
    torch.testing.assert_close(ctx[1], dec.cfg_uncond[:5])
    assert mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5]


def test_prompt_context_left_padding_and_start_token():
    pout = GenProjector(4, 3)
    S, start = 6, 9
    ids = torch.tensor([[0, 0, 5, 6, start, 7], [1, 2, 3, 4, start, 7]])
    attn = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    hidden = torch.randn(2, S, 4)
    ctx, mask = prompt_context(hidden, ids, start, pout, attn)
    assert mask.tolist() == [[True, True, False, False], [True] * 4]
    torch.testing.assert_close(ctx[0, :2], pout(hidden[0, 2:4]))
    torch.testing.assert_close(ctx[1], pout(hidden[1, :4]))


@torch.no_grad()
def test_llm_hook_left_padded_batch_matches_single_prompts(official):
    """Cond rows of different prompt lengths (left-padded cache + mask) equal batch-1 runs; 'cached' uncond
    rows continue their own cache, 'published' ones see only the current scale."""
    o = official
    llm = functools.partial(V.llm_forward, o.vlm)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=g) for n in (5, 8)]
    S = 8
    ids = torch.stack([F.pad(p, (S - len(p), 0), value=o.cfg.tokens.endoftext) for p in prompts])
    mask = (torch.arange(S)[None] >= torch.tensor([S - len(p) for p in prompts])[:, None]).long()
    embed = o.vlm.model.get_input_embeddings()
    cache = V.new_cache(o.vlm)
    pos = (mask.cumsum(1) - 1).clamp(min=0).unsqueeze(0).expand(3, -1, -1)
    llm(embed(ids), cache=cache, position_ids=pos, attention_mask=mask)
    uncond_cache = V.new_cache(o.vlm)
    llm(embed(ids[:, -1:]), cache=uncond_cache)  # e.g. an unconditional prompt of one token
    hook = LLMScaleHook(llm, o.pin, o.pout, cond_cache=cache, cond_attention_mask=mask, batch_size=2,
                        uncond_mode="cached", uncond_cache=uncond_cache)
    xs = [torch.randn(4, 1, 128, generator=g), torch.randn(4, 4, 128, generator=g)]
    outs = [hook(k, x) for k, x in enumerate(xs)]
    for i, p in enumerate(prompts):
        single_cache = V.new_cache(o.vlm)
        llm(embed(p[None]), cache=single_cache)
        single = LLMScaleHook(llm, o.pin, o.pout, cond_cache=single_cache, batch_size=1)
        for k, x in enumerate(xs):
            torch.testing.assert_close(outs[k][i], single(k, x[i:i + 1])[0], atol=1e-5, rtol=1e-4)
        u_cache = V.new_cache(o.vlm)
        llm(embed(ids[i:i + 1, -1:]), cache=u_cache)
        for k, x in enumerate(xs):
            torch.testing.assert_close(outs[k][2 + i], o.pout(llm(o.pin(x[2 + i:3 + i]), cache=u_cache))[0],
                                       atol=1e-5, rtol=1e-4)
    published = LLMScaleHook(llm, o.pin, o.pout, cond_cache=V.new_cache(o.vlm), batch_size=1)
    x = xs[1][:2]
    torch.testing.assert_close(published(0, x)[1], o.pout(llm(o.pin(x[1:]))[0]))


@torch.no_grad()
@pytest.mark.parametrize("uncond_mode", ["published", "cached"])
def test_sample_from_prompt_batch_equals_single_prompts(official, uncond_mode):
    """Two prompts of different lengths, left-padded into one batch, give the same image tokens as two
    batch-1 calls with the same per-sample seeds."""
    o = official
    llm, new_cache = functools.partial(V.llm_forward, o.vlm), functools.partial(V.new_cache, o.vlm)
    embed = o.vlm.model.get_input_embeddings()
    start = o.cfg.tokens.image_gen_start
    g = torch.Generator().manual_seed(1)
    prompts = [torch.cat([torch.randint(0, 256, (n,), generator=g), torch.tensor([start])]) for n in (6, 11)]
    S = max(len(p) for p in prompts)
    ids = torch.stack([F.pad(p, (S - len(p), 0), value=o.cfg.tokens.endoftext) for p in prompts])
    mask = torch.stack([F.pad(torch.ones(len(p), dtype=torch.long), (S - len(p), 0)) for p in prompts])
    sched = SCHED_256[:5]  # 121 tokens keep it fast
    sampling = SamplingConfig(cfg_scale=[3.0, 3.0, 2.0, 1.0, 3.0], tau=0.5)
    uncond = embed(torch.tensor([[start]])) if uncond_mode == "cached" else None
    kw = dict(start_id=start, uncond_mode=uncond_mode, uncond_inputs_embeds_BSH=uncond)
    batch = sample_from_prompt(o.dec, o.pin, o.pout, o.sos, llm, new_cache, embed(ids), ids, sched, sampling,
                               attention_mask_BS=mask, generator=[torch.Generator().manual_seed(s) for s in (5, 6)],
                               **kw)
    for i, (p, s) in enumerate(zip(prompts, (5, 6), strict=True)):
        single = sample_from_prompt(o.dec, o.pin, o.pout, o.sos, llm, new_cache, embed(p[None]), p[None], sched,
                                    sampling, generator=torch.Generator().manual_seed(s), **kw)
        flips = sum(int((batch.bits[k][i] != single.bits[k][0]).sum()) for k in range(len(sched)))
        assert flips == 0, (i, flips)
    with pytest.raises(InputError):
        sample_from_prompt(o.dec, o.pin, o.pout, o.sos, llm, new_cache, embed(ids[:, :-1]), ids[:, :-1], sched,
                           sampling, start_id=start)


def test_bf16_cross_attention_kv_layout_keeps_the_floats():
    """`CrossAttention.context_kv` (bf16 compat) lays k^T and v out as `_cross_attend`'s matmuls want them: the output
    equals the one on the permuted views it used to keep."""
    g = torch.Generator().manual_seed(0)
    ca = visual_decoder.CrossAttention(64, 64, 2, bf16=True)
    with torch.no_grad():
        for p in ca.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    x, ctx = torch.randn(3, 20, 64, generator=g), torch.randn(3, 9, 64, generator=g)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 6:] = False
    kv = ca.context_kv(ctx)
    B, N, _ = ctx.shape
    w = ca.mat_kv.weight
    kv_ref = F.linear(ctx, w, torch.cat((ca.zero_k_bias, ca.v_bias))).view(B, N, 2, 2, 32)
    k, v = kv_ref.permute(2, 0, 3, 1, 4).unbind(0)
    ref_kv = (k.to(torch.bfloat16).float(), v.to(torch.bfloat16).float())
    assert all(torch.equal(a, b) for a, b in zip(kv, ref_kv, strict=True))
    with torch.no_grad():
        assert torch.equal(ca(x, ctx, mask, kv), ca(x, ctx, mask, ref_kv))
