"""Processor: released templates, placeholder expansion, tokenizers, image sizes, bad input."""

import dataclasses

import numpy as np
import pytest
import torch

from vargpt.config import tiny_config
from vargpt.errors import CheckpointError, InputError
from vargpt.processing import (
    IGNORE_INDEX,
    BPETokenizer,
    ByteTokenizer,
    VARGPTProcessor,
    load_tokenizer,
    render_inference_prompt,
    render_training_turns,
    special_tokens,
    train_bpe_tokenizer,
)

SYS = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
TEXTS = ["a red circle left of a blue square", "How many triangles are there? Three.",
         "Make the green star bigger.", "There is a small yellow triangle above a purple circle."] * 50


@pytest.fixture
def cfg():
    c = tiny_config()
    c.image_gen_token_num = 8
    return c


@pytest.fixture
def proc(cfg):
    return VARGPTProcessor(ByteTokenizer(cfg.tokens), cfg)


def _image(h: int = 64, w: int = 64) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_inference_template():
    assert render_inference_prompt("Hi") == SYS + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert render_inference_prompt("Hi", system=None) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    chat = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "Colour?"}]
    assert render_inference_prompt(chat) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<image>What is it?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n<|im_start|>user\nColour?<|im_end|>\n<|im_start|>assistant\n")


def test_training_template():
    turns = render_training_turns([{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                                   {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "<image_gen>"}])
    assert turns == [(SYS + "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\n", "A1<|im_end|>"),
                     ("\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n", "<image_gen><|im_end|>")]
    with pytest.raises(InputError, match="alternate user/assistant"):
        render_training_turns([{"role": "user", "content": "Q"}])


def test_image_placeholder_expansion(proc, cfg):
    t = cfg.tokens
    out = proc("<image>Describe.", _image(64, 96))  # patch 8, merge 2: 64x96 px -> grid 8x12 -> 24 tokens
    assert out["image_grid_thw"].tolist() == [[1, 8, 12]]
    assert out["pixel_values"].shape == (8 * 12, 3 * 2 * 8 * 8)
    ids = out["input_ids"][0].tolist()
    start = ids.index(t.vision_start)
    assert ids[start + 1:start + 25] == [t.image_pad] * 24 and ids[start + 25] == t.vision_end
    assert out["mm_token_type_ids"].sum() == 24
    assert proc.decode(ids) == "system\nYou are a helpful assistant.\nuser\nDescribe.\nassistant\n"


def test_training_inputs_labels_and_gen_slots(proc, cfg):
    t = cfg.tokens
    src, tgt = _image(), _image(32, 32)
    msgs = [{"role": "user", "content": "Edit <image> please"}, {"role": "assistant", "content": "Done: <image_gen>"}]
    out = proc.training_inputs(msgs, [src, tgt], system=None)
    ids, labels = out["input_ids"][0].tolist(), out["labels"][0].tolist()
    assert out["gen_images"] == [tgt] and out["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert out["gen_sources"] == [src]  # the edit's source: the last <image> before the <image_gen> slot
    answer = proc.tokenizer.encode("Done: ") + [t.image_gen_start] + [t.image_gen_pad] * 8 + [t.image_gen_end, t.im_end]
    assert ids[-len(answer):] == answer
    # the image slots are image tokens (bit loss), never text targets: only "Done: ", start, end, im_end supervised
    supervised = [x if x != t.image_gen_pad else IGNORE_INDEX for x in answer]
    assert labels[-len(answer):] == supervised and t.image_gen_pad not in labels
    assert set(labels[:-len(answer)]) == {IGNORE_INDEX}


def test_bad_input(proc, cfg):
    with pytest.raises(InputError, match="no <image> placeholder"):
        proc("Describe.", _image())
    with pytest.raises(InputError, match="2 images given but the prompt has only 1"):
        proc("<image>Describe.", [_image(), _image()])
    with pytest.raises(InputError, match="1 image placeholder.*0 image"):
        proc("<image>Describe.")
    with pytest.raises(InputError, match="cannot appear in a prompt"):
        proc("Draw <image_gen>")
    with pytest.raises(InputError, match="expected HxWx3 uint8"):
        proc("<image>", np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(InputError, match="role 'tool'"):
        proc([{"role": "tool", "content": "x"}])
    short = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, max_position_embeddings=40))
    with pytest.raises(InputError, match="at most 40"):
        VARGPTProcessor(ByteTokenizer(cfg.tokens), short)("x" * 100)


def test_byte_tokenizer_round_trip(cfg):
    tok = ByteTokenizer(cfg.tokens)
    text = "<|im_start|>user\nGrün ☀<|im_end|>"
    ids = tok.encode(text)
    assert ids[0] == cfg.tokens.im_start and ids[-1] == cfg.tokens.im_end and len(ids) == 2 + 5 + 5 + 1 + 3
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "user\nGrün ☀"


def test_train_bpe_tokenizer_places_special_ids(cfg, tmp_path):
    tok = train_bpe_tokenizer(TEXTS, cfg.llm.vocab_size, cfg.tokens)
    assert tok.vocab_size == cfg.llm.vocab_size == 1024
    for text, i in special_tokens(cfg.tokens).items():
        assert tok.encode(text) == [i]
    s = "<|im_start|>user\na blue star left of a red circle<|im_end|>"
    ids = tok.encode(s)
    assert len(ids) < 20 and max(ids) < cfg.llm.vocab_size and tok.decode(ids) == s
    assert train_bpe_tokenizer(TEXTS, 1024, cfg.tokens).encode(s) == ids  # deterministic
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path, cfg.tokens)
    assert isinstance(again, BPETokenizer) and again.encode(s) == ids
    other = dataclasses.replace(cfg.tokens, im_start=cfg.tokens.im_end, im_end=cfg.tokens.im_start)
    with pytest.raises(CheckpointError, match="special token <\\|im_start\\|> has id 1014, the config says 1015"):
        load_tokenizer(tmp_path, other)


