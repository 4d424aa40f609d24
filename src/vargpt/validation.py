"""Checks of user inputs that several entry points share: prompt text and pixel tensors.

Each check returns quietly or raises `InputError` with one line naming the problem and the fix. Image files are
`vargpt.imageio`'s job, checkpoint files `vargpt.weights`'; this module holds what is left: text (empty, not valid
UTF-8, too long for the LLM) and tensors (NaN / inf).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vargpt.errors import InputError

if TYPE_CHECKING:
    import torch

__all__ = ["check_finite", "check_prompt_fits", "check_text", "check_utf8"]


def check_text(text: Any, what: str = "prompt") -> str:
    """``text`` if it is a non-empty string of valid Unicode (`check_utf8`), else `InputError`."""
    if not isinstance(text, str):
        raise InputError(f"the {what} must be text, got {type(text).__name__}")
    if not text.strip():
        raise InputError(f"the {what} is empty; write what you want, e.g. 'a red circle'")
    return check_utf8(text, what)


def check_utf8(text: str, what: str = "prompt") -> str:
    """``text`` unless it holds lone surrogates, which no tokenizer can encode: bytes that are not UTF-8 reach
    Python so from the command line (``sys.argv`` decodes them with surrogateescape, U+DC80..U+DCFF) or from JSON
    (``"\\ud800"``)."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        char = ord(text[e.start])
        shown = f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"lone surrogate U+{char:04X}"
        raise InputError(f"the {what} is not valid UTF-8 ({shown} at character {e.start}); save or type it "
                         "as UTF-8") from None
    return text


def check_prompt_fits(processor: Any, prompt: str, images: list[Any] | None = None, *, reserved: int = 0,
                      what: str = "prompt") -> int:
    """The token count of ``prompt`` (with ``images`` for its ``<image>`` placeholders) rendered as one user turn;
    `InputError` when it plus ``reserved`` tokens (while generating: ``<|image_gen_start|>`` and the image's slots)
    exceed the LLM's ``max_position_embeddings``."""
    n = processor(check_text(prompt, what), images)["input_ids"].shape[1]
    limit = processor.max_positions
    if n + reserved > limit:
        room = f" (the image takes {reserved} of its {limit} positions)" if reserved else ""
        raise InputError(f"the {what} is {n} tokens but the model takes at most {limit - reserved} here{room}; "
                         "shorten it")
    return n


def check_finite(x: torch.Tensor, what: str = "pixel_values") -> torch.Tensor:
    """``x`` if it holds no NaN or inf (integer tensors always pass), else `InputError` naming ``what``."""
    import torch  # here: the text checks above serve the command line before torch is imported

    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise InputError(f"{what} holds NaN or inf values; clean the input (torch.nan_to_num) or re-create it")
    return x
