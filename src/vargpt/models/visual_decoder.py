"""Next-scale visual decoder (Infinity-style, the released ``vargpt_gen``).

Contract
--------
The decoder predicts, for every position of every scale of a scale schedule, the ``D`` bits of that
position's residual code (2 logits per bit, ``head`` width 2D). Its inputs are

* a conditioning: one or more "text" tokens per sample (in VARGPT-v1.1 a single start-of-image embedding)
  -> ``text_norm`` (RMSNorm) -> ``text_proj_for_sos`` (attentive pool) -> ``cond_BD``. ``cond_BD`` drives every
  AdaLN (``shared_ada_lin`` + a learned per-block offset ``ada_gss``; ``head_nm`` before the head) and, plus
  ``pos_start``, is the first token of the sequence (`first_tokens`);
* a cross-attention context per sample, ``[N_b, C]`` rows of variable length (VARGPT: the projected LLM
  states of the prompt), batched as ``[B, N, C]`` with a key mask;
* the token sequence: the first token, then ``word_embed`` of the teacher-forcing / sampled codes of scales
  1..K-1 (`embed_inputs`). In VARGPT the sequence passes through the LLM before the blocks; the decoder
  only sees what it is given, so `forward_train` / `forward_step` take the *block input* ``x``;
* optionally (``DecoderConfig.source_condition``, editing; not in the released layout) the source's codes
  ``DecoderCondition.source_BLD`` (entries ~+-1; zero rows: no source): the source image's own bits of scale k (or
  its residual, ``source_input``) at the positions predicting scale k; ``source_embed`` (zero-initialised) of them
  is added to the block input with the level embedding, and with ``source_copy = G > 0`` they also reach the bit
  logits, ``G * gate * code`` per bit, a per-position gate (``source_gate``) deciding where to copy. With
  ``source_context`` the source's latent (one token per finest-grid position, `source_context_tokens`) is also
  appended to the cross-attention context, so a position can fetch what the source holds elsewhere.

Blocks: AdaLN -> self-attention (cosine attention with a learned per-head scale, 2-D RoPE, block-causal over
scales) -> cross-attention (pre-LayerNorm with affine, no gate) -> AdaLN -> GELU(tanh) FFN; DropPath on the
self-attention and FFN branches. The level (scale-index) embedding is added once, before the first block.

Two named forwards:

* `forward_train(x_BLC, cond, schedule)`: all scales in one pass with a block-causal mask (SDPA);
* `forward_step(x_BlC, cond, schedule, scale_index, cache)`: one scale, attending to an explicit
  `DecoderKVCache` (preallocated; nothing on the module is mutated).

Parameter names are the released ones under the module (``block_chunks.{c}.module.{j}.{sa,ca,ffn,...}``,
``shared_ada_lin.1``, ``head_nm.ada_lin.1``, ...), so ``vargpt_gen.*`` loads strictly after stripping the prefix.

Differences from the published implementation
---------------------------------------------
* Numerics are those of the published fp32 path: AdaLN in fp32, the 2-D RoPE table built the same way
  (star-style normalisation onto the template's 1M grid, 128 x 128 base grid), cosine attention with
  ``exp(min(scale, ln 100))``. The published cross-attention runs flash-attn on bf16-cast q/k/v; that
  rounding is reproduced only with ``CompatConfig.bf16_cross_attention`` (default off: full precision).
* Variable-length cross-attention uses padding + a key mask with SDPA instead of flash-attn varlen.
* Training does not pad the sequence to a multiple of 128 (the published code pads to 128 for its kernels;
  padded rows never influence real rows, so logits agree). `padded_length` gives the published length for
  callers that need the released LLM layout (2560 pad slots at 512 px).
* Condition dropout and DropPath act only in training mode, with explicit ``torch.Generator`` s
  (published: Python's global ``random`` and always on, also in eval mode).
* ``text_proj_for_ca`` is kept only so released checkpoints load; it is never evaluated (the published
  VARGPT-v1.1 code evaluates it and throws the result away).
* Gradient checkpointing per block (`DecoderConfig.gradient_checkpointing`) instead of per chunk.
* Optional source conditioning for editing (VAREdit-style, arXiv 2508.15772; absent from the released model): the
  source's scale-k bits tell the positions predicting scale k what is there to keep. ``source_embed`` starts at
  zero, so a model that turns it on starts exactly equal to one without it. The copy path (``source_copy``) instead
  starts as a copy of the source wherever the model is unsure (``source_gate`` starts open): an edit model then only
  has to learn where to deviate, not how to reproduce every bit of an unchanged picture.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vargpt.config import CompatConfig, DecoderConfig
from vargpt.errors import InputError
from vargpt.scales import TEMPLATES, Schedule

GATE_OPEN = 4.0  # the copy gate's logit at source_gate = 0: sigmoid(4) = 0.98, copying from the first step

__all__ = [
    "DecoderCondition",
    "DecoderKVCache",
    "VisualDecoder",
    "block_causal_mask",
    "rope2d_table",
]

_LN_100 = math.log(100.0)  # cap of the cosine-attention scale (published: ln(100) in fp32)


# ----------------------------------------------------------------------------------------------- 2-D RoPE


def _template_for(schedule: Schedule) -> tuple[tuple[int, int], ...]:
    """The aspect template (13 grids, the '1M' budget) whose prefix is ``schedule``.

    Short schedules can be a prefix of several templates; the one nearest the schedule's own aspect wins.
    """
    hws = tuple((int(h), int(w)) for _, h, w in schedule)
    matches = [r for r, grids in TEMPLATES.items() if grids[: len(hws)] == hws]
    if not matches:
        raise InputError(f"scale schedule {hws} is not a prefix of any aspect template; build it with "
                         "vargpt.scales.scale_schedule / schedule_for_size")
    h, w = hws[-1]
    return TEMPLATES[min(matches, key=lambda r: abs(r - h / w))]


def rope2d_table(schedule: Schedule, head_dim: int, *, theta: float = 10000.0, max_grid: int = 128,
                 pad_to: int = 128) -> Tensor:
    """cos/sin table ``[2, L_1M (padded), head_dim // 2]`` for the template of ``schedule`` (fp32).

    Position (i, j) of a (ph, pw) scale uses base-grid row round(i * UH / ph) and column round(j * UW / pw),
    (UH, UW) = the template's '1M' final grid ("star" normalisation); the angle vector is
    [row * inv_freq, col * inv_freq] with head_dim / 4 frequencies each. Scales are concatenated in order, so
    the rows of scale k start at the number of tokens before it; zero rows pad to a multiple of ``pad_to``.
    """
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.int64) / half))
    t = torch.arange(max_grid, dtype=torch.int64).type_as(inv_freq)
    f_rows = torch.outer(t, inv_freq)
    f_cols = torch.outer(t, inv_freq)
    grid = torch.cat([f_rows[:, None, :].expand(-1, max_grid, -1), f_cols[None, :, :].expand(max_grid, -1, -1)],
                     dim=-1)
    grid_2HWh = torch.stack([grid.cos(), grid.sin()], dim=0)
    full = _template_for(schedule)
    uh, uw = full[-1]
    parts = []
    for ph, pw in full:
        rows = (torch.arange(ph) * (uh / ph)).round().int()
        cols = (torch.arange(pw) * (uw / pw)).round().int()
        r = rows.view(ph, 1).expand(ph, pw).reshape(-1)
        c = cols.view(1, pw).expand(ph, pw).reshape(-1)
        parts.append(grid_2HWh[:, r, c, :])
    table = torch.cat(parts, dim=1)
    if table.shape[1] % pad_to:
        table = torch.cat([table, table.new_zeros(2, pad_to - table.shape[1] % pad_to, half)], dim=1)
    return table


def _rope_pairs(table_2Lh: Tensor) -> Tensor:
    """``rope2d_table`` in the form `_apply_rope` uses, [2, L, 2h]: each angle's cos twice, then (-sin, sin)."""
    cos, sin = table_2Lh[0], table_2Lh[1]
    return torch.stack([cos.repeat_interleave(2, dim=-1), torch.stack([-sin, sin], dim=-1).flatten(-2)])


def _apply_rope(x_BHLc: Tensor, cos_Lc: Tensor, sin_Lc: Tensor) -> Tensor:
    """Rotate consecutive (even, odd) pairs (a, b) of the last axis to (a cos - b sin, a sin + b cos): as
    ``x * cos + swap(x) * (-sin, sin)``, which rounds exactly like the released element-wise formula (the same
    products, added in an order that IEEE addition does not see) in 3 ops instead of 8."""
    swapped = x_BHLc.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return x_BHLc * cos_Lc + swapped * sin_Lc


def _l2_normalize(x: Tensor) -> Tensor:
    """``F.normalize(x, dim=-1, eps=1e-12)``: the same norm kernel and division, two operations fewer."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)


def block_causal_mask(schedule: Schedule, device: torch.device | None = None) -> Tensor:
    """Bool [L, L]: token i may attend token j iff scale(i) >= scale(j) (True = attend)."""
    scale_of = torch.cat([torch.full((t * h * w,), k, device=device) for k, (t, h, w) in enumerate(schedule)])
    return scale_of[:, None] >= scale_of[None, :]


def _scale_ids(schedule: Schedule, device: torch.device) -> Tensor:
    return torch.cat([torch.full((t * h * w,), k, dtype=torch.long, device=device)
                      for k, (t, h, w) in enumerate(schedule)])


# ----------------------------------------------------------------------------------------------- state objects


@dataclass
class DecoderCondition:
    """Everything about a batch that is fixed across scales.

    ``cond_BD``: AdaLN condition; ``gss_B16C``: the shared modulation ``shared_ada_lin(cond_BD)``;
    ``context_BNC``: cross-attention context (rows past a sample's length are padding); ``context_mask_BN``:
    True at real context rows (None = all real); ``source_BLD``: the source's codes at every position of the
    schedule (entries ~+-1: bits as +-1 or `source_residual`; all-zero rows for samples without a source; None =
    none), embedded by the decoder (`VisualDecoder.source_term`).
    """

    cond_BD: Tensor
    gss_B16C: Tensor
    context_BNC: Tensor
    context_mask_BN: Tensor | None = None
    source_BLD: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.cond_BD.shape[0]

    @staticmethod
    def cat(first: DecoderCondition, second: DecoderCondition) -> DecoderCondition:
        """Rows of ``first`` then rows of ``second`` (e.g. cond then uncond for CFG), contexts re-padded."""
        n1, n2 = first.context_BNC.shape[1], second.context_BNC.shape[1]
        n = max(n1, n2)

        def pad(c: DecoderCondition, nk: int) -> tuple[Tensor, Tensor]:
            mask = c.context_mask_BN
            if mask is None:
                mask = torch.ones(c.context_BNC.shape[:2], dtype=torch.bool, device=c.context_BNC.device)
            return F.pad(c.context_BNC, (0, 0, 0, n - nk)), F.pad(mask, (0, n - nk), value=False)

        c1, m1 = pad(first, n1)
        c2, m2 = pad(second, n2)
        mask = torch.cat([m1, m2])
        source = None
        if first.source_BLD is not None or second.source_BLD is not None:
            like = first.source_BLD if first.source_BLD is not None else second.source_BLD
            s1, s2 = (c.source_BLD if c.source_BLD is not None else like.new_zeros(c.batch_size, *like.shape[1:])
                      for c in (first, second))
            source = torch.cat([s1, s2])
        return DecoderCondition(cond_BD=torch.cat([first.cond_BD, second.cond_BD]),
                                gss_B16C=torch.cat([first.gss_B16C, second.gss_B16C]),
                                context_BNC=torch.cat([c1, c2]),
                                context_mask_BN=None if bool(mask.all()) else mask, source_BLD=source)


class DecoderKVCache:
    """Self-attention keys/values of every block for the scales decoded so far (preallocated).

    ``length`` = tokens already cached (= where the next scale starts). Cross-attention keys/values of the
    (fixed) context and each block's per-batch constants (AdaLN modulation, qkv bias; the head's modulation) are
    computed at the first step and kept in ``context_kv`` / ``block_constants`` / ``head_modulation``.
    """

    def __init__(self, depth: int, batch_size: int, num_heads: int, head_dim: int, max_length: int, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        shape = (batch_size, num_heads, max_length, head_dim)  # uninitialised: `update` writes before it returns
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(depth)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(depth)]
        self.context_kv: list[tuple[Tensor, Tensor] | None] = [None] * depth
        self.block_constants: list[tuple | None] = [None] * depth  # `DecoderBlock.constants` of this batch
        self.head_modulation: tuple[Tensor, Tensor] | None = None  # the head AdaLN's (1 + scale, shift)
        self.length = 0
        self.max_length = max_length

    def update(self, layer: int, start: int, k_BHlc: Tensor, v_BHlc: Tensor) -> tuple[Tensor, Tensor]:
        """Write keys/values of positions start.. and return everything up to them."""
        end = start + k_BHlc.shape[2]
        if end > self.max_length:
            raise InputError(f"KV cache holds {self.max_length} tokens; this step needs {end}")
        self.k[layer][:, :, start:end] = k_BHlc
        self.v[layer][:, :, start:end] = v_BHlc
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


# ----------------------------------------------------------------------------------------------- layers


def _drop_path_scales(batch_size: int, p: float, generator: torch.Generator | None, device: torch.device,
                      dtype: torch.dtype) -> Tensor:
    """Stochastic-depth multipliers [B, 1, 1]: 0 with prob p, else 1/(1-p). Drawn before the blocks run, so
    gradient checkpointing replays the same masks."""
    gen_device = generator.device if generator is not None else device
    keep = torch.rand(batch_size, 1, 1, generator=generator, device=gen_device) >= p
    return keep.to(device=device, dtype=dtype) / (1.0 - p)


def _ada_ln(x: Tensor, scale1p: Tensor, shift: Tensor, eps: float) -> Tensor:
    """LayerNorm without affine in fp32, then x * (1 + scale) + shift (the released fused op), in x's dtype;
    ``scale1p`` = 1 + scale and ``shift`` in fp32 (`_modulation`)."""
    fp32 = x.dtype == torch.float32
    y = F.layer_norm(x if fp32 else x.float(), (x.shape[-1],), eps=eps).mul(scale1p).add_(shift)
    return y if fp32 else y.to(x.dtype)


def _modulation(scale: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
    """(1 + scale, shift) in fp32: what `_ada_ln` takes."""
    return scale.float().add(1), shift.float()


def _cross_attend(q_BHLc: Tensor, k_BHNc: Tensor, v_BHNc: Tensor, mask_BN: Tensor | None, scale: float,
                  bf16: bool) -> Tensor:
    """Softmax attention over a padded key axis. ``bf16``: inputs rounded to bf16 (the keys and values arrive
    rounded, `CrossAttention.context_kv`), fp32 math, output rounded to bf16 (what the released flash-attn call does
    on an fp32 model), returned in the input dtype."""
    mask = None if mask_BN is None else mask_BN[:, None, None, :]
    if not bf16:
        return F.scaled_dot_product_attention(q_BHLc, k_BHNc, v_BHNc, attn_mask=mask, scale=scale)
    # Plain fp32 softmax(q k^T * scale) v on bf16-rounded inputs: of the fp32 formulations tried this one
    # rounds like the reference used for the fixtures (fewest bf16 rounding flips).
    q, k, v = q_BHLc.to(torch.bfloat16).float(), k_BHNc, v_BHNc
    scores = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, -torch.inf)
    out = scores.softmax(dim=-1) @ v
    return out.to(torch.bfloat16).to(q_BHLc.dtype)


class SelfAttention(nn.Module):
    """Cosine multi-head self-attention with 2-D RoPE (released ``sa``)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
        self.proj = nn.Linear(dim, dim)

    def constants(self) -> tuple[Tensor, Tensor]:
        """The qkv bias (q, 0, v) and the query scale exp(min(s, ln 100)) [1, H, 1, 1]."""
        return torch.cat((self.q_bias, self.zero_k_bias, self.v_bias)), self.scale_mul_1H11.clamp_max(_LN_100).exp()

    def qkv(self, x_BLC: Tensor, rope_2Lc: Tensor,
            constants: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        B, L, C = x_BLC.shape
        bias, q_scale = constants if constants is not None else self.constants()
        qkv = F.linear(x_BLC, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        cos, sin = rope_2Lc.unbind(0)
        return _apply_rope(_l2_normalize(q).mul(q_scale), cos, sin), _apply_rope(_l2_normalize(k), cos, sin), v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        B, _, L, _ = q.shape
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
        return self.proj(out.transpose(1, 2).reshape(B, L, -1))


class CrossAttention(nn.Module):
    """Multi-head cross-attention to a variable-length context (released ``ca``).

    ``pool=True`` is the attentive pool of ``text_proj_for_sos``: the query is a learned ``mat_q``
    [1, H, head_dim] and the output is one vector per sample.
    """

    def __init__(self, dim: int, kv_dim: int, num_heads: int, *, pool: bool = False, bf16: bool = False) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.bf16 = bf16
        if pool:
            self.mat_q = nn.Parameter(torch.empty(1, num_heads, self.head_dim))
            nn.init.trunc_normal_(self.mat_q, std=math.sqrt(1 / dim / 3))
        else:
            self.mat_q = nn.Linear(dim, dim)
        self.mat_kv = nn.Linear(kv_dim, 2 * dim, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def context_kv(self, context_BNC: Tensor) -> tuple[Tensor, Tensor]:
        B, N, _ = context_BNC.shape
        w = self.mat_kv.weight
        kv = F.linear(context_BNC.to(w.dtype), w, torch.cat((self.zero_k_bias, self.v_bias)))
        k, v = kv.view(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.bf16:  # rounded once per context (`_cross_attend`), not at every scale; laid out as the matmuls there
            # copy them at every call (k^T and v contiguous per batch row): copied once instead, the same floats
            k = k.to(torch.bfloat16).float().transpose(-1, -2).contiguous().transpose(-1, -2)
            v = v.to(torch.bfloat16).float().contiguous()
        return k, v

    def forward(self, x_BLC: Tensor | None, context_BNC: Tensor, mask_BN: Tensor | None,
                kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        k, v = kv if kv is not None else self.context_kv(context_BNC)
        B = context_BNC.shape[0]
        if x_BLC is None:  # attentive pool
            # the module's dtype, not k's: with ``bf16`` the keys arrive as fp32 copies of bf16 values, and the
            # output must come back in the dtype ``proj`` takes (bf16 in a bf16 model)
            q = self.mat_q.unsqueeze(2).expand(B, -1, -1, -1)
        else:
            q = self.mat_q(x_BLC).view(B, x_BLC.shape[1], self.num_heads, self.head_dim).transpose(1, 2)
        out = _cross_attend(q, k, v, mask_BN, 1.0 / math.sqrt(self.head_dim), self.bf16)
        return self.proj(out.transpose(1, 2).reshape(B, q.shape[2], -1))


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DecoderBlock(nn.Module):
    """AdaLN self-attention -> cross-attention -> AdaLN FFN (released ``CrossAttnBlock``)."""

    def __init__(self, cfg: DecoderConfig, drop_path: float, bf16_cross_attention: bool) -> None:
        super().__init__()
        C = cfg.embed_dim
        self.eps = cfg.norm_eps
        self.drop_path = drop_path
        self.sa = SelfAttention(C, cfg.num_heads)
        self.ca = CrossAttention(C, C, cfg.num_heads, bf16=bf16_cross_attention)
        self.ffn = FFN(C, cfg.ffn_hidden)
        self.ca_norm = nn.LayerNorm(C, eps=cfg.norm_eps)
        self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C**0.5)

    def constants(self, gss_B16C: Tensor, dtype: torch.dtype) -> tuple:
        """What a batch's forward computes before its tokens: the AdaLN gates and `_modulation` s, and the
        self-attention's `SelfAttention.constants` (kept in the `DecoderKVCache` across the scales of a sample)."""
        g1, g2, s1, s2, b1, b2 = (self.ada_gss + gss_B16C).to(dtype).unbind(2)
        return g1, g2, _modulation(s1, b1), _modulation(s2, b2), self.sa.constants()

    def forward(self, x_BLC: Tensor, gss_B16C: Tensor, context_BNC: Tensor, context_mask_BN: Tensor | None,
                rope_2Lc: Tensor, *, attn_mask: Tensor | None = None, cache: DecoderKVCache | None = None,
                layer: int = 0, start: int = 0, drop_B11: tuple[Tensor, Tensor] | None = None) -> Tensor:
        if cache is None:
            consts = self.constants(gss_B16C, x_BLC.dtype)
        else:
            if cache.block_constants[layer] is None:
                cache.block_constants[layer] = self.constants(gss_B16C, x_BLC.dtype)
            consts = cache.block_constants[layer]
        g1, g2, mod1, mod2, sa_consts = consts
        q, k, v = self.sa.qkv(_ada_ln(x_BLC, *mod1, self.eps), rope_2Lc, sa_consts)
        if cache is not None:
            k, v = cache.update(layer, start, k, v)
        # residuals added in place into each branch's own fresh output (no new buffer; autograd-safe: neither the
        # gate product nor a linear layer needs its output for backward; x + h and h + x are the same floats)
        h = self.sa.attend(q, k, v, attn_mask).mul(g1)
        if drop_B11 is not None:
            h = h * drop_B11[0]
        x_BLC = h.add_(x_BLC)
        ca_kv = None
        if cache is not None:
            if cache.context_kv[layer] is None:
                cache.context_kv[layer] = self.ca.context_kv(context_BNC)
            ca_kv = cache.context_kv[layer]
        x_BLC = self.ca(self.ca_norm(x_BLC), context_BNC, context_mask_BN, ca_kv).add_(x_BLC)
        h = self.ffn(_ada_ln(x_BLC, *mod2, self.eps)).mul(g2)
        if drop_B11 is not None:
            h = h * drop_B11[1]
        return h.add_(x_BLC)


class _Chunk(nn.Module):
    """Holds ``module.{j}``: keeps the released ``block_chunks.{c}.module.{j}`` parameter names."""

    def __init__(self, blocks: Sequence[DecoderBlock]) -> None:
        super().__init__()
        self.module = nn.ModuleList(blocks)


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class _AttentivePool(nn.Module):
    """``text_proj_for_sos``: one learned query attends over the conditioning tokens."""

    def __init__(self, text_channels: int, dim: int, bf16: bool) -> None:
        super().__init__()
        head_dim = 128 if dim <= 4096 else 64  # released rule
        self.ca = CrossAttention(dim, text_channels, max(1, text_channels // head_dim), pool=True, bf16=bf16)

    def forward(self, text_BTC: Tensor, mask_BT: Tensor | None) -> Tensor:
        return self.ca(None, text_BTC, mask_BT).squeeze(1)


class _HeadAdaLN(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def modulation(self, cond_BD: Tensor) -> tuple[Tensor, Tensor]:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, cond_BD.shape[-1]).unbind(2)
        return _modulation(scale, shift)

    def forward(self, x_BLC: Tensor, cond_BD: Tensor, modulation: tuple[Tensor, Tensor] | None = None) -> Tensor:
        return _ada_ln(x_BLC, *(modulation if modulation is not None else self.modulation(cond_BD)), self.eps)


# ----------------------------------------------------------------------------------------------- decoder


class VisualDecoder(nn.Module):
    """The next-scale decoder. See the module docstring for the contract."""

    def __init__(self, cfg: DecoderConfig, codebook_dim: int, compat: CompatConfig | None = None) -> None:
        super().__init__()
        cfg.validate()
        compat = compat or CompatConfig()
        self.cfg = cfg
        self.codebook_dim = codebook_dim
        C, Ct = cfg.embed_dim, cfg.text_channels
        init_std = math.sqrt(1 / C / 3)

        # the released draw: a CPU generator, so drawn on CPU whatever the device being built on (a CUDA tensor
        # cannot take a CPU generator), then moved there
        uncond = torch.empty(cfg.text_maxlen, Ct, device="cpu")
        nn.init.trunc_normal_(uncond, std=1.2, generator=torch.Generator().manual_seed(0))
        self.cfg_uncond = nn.Parameter((uncond / Ct**0.5).to(torch.get_default_device()))
        self.text_norm = _RMSNorm(Ct, cfg.norm_eps)
        self.text_proj_for_sos = _AttentivePool(Ct, C, compat.bf16_cross_attention)
        # Kept so released checkpoints load; VARGPT-v1.1 never uses its output.
        self.text_proj_for_ca = nn.Sequential(nn.Linear(Ct, C), nn.GELU(approximate="tanh"), nn.Linear(C, C))
        self.pos_start = nn.Parameter(torch.empty(1, 1, C))
        nn.init.trunc_normal_(self.pos_start, std=init_std)
        self.lvl_embed = nn.Embedding(cfg.num_levels, C)
        nn.init.trunc_normal_(self.lvl_embed.weight, std=init_std)
        self.word_embed = nn.Linear(codebook_dim, C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))

        # on the CPU so the decoder can be built under a meta device context
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()
        blocks = [DecoderBlock(cfg, rates[i], compat.bf16_cross_attention) for i in range(cfg.depth)]
        per = cfg.depth // cfg.block_chunks
        self.block_chunks = nn.ModuleList(_Chunk(blocks[c * per:(c + 1) * per]) for c in range(cfg.block_chunks))
        self.head_nm = _HeadAdaLN(C, cfg.norm_eps)
        self.head = nn.Linear(C, 2 * codebook_dim)
        if cfg.source_condition:
            # zeros, built without drawing from the global RNG: the other weights of a seeded build stay the same
            self.source_embed = nn.Linear(codebook_dim, C, device="meta").to_empty(device=self.head.weight.device)
            nn.init.zeros_(self.source_embed.weight)
            nn.init.zeros_(self.source_embed.bias)
        self.source_gate = None
        if cfg.source_condition and cfg.source_copy:
            # where to copy: a per-position gate sigmoid(GATE_OPEN + source_gate(h)) on the copy logits. Zeros (the
            # value a checkpoint without it loads with), so it starts open everywhere
            self.source_gate = nn.Linear(C, 1, device="meta").to_empty(device=self.head.weight.device)
            nn.init.zeros_(self.source_gate.weight)
            nn.init.zeros_(self.source_gate.bias)
        self.source_ctx = self.source_ctx_row = self.source_ctx_col = None
        if cfg.source_context:
            # the source's latent as cross-attention context: codes -> width C, plus where each token sits. Drawn
            # from a generator of its own: the other weights of a seeded build stay the same
            dev = self.head.weight.device
            self.source_ctx = nn.Linear(codebook_dim, C, device="meta").to_empty(device=dev)
            self.source_ctx_row = nn.Embedding(cfg.rope_max_grid, C, device="meta").to_empty(device=dev)
            self.source_ctx_col = nn.Embedding(cfg.rope_max_grid, C, device="meta").to_empty(device=dev)
            if dev.type != "meta":
                g = torch.Generator(device=dev).manual_seed(0)
                for w in (self.source_ctx.weight, self.source_ctx_row.weight, self.source_ctx_col.weight):
                    nn.init.trunc_normal_(w, std=init_std, generator=g)
                nn.init.zeros_(self.source_ctx.bias)
        self._rope: dict[tuple, Tensor] = {}

    # ---- helpers

    @property
    def blocks(self) -> list[DecoderBlock]:
        return [b for chunk in self.block_chunks for b in chunk.module]

    def rope(self, schedule: Schedule, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The 2-D RoPE table of ``schedule``'s template as the blocks use it (`_rope_pairs`), [2, L, head_dim]
        (memoised per schedule, device and dtype; built outside inference mode so training can use it too)."""
        key = (tuple(tuple(s) for s in schedule), device, dtype)
        if key not in self._rope:
            with torch.inference_mode(False):
                table = rope2d_table(schedule, self.cfg.head_dim, theta=self.cfg.rope_theta,
                                     max_grid=self.cfg.rope_max_grid, pad_to=self.cfg.pad_to_multiplier)
                self._rope[key] = _rope_pairs(table.to(device=device, dtype=dtype))
        return self._rope[key]

    def padded_length(self, schedule: Schedule) -> int:
        """Sequence length the published training pads to (multiple of ``pad_to_multiplier``)."""
        n = sum(t * h * w for t, h, w in schedule)
        m = self.cfg.pad_to_multiplier
        return -(-n // m) * m

    # ---- conditioning

    def encode_condition(self, text_BTC: Tensor, text_mask_BT: Tensor | None = None, *,
                         cond_drop_generator: torch.Generator | None = None) -> Tensor:
        """Conditioning tokens -> ``cond_BD`` (text_norm + attentive pool).

        In training mode each sample's tokens are replaced by the unconditional rows ``cfg_uncond[:T]`` with
        probability ``cond_drop_rate`` (draws from ``cond_drop_generator``).
        """
        text_BTC = text_BTC.to(self.cfg_uncond.dtype)
        if self.training and self.cfg.cond_drop_rate > 0:
            drop_B = torch.rand(text_BTC.shape[0], generator=cond_drop_generator,
                                device=cond_drop_generator.device if cond_drop_generator else None)
            drop_B = (drop_B < self.cfg.cond_drop_rate).to(text_BTC.device)
            uncond = self.cfg_uncond[: text_BTC.shape[1]].to(text_BTC.dtype).expand_as(text_BTC)
            text_BTC = torch.where(drop_B[:, None, None], uncond, text_BTC)
        return self.text_proj_for_sos(self.text_norm(text_BTC), text_mask_BT)

    def uncond_text(self, batch_size: int, length: int = 1) -> Tensor:
        """The unconditional "text": ``cfg_uncond[:length]`` for every sample, [B, length, Ct]."""
        return self.cfg_uncond[:length].unsqueeze(0).expand(batch_size, -1, -1)

    def condition(self, cond_BD: Tensor, context_BNC: Tensor, context_mask_BN: Tensor | None = None, *,
                  source_BLD: Tensor | None = None, source_latent_BDHW: Tensor | None = None,
                  source_mask_B: Tensor | None = None) -> DecoderCondition:
        """Bundle ``cond_BD`` (with its shared modulation, computed in fp32), the cross-attention context and the
        optional source codes (see `DecoderCondition`). ``source_latent_BDHW`` (``decoder.source_context``): the
        edit sources' latents, appended to the context as `source_context_tokens` (rows where ``source_mask_B``
        is False: masked out)."""
        lin = self.shared_ada_lin[1]  # fp32 whatever the parameter dtype, as released
        gss = F.linear(F.silu(cond_BD.float()), lin.weight.float(), lin.bias.float())
        if source_latent_BDHW is not None and self.source_ctx is not None:
            tokens = self.source_context_tokens(source_latent_BDHW).to(context_BNC.dtype)
            B, N = context_BNC.shape[:2]
            mask = (context_mask_BN if context_mask_BN is not None else
                    torch.ones(B, N, dtype=torch.bool, device=context_BNC.device))
            has = (torch.ones(B, dtype=torch.bool, device=mask.device) if source_mask_B is None
                   else source_mask_B.to(device=mask.device, dtype=torch.bool))
            context_BNC = torch.cat([context_BNC, tokens], 1)
            mask = torch.cat([mask, has[:, None].expand(-1, tokens.shape[1])], 1)
            context_mask_BN = None if bool(mask.all()) else mask
        return DecoderCondition(cond_BD, gss.reshape(-1, 1, 6, self.cfg.embed_dim), context_BNC, context_mask_BN,
                                source_BLD)

    def source_context_tokens(self, latent_BDHW: Tensor) -> Tensor:
        """Cross-attention tokens [B, H*W, C] of source latents [B, D, H, W] (reading order): ``source_ctx`` of each
        position's D channels + its row and column embeddings (``decoder.source_context``)."""
        if self.source_ctx is None:
            raise InputError("this decoder has no source context (config decoder.source_context = false)")
        _, _, H, W = latent_BDHW.shape
        if max(H, W) > self.cfg.rope_max_grid:
            raise InputError(f"source latent grid {H}x{W} exceeds decoder.rope_max_grid ({self.cfg.rope_max_grid})")
        w = self.source_ctx.weight
        x = self.source_ctx(latent_BDHW.flatten(2).transpose(1, 2).to(w.dtype))
        rows = torch.arange(H, device=w.device).repeat_interleave(W)
        cols = torch.arange(W, device=w.device).repeat(H)
        return x + self.source_ctx_row(rows) + self.source_ctx_col(cols)

    def source_term(self, source_BLD: Tensor) -> Tensor:
        """The block-input term [B, L, C] of source codes ``source_BLD`` (in the order of the bit labels: position
        block k = the source's scale-k codes, which line up with the positions predicting scale k): ``source_embed``
        of them, zero at all-zero positions (samples without a source)."""
        if not self.cfg.source_condition:
            raise InputError("this decoder has no source conditioning (config decoder.source_condition = false)")
        w = self.source_embed.weight
        x = self.source_embed(source_BLD.to(w.dtype))
        return x * (source_BLD != 0).any(-1, keepdim=True).to(x.dtype)

    def first_tokens(self, cond_BD: Tensor) -> Tensor:
        """The first token of every sequence: ``cond_BD + pos_start``, [B, 1, C]."""
        return cond_BD.unsqueeze(1) + self.pos_start

    def embed_inputs(self, x_BlD: Tensor) -> Tensor:
        """Codes of the next scale(s) [B, l, D] -> decoder width [B, l, C] (``word_embed``)."""
        return self.word_embed(x_BlD)

    def input_sequence(self, cond_BD: Tensor, x_wo_prefix_BlD: Tensor) -> Tensor:
        """Teacher-forcing sequence [B, L, C]: first token, then the embedded inputs of scales 1..K-1."""
        return torch.cat([self.first_tokens(cond_BD), self.embed_inputs(x_wo_prefix_BlD)], dim=1)

    def get_logits(self, h_BLC: Tensor, cond_BD: Tensor, source_BLD: Tensor | None = None,
                   modulation: tuple[Tensor, Tensor] | None = None, *,
                   return_gate: bool = False) -> Tensor | tuple[Tensor, Tensor | None]:
        """Head AdaLN + bitwise head: [B, L, 2D] (columns 2d, 2d+1 = logits of bit d being 0, 1). With the copy
        path and source codes of these positions, bit d's logit gap (1 minus 0) grows by ``source_copy * gate *
        code_d``, gate = sigmoid(GATE_OPEN + ``source_gate``(h)) per position. ``modulation``: the head AdaLN's of
        ``cond_BD``, when kept (`DecoderKVCache`). ``return_gate``: also the gate's logits [B, L] (None without)."""
        h = self.head_nm(h_BLC.to(cond_BD.dtype), cond_BD, modulation)
        logits, gate = self.head(h), None
        if source_BLD is not None and self.source_gate is not None:
            gate = self.source_gate(h).float().squeeze(-1) + GATE_OPEN
            half = (0.5 * self.cfg.source_copy) * torch.sigmoid(gate).unsqueeze(-1) * source_BLD.float()
            logits = logits + torch.stack([-half, half], dim=-1).flatten(-2).to(logits.dtype)
        return (logits, gate) if return_gate else logits

    # ---- forwards

    def forward_train(self, x_BLC: Tensor, cond: DecoderCondition, schedule: Schedule, *,
                      num_scales: int | None = None, generator: torch.Generator | None = None,
                      return_gate: bool = False) -> Tensor | tuple[Tensor, Tensor | None]:
        """All scales in one pass (block-causal mask). ``x_BLC``: block input (see `input_sequence`);
        returns logits [B, L, 2D] (``return_gate``: and the copy gate's logits, `get_logits`). ``num_scales``: only
        the first scales of ``schedule`` are given (the RoPE positions still come from the whole schedule).
        ``generator`` drives DropPath in training mode."""
        schedule = tuple(schedule)
        used = schedule[:num_scales] if num_scales is not None else schedule
        B, L, _ = x_BLC.shape
        if L != sum(t * h * w for t, h, w in used):
            raise InputError(f"decoder input has {L} tokens but the scale schedule has "
                             f"{sum(t * h * w for t, h, w in used)}")
        x = x_BLC + self.lvl_embed(_scale_ids(used, x_BLC.device))
        if cond.source_BLD is not None:
            x = x + self.source_term(cond.source_BLD[:, :L]).to(x.dtype)
        rope = self.rope(schedule, x.device, x.dtype)[:, :L]
        mask = block_causal_mask(used, x.device)
        for block in self.blocks:
            drop = None
            if self.training and block.drop_path > 0:
                drop = tuple(_drop_path_scales(B, block.drop_path, generator, x.device, x.dtype) for _ in range(2))
            args = (x, cond.gss_B16C, cond.context_BNC, cond.context_mask_BN, rope)
            if self.cfg.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, *args, attn_mask=mask, drop_B11=drop, use_reentrant=False)
            else:
                x = block(*args, attn_mask=mask, drop_B11=drop)
        return self.get_logits(x, cond.cond_BD, None if cond.source_BLD is None else cond.source_BLD[:, :L],
                               return_gate=return_gate)

    def new_cache(self, batch_size: int, schedule: Schedule, *, device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> DecoderKVCache:
        """An empty KV cache sized for ``schedule``."""
        n = sum(t * h * w for t, h, w in schedule)
        return DecoderKVCache(self.cfg.depth, batch_size, self.cfg.num_heads, self.cfg.head_dim, n,
                              device=device, dtype=dtype)

    def forward_step(self, x_BlC: Tensor, cond: DecoderCondition, schedule: Schedule, scale_index: int,
                     cache: DecoderKVCache) -> Tensor:
        """One scale: ``x_BlC`` = block input of scale ``scale_index`` (its tokens attend to every cached
        token and to each other); appends to ``cache`` and returns logits [B, l, 2D]."""
        schedule = tuple(schedule)
        t, h, w = schedule[scale_index]
        start = sum(a * b * c for a, b, c in schedule[:scale_index])
        l = x_BlC.shape[1]
        if l != t * h * w or cache.length != start:
            raise InputError(f"scale {scale_index} expects {t * h * w} tokens starting at {start}; got {l} tokens "
                             f"with {cache.length} cached (run the scales in order with one cache)")
        x = x_BlC + self.lvl_embed.weight[scale_index]
        source = None if cond.source_BLD is None else cond.source_BLD[:, start:start + l]
        if source is not None:
            x = x + self.source_term(source).to(x.dtype)
        rope = self.rope(schedule, x.device, x.dtype)[:, start:start + l]
        for i, block in enumerate(self.blocks):
            x = block(x, cond.gss_B16C, cond.context_BNC, cond.context_mask_BN, rope, cache=cache, layer=i,
                      start=start)
        cache.length = start + l
        if cache.head_modulation is None:
            cache.head_modulation = self.head_nm.modulation(cond.cond_BD)
        return self.get_logits(x, cond.cond_BD, source, cache.head_modulation)
