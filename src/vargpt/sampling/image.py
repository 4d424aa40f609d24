"""Scale-by-scale image-token sampling with the visual decoder (KV-cached, CFG in one batch).

Contract
--------
`sample_image_tokens(decoder, cond, schedule, sampling, generator=...)` walks the scale schedule coarse to
fine. At scale k it takes the block input of that scale (scale 0: ``decoder.first_tokens(cond_BD)``; later:
``word_embed`` of the running code sum resized to the scale), passes it through the optional per-scale
``hook(k, x_BlC) -> x_BlC`` (the unified model puts the LLM there: project in -> LLM with its own KV cache
-> project out), runs the decoder blocks on it (`VisualDecoder.forward_step` with an explicit
`DecoderKVCache`, or an uncached full pass over all scales so far), applies 1/tau and CFG to the logits,
samples every bit (`vargpt.sampling.bits`), turns the bits into codes and adds them, up-sampled, to the sum.

Classifier-free guidance: when any per-scale cfg differs from 1 the condition must hold 2B rows, the B
conditional rows first, then the B unconditional ones (`DecoderCondition.cat(cond, uncond)`); both run as one
batch through the decoder. What "unconditional" means (which cond_BD, which cross-attention context, what the
hook does with those rows) is decided by whoever builds ``cond`` and ``hook`` (see
`vargpt.models.generation` for the published behaviour and the alternative).

Returns per-scale bits ``[B, h, w, D]``, the summed codes ``[B, D, H, W]`` (decode them with the VAE), and, on
request, every scale's raw decoder logits (all rows, before 1/tau and CFG).

Differences from the published implementation (``autoregressive_infer_cfg``): any batch size, per-sample
generators, per-scale cfg/tau lists from `SamplingConfig`, teacher forcing of given bits, a progress callback;
no image is written to disk and nothing on the modules is switched on or off.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from vargpt.config import SamplingConfig
from vargpt.errors import InputError
from vargpt.models.quantizer import bits_to_codes, next_scale_input, upsample_codes
from vargpt.models.visual_decoder import DecoderCondition, VisualDecoder
from vargpt.sampling.bits import as_bit_logits, cfg_mix, sample_bits
from vargpt.scales import Schedule

__all__ = ["ImageTokens", "ScaleHook", "per_scale", "sample_image_tokens"]

ScaleHook = Callable[[int, Tensor], Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None


@dataclass
class ImageTokens:
    """Result of `sample_image_tokens`."""

    bits: list[Tensor]  # per scale [B, h, w, D] long
    summed_codes_BDHW: Tensor  # input of the VAE decoder
    logits: list[Tensor] = field(default_factory=list)  # per scale raw logits [rows, l, 2D] (return_logits=True)


def per_scale(value: float | Sequence[float], n: int, name: str) -> list[float]:
    """A setting for each of n scales: a number is repeated; a list must have at least n entries."""
    if isinstance(value, (int, float)):
        return [float(value)] * n
    if len(value) < n:
        raise InputError(f"sampling.{name} lists {len(value)} values but the schedule has {n} scales")
    return [float(v) for v in value[:n]]


@torch.no_grad()
def sample_image_tokens(decoder: VisualDecoder, cond: DecoderCondition, schedule: Schedule,
                        sampling: SamplingConfig | None = None, *, generator: Generators = None,
                        hook: ScaleHook | None = None, teacher_bits: Sequence[Tensor] | None = None,
                        use_cache: bool = True, return_logits: bool = False,
                        callback: Callable[[int, Tensor], None] | None = None) -> ImageTokens:
    """Sample the bits of every scale. See the module docstring.

    ``generator``: one generator for the batch (the published single draw per scale) or one per sample
    (batch-invariant: sample b's bits depend only on its own generator and condition).
    ``teacher_bits``: per-scale bits [B, h, w, D] used instead of the sampled ones (teacher forcing; the
    draws still happen, so generators advance as in free sampling).
    ``callback(k, bits_BhwD)`` runs after each scale (progress bars, previews, interrupts by raising).
    """
    sampling = sampling or SamplingConfig()
    schedule = tuple(tuple(int(v) for v in s) for s in schedule)
    K = len(schedule)
    cfgs = per_scale(sampling.cfg, K, "cfg")
    taus = per_scale(sampling.tau, K, "tau")
    guided = any(c != 1 for c in cfgs)
    rows = cond.batch_size
    if guided and rows % 2:
        raise InputError(f"classifier-free guidance needs cond and uncond rows (2B), got {rows} rows")
    B = rows // 2 if guided else rows
    H, W = schedule[-1][1:]
    D = decoder.codebook_dim
    device = cond.cond_BD.device

    cache = decoder.new_cache(rows, schedule, device=device, dtype=cond.cond_BD.dtype) if use_cache else None
    x_BlC = decoder.first_tokens(cond.cond_BD)
    block_inputs: list[Tensor] = []
    summed = torch.zeros(B, D, H, W, device=device)
    out = ImageTokens([], summed)
    for k, (_, h, w) in enumerate(schedule):
        if hook is not None:
            x_BlC = hook(k, x_BlC)
        if cache is not None:
            logits = decoder.forward_step(x_BlC, cond, schedule, k, cache)
        else:
            block_inputs.append(x_BlC)
            logits = decoder.forward_train(torch.cat(block_inputs, dim=1), cond, schedule, num_scales=k + 1)
            logits = logits[:, -h * w:]
        if return_logits:
            out.logits.append(logits)
        logits = logits.mul(1 / taus[k])
        logits = cfg_mix(logits[:B], logits[B:], cfgs[k]) if guided and cfgs[k] != 1 else logits[:B]
        bits = sample_bits(as_bit_logits(logits), top_k=sampling.top_k, top_p=sampling.top_p,
                           generator=generator).view(B, h, w, D)
        if teacher_bits is not None:
            bits = teacher_bits[k].reshape(B, h, w, D).to(device=device, dtype=torch.long)
        out.bits.append(bits)
        if callback is not None:
            callback(k, bits)
        codes_BDhw = bits_to_codes(bits)
        if k < K - 1:
            summed = summed + upsample_codes(codes_BDhw, (H, W))
            x_BlC = decoder.embed_inputs(next_scale_input(summed, schedule[k + 1][1:]).to(cond.cond_BD.dtype))
            if guided:
                x_BlC = x_BlC.repeat(2, 1, 1)
        else:
            summed = summed + codes_BDhw
    out.summed_codes_BDHW = summed
    return out
