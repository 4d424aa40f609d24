"""Generation bridge modules between the visual decoder and the LLM, in the released layout.

Contract
--------
* `GenProjector(in_dim, out_dim)`: Linear(in, in) -> exact GELU -> Linear(in, out) applied to the last axis
  (any leading shape). Used twice in VARGPT-v1.1: ``image_gen_projector`` (decoder width -> LLM width: the
  decoder's token stream enters the LLM) and ``image_gen_projector_out`` (LLM width -> decoder width: LLM
  states go to the decoder blocks, and the prompt's states become the decoder's cross-attention context).
* `SosEmbedding`: the start-of-image embedding. Only row ``image_gen_start_id`` is ever used (the "text" token
  that conditions the decoder's AdaLN and first token); `vector(batch)` returns it as [B, 1, C].

Differences from the published implementation
---------------------------------------------
* ``ln_q`` (a LayerNorm) exists in the released checkpoint but the published forward never applies it; it is
  kept here, unused, so released weights load strictly.
* The published forward flattens its input to [-1, in]; ours keeps the leading shape.
* ``sos_embedding`` keeps the released layout: an ``nn.Embedding`` with ``image_gen_start_id + 1`` rows
  (151,658 x 2048 = 310.6M parameters, 1.2 GB in fp32, at full size) of which one row is used. We keep it
  for strict loading and conversion; a compact checkpoint could store the single row.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vargpt.errors import InputError

__all__ = ["GenProjector", "ImagePlaceEmbedding", "SosEmbedding"]


class ImagePlaceEmbedding(nn.Module):
    """``vision.place_embed`` (not in the released layout): ``row[r] + col[c]`` added to the merged image token at
    row r, column c of its image's merged grid, both tables zero-initialised (a model that gains it starts equal to
    one without it). Why: the LLM's M-RoPE gives image tokens positions, but a question's tokens sit at positions that
    move with its length and turn, so under a small ``rope_theta`` the LLM cannot look a shape up wherever it is, and
    under a large one it cannot tell columns apart; features that carry their place serve both."""

    def __init__(self, max_side: int, dim: int, merge: int, scale: float = 1.0) -> None:
        super().__init__()
        self.merge, self.scale = merge, scale
        # zeros given up front: building the module draws nothing from the global RNG, so every module built after
        # it (and a vision stage that trains only the tower) starts as it would without it
        self.row = nn.Embedding(max_side, dim, _weight=torch.zeros(max_side, dim))
        self.col = nn.Embedding(max_side, dim, _weight=torch.zeros(max_side, dim))

    def forward(self, grid_thw_N3: Tensor) -> Tensor:
        """Embeddings of every merged token of images with patch grids ``grid_thw_N3``, in the vision tower's
        output order (per image, frame by frame, row-major), [sum of tokens, dim]."""
        rows, cols = [], []
        for t, h, w in grid_thw_N3.tolist():
            h, w = h // self.merge, w // self.merge
            if max(h, w) > self.row.num_embeddings:
                raise InputError(f"an image of {h}x{w} merged tokens exceeds vision.place_embed = "
                                 f"{self.row.num_embeddings}; resize it or build the model with a larger place_embed")
            idx = torch.arange(t * h * w, device=self.row.weight.device)
            rows.append(idx // w % h)
            cols.append(idx % w)
        place = self.row(torch.cat(rows)) + self.col(torch.cat(cols))
        return place if self.scale == 1 else place * self.scale


class GenProjector(nn.Module):
    """Two-layer MLP with exact GELU (released ``GenPatchMerger``); ``ln_q`` kept for loading only."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.ln_q = nn.LayerNorm(in_dim, eps=1e-6)  # unused in forward, as released
        self.mlp = nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim))

    def forward(self, x_NC: Tensor) -> Tensor:
        return self.mlp(x_NC)


class SosEmbedding(nn.Embedding):
    """Start-of-image embedding: ``image_gen_start_id + 1`` rows (released layout), one of them used."""

    def __init__(self, image_gen_start_id: int, dim: int) -> None:
        super().__init__(image_gen_start_id + 1, dim)
        self.image_gen_start_id = image_gen_start_id

    def vector(self, batch_size: int = 1) -> Tensor:
        """The start-of-image "text" token for ``batch_size`` samples, [B, 1, C]."""
        return self.weight[self.image_gen_start_id].view(1, 1, -1).expand(batch_size, 1, -1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, used_row={self.image_gen_start_id}"
