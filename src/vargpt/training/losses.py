"""Training losses as pure functions: text CE, bit CE, image log-probabilities, DPO.

Contract
--------
* `text_loss(logits_BSV, labels_BS)`: next-token cross-entropy, logits at position t predict label t+1, mean over
  the labels that are not ``IGNORE_INDEX`` (-100). Computed in fp32. A batch without any label gives 0 (with a
  graph), not NaN.
* `published_text_labels(input_ids, image_gen_pad_id)`: the targets the published generation loss uses (the whole
  sequence, prompt and padding included, only the image pads ignored) — for ``CompatConfig.published_text_loss``.
  Our default supervises the answer tokens only (the processor's ``labels``).
* `bit_loss(logits, bits, reduction=..., schedule=...)`: cross-entropy of every bit of every image token.
  ``logits`` are ``[B, L, D, 2]`` or ``[B, L, 2D]`` (columns 2d, 2d+1 = bit d's "0" and "1", as the released head),
  ``bits`` ``[B, L, D]`` in {0, 1}. ``"mean"``: mean over all B*L*D bits (what the published VARGPT computes, see
  reference-facts 8.2 / rough edge 1); ``"scale_reweighted"``: upstream Infinity's per-token weights
  sqrt(area_last) / sqrt(area_scale), normalised to sum 1 over the L tokens (`scale_weights`), applied to the
  per-token mean over bits, summed over tokens, averaged over the batch.
* `bit_logprob(logits, bits)` -> ``[B]``: log pi(image) = sum over scales, positions and bits of the log-softmax at
  the label (``average=True``: divided by the number of tokens L, for IPO as the published fork does).
* `dpo_loss(...)` -> ``DPOLoss(loss, chosen_rewards, rejected_rewards)``: the TRL / LLaMA-Factory formulas
  (``sigmoid`` with optional label smoothing, ``hinge``, ``ipo``); rewards are beta * (log pi_theta - log pi_ref),
  detached. `dpo_metrics` turns the rewards into the usual scalars (accuracy, margin).

Differences from the published implementation: the published image loss reduces with a plain mean, so its
``bitloss_type`` / ``reweight_loss_by_scale`` options are no-ops; here ``"scale_reweighted"`` really reweights.
The DPO loss is averaged over any batch size (the published run used batch 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100

__all__ = [
    "IGNORE_INDEX",
    "DPOLoss",
    "bit_logprob",
    "bit_loss",
    "dpo_loss",
    "dpo_metrics",
    "published_text_labels",
    "scale_weights",
    "text_loss",
]


def text_loss(logits_BSV: Tensor, labels_BS: Tensor) -> Tensor:
    """Shifted next-token cross-entropy over labels != -100 (mean over supervised tokens; 0 if there are none)."""
    logits = logits_BSV[:, :-1].float()
    labels = labels_BS[:, 1:].to(logits.device)
    valid = labels != IGNORE_INDEX
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)


def published_text_labels(input_ids_BS: Tensor, image_gen_pad_id: int) -> Tensor:
    """The published generation-sample targets: every input id (prompt and padding too), image pads ignored."""
    labels = input_ids_BS.clone()
    labels[input_ids_BS == image_gen_pad_id] = IGNORE_INDEX
    return labels


def _bit_logits(logits: Tensor, bits_BLD: Tensor) -> Tensor:
    """``[B, L, D, 2]`` float32 view of the bit logits, checked against ``bits``."""
    if logits.dim() == 3:
        logits = logits.unflatten(-1, (-1, 2))
    if logits.shape[:-1] != bits_BLD.shape or logits.shape[-1] != 2:
        raise ValueError(f"bit logits {tuple(logits.shape)} do not match bits {tuple(bits_BLD.shape)}: expected "
                         "[B, L, D, 2] or [B, L, 2D] logits for [B, L, D] bits")
    return logits.float()


def scale_weights(schedule: Sequence[Sequence[int]]) -> Tensor:
    """Infinity's per-token weights: sqrt(area_last) / sqrt(area_scale) for every token, normalised to sum 1."""
    areas = [t * h * w for t, h, w in schedule]
    last = areas[-1] ** 0.5
    w = torch.cat([torch.full((a,), last / a**0.5, dtype=torch.float64) for a in areas])
    return (w / w.sum()).float()


