"""BSQ VAE: conformance with fixture (c), released key layout at full size, input checks."""

import dataclasses
import math

import pytest
import torch

from conftest import VAE_DECODE_TOL, assert_close_recorded, load_fixture
from vargpt.config import VAEConfig, official_config, tiny_config
from vargpt.errors import ConfigError, InputError
from vargpt.models.quantizer import multiscale_bits, sum_codes
from vargpt.models.vae import BSQVAE

TOL = dict(atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def fixture_vae(fixture_config, fixture_weights):
    vae = BSQVAE(fixture_config.vae).eval()
    sd = {k.removeprefix("vae_local."): v for k, v in fixture_weights.items() if k.startswith("vae_local.")}
    missing, unexpected = vae.load_state_dict(sd, strict=True)
    assert not missing and not unexpected
    return vae


@pytest.fixture(scope="module")
def c(fixtures_dir):
    return load_fixture(fixtures_dir, "c_vae")


def _schedule(c_):
    return tuple((1, c_[f"bits_scale{k:02d}"].shape[2], c_[f"bits_scale{k:02d}"].shape[3]) for k in range(7))


def test_fixture_vae_conformance(fixture_vae, c, record_property):
    sched = _schedule(c)
    assert sched == fixture_vae.schedule_for(c["x"])  # the '0.06M' 1:1 template
    x = c["image_uint8_hwc"].permute(2, 0, 1)[None].float() / 127.5 - 1
    assert torch.equal(x, c["x"])
    with torch.no_grad():
        latent = fixture_vae.encode_latent(x)
        assert_close_recorded(record_property, "c.raw_features", latent, c["raw_features"], **TOL)
        q = fixture_vae.quantizer(latent, sched)
        for k in range(7):
            assert torch.equal(q.bits[k], c[f"bits_scale{k:02d}"][:, 0]), f"bits of scale {k}"
        for k in range(6):
            torch.testing.assert_close(q.var_inputs[k], c[f"var_input_scale{k:02d}"][:, :, 0], **TOL)
        torch.testing.assert_close(q.quantized_BDHW, c["quantized_summed"], **TOL)
        assert_close_recorded(record_property, "c.decoded_from_quantized", fixture_vae.decode(q.quantized_BDHW),
                              c["decoded_from_quantized"], **TOL)
        bits = [c[f"bits_scale{k:02d}"][:, 0] for k in range(7)]
        torch.testing.assert_close(sum_codes(bits), c["summed_codes_from_bits"][:, :, 0], **TOL)
        # decoded_from_bits: measured 8.8e-6 with 2 threads, 3.7e-5 with 1 (see VAE_DECODE_TOL)
        assert_close_recorded(record_property, "c.decoded_from_bits", fixture_vae.decode_bits(bits, sched),
                              c["decoded_from_bits"], **VAE_DECODE_TOL)
        # the released 5-D code layout is accepted by decode too
        torch.testing.assert_close(fixture_vae.decode(c["summed_codes_from_bits"]), c["decoded_from_bits"],
                                   **VAE_DECODE_TOL)


def test_channels_last_decode_psnr(fixture_vae, c):
    """The engine's decode (channels-last activations) against the default fp32 decode of the same codes: PSNR >= 45
    dB required (measured > 100 dB: the sums only come in another order), same shape and layout out."""
    with torch.no_grad():
        ref = fixture_vae.decode(c["quantized_summed"])
        fast = fixture_vae.decode(c["quantized_summed"], channels_last=True)
    assert fast.shape == ref.shape and fast.is_contiguous()
    mse = (fast - ref).pow(2).mean().item()
    assert mse == 0 or 10 * math.log10(4.0 / mse) >= 45  # peak-to-peak 2 for images in [-1, 1]


@torch.no_grad()
def test_channels_last_decode_with_refinement_blocks():
    """The patch decoder with ``refine_blocks`` (random refinement weights, so the branch counts): channels-last
    decode within 45 dB PSNR of the default layout, contiguous NCHW out."""
    cfg = VAEConfig(codebook_dim=16, base_ch=32, arch="patch", patch_size=8, num_res_blocks=1, refine_blocks=2)
    torch.manual_seed(0)
    vae = BSQVAE(cfg).eval()
    torch.nn.init.normal_(vae.decoder.refine.conv_out.conv.weight, std=0.05)
    z = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    ref, fast = vae.decode(z), vae.decode(z, channels_last=True)
    assert fast.shape == ref.shape == (2, 3, 64, 64) and fast.is_contiguous()
    mse = (fast - ref).pow(2).mean().item()
    assert mse == 0 or 10 * math.log10(4.0 / mse) >= 45
    refine, vae.decoder.refine = vae.decoder.refine, None
    assert (vae.decode(z, channels_last=True) - fast).abs().max() > 1e-3  # the refinement is part of what is compared
    vae.decoder.refine = refine


def test_fixture_decoder_labels(fixture_vae, c):
    """The self-correction path at strength 0 gives the same labels as the VAE path."""
    sched = _schedule(c)
    tok = fixture_vae.encode(c["x"], sched)
    for k in range(7):
        assert torch.equal(tok.bits[k], c[f"bits_scale{k:02d}"][:, 0])
    torch.testing.assert_close(tok.summed_BDHW, c["summed_codes_from_bits"][:, :, 0], **TOL)
    assert tok.x_wo_prefix_BLD.shape == (1, 520, 32)
    again = multiscale_bits(c["raw_features"], sched)
    assert all(torch.equal(a, b) for a, b in zip(again.bits, tok.bits, strict=True))


def _released_vae_keys(base=128, mult=(1, 2, 4, 4, 4), nres=2, zc=32):
    """Key -> shape of the released ``vae_local`` (reference-facts 2.5), written out independently of our modules."""
    keys = {}

    def conv(name, cin, cout, k):
        keys[f"{name}.conv.weight"] = (cout, cin, k, k)
        keys[f"{name}.conv.bias"] = (cout,)

    def norm(name, ch):
        keys[f"{name}.norm.weight"] = (ch,)
        keys[f"{name}.norm.bias"] = (ch,)

    def res(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    chans = [base * m for m in mult]
    conv("encoder.conv_in", 3, base, 3)
    cin = base
    for i, ch in enumerate(chans):
        for b in range(nres):
            res(f"encoder.down.{i}.block.{b}", cin, ch)
            cin = ch
        if i < len(chans) - 1:
            conv(f"encoder.down.{i}.downsample.conv", ch, ch, 3)
    res("encoder.mid.block_1", cin, cin)
    res("encoder.mid.block_2", cin, cin)
    norm("encoder.norm_out", cin)
    conv("encoder.conv_out", cin, zc, 3)
    conv("decoder.conv_in", zc, chans[-1], 3)
    res("decoder.mid.block_1", chans[-1], chans[-1])
    res("decoder.mid.block_2", chans[-1], chans[-1])
    cin = chans[-1]
    for i in reversed(range(len(chans))):
        for b in range(nres + 1):
            res(f"decoder.up.{i}.block.{b}", cin, chans[i])
            cin = chans[i]
        if i > 0:
            conv(f"decoder.up.{i}.upsample.conv", cin, cin, 3)
    norm("decoder.norm_out", cin)
    conv("decoder.conv_out", cin, 3, 3)
    return keys


def test_official_layout_loads_on_meta_device():
    expected = _released_vae_keys()
    assert expected["decoder.up.1.block.0.nin_shortcut.conv.weight"] == (256, 512, 1, 1)
    with torch.device("meta"):
        vae = BSQVAE(official_config().vae)
    n_params = sum(p.numel() for p in vae.parameters())
    assert round(n_params / 1e6, 1) == 110.1
    assert n_params == sum(torch.Size(s).numel() for s in expected.values())
    sd = {k: torch.empty(s, device="meta") for k, s in expected.items()}
    sd["quantizer.lfq.mask"] = torch.empty(32, dtype=torch.int64, device="meta")
    missing, unexpected = vae.load_state_dict(sd, strict=True, assign=True)
    assert not missing and not unexpected
    assert vae.stride == 16


def test_fixture_key_set_matches_independent_layout(fixture_config, fixture_weights):
    v = fixture_config.vae
    expected = _released_vae_keys(v.base_ch, v.ch_mult, v.num_res_blocks, v.codebook_dim)
    got = {k.removeprefix("vae_local."): tuple(t.shape) for k, t in fixture_weights.items()
           if k.startswith("vae_local.") and not k.endswith("lfq.mask")}
    assert got == expected


@pytest.fixture(scope="module")
def tiny_vae():
    return BSQVAE(tiny_config().vae).eval()


def test_tiny_round_trip_shapes(tiny_vae):
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    tok = tiny_vae.encode(x)
    assert [b.shape[1:3] for b in tok.bits] == [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8)]
    y = tiny_vae.decode_bits(tok.bits)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    coarse = tiny_vae.decode_bits(tok.bits[:2], tiny_vae.schedule_for(x))
    assert coarse.shape == x.shape
    recon, q = tiny_vae(x)
    assert recon.shape == x.shape and len(q.z) == 5


def test_patch_arch_round_trip_and_key_layout():
    cfg = dataclasses.replace(tiny_config().vae, arch="patch", patch_size=8, base_ch=32, codebook_dim=24)
    cfg.validate()
    vae = BSQVAE(cfg).eval()
    assert vae.stride == 8
    x = torch.rand(2, 3, 80, 40) * 2 - 1
    tok = vae.encode(x)
    assert [tuple(b.shape[1:]) for b in tok.bits][-1] == (10, 5, 24)
    assert vae.decode_bits(tok.bits).shape == x.shape
    recon, q = vae(x)
    assert recon.shape == x.shape and q.quantized_BDHW.shape == (2, 24, 10, 5)
    # compute lives at the latent grid: no module sees a 64 px or 32 px feature map
    keys = set(vae.state_dict())
    assert "encoder.conv_in.conv.weight" in keys and "decoder.conv_out.conv.weight" in keys
    assert not any(".down." in k or ".up." in k for k in keys)
    # per-patch MLPs, 4x the width: patch -> 128 -> 32 in the encoder, 32 -> 128 -> 8x8x3 pixels in the decoder
    assert vae.state_dict()["encoder.conv_in.conv.weight"].shape == (128, 3, 8, 8)
    assert vae.state_dict()["decoder.conv_out.conv.weight"].shape == (192, 128, 1, 1)
    # the released layout is unchanged by the new field
    assert BSQVAE(tiny_config().vae).state_dict().keys() == BSQVAE(
        dataclasses.replace(tiny_config().vae, patch_size=4)).state_dict().keys()


def test_patch_decoder_mlp_width():
    """``patch_mlp_ch`` widens the decoder's per-patch MLP (default 4 * base_ch: the shipped key shapes), with and
    without refinement blocks, and round-trips a picture at the right shape."""
    base = dataclasses.replace(tiny_config().vae, arch="patch", patch_size=8, base_ch=32, codebook_dim=24)
    assert base.decoder_mlp_ch == 128
    for refine in (0, 1):
        cfg = dataclasses.replace(base, patch_mlp_ch=256, refine_blocks=refine)
        cfg.validate()
        vae = BSQVAE(cfg).eval()
        sd = vae.state_dict()
        assert sd["decoder.proj_out.conv.weight"].shape == (256, 32, 1, 1)
        assert sd["decoder.conv_out.conv.weight"].shape == (192, 256, 1, 1)
        assert sd["encoder.conv_in.conv.weight"].shape == (128, 3, 8, 8)  # the encoder is unchanged
        recon, _ = vae(torch.rand(1, 3, 32, 48) * 2 - 1)
        assert recon.shape == (1, 3, 32, 48)


@pytest.mark.parametrize("over, match", [({"arch": "mlp"}, "conv or patch"), ({"patch_size": 0}, "patch_size"),
                                         ({"patch_mlp_ch": -1}, "patch_mlp_ch"),
                                         ({"arch": "patch", "refine_blocks": 1, "patch_mlp_ch": 100}, "patch_size")])
def test_bad_arch_config(over, match):
    with pytest.raises(ConfigError, match=match):
        dataclasses.replace(tiny_config().vae, **over).validate()


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.zeros(1, 1, 64, 64), "must be \\[B, 3, H, W\\]"),
        (torch.zeros(1, 4, 64, 64), "convert to RGB"),
        (torch.zeros(3, 64, 64), "must be \\[B, 3, H, W\\]"),
        (torch.zeros(1, 3, 60, 64), "not a multiple of the VAE stride 8"),
        (torch.full((1, 3, 64, 64), float("nan")), "NaN"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "dtype is torch.uint8"),
    ],
)
def test_bad_input(tiny_vae, x, match):
    with pytest.raises(InputError, match=match):
        tiny_vae.encode_latent(x)
