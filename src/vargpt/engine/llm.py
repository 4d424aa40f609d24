"""The engine's LLM: the Qwen2 text model of transformers' Qwen2-VL without its per-call machinery.

Contract
--------
* `KVCache()`: keys/values of every layer for the tokens seen so far, in buffers that grow by doubling (allocated
  at the first `update`, when the batch size and dtype are known). ``length`` = tokens cached.
* `LeanLLM(vlm)`: the model's weights looked up once; calling it, ``(inputs_embeds, *, cache=None,
  position_ids=None, attention_mask=None)`` -> final-norm hidden states, gives the result of
  `vargpt.models.vlm.llm_forward` bit for bit (tests), with a `KVCache` instead of transformers' ``DynamicCache``.
  `llm_forward(vlm, ...)` is the same as a function.
* `generate_tokens(llm, input_ids, inputs_embeds, position_ids, attention_mask, ...)` -> new tokens: transformers'
  ``generate`` loop for greedy or sampled decoding (same logits, processors, draws, padding of finished rows and
  streamer calls; tests compare the tokens), one forward + ``lm_head`` per token, for a model whose generation
  config is transformers' default one (`default_generation`).

Why: on the small models the engine runs on a CPU, one call of transformers' text model spends most of its time in
decorators, output capturing, mask building, module calls and cache bookkeeping, not in the layers: the image loop
calls the LLM twice per scale and text decoding once per token. Here the layers run transformers' operations in
transformers' order (its RMSNorm formula, projections, MLP and rotary embedding module) and the attention glue
(mask, grouped-query attention, SDPA flags) is written out as its SDPA path does it
(`transformers.integrations.sdpa_attention`), so the floats are the same. Only ``attn_implementation="sdpa"`` has
this path (`supported`); the engine uses transformers' forward otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import GenerationConfig, LogitsProcessor

__all__ = ["KVCache", "LeanLLM", "default_generation", "generate_tokens", "llm_forward", "supported"]


def supported(vlm: torch.nn.Module) -> bool:
    """Whether `LeanLLM` reproduces this model's own forward (attention through SDPA, the default rotary embedding)."""
    lm = vlm.model.language_model
    return lm.config._attn_implementation == "sdpa" and lm.rotary_emb.rope_type == "default"


def default_generation(vlm: torch.nn.Module) -> bool:
    """Whether the model's ``generation_config`` is the one transformers derives from its config (so ``generate`` adds
    only what the engine asks for, which `generate_tokens` reproduces); an edited or loaded one (repetition penalty,
    bad words, ...) goes through transformers' ``generate``."""
    return vlm.generation_config == GenerationConfig.from_model_config(vlm.config)


class KVCache:
    """Per-layer keys/values [B, kv_heads, capacity, head_dim]; ``update`` writes a step and returns all so far."""

    def __init__(self) -> None:
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []
        self.length = 0

    def update(self, layer: int, k_BHlD: Tensor, v_BHlD: Tensor) -> tuple[Tensor, Tensor]:
        start, end = self.length, self.length + k_BHlD.shape[2]
        if layer == len(self.k):  # first step of this layer: room for the prompt and 255 more tokens
            shape = (*k_BHlD.shape[:2], end + 255, k_BHlD.shape[3])
            self.k.append(k_BHlD.new_empty(shape))
            self.v.append(v_BHlD.new_empty(shape))
        if end > self.k[layer].shape[2]:
            grow = lambda t: torch.cat([t, t.new_empty(*t.shape[:2], max(end, 2 * t.shape[2]) - t.shape[2],
                                                        t.shape[3])], dim=2)  # noqa: E731
            self.k[layer], self.v[layer] = grow(self.k[layer]), grow(self.v[layer])
        self.k[layer].narrow(2, start, end - start).copy_(k_BHlD)
        self.v[layer].narrow(2, start, end - start).copy_(v_BHlD)
        return self.k[layer].narrow(2, 0, end), self.v[layer].narrow(2, 0, end)


