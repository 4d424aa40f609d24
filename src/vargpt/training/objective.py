"""What VARGPT is trained on: the losses of a batch, condition dropout, and DPO's image log-probabilities.

Contract
--------
Training batch protocol (what `vargpt.data.records.Collator` makes from `VARGPTProcessor.training_inputs`):
``input_ids``, ``attention_mask``, ``labels`` [B, S] (prompt = -100; any padding side), optional
``pixel_values`` / ``image_grid_thw`` (understanding images, in reading order over the batch), optional
``gen_pixel_values`` [N, 3, H, W] in [-1, 1]: one target image per row that holds ``<|image_gen_pad|>`` slots
(in row order; the slots per image = the schedule's token count padded to ``decoder.pad_to_multiplier``); with
``decoder.source_condition``, optional ``gen_source_pixel_values`` [N, 3, H, W] (aligned with ``gen_pixel_values``:
each target's edit source at the same size) and ``gen_source_mask`` [N] bool (False: no source). Other keys are
ignored.

* `training_losses(model, batch, generator=None)` -> ``{"loss", "text_loss", "bit_loss"}``: loss =
  text_loss_weight x text CE + bit_loss_weight x bit CE (``compat.bit_loss``), teacher forced with bitwise
  self-correction and condition dropout (training mode) drawn from ``generator`` (default: one seeded from torch's
  global RNG, so a seeded, resumed trainer replays the same noise).
* `image_logprobs(model, batch, average=False)` -> [N]: sum over scales, positions and bits of log p(own bit)
  under clean teacher forcing (no self-correction, no condition dropout: deterministic, so reference log-probs can
  be cached); ``average=True`` divides by the tokens; ``scale_weighted=True`` weighs each token as Infinity's
  scale-reweighted bit loss does (sqrt(area_last / area_scale), mean 1), so the coarse scales that lay a picture
  out count more against the fine ones that hold most of the bits.
* Condition dropout (consistent unconditional branch, `vargpt.engine`): with probability
  ``decoder.cond_drop_rate`` a generation row's whole prefix (everything before its first
  ``<|image_gen_start|>``, understanding images included) is replaced by the null prompt and its start condition
  by the ``cfg_uncond`` one, exactly what sampling's unconditional row sees (with ``decoder.uncond_keeps_image``
  an edit row keeps its picture and drops only its instruction, `drop_prompts`). With
  ``compat.published_uncond_branch`` only the start condition is dropped (by the decoder), as published.

Differences from the published implementation: the text loss is by default over the answer tokens only
(``compat.published_text_loss`` restores the published whole-sequence loss of generation rows), per token or per
sample (``text_loss_mean``); lm_head is applied only at supervised positions (same value, less memory). With
``early_exit_weight`` the text CE is also taken at an earlier LLM block (deep supervision, not published; reported
as ``early_loss``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vargpt.errors import InputError
from vargpt.models.generation import image_only_prompt_ids, null_prompt_ids
from vargpt.models.vargpt import VARGPT, GenerationForward
from vargpt.processing import IGNORE_INDEX
from vargpt.training.losses import bit_logprob, bit_loss, published_text_labels, scale_weights

__all__ = ["drop_prompts", "image_logprobs", "teacher_forced", "text_ce", "training_losses"]


def drop_prompts(model: VARGPT, batch: dict[str, Any], drop_B: Tensor) -> dict[str, Any]:
    """``batch`` with the prefix (before the first ``<|image_gen_start|>``) of the ``drop_B`` rows replaced by the
    null prompt, their understanding images removed, re-padded on the right. With ``decoder.uncond_keeps_image`` a
    prefix with an understanding image (an edit) keeps it and loses the text after it (`image_only_prompt_ids`)."""
    t = model.config.tokens
    processor = model.require_processor()
    null = null_prompt_ids(processor)
    keep_image = model.config.decoder.uncond_keeps_image
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    rows, keep_img = [], []
    for b in range(ids.shape[0]):
        real = mask[b].bool()
        r_ids, r_lab = ids[b][real].tolist(), labels[b][real].tolist()
        n_img = r_ids.count(t.vision_start)
        if bool(drop_B[b]):
            s = r_ids.index(t.image_gen_start)
            n_prefix = r_ids[:s].count(t.vision_start)
            if keep_image and n_prefix:  # an edit: its picture stays, its instruction goes
                prefix = image_only_prompt_ids(r_ids[:s], processor)
                keep_img += [True] * n_img
            else:
                prefix = null
                keep_img += [False] * n_prefix + [True] * (n_img - n_prefix)
            r_ids, r_lab = prefix + r_ids[s:], [IGNORE_INDEX] * len(prefix) + r_lab[s:]
        else:
            keep_img += [True] * n_img
        rows.append((r_ids, r_lab))
    S = max(len(r) for r, _ in rows)
    out = dict(batch)
    out["input_ids"] = torch.tensor([r + [t.endoftext] * (S - len(r)) for r, _ in rows], device=ids.device)
    out["labels"] = torch.tensor([lab + [IGNORE_INDEX] * (S - len(lab)) for _, lab in rows], device=ids.device)
    out["attention_mask"] = torch.tensor([[1] * len(r) + [0] * (S - len(r)) for r, _ in rows],
                                         device=ids.device, dtype=mask.dtype)
    if batch.get("pixel_values") is not None and not all(keep_img):
        grid = batch["image_grid_thw"]
        pieces = batch["pixel_values"].split(grid.prod(-1).tolist())
        kept = [p for p, k in zip(pieces, keep_img, strict=True) if k]
        out["pixel_values"] = torch.cat(kept) if kept else None
        out["image_grid_thw"] = grid[torch.tensor(keep_img, device=grid.device)] if kept else None
    return out


def _start_condition(model: VARGPT, drop_N: Tensor) -> Tensor:
    """Start condition per image: from the start-of-image embedding, or ``cfg_uncond`` where ``drop_N``."""
    dec = model.vargpt_gen
    n = drop_N.shape[0]
    text = torch.where(drop_N.view(-1, 1, 1).to(model.device), dec.uncond_text(n, 1),
                       model.sos_embedding.vector(n).to(dec.cfg_uncond.dtype))
    return dec.text_proj_for_sos(dec.text_norm(text), None)


def teacher_forced(model: VARGPT, batch: dict[str, Any], *, noisy: bool = False,
                   generator: torch.Generator | None = None) -> tuple[GenerationForward, dict[str, Any]]:
    """The model's teacher-forced forward of ``batch`` and the batch it saw: clean (``noisy=False``: no
    self-correction, no condition dropout), or as in training (``noisy``: both, drawn from ``generator``). The batch
    it saw has ``gen_dropped`` [N]: which generation rows had their prompt dropped."""
    cfg, dev = model.config, model.device
    batch = {k: (v.to(dev) if isinstance(v, Tensor) else v) for k, v in batch.items()}
    if batch.get("attention_mask") is None:
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    if batch.get("labels") is None:
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    gen_rows = (batch["input_ids"] == cfg.tokens.image_gen_pad).any(1)
    n_gen = int(gen_rows.sum())
    consistent = not cfg.compat.published_uncond_branch
    drop_N = torch.zeros(n_gen, dtype=torch.bool)
    if noisy and n_gen and consistent and model.training and cfg.decoder.cond_drop_rate > 0:
        drop_N = torch.rand(n_gen, generator=generator) < cfg.decoder.cond_drop_rate
        if bool(drop_N.any()):
            drop_B = torch.zeros(gen_rows.shape[0], dtype=torch.bool)
            drop_B[gen_rows.cpu()] = drop_N
            batch = drop_prompts(model, batch, drop_B)
    # published mode in training: the decoder drops the start condition itself (from the generator)
    cond_BD = None if (noisy and not consistent) or not n_gen else _start_condition(model, drop_N)
    out = model.forward_generation(batch, cond_BD=cond_BD, self_correction=noisy, generator=generator)
    return out, batch | {"gen_dropped": drop_N}


def guided_bit_loss(model: VARGPT, out: GenerationForward, batch: dict[str, Any]) -> Tensor:
    """Bit loss of the guided logits ``cfg * cond + (1 - cfg) * uncond`` (cfg = the model's
    ``sampling.cfg_scale``, one number) of the generation rows that have an edit source and kept their prompt. The
    unconditional rows (prompts dropped, sources kept, as sampling builds them) run without gradient on the very
    inputs of ``out`` (``out.tokens``), so the loss teaches the conditional row what guidance will make of it."""
    zero = out.hidden_BSH.sum() * 0.0
    if out.gen_logits_BLV is None or out.source_BLD is None:
        return zero
    keep_N = (out.source_BLD != 0).flatten(1).any(1).cpu() & ~batch["gen_dropped"]
    if not bool(keep_N.any()):
        return zero
    cfg = model.config.sampling.cfg_scale
    if not isinstance(cfg, (int, float)):
        raise InputError(f"guided_loss_weight needs one sampling.cfg_scale, not a list per scale ({cfg})")
    gen_rows = (batch["input_ids"] == model.config.tokens.image_gen_pad).any(1)
    n = int(gen_rows.sum())
    with torch.no_grad():
        uncond = drop_prompts(model, batch, gen_rows.cpu())
        u = model.forward_generation(uncond, cond_BD=_start_condition(model, torch.ones(n, dtype=torch.bool)),
                                     tokens=out.tokens).gen_logits_BLV
    keep = keep_N.to(out.gen_logits_BLV.device)
    mixed = cfg * out.gen_logits_BLV[keep] + (1 - cfg) * u[keep]
    return bit_loss(mixed, out.bit_labels_BLD[keep], reduction=model.config.compat.bit_loss, schedule=out.schedule)


def text_ce(model: VARGPT, hidden_BSH: Tensor, labels_BS: Tensor) -> Tensor:
    """Shifted next-token CE over labels != -100; lm_head only at the supervised positions. Mean over tokens,
    or (``config.text_loss_mean == "sample"``) within each sample first, then over the samples with labels."""
    h, y = hidden_BSH[:, :-1], labels_BS[:, 1:]
    keep = y != IGNORE_INDEX
    if not bool(keep.any()):
        return hidden_BSH.sum() * 0.0
    ce = F.cross_entropy(model.lm_head(h[keep]).float(), y[keep], reduction="none")
    if model.config.text_loss_mean == "token":
        return ce.mean()
    counts = keep.sum(1)  # supervised tokens per sample
    row = torch.arange(keep.shape[0], device=ce.device).repeat_interleave(counts)
    per_sample = torch.zeros(keep.shape[0], device=ce.device).index_add_(0, row, ce)
    labelled = counts > 0
    return (per_sample[labelled] / counts[labelled]).mean()


@contextmanager
def _block_output(model: VARGPT, layer: int) -> Iterator[dict[str, Tensor]]:
    """Holds the output hidden states of LLM block ``layer`` (1-based; 0: nothing) of forwards run inside, under
    ``"h"`` (the last forward's)."""
    store: dict[str, Tensor] = {}
    if not layer:
        yield store
        return

    def keep(module: nn.Module, inputs: Any, output: Any) -> None:
        store["h"] = output[0] if isinstance(output, tuple) else output

    handle = model.vlm.model.language_model.layers[layer - 1].register_forward_hook(keep)
    try:
        yield store
    finally:
        handle.remove()


def training_losses(model: VARGPT, batch: dict[str, Any], *,
                    generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Teacher-forced losses of a training batch (protocol in the module docstring)."""
    cfg = model.config
    if generator is None:
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))
    with _block_output(model, cfg.early_exit_layer if cfg.early_exit_weight else 0) as early:
        out, batch = teacher_forced(model, batch, noisy=True, generator=generator)
    labels = batch["labels"]
    if cfg.compat.published_text_loss:
        gen_rows = (batch["input_ids"] == cfg.tokens.image_gen_pad).any(1, keepdim=True)
        labels = torch.where(gen_rows, published_text_labels(batch["input_ids"], cfg.tokens.image_gen_pad), labels)
    text = text_ce(model, out.hidden_BSH, labels)
    bit = (bit_loss(out.gen_logits_BLV, out.bit_labels_BLD, reduction=cfg.compat.bit_loss, schedule=out.schedule)
           if out.gen_logits_BLV is not None else text.new_zeros(()))
    losses = {"loss": cfg.text_loss_weight * text + cfg.bit_loss_weight * bit, "text_loss": text, "bit_loss": bit}
    if early:
        losses["early_loss"] = text_ce(model, model.vlm.model.language_model.norm(early["h"]), labels)
        losses["loss"] = losses["loss"] + cfg.text_loss_weight * cfg.early_exit_weight * losses["early_loss"]
    if cfg.guided_loss_weight:
        losses["guided_loss"] = guided_bit_loss(model, out, batch)
        losses["loss"] = losses["loss"] + cfg.guided_loss_weight * losses["guided_loss"]
    if cfg.copy_gate_loss_weight and out.copy_gate_BL is not None:
        losses["gate_loss"] = copy_gate_loss(out.copy_gate_BL, out.source_BLD, out.bit_labels_BLD)
        losses["loss"] = losses["loss"] + cfg.copy_gate_loss_weight * losses["gate_loss"]
    return losses


def copy_gate_loss(gate_BL: Tensor, source_BLD: Tensor, labels_BLD: Tensor) -> Tensor:
    """BCE of the copy gate's logits against where copying is right: 1 at a position whose every label bit is the
    sign of the source's code there (an unchanged region, with residual source input), else 0; over the rows that
    have a source (mean; zero without any)."""
    rows = (source_BLD != 0).flatten(1).any(1)
    if not bool(rows.any()):
        return gate_BL.sum() * 0.0
    target = ((source_BLD[rows] > 0) == labels_BLD[rows].bool()).all(-1).to(gate_BL.dtype)
    return F.binary_cross_entropy_with_logits(gate_BL[rows], target)


def image_logprobs(model: VARGPT, batch: dict[str, Any], *, average: bool = False,
                   scale_weighted: bool = False) -> Tensor:
    """[N]: log pi of each generation row's target image (clean teacher forcing; see the module docstring)."""
    out, _ = teacher_forced(model, batch)
    if out.gen_logits_BLV is None:
        raise InputError("image_logprobs needs rows with an <image_gen> slot and gen_pixel_values")
    weights_L = scale_weights(out.schedule) * out.bit_labels_BLD.shape[1] if scale_weighted else None
    return bit_logprob(out.gen_logits_BLV, out.bit_labels_BLD, average=average, weights_L=weights_L)
