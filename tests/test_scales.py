import pytest

from vargpt.errors import InputError
from vargpt.scales import (
    nearest_sizes,
    num_tokens,
    padded_tokens,
    resolve_size,
    scale_offsets,
    scale_schedule,
    schedule_for_size,
)


def test_released_square_schedules():
    s = scale_schedule("0.25M", 1.0)
    assert [h for _, h, _ in s] == [1, 2, 4, 6, 8, 12, 16, 20, 24, 32]
    assert num_tokens(s) == 2521 and padded_tokens(s) == 2560
    assert scale_offsets(s) == [0, 1, 5, 21, 57, 121, 265, 521, 921, 1497]
    assert num_tokens(scale_schedule("0.06M")) == 521


@pytest.mark.parametrize("ratio,pn,tokens", [(0.333, "0.25M", 2588), (0.5, "0.06M", 451), (1.333, "0.06M", 665),
                                              (2.5, "0.25M", 2555), (0.8, "0.25M", 2814)])
def test_non_square_token_counts(ratio, pn, tokens):
    assert num_tokens(scale_schedule(pn, ratio)) == tokens


def test_schedule_for_size():
    assert schedule_for_size(512, 512, 16) == scale_schedule("0.25M")
    assert schedule_for_size(240, 320, 16) == scale_schedule("0.06M", 0.75)
    assert schedule_for_size(64, 64, 8)[-1] == (1, 8, 8)
    with pytest.raises(InputError, match="supported sizes"):
        schedule_for_size(500, 500, 16)


def test_resolve_size_reads_squares_width_x_height_and_aspects():
    assert resolve_size("512", 16) == resolve_size(512, 16) == (512, 512)
    assert resolve_size("736x368", 16) == (368, 736)  # WIDTHxHEIGHT, as OpenAI writes sizes
    assert resolve_size(" 368X736 ", 16) == (736, 368)
    # an aspect picks that template at the square's pixel budget (index of 32x32 in the 1:1 template)
    assert resolve_size("512", 16, "2:1") == (368, 736) and resolve_size("512", 16, "1:2") == (736, 368)
    assert resolve_size("64", 8, "2:1") == (40, 80)
    h, w = resolve_size("512", 16, "4:3")
    assert 0.7 < h / w < 0.8 and schedule_for_size(h, w, 16)[-1][1:] == (h // 16, w // 16)


@pytest.mark.parametrize("size,aspect,match", [
    ("500", None, "nearest supported sizes: 512x512"), ("100x60", None, "nearest supported sizes"),
    ("wide", None, "WIDTHxHEIGHT"), ("512x", None, "WIDTHxHEIGHT"), ("736x368", "2:1", "square size"),
    ("768x384", None, "nearest supported sizes: 736x368"),
    ("512", "2", "WIDTH:HEIGHT"), ("512", "0:1", "WIDTH:HEIGHT"), ("500", "2:1", "templates define")])
def test_resolve_size_errors_name_the_fix(size, aspect, match):
    with pytest.raises(InputError, match=match):
        resolve_size(size, 16, aspect)


def test_nearest_sizes_prefer_the_aspect_then_the_area():
    assert nearest_sizes(500, 500, 16)[0] == (512, 512)
    h, w = nearest_sizes(380, 760, 16)[0]
    assert w == 2 * h or abs(w / h - 2) < 0.1
