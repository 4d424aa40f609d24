"""Multi-scale bitwise residual quantiser (BSQ) and bitwise self-correction.

Contract
--------
A latent ``F`` of shape [B, D, H, W] (D = codebook_dim bits per position) is quantised coarse to fine over a
scale schedule ``((1, h_1, w_1), ..., (1, H, W))``. At scale k the residual ``F - sum_{j<k} up(q_j)`` is
area-downsampled to (h_k, w_k) (not at the last scale), l2-normalised over D and binarised:
``q = sign(r) / sqrt(D)`` with sign(0) -> -1, bit = 1 where q > 0. Codes are brought back to (H, W) with
bilinear interpolation (the released code calls it "trilinear" on a t = 1 axis; we do the same 5-D call so
the floats agree) and accumulated. Bits are returned channel-last ``[B, h, w, D]`` (uint8; ``.long()`` for a
cross-entropy target), codes channel-first ``[B, D, h, w]``; token order inside a scale is row-major.

Two paths, both as released:

* `residual_quantize` / `MultiScaleBSQ.forward` — the VAE's own path (training and ``vae.encode``):
  straight-through estimator, running residual, next-scale inputs built with the DOWN mode (area).
* `multiscale_bits` — the visual decoder's label builder (``BitwiseSelfCorrection.flip_requant``):
  optional random bit flips per scale, later residuals re-quantised against the corrupted running sum,
  next-scale inputs built with the UP mode (bilinear), as the sampling loop does (`next_scale_input`).

Differences from the published code: pure functions over explicit tensors instead of a 45-flag module;
no unused options (projections, layer norm, decay factors, stochastic depth, random-flip variants);
randomness from an explicit ``torch.Generator`` (published: global numpy and torch RNGs); the commitment
and entropy losses are computed (the published path returns 0, since VARGPT never trains the VAE) following
the BSQ paper's analytic per-bit entropy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vargpt.config import SelfCorrectionConfig
from vargpt.errors import InputError

Schedule = Sequence[tuple[int, int, int]]

__all__ = [
    "MultiScaleBSQ", "MultiScaleTokens", "QuantizerOutput", "add_scale", "bits_to_codes", "bsq_losses",
    "downsample_area", "multiscale_bits", "next_scale_input", "quantize_bsq", "residual_quantize", "sum_codes",
    "upsample_codes",
]


# ----------------------------------------------------------------------------------------------- primitives


def quantize_bsq(residual_BDhw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One BSQ step: returns (codes_BDhw with straight-through gradient, bits_BhwD uint8, z_BhwD).

    ``z`` is the l2-normalised input (channel-last), kept for the commitment / entropy losses.
    """
    D = residual_BDhw.shape[1]
    z_BhwD = F.normalize(residual_BDhw.float().permute(0, 2, 3, 1), dim=-1)
    zhat = torch.where(z_BhwD > 0, 1.0, -1.0).to(z_BhwD.dtype) * (1.0 / D**0.5)
    q_BhwD = z_BhwD + (zhat - z_BhwD).detach()
    bits_BhwD = (q_BhwD > 0).to(torch.uint8)
    return q_BhwD.permute(0, 3, 1, 2), bits_BhwD, z_BhwD


def bits_to_codes(bits_BhwD: Tensor) -> Tensor:
    """Bits {0,1} [B, h, w, D] -> codes (2b - 1)/sqrt(D), l2-normalised as released, as [B, D, h, w] float32."""
    D = bits_BhwD.shape[-1]
    s = 1.0 / math.sqrt(D)
    codes_BhwD = F.normalize(bits_BhwD.float() * s * 2 - s, dim=-1)
    return codes_BhwD.permute(0, 3, 1, 2)


def upsample_codes(codes_BDhw: Tensor, size_hw: tuple[int, int]) -> Tensor:
    """Bilinear resize (align_corners False) to ``size_hw``, done as the released trilinear call on t = 1."""
    return F.interpolate(codes_BDhw.unsqueeze(2), size=(1, *size_hw), mode="trilinear").squeeze(2)


