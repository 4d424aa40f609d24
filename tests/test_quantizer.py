"""Multi-scale BSQ quantiser: primitives, the two released paths, self-correction, losses."""

import math

import pytest
import torch
import torch.nn.functional as F

from vargpt.config import SelfCorrectionConfig
from vargpt.errors import InputError
from vargpt.models.quantizer import (
    MultiScaleBSQ,
    bits_to_codes,
    bsq_losses,
    multiscale_bits,
    next_scale_input,
    quantize_bsq,
    residual_quantize,
    sum_codes,
    upsample_codes,
)

SCHED = ((1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 6, 6), (1, 8, 8))


def _latent(B=2, D=16, H=8, W=8, seed=0):
    return torch.randn(B, D, H, W, generator=torch.Generator().manual_seed(seed))


def test_bits_to_codes_values_and_layout():
    bits = torch.tensor([[[[1, 0, 0, 1]]]], dtype=torch.uint8)  # [1, 1, 1, 4]
    codes = bits_to_codes(bits)
    assert codes.shape == (1, 4, 1, 1)
    assert torch.allclose(codes[0, :, 0, 0], torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_quantize_sign_zero_is_bit_zero_and_codes_unit_norm():
    r = torch.tensor([1.0, -2.0, 0.0, 3.0]).view(1, 4, 1, 1)
    q, bits, z = quantize_bsq(r)
    assert bits.flatten().tolist() == [1, 0, 0, 1]
    assert torch.allclose(q.flatten(), torch.tensor([0.5, -0.5, -0.5, 0.5]))
    assert torch.allclose(z.norm(dim=-1), torch.ones(1, 1, 1))
    r = _latent()
    q, bits, _ = quantize_bsq(r)
    assert torch.allclose(q.norm(dim=1), torch.ones(2, 8, 8), atol=1e-6)
    assert torch.equal(bits.permute(0, 3, 1, 2).bool(), r > 0)


def test_quantize_straight_through_gradient():
    r = _latent(1, 4, 2, 2).requires_grad_()
    q, _, _ = quantize_bsq(r)
    (q * torch.randn_like(q)).sum().backward()
    assert r.grad is not None and r.grad.abs().sum() > 0


def test_upsample_is_bilinear_and_next_scale_input_row_major():
    x = _latent(1, 3, 2, 3)
    assert torch.allclose(upsample_codes(x, (4, 6)), F.interpolate(x, size=(4, 6), mode="bilinear"), atol=1e-6)
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).view(1, 2, 3, 4)
    t = next_scale_input(x, (3, 4))
    assert t.shape == (1, 12, 2)
    assert t[0, 5].tolist() == [5.0, 17.0]  # token 5 = row 1, column 1
    area = next_scale_input(x, (1, 1), mode="area")
    assert torch.allclose(area[0, 0], x.mean(dim=(2, 3))[0])
    with pytest.raises(InputError):
        next_scale_input(x, (1, 1), mode="nearest")


def test_multiscale_bits_shapes_and_consistency_with_vae_path():
    lat = _latent()
    tok = multiscale_bits(lat, SCHED)
    assert [tuple(b.shape) for b in tok.bits] == [(2, h, w, 16) for _, h, w in SCHED]
    assert tok.bits[0].dtype == torch.uint8
    L = sum(h * w for _, h, w in SCHED)
    assert tok.labels_BLD.shape == (2, L, 16)
    assert tok.x_wo_prefix_BLD.shape == (2, L - 1, 16)
    assert torch.allclose(sum_codes(tok.bits), tok.summed_BDHW, atol=1e-6)
    # the last input is the running sum after scale K-2 at the final grid
    prefix = sum_codes(tok.bits[:-1], (8, 8))
    assert torch.allclose(tok.x_wo_prefix_BLD[:, -64:], prefix.flatten(2).transpose(1, 2), atol=1e-6)
    out = residual_quantize(lat, SCHED)
    assert all(torch.equal(a, b) for a, b in zip(out.bits, tok.bits, strict=True))
    assert len(out.var_inputs) == len(SCHED) - 1
    assert torch.allclose(out.quantized_BDHW, tok.summed_BDHW, atol=1e-5)


