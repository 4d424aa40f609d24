"""Pure functions for sampling the decoder's bits: CFG mix, top-k / top-p filtering, bit draws.

Contract
--------
Bit logits come as ``[B, l, D, 2]`` (or ``[B, l, 2D]``: columns 2d and 2d+1 are bit d's "0" and "1"); every
bit is an independent 2-way distribution. `sample_bits` returns {0, 1} bits ``[B, l, D]`` (long).

Reproducing the published sampler: it divides the logits by tau, mixes ``cfg * cond + (1 - cfg) * uncond``,
applies top-k then top-p to each 2-way distribution (with the published threshold test ``cumsum <= 1 - top_p``
on the ascending-sorted probabilities, always keeping the largest) and draws with ONE call of
``torch.multinomial`` on the flattened ``[B*l*D, 2]`` probabilities with a generator on the model's device (a
CPU one for the fixtures). With a single generator `sample_bits` draws what that call draws, so the same seed gives
the same bits when the logits match.

Differences from the published implementation: a list of generators (one per sample) draws each sample from
its own generator, so a batch gives the same bits as separate batch-1 calls with the same seeds (the bits of one
``torch.multinomial`` call per sample, drawn in one batched pass: `_draw`); the random numbers come from the
generator's device whatever the model's, so the engine's CPU generators give a seed the same draws on a GPU; the
functions return new tensors instead of filtering the logits in place.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["cfg_mix", "top_k_top_p_filter", "sample_bits", "as_bit_logits"]


def as_bit_logits(logits: Tensor) -> Tensor:
    """``[..., 2D]`` -> ``[..., D, 2]`` (no-op when the last axis already is 2 and the one before is D)."""
    return logits.unflatten(-1, (-1, 2))


def cfg_mix(logits_cond: Tensor, logits_uncond: Tensor, cfg: float) -> Tensor:
    """Classifier-free guidance on logits: ``cfg * cond + (1 - cfg) * uncond`` (the published formula)."""
    return cfg * logits_cond + (1 - cfg) * logits_uncond


def top_k_top_p_filter(logits: Tensor, top_k: int = 0, top_p: float = 0.0) -> Tensor:
    """Set logits outside the top-k / nucleus to -inf along the last axis (a copy; 0 disables a filter).

    top-p as published: sort ascending, drop entries whose cumulative probability is <= 1 - top_p, never the
    largest. On 2-way bit distributions top-k >= 2 is a no-op and top-p 0.97 forces a bit to its majority value
    when the minority probability is <= 0.03.
    """
    V = logits.shape[-1]
    if 0 < top_k < V:  # top-k >= V keeps everything
        kth = logits.topk(top_k, dim=-1, largest=True, sorted=False).values.amin(dim=-1, keepdim=True)
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p > 0.5 and V == 2:
        # Two-way: the sorted cumsum's first entry is the smaller probability, dropped iff <= 1 - top_p; the larger
        # one is >= 1/2 > 1 - top_p. One softmax gives the same floats (the sum of two is order-free) and the same
        # decisions as the sort, cumsum and scatter below.
        return logits.masked_fill(logits.softmax(dim=-1) <= (1 - top_p), -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        remove_sorted = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove_sorted[..., -1:] = False
        remove = torch.zeros_like(remove_sorted).scatter(-1, sorted_idx, remove_sorted)
        logits = logits.masked_fill(remove, -torch.inf)
    return logits


def sample_bits(logits_BlD2: Tensor, *, tau: float = 1.0, top_k: int = 0, top_p: float = 0.0,
                generator: torch.Generator | Sequence[torch.Generator] | None = None) -> Tensor:
    """Draw every bit from its (filtered, tempered) 2-way distribution. Returns long bits [B, l, D].

    ``generator``: one generator for the whole batch (the published single multinomial call), or a sequence
    of B generators, sample b drawing from ``generator[b]``.
    """
    if logits_BlD2.shape[-1] != 2:
        raise ValueError(f"bit logits must end with an axis of 2, got shape {tuple(logits_BlD2.shape)}")
    B, l, D = logits_BlD2.shape[:3]
    logits = logits_BlD2 if tau == 1.0 else logits_BlD2.mul(1 / tau)
    probs = _bit_probs(logits, top_k, top_p)
    if generator is None:
        return torch.multinomial(probs.reshape(-1, 2), 1, replacement=True).view(B, l, D)
    if isinstance(generator, torch.Generator):
        return _draw(probs, [generator])
    if len(generator) != B:
        raise ValueError(f"got {len(generator)} generators for a batch of {B}")
    return _draw(probs, list(generator))


def _bit_probs(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """``top_k_top_p_filter(logits, top_k, top_p).softmax(-1)`` of 2-way logits, the same floats with one softmax.

    top-k >= 2 keeps both entries; top-p > 1/2 drops at most the smaller one, whose softmax becomes exactly 0 and
    the kept one's exactly 1 (exp(0) / (exp(0) + 0)); the others keep the softmax the filter computed. Other filter
    settings go through `top_k_top_p_filter`."""
    if top_k == 1 or 0 < top_p <= 0.5:
        return top_k_top_p_filter(logits, top_k, top_p).softmax(dim=-1)
    probs = logits.softmax(dim=-1)
    if top_p == 0:
        return probs
    drop = probs <= (1 - top_p)
    return torch.where(drop.any(dim=-1, keepdim=True), (~drop).to(probs.dtype), probs)


def _draw(probs_BlD2: Tensor, generators: Sequence[torch.Generator]) -> Tensor:
    """``torch.multinomial(p.reshape(-1, 2), 1, replacement=True, generator=g)`` for each generator's share of the
    batch (all of it for one generator; sample b for ``generators[b]``), in one pass. For one sample that call draws
    q ~ Exp(1) (``exponential_`` on a tensor like its input) and takes argmax(p / q) (torch's one-sample path); here
    each share's q is drawn from its generator on the generator's own device, so the engine's CPU generators draw the
    same numbers for a seed on every device (a CUDA tensor cannot take a CPU generator, and the published code's
    device generator would give other images on a GPU), and is then moved to the probabilities' device; the division
    and argmax run once for the batch. multinomial's validity check (finite, non-negative) runs where it costs no
    device synchronisation, on CPU; `sample_image_tokens` checks the logits of an accelerator once, after its loop.
    Tests compare the bits with the per-sample multinomial calls.
    """
    if probs_BlD2.device.type == "cpu" and not bool(((probs_BlD2 >= 0) & (probs_BlD2 < torch.inf)).all()):
        raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
    draws = [torch.empty(share.shape, dtype=share.dtype, device=g.device).exponential_(generator=g)
             for share, g in zip(probs_BlD2.chunk(len(generators)), generators, strict=True)]
    q = (draws[0] if len(draws) == 1 else torch.cat(draws)).to(probs_BlD2.device, non_blocking=True)
    return torch.div(probs_BlD2, q, out=q).argmax(dim=-1)
