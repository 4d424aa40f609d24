"""Pure bit-sampling functions: CFG mix, top-k / top-p on 2-way distributions, seeded draws."""

import pytest
import torch

from vargpt.config import SamplingConfig
from vargpt.engine.bits import as_bit_logits, cfg_mix, sample_bits, top_k_top_p_filter
from vargpt.engine.loop import per_scale
from vargpt.errors import InputError


def test_cfg_mix_formula():
    c, u = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.0])
    torch.testing.assert_close(cfg_mix(c, u, 3.0), 3 * c - 2 * u)
    torch.testing.assert_close(cfg_mix(c, u, 1.0), c)


def test_top_p_forces_majority_bit_only_below_threshold():
    # minority probabilities 0.02 (forced away) and 0.05 (kept) with top_p = 0.97
    p_min = torch.tensor([0.02, 0.05])
    logits = torch.stack([p_min.log(), (1 - p_min).log()], -1)
    out = top_k_top_p_filter(logits, top_k=900, top_p=0.97)
    assert torch.isinf(out[0, 0]) and out[0, 0] < 0 and torch.isfinite(out[0, 1])
    assert torch.isfinite(out[1]).all()
    # the larger entry is never removed, also when it is the first column
    out = top_k_top_p_filter(logits.flip(-1), top_p=0.97)
    assert torch.isfinite(out[0, 0]) and torch.isinf(out[0, 1])


def _sorted_top_p(logits, top_p):
    """The published nucleus filter, written out: sort ascending, drop cumsum <= 1 - top_p, never the largest."""
    sorted_logits, idx = logits.sort(dim=-1)
    remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
    remove[..., -1:] = False
    return logits.masked_fill(torch.zeros_like(remove).scatter(-1, idx, remove), -torch.inf)


def test_two_way_filters_match_the_sorted_filter():
    """On 2-way bits, top-k >= 2 is skipped and top-p > 1/2 is one softmax: the same floats and decisions as the
    sort-based filter (so the same draws), ties, infinities and the published settings included."""
    g = torch.Generator().manual_seed(0)
    for scale in (0.01, 1.0, 10.0, 300.0):
        logits = torch.randn(8, 64, 32, 2, generator=g) * scale
        logits[0, :4, 0] = torch.tensor([[1.0, 1.0], [0.0, 0.0], [-torch.inf, 0.0], [torch.inf, 1.0]])
        for top_k, top_p in ((900, 0.97), (0, 0.97), (2, 0.6), (900, 0.51)):
            ref = _sorted_top_p(logits, top_p)
            out = top_k_top_p_filter(logits, top_k, top_p)
            assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.nan_to_num(), ref.nan_to_num())
            assert torch.equal(out.softmax(-1).nan_to_num(7.0), ref.softmax(-1).nan_to_num(7.0))


def test_top_k_one_keeps_argmax_and_filters_are_copies():
    logits = torch.tensor([[0.3, -1.0], [2.0, 5.0]])
    before = logits.clone()
    out = top_k_top_p_filter(logits, top_k=1)
    assert torch.equal(torch.isfinite(out), torch.tensor([[True, False], [False, True]]))
    assert torch.equal(logits, before)
    assert torch.equal(top_k_top_p_filter(logits), logits)  # 0 = off


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sample_bits_single_generator_is_one_multinomial_call(dtype):
    """The same bits as one multinomial call, in the model's dtype too (bf16 draws its Exp(1) noise in bf16, as
    multinomial does on bf16 probabilities); the noise comes from the generator's device, the argmax runs on the
    probabilities' (on a GPU with the engine's CPU generators: the same bits for a seed)."""
    logits = torch.randn(2, 5, 8, 2, generator=torch.Generator().manual_seed(0)).to(dtype)
    bits = sample_bits(logits, generator=torch.Generator().manual_seed(42))
    ref = torch.multinomial(logits.softmax(-1).view(-1, 2), 1, replacement=True,
                            generator=torch.Generator().manual_seed(42)).view(2, 5, 8)
    assert torch.equal(bits, ref)
    assert bits.dtype == torch.long and set(bits.unique().tolist()) <= {0, 1}
    with pytest.raises(RuntimeError, match="nan"):
        sample_bits(torch.full_like(logits, float("nan")), generator=torch.Generator())


