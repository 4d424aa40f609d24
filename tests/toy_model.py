"""A toy model with the released top-level module names, implementing the trainer's protocol (tests only).

Text side: token embedding (``model``) -> ``lm_head``. Generation side: a frozen random conv (``vae_local``) turns
each target image into D bits per latent position; the prompt's mean embedding goes through
``image_gen_projector_out`` plus ``sos_embedding`` into ``vargpt_gen``, a linear map to bit logits. Deterministic
on CPU; ``build_noisy`` adds training noise drawn from the global torch RNG (as dropout or the real model's
self-correction flips do), which a resumed run must replay exactly.

Used as ``model.factory: "toy_model:build"`` with ``tests/`` on the Python path.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from vargpt.config import tiny_config
from vargpt.training.losses import bit_logprob, bit_loss, text_loss

WIDTH = 16
BITS = 8


class ToyVARGPT(nn.Module):
    def __init__(self, *, sleep_s: float = 0.0, noise: float = 0.0) -> None:
        super().__init__()
        self.config = tiny_config()
        self.seen_tasks: list[str] = []  # the task of every training sample, in order (tests read it)
        vocab, stride = self.config.llm.vocab_size, self.config.vae.stride
        patch = 3 * self.config.vision.temporal_patch_size * self.config.vision.patch_size ** 2
        self.visual = nn.Linear(patch, WIDTH)
        self.model = nn.Embedding(vocab, WIDTH)
        self.lm_head = nn.Linear(WIDTH, vocab)
        self.vae_local = nn.Conv2d(3, BITS, kernel_size=stride, stride=stride)
        self.vargpt_gen = nn.Linear(WIDTH, (64 // stride) ** 2 * BITS * 2)
        self.image_gen_projector = nn.Linear(WIDTH, WIDTH)
        self.image_gen_projector_out = nn.Linear(WIDTH, WIDTH)
        self.sos_embedding = nn.Embedding(1, WIDTH)
        self.sleep_s = sleep_s
        self.noise = noise  # training noise from the global torch RNG (like dropout): resume must replay it
        self.checkpointing = False

    def gradient_checkpointing_enable(self) -> None:
        self.checkpointing = True

    def _hidden(self, batch: dict) -> Tensor:
        h = self.model(batch["input_ids"])
        if "pixel_values" in batch:
            h = h + self.visual(batch["pixel_values"]).mean(0)
        return h

    def _gen(self, batch: dict, h: Tensor) -> tuple[Tensor, Tensor]:
        start = self.config.tokens.image_gen_start
        rows = (batch["input_ids"] == start).any(1)
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (h * mask).sum(1) / mask.sum(1)
        cond = self.image_gen_projector_out(self.image_gen_projector(pooled[rows])) + self.sos_embedding.weight
        if self.noise and self.training:
            cond = cond + self.noise * torch.randn(cond.shape)
        logits = self.vargpt_gen(cond).view(cond.shape[0], -1, 2 * BITS)
        with torch.no_grad():
            bits = (self.vae_local(batch["gen_pixel_values"]) > 0).long().flatten(2).transpose(1, 2)
        return logits, bits

    def training_losses(self, batch: dict) -> dict[str, Tensor]:
        if self.sleep_s:
            time.sleep(self.sleep_s)
        self.seen_tasks.extend(batch.get("tasks", ()))
        h = self._hidden(batch)
        out = {"text_loss": text_loss(self.lm_head(h), batch["labels"])}
        loss = out["text_loss"]
        if "gen_pixel_values" in batch:
            logits, bits = self._gen(batch, h)
            out["bit_loss"] = bit_loss(logits, bits)
            loss = loss + 3.0 * out["bit_loss"]
        out["loss"] = loss
        return out

    def image_logprobs(self, batch: dict, *, average: bool = False) -> Tensor:
        if self.sleep_s:
            time.sleep(self.sleep_s)
        logits, bits = self._gen(batch, self._hidden(batch))
        return bit_logprob(logits, bits, average=average)


BUILT: list[ToyVARGPT] = []  # every model built in this process (tests inspect the trained one)


def build(recipe=None) -> ToyVARGPT:
    BUILT.append(ToyVARGPT())
    return BUILT[-1]


def build_noisy(recipe=None) -> ToyVARGPT:
    return ToyVARGPT(noise=0.1)


def build_noisy_slow(recipe=None) -> ToyVARGPT:
    return ToyVARGPT(noise=0.1, sleep_s=0.15)


def build_noisy_paced(recipe=None) -> ToyVARGPT:
    """`build_noisy` at 0.04 s a step: kills land anywhere in a run of a second or two."""
    return ToyVARGPT(noise=0.1, sleep_s=0.04)