def downsample_area(x_BDHW: Tensor, size_hw: tuple[int, int]) -> Tensor:
    """Area (adaptive average) resize to ``size_hw``, done as the released 5-D call on t = 1."""
    return F.interpolate(x_BDHW.unsqueeze(2), size=(1, *size_hw), mode="area").squeeze(2)


def next_scale_input(summed_BDHW: Tensor, size_hw: tuple[int, int], *, mode: str = "up") -> Tensor:
    """Accumulated codes -> the decoder input of the next scale, ``x_BlD`` with l = h*w row-major.

    ``mode="up"`` (bilinear) is what released inference and self-correction use; ``mode="area"`` is what the
    VAE's own forward records (its ``var_input``).
    """
    if mode == "up":
        x_BDhw = upsample_codes(summed_BDHW, size_hw)
    elif mode == "area":
        x_BDhw = downsample_area(summed_BDHW, size_hw)
    else:
        raise InputError(f"next_scale_input mode must be 'up' or 'area', got {mode!r}")
    return x_BDhw.flatten(2).transpose(1, 2)


def add_scale(summed_BDHW: Tensor | None, bits_BhwD: Tensor, size_HW: tuple[int, int]) -> Tensor:
    """Sampling-loop step: add scale k's bits, as codes brought to the final grid, to the running sum.

    Then ``next_scale_input(summed, hw_{k+1})`` is the decoder input of scale k+1 and, after the last scale,
    ``vae.decode(summed)`` the image.
    """
    up = upsample_codes(bits_to_codes(bits_BhwD), size_HW)
    return up if summed_BDHW is None else summed_BDHW + up


def sum_codes(bits_list: Sequence[Tensor], size_hw: tuple[int, int] | None = None) -> Tensor:
    """Per-scale bits [B, h_k, w_k, D] -> summed codes [B, D, H, W] (H, W = last scale unless given)."""
    if not bits_list:
        raise InputError("sum_codes needs the bits of at least one scale")
    size_hw = size_hw or tuple(bits_list[-1].shape[1:3])
    summed = None
    for bits in bits_list:
        summed = add_scale(summed, bits, size_hw)
    return summed


def _check_latent(latent_BDHW: Tensor, schedule: Schedule) -> list[tuple[int, int]]:
    if latent_BDHW.ndim != 4:
        raise InputError(f"latent must be [B, D, H, W], got shape {tuple(latent_BDHW.shape)}")
    if not schedule:
        raise InputError("scale schedule is empty; pass e.g. vargpt.scales.schedule_for_grid(H, W)")
    hws = [(int(h), int(w)) for _, h, w in schedule]
    if hws[-1] != tuple(latent_BDHW.shape[2:]):
        raise InputError(f"the scale schedule ends at {hws[-1]} but the latent grid is "
                         f"{tuple(latent_BDHW.shape[2:])}; use vargpt.scales.schedule_for_grid(H, W)")
    return hws


# ----------------------------------------------------------------------------------------------- VAE path


@dataclass
class QuantizerOutput:
    """Result of the VAE's own multi-scale quantisation (`residual_quantize`)."""

    quantized_BDHW: Tensor  # sum of the up-sampled per-scale codes (straight-through gradient to the latent)
    bits: list[Tensor]  # per scale [B, h, w, D] uint8
    var_inputs: list[Tensor]  # K-1 tensors [B, D, h_{k+1}, w_{k+1}]: area-downsampled running sum (released)
    z: list[Tensor] = field(default_factory=list)  # per scale l2-normalised residual [B, h, w, D] (for losses)
    prefix_BDHW: Tensor | None = None  # sum of the first `prefix` scales' codes when asked for (training)


