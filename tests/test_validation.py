"""Prompt and tensor checks: empty, not UTF-8 (command line bytes, JSON surrogates), too long for the LLM, NaN."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import run_cli
from vargpt.config import tiny_config
from vargpt.errors import InputError
from vargpt.processing import ByteTokenizer, VARGPTProcessor
from vargpt.validation import check_finite, check_prompt_fits, check_text

CFG = tiny_config()
LATIN1 = os.fsdecode(b"caf\xe9 au lait")  # how Python hands a non-UTF-8 command-line argument over


@pytest.mark.parametrize("text, words", [
    ("", "is empty"), ("  \n\t", "is empty"), (None, "must be text"), (b"bytes", "must be text"),
    (LATIN1, "not valid UTF-8 (byte 0xe9 at character 3)"),
    ("x\ud800y", "not valid UTF-8 (lone surrogate U+D800 at character 1)"),
])
def test_check_text_names_the_problem(text, words):
    with pytest.raises(InputError) as e:
        check_text(text, "prompt")
    assert words in str(e.value) and "\n" not in str(e.value)


def test_good_text_passes_unchanged():
    for text in ("a red circle", "ein grüner Kreis", "红色的圆", "🙂"):
        assert check_text(text) == text


def test_the_processor_refuses_text_no_tokenizer_can_encode():
    proc = VARGPTProcessor(ByteTokenizer(CFG.tokens), CFG)
    with pytest.raises(InputError, match="not valid UTF-8"):
        proc(LATIN1)
    with pytest.raises(InputError, match="not valid UTF-8"):
        proc.training_inputs([{"role": "user", "content": "x\udcff"}, {"role": "assistant", "content": "y"}])


def test_prompt_length_counts_the_generated_image():
    proc = VARGPTProcessor(ByteTokenizer(CFG.tokens), CFG)
    limit = proc.max_positions
    n = check_prompt_fits(proc, "a red circle")
    assert 12 < n < 100  # the chat template around the text
    fits = "x" * (limit - n - 100)
    check_prompt_fits(proc, fits)
    reserved = CFG.image_gen_token_num + 1
    with pytest.raises(InputError, match=rf"at most {limit - reserved} here \(the image takes {reserved} of its "
                                         rf"{limit} positions\); shorten it"):
        check_prompt_fits(proc, fits, reserved=reserved)
    with pytest.raises(InputError, match=rf"tokens but the model takes at most {limit}"):
        check_prompt_fits(proc, "x" * limit)


def test_check_finite():
    assert check_finite(torch.zeros(2)).shape == (2,) and check_finite(torch.arange(3)).shape == (3,)
    with pytest.raises(InputError, match="pixel_values holds NaN or inf"):
        check_finite(torch.tensor([0.0, float("inf")]))


@pytest.mark.parametrize("argv", [
    ["generate", LATIN1, "--out", "x.png"], ["edit", LATIN1, "--image", "x.png", "--out", "y.png"],
    ["chat", LATIN1], ["generate", "  ", "--out", "x.png"],
])
def test_cli_refuses_bad_prompts_before_loading_anything(capsys, tmp_path, argv):
    code, out, err = run_cli(capsys, *argv, "--model", str(tmp_path / "no-such-model"))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and ("not valid UTF-8" in err or "empty" in err), err


def test_interactive_chat_skips_a_line_that_is_not_utf8(monkeypatch, capsys):
    lines = iter([UnicodeDecodeError("utf-8", b"\xe9", 0, 1, "invalid continuation byte"), ""])

    def typed(prompt=""):
        line = next(lines)
        if isinstance(line, Exception):
            raise line
        return line

    monkeypatch.setattr("builtins.input", typed)
    monkeypatch.setattr("vargpt.cli._pipeline", lambda *args: None)  # no model: the session ends before it is used
    code, out, err = run_cli(capsys, "chat")
    assert code == 0 and "error: the line is not valid UTF-8 (invalid continuation byte); type it again" in err
