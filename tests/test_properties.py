"""Property-based checks (hypothesis) of small pure pieces: schedules, bit codes and the quantiser round trip, the
byte tokenizer and the processor, image decoding of arbitrary bytes, the HTTP request schemas."""

import base64
import io
import random
import re

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from bad_files import encode
from vargpt.config import TokenIds
from vargpt.errors import InputError
from vargpt.imageio import load_image, to_rgb
from vargpt.models.quantizer import bits_to_codes, quantize_bsq, residual_quantize, sum_codes
from vargpt.processing import ByteTokenizer
from vargpt.scales import (
    TEMPLATES,
    num_tokens,
    resolve_size,
    scale_offsets,
    schedule_for_grid,
    schedule_for_size,
    supported_sizes,
)
from vargpt.server import APIError, ChatRequest, ImageRequest, chat_inputs, parse_size

PNG = encode(Image.new("RGB", (6, 5), (10, 200, 30)))


@given(ratio=st.sampled_from(sorted(TEMPLATES)), k=st.integers(min_value=1, max_value=13))
def test_every_template_prefix_is_found_from_its_last_grid(ratio, k):
    hws = TEMPLATES[ratio][:k]
    sched = schedule_for_grid(*hws[-1])
    assert sched[-1] == (1, *hws[-1])
    assert [h * w for _, h, w in sched] == sorted(h * w for _, h, w in sched)  # coarse to fine
    offs = scale_offsets(sched)
    assert offs[0] == 0 and offs[-1] + sched[-1][1] * sched[-1][2] == num_tokens(sched)


@settings(max_examples=50, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 5), w=st.integers(1, 5), d=st.sampled_from([4, 16, 32]),
       seed=st.integers(0, 2**31 - 1))
def test_bits_survive_codes_and_requantisation(b, h, w, d, seed):
    bits = torch.randint(0, 2, (b, h, w, d), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    codes = bits_to_codes(bits)
    assert torch.allclose(codes.norm(dim=1), torch.ones(b, h, w), atol=1e-6)  # unit vectors per position
    _, again, _ = quantize_bsq(codes)
    assert torch.equal(again, bits)


@given(text=st.text(max_size=60))
def test_byte_tokenizer_round_trips_any_text(text):
    tok = ByteTokenizer(TokenIds(endoftext=256, im_start=257, im_end=258, vision_start=259, vision_end=260,
                                 vision_pad=261, image_pad=262, video_pad=263, image_gen_start=264,
                                 image_gen_end=265, image_gen_pad=266))
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text


# ----------------------------------------------------------------------------------------------- quantiser


@settings(max_examples=25, deadline=None)
@given(ratio=st.sampled_from(sorted(TEMPLATES)), k=st.integers(1, 7), b=st.integers(1, 2), d=st.sampled_from([4, 8]),
       seed=st.integers(0, 2**31 - 1))
def test_residual_quantisation_is_rebuilt_exactly_from_its_bits(ratio, k, b, d, seed):
    """The VAE's multi-scale quantisation and the sampler's running sum of per-scale codes agree: bits out -> codes
    in gives back the quantised latent (what generation decodes equals what training encoded)."""
    sched = schedule_for_grid(*TEMPLATES[ratio][:k][-1])
    _, H, W = sched[-1]
    latent = torch.randn(b, d, H, W, generator=torch.Generator().manual_seed(seed))
    out = residual_quantize(latent, sched)
    assert [tuple(x.shape) for x in out.bits] == [(b, h, w, d) for _, h, w in sched]
    torch.testing.assert_close(sum_codes(out.bits, (H, W)), out.quantized_BDHW, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- scale schedules


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 700), w=st.integers(1, 700), stride=st.sampled_from([8, 16]))
def test_every_size_gets_a_schedule_or_an_error_naming_sizes_that_work(h, w, stride):
    try:
        sched = schedule_for_size(h, w, stride)
    except InputError as e:
        named = re.findall(r"(\d+)x(\d+)", str(e).split("nearest supported sizes:")[1])
        assert len(named) == 3
        for nw, nh in named:  # every suggestion is itself supported
            assert schedule_for_size(int(nh), int(nw), stride)[-1][1:] == (int(nh) // stride, int(nw) // stride)
        return
    assert sched[-1][1:] == (h // stride, w // stride) and h % stride == 0 == w % stride
    assert resolve_size(f"{w}x{h}", stride) == (h, w)


# ----------------------------------------------------------------------------------------------- processor


def _processor():
    from vargpt.config import tiny_config
    from vargpt.processing import VARGPTProcessor

    cfg = tiny_config()
    return VARGPTProcessor(ByteTokenizer(cfg.tokens), cfg), cfg.tokens


PROC, TOKENS = _processor()


@settings(max_examples=25, deadline=None)
@given(pieces=st.lists(st.text(max_size=20).filter(lambda t: "<image" not in t), min_size=1, max_size=3),
       sizes=st.lists(st.tuples(st.integers(1, 80), st.integers(1, 80)), min_size=0, max_size=2))
def test_processor_gives_each_image_its_slots_and_keeps_the_text(pieces, sizes):
    """Any text with one ``<image>`` per image (any sizes): as many ``<|image_pad|>`` as the images' grids say,
    marked in ``mm_token_type_ids``, and the text comes back around them."""
    images = [Image.new("RGB", (w, h), (w, h, 0)) for h, w in sizes]
    padded = pieces + [""] * len(images)
    text = "".join(padded[i] + "<image>" for i in range(len(images))) + "".join(pieces[len(images):])
    out = PROC(text, images or None, system=None)
    ids = out["input_ids"][0]
    slots = sum(PROC.image_slot_count(g) for g in out["image_grid_thw"]) if images else 0
    assert int((ids == TOKENS.image_pad).sum()) == slots == int(out["mm_token_type_ids"].sum())
    assert int((ids == TOKENS.vision_start).sum()) == len(images)
    decoded = PROC.decode(ids, skip_special_tokens=True)
    assert all(p in decoded for p in pieces)


@settings(max_examples=40, deadline=None)
@given(text=st.text(max_size=40))
def test_processor_takes_any_text_or_names_the_problem(text):
    try:
        out = PROC(text)
    except InputError:
        return  # an <image> without an image, a lone surrogate: one clear line
    assert out["input_ids"].shape == out["attention_mask"].shape


# ----------------------------------------------------------------------------------------------- image files


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=300), seed=st.integers(0, 2**31 - 1), flips=st.integers(0, 8))
def test_any_bytes_load_as_rgb_or_fail_with_one_line(data, seed, flips):
    """Random bytes, and a real PNG with random bytes changed or cut: an RGB image or an `InputError`, nothing else."""
    png = bytearray(PNG)
    rng = random.Random(seed)
    for _ in range(flips):
        png[rng.randrange(len(png))] = rng.randrange(256)
    for blob in (data, bytes(png), bytes(png[: rng.randrange(len(png))])):
        try:
            img = load_image(io.BytesIO(blob))
        except InputError as e:
            assert "\n" not in str(e)
            continue
        assert img.mode == "RGB" and img.width > 0 and img.height > 0


