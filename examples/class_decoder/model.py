"""Class-conditional use of the visual decoder, standalone (no LLM): labels -> multi-scale bits.

Contract
--------
`ClassConditionalDecoder(cfg, codebook_dim, num_classes)` wraps a `VisualDecoder`; the conditioning "text" is
one learned token per class (``class_emb``, row ``num_classes`` = "no class", the unconditional token). That
token drives the AdaLN condition (through ``text_norm`` + the attentive pool, as the start-of-image token does
in VARGPT) and is also the one-row cross-attention context. Condition dropout replaces a label by "no class"
with probability ``cfg.cond_drop_rate`` in training (explicit generator), so classifier-free guidance at
sampling time contrasts the label with "no class" in one batch.

* `loss(labels_B, tokens, schedule)`: mean bit cross-entropy, teacher-forced on `MultiScaleTokens` (from
  ``BSQVAE.encode``), plus bit accuracy for logging.
* `sample(labels_B, schedule, sampling, generator=...)`: `vargpt.sampling.image.sample_image_tokens`; decode
  ``summed_codes_BDHW`` with the VAE.

Not in the published code (VARGPT-v1.1 is text-conditional through its LLM; Infinity's class-conditional mode
uses a plain embedding without cross-attention). Requires ``cfg.text_channels == cfg.embed_dim``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vargpt.config import DecoderConfig, SamplingConfig
from vargpt.engine.loop import ImageTokens, per_scale, sample_image_tokens
from vargpt.errors import ConfigError, InputError
from vargpt.models.quantizer import MultiScaleTokens
from vargpt.models.visual_decoder import DecoderCondition, VisualDecoder
from vargpt.scales import Schedule

__all__ = ["ClassConditionalDecoder", "ClassLoss"]


@dataclass
class ClassLoss:
    loss: Tensor  # mean bit cross-entropy (differentiable)
    bit_accuracy: float  # fraction of bits whose argmax matches the label


class ClassConditionalDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig, codebook_dim: int, num_classes: int) -> None:
        super().__init__()
        if cfg.text_channels != cfg.embed_dim:
            raise ConfigError(f"config field decoder.text_channels = {cfg.text_channels} is invalid: allowed "
                              f"embed_dim ({cfg.embed_dim}) for class conditioning (the class token is the context)")
        if num_classes < 1:
            raise ConfigError(f"num_classes = {num_classes} is invalid: allowed an integer >= 1")
        self.num_classes = num_classes
        self.cond_drop_rate = cfg.cond_drop_rate
        self.class_emb = nn.Embedding(num_classes + 1, cfg.text_channels)
        nn.init.trunc_normal_(self.class_emb.weight, std=(1 / cfg.embed_dim / 3) ** 0.5)
        # Dropout happens on labels here, so the decoder's own (cfg_uncond) dropout is off.
        self.decoder = VisualDecoder(dataclasses.replace(cfg, cond_drop_rate=0.0), codebook_dim)

    def condition(self, labels_B: Tensor, *, drop_generator: torch.Generator | None = None) -> DecoderCondition:
        """AdaLN condition + one-token context of each label (label ``num_classes`` = unconditional)."""
        if labels_B.min() < 0 or labels_B.max() > self.num_classes:
            raise InputError(f"class labels must lie in [0, {self.num_classes}] ({self.num_classes} = no class)")
        if self.training and self.cond_drop_rate > 0:
            gen_device = drop_generator.device if drop_generator is not None else labels_B.device
            drop = torch.rand(labels_B.shape, generator=drop_generator, device=gen_device) < self.cond_drop_rate
            labels_B = torch.where(drop.to(labels_B.device), self.num_classes, labels_B)
        text_B1C = self.class_emb(labels_B).unsqueeze(1)
        return self.decoder.condition(self.decoder.encode_condition(text_B1C), text_B1C)

    def loss(self, labels_B: Tensor, tokens: MultiScaleTokens, schedule: Schedule, *,
             generator: torch.Generator | None = None) -> ClassLoss:
        cond = self.condition(labels_B, drop_generator=generator)
        x_BLC = self.decoder.input_sequence(cond.cond_BD, tokens.x_wo_prefix_BLD.to(cond.cond_BD.dtype))
        logits_BLD2 = self.decoder.forward_train(x_BLC, cond, schedule, generator=generator).unflatten(-1, (-1, 2))
        target = tokens.labels_BLD.long()
        loss = F.cross_entropy(logits_BLD2.float().permute(0, 3, 1, 2), target)
        acc = (logits_BLD2.argmax(-1) == target).float().mean().item()
        return ClassLoss(loss, acc)

    @torch.no_grad()
    def sample(self, labels_B: Tensor, schedule: Schedule, sampling: SamplingConfig | None = None, *,
               generator: torch.Generator | list[torch.Generator] | None = None) -> ImageTokens:
        sampling = sampling or SamplingConfig(cfg_scale=3.0, tau=1.0, top_k=0, top_p=0.0)
        cond = self.condition(labels_B)
        if any(c != 1 for c in per_scale(sampling.cfg_scale, len(schedule), "cfg_scale")):
            cond = DecoderCondition.cat(cond, self.condition(torch.full_like(labels_B, self.num_classes)))
        return sample_image_tokens(self.decoder, cond, schedule, sampling, generator=generator)
