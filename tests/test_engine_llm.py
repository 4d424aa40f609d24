"""The engine's lean LLM (`vargpt.engine.llm`) against transformers: the same floats, the same tokens, the same images.

transformers' own forward and ``generate`` stay in the engine as the path for non-SDPA attention; here they are the
reference: every comparison is exact (``torch.equal``), on the conformance fixtures' weights and on the tiny preset.
"""

from __future__ import annotations

import copy
import dataclasses
from unittest import mock

import pytest
import torch
from PIL import Image
from transformers import LogitsProcessor
from transformers.generation.streamers import BaseStreamer

from conftest import load_fixture
from vargpt.config import SamplingConfig, tiny_config
from vargpt.engine import Engine
from vargpt.engine import llm as fast
from vargpt.models import vlm as V
from vargpt.models.vargpt import VARGPT


def _transformers_path():
    """The engine as it runs with transformers' forward and generate (what `fast.supported` False selects)."""
    return mock.patch.object(fast, "supported", lambda vlm: False)


@torch.inference_mode()
@pytest.mark.parametrize("batch", [1, 3])
def test_forward_matches_transformers(fixture_model, batch):
    """Prefill, cached steps of 1..36 tokens with default or explicit positions and a padding mask, and uncached
    calls (the published unconditional branch): hidden states equal bit for bit, caches included."""
    vlm, g = fixture_model.vlm, torch.Generator().manual_seed(batch)
    assert fast.supported(vlm)
    prompt = torch.randn(batch, 30, 64, generator=g)
    steps = [torch.randn(batch, n, 64, generator=g) for n in (1, 4, 16, 36)]
    mask = torch.ones(batch, 30, dtype=torch.long)
    if batch > 1:
        mask[-1, :7] = 0  # the last row is left-padded
    pos = (mask.cumsum(1) - 1).clamp(min=0)[None].expand(3, -1, -1)

    def run(forward, new_cache):
        cache, m = new_cache(), mask
        out = [forward(vlm, prompt, cache=cache, position_ids=pos, attention_mask=m)]
        for s in steps:
            p = (m.sum(1, keepdim=True) + torch.arange(s.shape[1]))[None].expand(3, -1, -1)
            m = torch.cat([m, torch.ones(batch, s.shape[1], dtype=m.dtype)], 1)
            out.append(forward(vlm, s, cache=cache, position_ids=p, attention_mask=m))
        plain = new_cache()  # default positions, no mask
        out += [forward(vlm, prompt, cache=plain)] + [forward(vlm, s, cache=plain) for s in steps]
        return out + [forward(vlm, s) for s in steps]

    ours, ref = run(fast.llm_forward, fast.KVCache), run(V.llm_forward, lambda: V.new_cache(vlm))
    assert all(torch.equal(a, b) for a, b in zip(ours, ref, strict=True))


def test_kv_cache_grows_past_its_first_allocation():
    cache, k = fast.KVCache(), torch.randn(1, 2, 250, 4)
    cache.update(0, k, k)
    cache.length = 250
    k2 = torch.randn(1, 2, 300, 4)  # beyond the first 250 + 255 slots
    keys, _ = cache.update(0, k2, k2)
    assert keys.shape == (1, 2, 550, 4) and torch.equal(keys, torch.cat([k, k2], 2))


class _NoEnd(LogitsProcessor):
    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, input_ids, scores):
        scores[:, self.token] = -float("inf")
        return scores


class _ImageFirst(LogitsProcessor):
    """Forces <|image_gen_start|> as the first answer token (a mixed turn: image, then text)."""

    def __init__(self, prompt_len: int, token: int) -> None:
        self.prompt_len, self.token = prompt_len, token

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.prompt_len:
            scores = torch.full_like(scores, -float("inf"))
            scores[:, self.token] = 0
        return scores


class _Recorder(BaseStreamer):
    def __init__(self) -> None:
        self.calls: list = []

    def put(self, value):
        self.calls.append(value.clone())

    def end(self):
        self.calls.append("end")


def _same_streams(a: list, b: list) -> bool:
    same = (x == y if isinstance(x, str) else torch.equal(x, y) for x, y in zip(a, b, strict=True))
    return len(a) == len(b) and all(same)