@settings(max_examples=30, deadline=None)
@given(mode=st.sampled_from(["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "I", "I;16", "YCbCr", "HSV"]),
       w=st.integers(1, 12), h=st.integers(1, 12), seed=st.integers(0, 255))
def test_every_mode_converts_to_rgb_of_the_same_size(mode, w, h, seed):
    img = Image.new(mode, (w, h))
    img.putdata([seed * (i + 1) % 256 if mode not in ("LA", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "HSV") else
                 tuple((seed + i + c) % 256 for c in range(len(mode) if mode != "YCbCr" else 3))
                 for i in range(w * h)])
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (w, h)


# ----------------------------------------------------------------------------------------------- HTTP schemas


@settings(max_examples=40, deadline=None)
@given(text=st.one_of(st.none(), st.text(max_size=12), st.builds(lambda w, h: f"{w}x{h}", st.integers(0, 600),
                                                                   st.integers(0, 600))))
def test_size_field_parses_to_a_supported_size_or_a_400(text):
    valid = supported_sizes(8)
    try:
        size = parse_size(text, valid)
    except APIError as e:
        assert e.status_code == 400 and e.code == "unsupported_size"
        return
    assert size is None or (size in valid and text.lower() == f"{size[1]}x{size[0]}")


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=8)


@settings(max_examples=60, deadline=None)
@given(body=st.dictionaries(st.sampled_from(["model", "prompt", "n", "size", "seed", "cfg", "messages", "stream",
                                             "max_tokens", "response_format", "extra"]), JSON, max_size=6))
def test_request_bodies_validate_or_are_a_400(body):
    """Any JSON object against the request schemas: a typed request or a validation error (a 400), never a crash."""
    from pydantic import ValidationError

    for schema in (ImageRequest, ChatRequest):
        try:
            schema.model_validate(body)
        except ValidationError:
            pass


_URLS = ["data:image/png;base64," + base64.b64encode(PNG).decode(), "data:image/png;base64,@@", "https://x/y.png",
         "data:text/plain;base64,aGk=", "data:image/png;base64," + base64.b64encode(PNG[:30]).decode(), ""]
_PART = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "input_audio"])}, optional={
    "text": st.text(max_size=10), "image_url": st.one_of(st.sampled_from(_URLS), st.builds(
        lambda u: {"url": u}, st.sampled_from(_URLS)))})
_MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant"]),
                                  "content": st.one_of(st.none(), st.text(max_size=10), st.lists(_PART, max_size=3))})


@settings(max_examples=60, deadline=None)
@given(messages=st.lists(_MESSAGE, min_size=1, max_size=3))
def test_chat_messages_become_pipeline_messages_or_a_400(messages):
    """Chat messages with any mix of text, image and unknown parts: one ``<image>`` per decoded image in the
    pipeline's messages, or a 400 naming the bad part."""
    try:
        converted, images = chat_inputs(ChatRequest(model="m", messages=messages).messages)
    except APIError as e:
        assert e.status_code == 400 and "\n" not in e.detail
        return
    assert len(converted) == len(messages) and all(im.mode == "RGB" for im in images)
    assert sum(m["content"].count("<image>") for m in converted) >= len(images)
