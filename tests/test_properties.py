"""Property-based checks (hypothesis) of small pure pieces: schedules, bit codes, the byte tokenizer."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vargpt.config import TokenIds
from vargpt.models.quantizer import bits_to_codes, quantize_bsq
from vargpt.processing import ByteTokenizer
from vargpt.scales import TEMPLATES, num_tokens, scale_offsets, schedule_for_grid


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