def residual_quantize(latent_BDHW: Tensor, schedule: Schedule, *, prefix: int | None = None) -> QuantizerOutput:
    """The VAE's multi-scale residual quantisation (released ``MultiScaleBSQ.forward``), differentiable (STE).

    ``prefix=k`` also returns the running sum after the first k scales (for a coarse-reconstruction loss).
    """
    hws = _check_latent(latent_BDHW, schedule)
    H, W = hws[-1]
    residual = latent_BDHW.float()
    quantized_out = torch.zeros_like(residual)
    bits, var_inputs, zs, prefix_sum = [], [], [], None
    for k, hw in enumerate(hws):
        r = downsample_area(residual, hw) if hw != (H, W) else residual
        q, b, z = quantize_bsq(r)
        if hw != (H, W):
            q = upsample_codes(q, (H, W))
        residual = residual - q.detach()
        quantized_out = quantized_out + q
        if prefix == k + 1:
            prefix_sum = quantized_out
        bits.append(b)
        zs.append(z)
        if k < len(hws) - 1:
            var_inputs.append(downsample_area(quantized_out, hws[k + 1]))
    return QuantizerOutput(quantized_out, bits, var_inputs, zs, prefix_sum)


def bsq_losses(z_list: Sequence[Tensor], *, inv_temperature: float = 100.0,
               gamma: float = 1.0) -> tuple[Tensor, Tensor]:
    """(commitment, entropy) averaged over scales, for training the VAE.

    commitment = mean ||z - sign(z)/sqrt(D)||^2 per bit; entropy = per-sample bit entropy minus ``gamma`` x
    the entropy of the batch-averaged bit distribution (BSQ's analytic factorised form, divided by the
    inverse temperature as in BSQ), so minimising it makes bits confident per sample and balanced over the batch.
    """
    commit, entropy = [], []
    for z in z_list:
        D = z.shape[-1]
        zhat = torch.where(z > 0, 1.0, -1.0).to(z.dtype) / D**0.5
        commit.append((z - zhat.detach()).pow(2).sum(-1).mean())
        p = torch.sigmoid(-4 * z / D**0.5 * inv_temperature).flatten(0, -2)  # [N, D] prob of bit 0
        prob = torch.stack([p, 1 - p], -1)
        per_sample = -(prob * torch.log(prob + 1e-8)).sum(-1).sum(-1).mean()
        avg = prob.mean(0)
        codebook = -(avg * torch.log(avg + 1e-8)).sum(-1).sum()
        entropy.append((per_sample - gamma * codebook) / inv_temperature)
    return torch.stack(commit).mean(), torch.stack(entropy).mean()


# ----------------------------------------------------------------------------------------------- decoder labels


@dataclass
class MultiScaleTokens:
    """Bit labels and teacher-forcing inputs of one image batch for the visual decoder."""

    bits: list[Tensor]  # per scale [B, h, w, D] uint8: the CLEAN labels
    x_wo_prefix_BLD: Tensor  # [B, L - L_0, D] inputs of scales 1..K-1 (L_0 = 1 token of scale 0)
    summed_BDHW: Tensor  # running sum of all scales' codes (corrupted ones when self-correction flipped bits)
    source_BLD: Tensor | None = None  # with a source latent: `source_residual` of every scale, [B, L, D]

    @property
    def labels_BLD(self) -> Tensor:
        """All scales' bits concatenated, [B, L, D] uint8 (row-major inside a scale)."""
        return torch.cat([b.flatten(1, 2) for b in self.bits], dim=1)


def source_residual(source_BDHW: Tensor, summed_BDHW: Tensor, size_hw: tuple[int, int]) -> Tensor:
    """What a scale of grid ``size_hw`` must add to the running sum ``summed_BDHW`` to reach the latent
    ``source_BDHW`` (both [B, D, H, W]): their difference area-resized to the grid and l2-normalised per position, as
    the quantiser treats a residual (`quantize_bsq`), times sqrt(D) (entries of magnitude ~1, like +-1 bits), as
    [B, h*w, D]. Where an edit keeps the source, the bits of that scale are its signs."""
    r = source_BDHW.float() - summed_BDHW.float()
    if tuple(size_hw) != tuple(r.shape[2:]):
        r = downsample_area(r, size_hw)
    return (F.normalize(r, dim=1) * r.shape[1] ** 0.5).flatten(2).transpose(1, 2)