def test_train_bpe_tokenizer_small_corpus_keeps_ids(cfg):
    tok = train_bpe_tokenizer(["ab ab"], cfg.llm.vocab_size, cfg.tokens)  # runs out of merges early
    assert tok.vocab_size == 1024 and tok.encode("<|image_gen_pad|>") == [cfg.tokens.image_gen_pad]
    assert tok.decode(tok.encode("ab cd")) == "ab cd"


def test_pad_batches_left(proc, cfg):
    a, b = proc("Hi", system=None), proc("<image>Hello there", _image())
    batch = proc.pad([a, b])
    n = b["input_ids"].shape[1] - a["input_ids"].shape[1]
    assert batch["input_ids"].shape == (2, b["input_ids"].shape[1])
    assert batch["input_ids"][0, :n].eq(cfg.tokens.endoftext).all() and batch["attention_mask"][0, :n].eq(0).all()
    assert torch.equal(batch["input_ids"][0, n:], a["input_ids"][0])
    assert torch.equal(batch["pixel_values"], b["pixel_values"])


def test_training_template_reproduces_fixture_d(fixtures_dir, fixture_config):
    """Fixture (d): no system turn, the answer is one generated image padded to 640 slots."""
    from conftest import load_fixture

    fd = load_fixture(fixtures_dir, "d_train")
    assert fixture_config.image_gen_token_num == 640
    proc = VARGPTProcessor(ByteTokenizer(fixture_config.tokens), fixture_config)
    msgs = [{"role": "user", "content": "Draw a small house."}, {"role": "assistant", "content": "<image_gen>"}]
    out = proc.training_inputs(msgs, [fd["image_uint8_hwc"]], system=None)
    assert torch.equal(out["input_ids"], fd["input_ids"])
    assert len(out["gen_images"]) == 1 and "pixel_values" not in out and out["gen_sources"] == [None]
