import pytest

from vargpt.errors import InputError
from vargpt.scales import (
    num_tokens,
    padded_tokens,
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