@torch.inference_mode()
def test_generate_text_matches_transformers_generate(fixture_model, fixtures_dir):
    """Greedy and sampled answers about fixture (a)'s image, and a left-padded text batch: the lean decode loop
    gives transformers' tokens and streamer calls."""
    a, tok = load_fixture(fixtures_dir, "a_understanding"), fixture_model.config.tokens
    engine, ids = Engine(fixture_model), a["input_ids"]
    text = torch.tensor([[tok.endoftext, tok.endoftext, tok.im_start, 65, 66, tok.im_end, 10, tok.im_start],
                         [tok.im_start, 70, 71, 72, 73, tok.im_end, 10, tok.im_start]])
    cases = [
        ((ids, a["attention_mask"], a["pixel_values"], a["image_grid_thw"]),
         dict(max_new_tokens=24, images=False, logits_processor=[_NoEnd(tok.im_end)])),
        ((ids, a["attention_mask"], a["pixel_values"], a["image_grid_thw"]),
         dict(max_new_tokens=16, images=False, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=5)),
        ((text, (text != tok.endoftext).long()), dict(max_new_tokens=24)),
        ((text, (text != tok.endoftext).long()), dict(max_new_tokens=24, do_sample=True, seed=1)),
    ]
    for args, kwargs in cases:
        streams, answers = [], []
        for patch in (_transformers_path(), mock.patch.object(fast, "supported", fast.supported)):
            with patch:
                rec = _Recorder()
                answers.append(engine.generate_text(*args, streamer=rec, **kwargs))
                streams.append(rec.calls)
        assert repr(answers[0]) == repr(answers[1]), kwargs
        assert _same_streams(*streams), kwargs


@torch.inference_mode()
def test_images_bit_identical_to_the_transformers_path(fixture_model, tiny_model):
    """Same seeds, same images before and after the lean LLM: the fixture model (published unconditional branch, a
    left-padded batch of two prompt lengths) and the tiny preset (cached unconditional branch, mixed text + image)."""
    tok = fixture_model.config.tokens
    prompt = torch.tensor([[tok.im_start] + list(b"user\na red circle") + [tok.im_end, 10, tok.im_start]
                           + list(b"assistant\n")])
    short = torch.cat([prompt.new_full((1, 6), tok.endoftext), prompt[:, 6:]], 1)
    ids, mask = torch.cat([prompt, short]), torch.cat([torch.ones_like(prompt), (short != tok.endoftext).long()])
    sampling = SamplingConfig(cfg_scale=3.0, tau=0.5, top_k=900, top_p=0.97)
    runs = [(fixture_model, dict(input_ids=ids, attention_mask=mask, size=256, seed=7, sampling=sampling)),
            (tiny_model, dict(prompts=["a red circle", "two blue squares"], size=64, seed=3))]
    for model, kwargs in runs:
        with _transformers_path():
            ref = Engine(model).generate_images(**kwargs, return_logits=True)
        out = Engine(model).generate_images(**kwargs, return_logits=True)
        assert all(torch.equal(a, b) for a, b in zip(out.bits, ref.bits, strict=True))
        assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits, strict=True))
        assert torch.equal(out.images, ref.images)
    inputs = tiny_model.processor("Say hi, draw a circle, then say ok.")
    first = _ImageFirst(inputs["input_ids"].shape[1], tiny_model.config.tokens.image_gen_start)
    kwargs = dict(max_new_tokens=24, do_sample=True, seed=0, image_size=64, logits_processor=[first])
    with _transformers_path():
        ref = Engine(tiny_model).generate_text(inputs["input_ids"], **kwargs)[0]
    out = Engine(tiny_model).generate_text(inputs["input_ids"], **kwargs)[0]
    assert isinstance(out[0], torch.Tensor) and len(out) == len(ref)
    assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b for a, b in zip(out, ref, strict=True))