def multiscale_bits(latent_BDHW: Tensor, schedule: Schedule, *, self_correction: SelfCorrectionConfig | None = None,
                    generator: torch.Generator | None = None, source_BDHW: Tensor | None = None) -> MultiScaleTokens:
    """Labels + inputs for the visual decoder (released ``BitwiseSelfCorrection.flip_requant``), no gradient.

    Without ``self_correction`` (or with strength 0) no bits are flipped and each scale's codes are rebuilt
    from its bits, exactly as the released code does at strength 0. With it, at every scale k < ``apply_layers`` a flip
    probability p is drawn uniformly from {0.00, 0.01, ..., strength} (one draw per scale for the batch) and
    each bit flips independently with probability p; if ``requant`` the (flipped) bits are turned back into
    codes, so later residuals are taken against the corrupted running sum. Labels stay the clean bits.
    ``source_BDHW`` (an edit source's latent, same shape): also record its `source_residual` against the same
    running sum at every scale (``source_BLD``), the source term of ``decoder.source_input = "residual"``.
    """
    hws = _check_latent(latent_BDHW, schedule)
    H, W = hws[-1]
    sc = self_correction if self_correction is not None else SelfCorrectionConfig(strength=0.0)
    if sc.strength > 0 and generator is None:
        raise InputError("bitwise self-correction needs an explicit torch.Generator (generator=...)")
    feats = latent_BDHW.detach().float()
    summed = torch.zeros_like(feats)
    bits_out, inputs, sources = [], [], []
    for k, hw in enumerate(hws):
        if source_BDHW is not None:
            sources.append(source_residual(source_BDHW, summed, hw))
        r = feats - summed
        if k < len(hws) - 1:
            r = downsample_area(r, hw)
        q, bits, _ = quantize_bsq(r)
        bits_out.append(bits)
        if k < sc.apply_layers:
            noisy = bits
            if sc.strength > 0:
                p = torch.randint(0, int(round(100 * sc.strength)) + 1, (1,), generator=generator,
                                  device=generator.device).item() * 0.01
                flip = torch.rand(bits.shape, generator=generator, device=generator.device) < p
                noisy = bits ^ flip.to(device=bits.device, dtype=torch.uint8)
            if sc.requant:
                q = bits_to_codes(noisy)
        summed = summed + upsample_codes(q, (H, W))
        if k < len(hws) - 1:
            inputs.append(next_scale_input(summed, hws[k + 1]))
    D = feats.shape[1]
    x = torch.cat(inputs, dim=1) if inputs else feats.new_zeros(feats.shape[0], 0, D)
    return MultiScaleTokens(bits_out, x, summed, torch.cat(sources, dim=1) if sources else None)


# ----------------------------------------------------------------------------------------------- module


class _BitMask(nn.Module):
    """Holds the released ``lfq.mask`` buffer: 2^(D-1) ... 2^0 (int64), the weights of integer labels."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mask", 2 ** torch.arange(dim - 1, -1, -1, dtype=torch.int64))


class MultiScaleBSQ(nn.Module):
    """The quantiser as a module: no parameters, only the ``lfq.mask`` buffer of the released state dict."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.lfq = _BitMask(dim)

    def forward(self, latent_BDHW: Tensor, schedule: Schedule, *, prefix: int | None = None) -> QuantizerOutput:
        return residual_quantize(latent_BDHW, schedule, prefix=prefix)

    def bits_to_int(self, bits_BhwD: Tensor) -> Tensor:
        """Integer label of each position (bit 0 of the vector = most significant), [B, h, w] int64."""
        return (bits_BhwD.long() * self.lfq.mask).sum(-1)