def _attention_mask(padding_BS: Tensor | None, B: int, q_len: int, kv_len: int, device: torch.device,
                    dtype: torch.dtype = torch.float32) -> Tensor | None:
    """transformers' `sdpa_mask` of a causal layer: None where SDPA's own flags suffice, else the additive mask
    [B or 1, 1, q, kv] (0 = attend, -inf = not): query i (cache index kv_len - q_len + i) sees key j iff j <= its
    index and j is a real token. SDPA turns a bool mask into exactly this one (0 / -inf in the query dtype) at every
    call; built here once per forward, and without padding not copied per row (the kernel broadcasts it)."""
    if padding_BS is not None and bool(padding_BS[:, :kv_len].all()):
        padding_BS = None
    offset = kv_len - q_len
    if padding_BS is None and (q_len == 1 or offset == 0):
        return None
    j = torch.arange(kv_len, device=device)
    mask = j[None, None, None, :] <= j[None, None, offset:, None]
    if padding_BS is not None:
        mask = mask & padding_BS[:, None, None, :kv_len].bool()
    return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, -torch.inf)


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """transformers' Qwen2-VL RMSNorm, operation for operation (fp32 statistics, the weight in x's dtype). For fp32 on
    a CPU torch's ``rms_norm`` is these very operations composed in C++ (one call instead of six; tests); elsewhere it
    rounds differently (a fused kernel, or the weight applied before the cast), so the operations are spelled out."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    h = x if x.dtype == torch.float32 else x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (h if x.dtype == torch.float32 else h.to(x.dtype))


class LeanLLM:
    """The LLM with its weights looked up once (per image or per answer): see the module docstring."""

    def __init__(self, vlm: torch.nn.Module) -> None:
        lm = vlm.model.language_model
        self.embed_tokens, self.lm_head = lm.embed_tokens, vlm.lm_head
        rot = lm.rotary_emb  # M-RoPE: frequency i takes its angle from axis rope_axis[i] (t, h or w)
        self.inv_freq, self.rope_scaling = rot.inv_freq, rot.attention_scaling
        self.rope_axis = torch.tensor([i % 3 for i, n in enumerate(rot.mrope_section) for _ in range(n)],
                                      device=rot.inv_freq.device)
        self.norm = (lm.norm.weight, lm.norm.variance_epsilon)
        a = lm.layers[0].self_attn
        self.head_dim, self.n_rep, self.scaling = a.head_dim, a.num_key_value_groups, a.scaling
        self.layers = [(lay.input_layernorm.weight, lay.input_layernorm.variance_epsilon,
                        [(p.weight, p.bias) for p in (lay.self_attn.q_proj, lay.self_attn.k_proj, lay.self_attn.v_proj,
                                                      lay.self_attn.o_proj)],
                        lay.post_attention_layernorm.weight, lay.post_attention_layernorm.variance_epsilon,
                        lay.mlp.gate_proj.weight, lay.mlp.up_proj.weight, lay.mlp.down_proj.weight, lay.mlp.act_fn)
                       for lay in lm.layers]

    def _rotary(self, position_ids_3Bl: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and signed sin [B, 1, l, head_dim] such that x * cos + roll(x, head_dim / 2) * sin is transformers'
        rotation x * cos + rotate_half(x) * sin (rotate_half(x) = (-x2, x1); (x2, x1) * (-sin1, sin2) are the same
        products, negation being exact). cos and sin are computed on transformers' [3, B, l, head_dim / 2] angles (its
        `Qwen2VLRotaryEmbedding`: same shapes, so the same vectorised rounding), then each frequency's M-RoPE axis is
        gathered (its split + cat) and the scaling, 1 for the default rope, is applied only if it is not 1."""
        freqs = position_ids_3Bl[..., None].float() * self.inv_freq
        cos, sin = freqs.cos(), freqs.sin()
        if self.rope_scaling != 1.0:
            cos, sin = cos * self.rope_scaling, sin * self.rope_scaling
        axis = self.rope_axis.expand(1, *freqs.shape[1:])
        cos, sin = cos.gather(0, axis)[0], sin.gather(0, axis)[0]
        if cos.dtype != dtype:
            cos, sin = cos.to(dtype), sin.to(dtype)
        return torch.cat((cos, cos), dim=-1).unsqueeze(1), torch.cat((-sin, sin), dim=-1).unsqueeze(1)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """transformers' `sdpa_attention_forward` for a causal layer: [B, H, q, D] -> [B, q, H * D]."""
        B, _, q_len, D = q.shape
        n_rep, kw = self.n_rep, {}
        if n_rep > 1:
            if mask is None and k.shape[-1] <= 256:
                kw["enable_gqa"] = True
            elif q_len == 1:  # the query heads of one key head as a short "sequence"
                q = q.reshape(B, q.shape[1] // n_rep, n_rep, D)
            else:
                k, v = (t[:, :, None].expand(B, t.shape[1], n_rep, *t.shape[2:]).reshape(B, -1, *t.shape[2:])
                        for t in (k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling,
                                             is_causal=q_len > 1 and mask is None, **kw)
        return out.reshape(B, -1, q_len, D).transpose(1, 2).reshape(B, q_len, -1)  # contiguous, as transformers

    def __call__(self, inputs_embeds: Tensor, *, cache: KVCache | None = None, position_ids: Tensor | None = None,
                 attention_mask: Tensor | None = None) -> Tensor:
        """Final-norm hidden states [B, l, H] of ``inputs_embeds`` [B, l, H] (see `vargpt.models.vlm.llm_forward`).

        ``cache``: appended to; positions default to cache length + 0..l-1 on all M-RoPE axes. ``position_ids``:
        [3, B, l] or [B, l]. ``attention_mask`` [B, cached + l]: 1 at real tokens (left padding)."""
        B, l, _ = inputs_embeds.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = (torch.arange(l, device=inputs_embeds.device) + past).view(1, 1, -1).expand(3, B, -1)
        elif position_ids.ndim == 2:
            position_ids = position_ids[None].expand(3, -1, -1)
        cos, sin = self._rotary(position_ids, inputs_embeds.dtype)
        half = cos.shape[-1] // 2
        mask = _attention_mask(attention_mask, B, l, past + l, inputs_embeds.device, inputs_embeds.dtype)
        h = inputs_embeds
        for i, (w_in, eps_in, qkvo, w_post, eps_post, w_gate, w_up, w_down, act) in enumerate(self.layers):
            x = _rms_norm(h, w_in, eps_in)
            q, k, v = (F.linear(x, w, b).view(B, l, -1, self.head_dim).transpose(1, 2) for w, b in qkvo[:3])
            q, k = (t * cos + t.roll(half, -1) * sin for t in (q, k))
            if cache is not None:
                k, v = cache.update(i, k, v)
            h = F.linear(self._attend(q, k, v, mask), *qkvo[3]).add_(h)  # residuals into the fresh outputs
            x = _rms_norm(h, w_post, eps_post)
            h = F.linear(act(F.linear(x, w_gate)) * F.linear(x, w_up), w_down).add_(h)
        if cache is not None:
            cache.length = past + l
        return _rms_norm(h, *self.norm)


def llm_forward(vlm: torch.nn.Module, inputs_embeds: Tensor, **kwargs: Any) -> Tensor:
    """`LeanLLM` (vlm) (inputs_embeds, **kwargs): the signature of `vargpt.models.vlm.llm_forward`."""
    return LeanLLM(vlm)(inputs_embeds, **kwargs)


def generate_tokens(llm: LeanLLM, input_ids_BS: Tensor, inputs_embeds_BSH: Tensor, position_ids_3BS: Tensor,
                    attention_mask_BS: Tensor, *, max_new_tokens: int, eos_ids: Sequence[int], pad_id: int,
                    suppress_ids: Sequence[int] = (), processors: Sequence[LogitsProcessor] = (),
                    do_sample: bool = False, streamer: Any | None = None) -> Tensor:
    """New tokens [B, n <= max_new_tokens] after the prompts (left-padded), as transformers' ``generate`` makes them:
    on the fp32 logits of the last position ``suppress_ids`` set to -inf (its ``suppress_tokens``), then
    ``processors`` in order, then argmax or one ``torch.multinomial`` draw per step (the global RNG); rows that
    emitted an ``eos_ids`` token continue with ``pad_id``; stop when every row has ended. Each new token sits at the
    previous position + 1 on every M-RoPE axis."""
    B, S = input_ids_BS.shape
    dev = input_ids_BS.device
    cache, eos, suppress = KVCache(), torch.tensor(list(eos_ids), device=dev), torch.tensor(list(suppress_ids),
                                                                                         device=dev, dtype=torch.long)
    # an all-ones mask stays all ones (new tokens are real): no mask at all then, as transformers' mask builder finds
    mask = None if bool(attention_mask_BS.all()) else attention_mask_BS
    pos = position_ids_3BS[..., -1:]
    hidden = llm(inputs_embeds_BSH, cache=cache, position_ids=position_ids_3BS, attention_mask=mask)
    ids, unfinished = input_ids_BS, torch.ones(B, dtype=torch.bool, device=dev)
    if streamer is not None:
        streamer.put(ids.cpu())
    for step in range(max_new_tokens):
        scores = llm.lm_head(hidden[:, -1:])[:, -1].to(copy=True, dtype=torch.float32)
        if len(suppress):
            scores.index_fill_(-1, suppress, -torch.inf)
        for p in processors:
            scores = p(ids, scores)
        tok = (torch.multinomial(scores.softmax(dim=-1), num_samples=1).squeeze(1) if do_sample
               else scores.argmax(dim=-1))
        tok = torch.where(unfinished, tok, pad_id)  # transformers: tok * unfinished + pad * (1 - unfinished)
        ids = torch.cat([ids, tok[:, None]], dim=-1)
        unfinished &= ~torch.isin(tok, eos)
        if streamer is not None:
            streamer.put(tok.cpu())
        if step == max_new_tokens - 1 or not bool(unfinished.any()):
            break
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=-1)
        pos = pos + 1
        hidden = llm(llm.embed_tokens(tok[:, None]), cache=cache, position_ids=pos, attention_mask=mask)
    if streamer is not None:
        streamer.end()
    return ids[:, S:]