@torch.inference_mode()
def test_generate_text_with_image_places_matches_transformers():
    """A model with ``vision.place_embed`` (random place tables, so they matter): the lean decode loop answers about
    an image as transformers' path does (which gets the placed image embeddings from `Engine.generate_text`), and
    the places do reach its tokens."""
    cfg = tiny_config()
    torch.manual_seed(0)
    model = VARGPT(dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, place_embed=8)))
    g = torch.Generator().manual_seed(1)
    for table in (model.image_place.row.weight, model.image_place.col.weight):
        table.copy_(torch.randn(table.shape, generator=g) * 5)
    engine, img = Engine(model), Image.new("RGB", (64, 64), (240, 240, 240))
    img.paste((200, 30, 30), (8, 40, 24, 56))
    b = engine.encode_prompts(["<image>\nWhat colour is the square?"], [img])
    args = (b.input_ids, b.attention_mask, b.pixel_values, b.image_grid_thw)

    def tokens(**kwargs) -> list:
        rec = _Recorder()
        answer = engine.generate_text(*args, max_new_tokens=12, images=False, streamer=rec, **kwargs)
        return [answer, *rec.calls]

    for kwargs in (dict(logits_processor=[_NoEnd(model.config.tokens.im_end)]), dict(do_sample=True, seed=2)):
        with _transformers_path():
            ref = tokens(**kwargs)
        out = tokens(**kwargs)
        assert repr(out[0]) == repr(ref[0]) and _same_streams(out[1:], ref[1:]), kwargs
    placed = tokens(logits_processor=[_NoEnd(model.config.tokens.im_end)])
    model.image_place.row.weight.zero_()
    model.image_place.col.weight.zero_()
    assert not _same_streams(tokens(logits_processor=[_NoEnd(model.config.tokens.im_end)])[1:], placed[1:])


@torch.inference_mode()
def test_an_edited_generation_config_goes_through_transformers(tiny_model):
    """The lean loop adds only the engine's processors: a model whose generation config asks for more (here a
    repetition penalty) is answered by transformers' ``generate``."""
    ids = tiny_model.processor("Say hi.")["input_ids"]
    engine, vlm = Engine(tiny_model), tiny_model.vlm
    with mock.patch.object(vlm, "generate", wraps=vlm.generate) as gen:
        engine.generate_text(ids, max_new_tokens=2)
        assert not gen.called and fast.default_generation(vlm)
        edited = copy.deepcopy(vlm.generation_config)
        edited.repetition_penalty = 1.3
        with mock.patch.object(vlm, "generation_config", edited):
            engine.generate_text(ids, max_new_tokens=2)
        assert gen.called


def test_rms_norm_is_transformers_rms_norm():
    """The CPU fp32 shortcut (torch's ``rms_norm``) and the spelled-out path give transformers' RMSNorm floats."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRMSNorm

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for hidden in (64, 3584):
            norm = Qwen2VLRMSNorm(hidden, eps=1e-6).to(dtype)
            norm.weight.data = (torch.randn(hidden, generator=g) * 0.1 + 1).to(dtype)
            x = (torch.randn(3, 17, hidden, generator=g) * 5).to(dtype)
            assert torch.equal(fast._rms_norm(x, norm.weight, 1e-6), norm(x)), (dtype, hidden)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("q_len,past", [(5, 7), (1, 9), (12, 0)])
def test_additive_mask_gives_the_bool_mask_attention(padded, q_len, past):
    """`_attention_mask` (0 / -inf, shared by the rows without padding) gives SDPA's floats of transformers' bool
    mask, one copy per row, which SDPA converts itself."""
    g = torch.Generator().manual_seed(q_len + past)
    B, H, D, kv = 3, 4, 16, past + q_len
    padding = torch.ones(B, kv, dtype=torch.long)
    if padded:
        padding[1, :2] = 0
        padding[2, :4] = 0
    padding = padding if padded else None
    mask = fast._attention_mask(padding, B, q_len, kv, torch.device("cpu"))
    if mask is None:
        assert not padded and (q_len == 1 or past == 0)
        return
    j = torch.arange(kv)
    ref = (j[None, None, None, :] <= j[None, None, past:, None]).expand(B, -1, -1, -1)
    if padding is not None:
        ref = ref & padding[:, None, None, :].bool()
    assert mask.dtype == torch.float32 and mask.shape[0] == (B if padded else 1)
    q, k, v = (torch.randn(B, H, n, D, generator=g) for n in (q_len, kv, kv))
    got = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=ref, scale=0.25)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)  # (rows of padding see nothing)