def test_sample_bits_per_sample_generators_are_batch_invariant():
    logits = torch.randn(3, 4, 6, 2, generator=torch.Generator().manual_seed(1))
    batch = sample_bits(logits, tau=0.5, top_p=0.97, generator=[torch.Generator().manual_seed(s) for s in (5, 6, 7)])
    for i, s in enumerate((5, 6, 7)):
        single = sample_bits(logits[i:i + 1], tau=0.5, top_p=0.97, generator=torch.Generator().manual_seed(s))
        assert torch.equal(batch[i:i + 1], single)
    with pytest.raises(ValueError):
        sample_bits(logits, generator=[torch.Generator()])


def test_sample_bits_follows_probabilities_and_temperature():
    logits = torch.tensor([0.0, 1.0]).expand(1, 20000, 1, 2)  # p(1) = sigmoid(1) = 0.731
    g = torch.Generator().manual_seed(0)
    assert sample_bits(logits, generator=g).float().mean().item() == pytest.approx(0.731, abs=0.02)
    assert sample_bits(logits, tau=0.5, generator=g).float().mean().item() == pytest.approx(0.881, abs=0.02)
    assert sample_bits(logits * 100, generator=g).float().mean().item() == 1.0


def test_bit_logit_layout_and_per_scale_settings():
    flat = torch.arange(8.0).view(1, 1, 8)
    assert as_bit_logits(flat)[0, 0].tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]  # (bit d: "0", "1")
    assert per_scale(3.0, 3, "cfg") == [3.0, 3.0, 3.0]
    assert per_scale([1, 2, 3, 4], 3, "cfg") == [1.0, 2.0, 3.0]
    with pytest.raises(InputError):
        per_scale([1.0], 3, "tau")
    SamplingConfig(cfg_scale=[1.0, 3.0], tau=[0.5, 1.0]).validate()


def _multinomial_reference(logits, tau, top_k, top_p, generators):
    """What `sample_bits` did before its batched draw: the filter, a softmax, one multinomial call per sample."""
    B, l, D = logits.shape[:3]
    logits = logits if tau == 1.0 else logits.mul(1 / tau)
    probs = top_k_top_p_filter(logits, top_k, top_p).softmax(dim=-1)
    return torch.stack([torch.multinomial(probs[b].reshape(-1, 2), 1, replacement=True, generator=g).view(l, D)
                        for b, g in enumerate(generators)])


@pytest.mark.parametrize("shape", [(1, 1, 32, 2), (2, 1, 3, 2), (3, 36, 32, 2), (16, 64, 32, 2)])
@pytest.mark.parametrize("top_k,top_p,tau", [(0, 0.0, 1.0), (0, 0.97, 1.0), (2, 0.9, 0.5), (1, 0.0, 1.0),
                                              (0, 0.3, 1.0), (900, 0.97, 2.0)])
def test_per_sample_draws_are_the_per_sample_multinomial_calls(shape, top_k, top_p, tau):
    logits = torch.randn(shape, generator=torch.Generator().manual_seed(shape[0] * 100 + shape[1])) * 4
    logits[0, 0, 0] = torch.tensor([30.0, -30.0])  # a bit forced by top-p
    seeds = [7 + b for b in range(shape[0])]
    got = sample_bits(logits, tau=tau, top_k=top_k, top_p=top_p,
                      generator=[torch.Generator().manual_seed(s) for s in seeds])
    ref = _multinomial_reference(logits, tau, top_k, top_p, [torch.Generator().manual_seed(s) for s in seeds])
    assert torch.equal(got, ref)
    one = sample_bits(logits, tau=tau, top_k=top_k, top_p=top_p, generator=torch.Generator().manual_seed(3))
    probs = top_k_top_p_filter(logits if tau == 1.0 else logits.mul(1 / tau), top_k, top_p).softmax(-1)
    draws = torch.multinomial(probs.reshape(-1, 2), 1, replacement=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(one, draws.view(shape[:3]))


def test_per_sample_draws_reject_nan_like_multinomial():
    logits = torch.zeros(2, 1, 4, 2)
    logits[1, 0, 2, 0] = float("nan")
    with pytest.raises(RuntimeError, match="nan"):
        sample_bits(logits, generator=[torch.Generator(), torch.Generator()])