def test_prefix_sum_for_coarse_loss():
    lat = _latent()
    out = residual_quantize(lat, SCHED, prefix=2)
    assert torch.allclose(out.prefix_BDHW, sum_codes(out.bits[:2], (8, 8)), atol=1e-5)
    assert residual_quantize(lat, SCHED).prefix_BDHW is None


def test_more_scales_reconstruct_better():
    lat = _latent(4, 16, 8, 8)
    errs = [(sum_codes(multiscale_bits(lat, SCHED).bits[:k], (8, 8)) - lat).pow(2).mean().item()
            for k in range(1, len(SCHED) + 1)]
    assert errs[-1] < errs[0]


def test_schedule_must_end_at_latent_grid():
    with pytest.raises(InputError, match="schedule ends at"):
        multiscale_bits(_latent(), SCHED[:-1])
    with pytest.raises(InputError, match="Generator"):
        multiscale_bits(_latent(), SCHED, self_correction=SelfCorrectionConfig())


def _flip_fraction(seed, strength=0.3, D=16):
    lat = _latent(8, D, 16, 16, seed=1)
    one = ((1, 16, 16),)
    g = torch.Generator().manual_seed(seed)
    tok = multiscale_bits(lat, one, self_correction=SelfCorrectionConfig(strength=strength), generator=g)
    noisy_bits = (tok.summed_BDHW > 0).permute(0, 2, 3, 1).to(torch.uint8)
    return (noisy_bits != tok.bits[0]).float().mean().item(), tok


def test_self_correction_flip_rate_and_determinism():
    fracs = [_flip_fraction(s)[0] for s in range(8)]
    assert all(f <= 0.33 for f in fracs)
    assert max(fracs) > 0.02  # some draws flip bits
    f0, t0 = _flip_fraction(3)
    f1, t1 = _flip_fraction(3)
    assert f0 == f1 and torch.equal(t0.summed_BDHW, t1.summed_BDHW)
    # labels stay clean
    clean = multiscale_bits(_latent(8, 16, 16, 16, seed=1), ((1, 16, 16),))
    assert torch.equal(t0.bits[0], clean.bits[0])


def test_self_correction_changes_later_labels_and_respects_apply_layers():
    lat = _latent(4, 16, 8, 8)
    clean = multiscale_bits(lat, SCHED)
    g = torch.Generator().manual_seed(0)
    noisy = multiscale_bits(lat, SCHED, self_correction=SelfCorrectionConfig(strength=0.5), generator=g)
    assert torch.equal(noisy.bits[0], clean.bits[0])
    assert any(not torch.equal(a, b) for a, b in zip(noisy.bits[1:], clean.bits[1:], strict=True))
    off = multiscale_bits(lat, SCHED, self_correction=SelfCorrectionConfig(strength=0.5, apply_layers=0),
                          generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(off.bits, clean.bits, strict=True))
    assert torch.equal(off.x_wo_prefix_BLD, clean.x_wo_prefix_BLD)


def test_losses():
    D = 16
    z = F.normalize(torch.randn(4, 8, 8, D), dim=-1)
    commit, ent = bsq_losses([z])
    assert commit > 0
    z_on = torch.sign(z) / math.sqrt(D)
    assert bsq_losses([z_on])[0] < 1e-10
    # balanced, confident bits have lower entropy loss than identical (collapsed) bits
    collapsed = torch.ones(4, 8, 8, D) / math.sqrt(D)
    assert bsq_losses([z_on])[1] < bsq_losses([collapsed])[1]


def test_module_mask_and_int_labels():
    m = MultiScaleBSQ(4)
    assert m.lfq.mask.tolist() == [8, 4, 2, 1]
    assert list(m.state_dict()) == ["lfq.mask"]
    bits = torch.tensor([[[[1, 0, 1, 1]]]], dtype=torch.uint8)
    assert m.bits_to_int(bits).item() == 11