def bit_loss(logits: Tensor, bits_BLD: Tensor, *, reduction: Literal["mean", "scale_reweighted"] = "mean",
             schedule: Sequence[Sequence[int]] | None = None) -> Tensor:
    """Bit cross-entropy; ``"mean"`` as published, ``"scale_reweighted"`` as upstream Infinity (needs ``schedule``)."""
    logits_BLD2 = _bit_logits(logits, bits_BLD)
    target = bits_BLD.long()
    ce_BLD = F.cross_entropy(logits_BLD2.reshape(-1, 2), target.reshape(-1), reduction="none").view(target.shape)
    if reduction == "mean":
        return ce_BLD.mean()
    if reduction != "scale_reweighted":
        raise ValueError(f"unknown bit loss reduction {reduction!r}; use 'mean' or 'scale_reweighted'")
    if schedule is None:
        raise ValueError("reduction 'scale_reweighted' needs the scale schedule of the tokens")
    w_L = scale_weights(schedule).to(ce_BLD.device)
    if w_L.numel() != ce_BLD.shape[1]:
        raise ValueError(f"the schedule has {w_L.numel()} tokens but the logits have {ce_BLD.shape[1]}")
    return (ce_BLD.mean(-1) * w_L).sum(-1).mean()


def bit_logprob(logits: Tensor, bits_BLD: Tensor, *, average: bool = False, weights_L: Tensor | None = None
                ) -> Tensor:
    """``[B]``: sum over tokens and bits of log p(label) (``average``: divided by the number of tokens L;
    ``weights_L``: each token's bits weighted, e.g. ``scale_weights(schedule) * L``, coarse scales above fine)."""
    logp_BLD2 = torch.log_softmax(_bit_logits(logits, bits_BLD), dim=-1)
    picked_BL = logp_BLD2.gather(-1, bits_BLD.long().unsqueeze(-1)).squeeze(-1).sum(-1)
    if weights_L is not None:
        if weights_L.numel() != picked_BL.shape[1]:
            raise ValueError(f"{weights_L.numel()} token weights for {picked_BL.shape[1]} tokens")
        picked_BL = picked_BL * weights_L.to(picked_BL)
    total_B = picked_BL.sum(1)
    return total_B / bits_BLD.shape[1] if average else total_B


class DPOLoss(NamedTuple):
    loss: Tensor  # scalar, mean over pairs
    chosen_rewards: Tensor  # [B], beta * (log pi_theta(y_w) - log pi_ref(y_w)), detached
    rejected_rewards: Tensor  # [B]


def dpo_loss(pol_chosen: Tensor, pol_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float,
             loss_type: Literal["sigmoid", "hinge", "ipo"] = "sigmoid", label_smoothing: float = 0.0,
             dpop_lambda: float = 0.0) -> DPOLoss:
    """DPO on sequence log-probs ``[B]`` (TRL's ``dpo_loss``): sigmoid = -log sigmoid(beta * margin) where
    margin = (pol_w - ref_w) - (pol_l - ref_l). ``dpop_lambda`` > 0 is DPO-Positive (Pal et al. 2024, arXiv
    2402.13228): the margin loses ``dpop_lambda * max(0, ref_w - pol_w)``, a penalty that pushes the chosen answer's
    log-prob back up to the reference's whenever it falls below it (plain DPO lets both log-probs fall)."""
    logits = (pol_chosen - pol_rejected) - (ref_chosen - ref_rejected)
    if dpop_lambda:
        logits = logits - dpop_lambda * torch.relu(ref_chosen - pol_chosen)
    if loss_type == "sigmoid":
        losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                  - F.logsigmoid(-beta * logits) * label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}; use sigmoid, hinge or ipo")
    chosen_rewards = beta * (pol_chosen - ref_chosen).detach()
    rejected_rewards = beta * (pol_rejected - ref_rejected).detach()
    return DPOLoss(losses.mean(), chosen_rewards, rejected_rewards)


def dpo_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, Tensor]:
    """Implicit-reward scalars: mean chosen / rejected reward, margin, and accuracy (chosen > rejected)."""
    return {
        "rewards_chosen": chosen_rewards.float().mean(),
        "rewards_rejected": rejected_rewards.float().mean(),
        "rewards_margin": (chosen_rewards - rejected_rewards).float().mean(),
        "rewards_accuracy": (chosen_rewards > rejected_rewards).float().mean(),
    }
