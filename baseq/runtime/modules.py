"""The runtime's modules: what replaces a decoder block's attention and MLP, the embedding and the LM head in a
packed model.

A decoder layer keeps transformers' own structure (residuals, norms, RoPE, masks, cache plumbing); inside it

* :class:`RuntimeAttention`: one activation quantization and ONE integer GEMM for q, k and v together (their
  weights concatenated), the family's q/k norms (per head or over all heads), RoPE (partial where the config says
  so), the online R3 Hadamard on queries and keys, K/V quantized per token and KV head
  (stored as codes in a :class:`~baseq.runtime.kvcache.QuantizedKVCache`), attention, then the o_proj input point
  (asymmetric scale, bias shift, quantization) and its integer GEMM;
* :class:`RuntimeMLP`: one quantization and ONE integer GEMM for gate and up, act(gate)·up (SiLU or GELU-tanh), the
  online R4 Hadamard, the down_proj input point and its integer GEMM.

Attention-logit soft-capping (Gemma 2) uses the simulated model's own eager path
(:func:`baseq.quant.qmodel.softcapped_attention`), and decoding on the cache codes applies it too.

Each point computes exactly the fake quantizer's codes (:func:`~baseq.runtime.kernels.quantize_tokens`), so the
runtime computes the fake-quant model's function with integer arithmetic (see ``kernels.py`` for the zero-point
algebra).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..quant.qmodel import TokenGate, combine_digits, float_digits, softcapped_attention
from .kernels import INT4_ROWS, IntLinear, int_mm, quantize_tokens, token_grid
from .native import native_ops
from .kvcache import QuantizedKVCache


class RMSNorm(nn.Module):
    """Llama's RMSNorm (same arithmetic as transformers' and as :class:`baseq.quant.qmodel.QuantRMSNorm`)."""

    def __init__(self, weight: Tensor, eps: float):
        super().__init__()
        # a (frozen) parameter: transformers reads a model's device and dtype from its parameters
        self.weight = nn.Parameter(weight.float().contiguous(), requires_grad=False)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        wide = x.dtype == torch.float32  # (the runtime's own stream: no conversions to dispatch)
        h = x if wide else x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * (h if wide else h.to(x.dtype))


class ActPoint(nn.Module):
    """An activation quantization point: ``x ↦ codes of (R(x)·scale − shift)`` per token (its ``+ shift`` lives in
    the next bias). ``bits = 16``: no quantization, the float value is passed on."""

    def __init__(self, bits: int, clip: Tensor, scale: Tensor | None, shift: Tensor | None,
                 rotation: nn.Module | None = None):
        super().__init__()
        self.bits = bits
        self.rotation = rotation
        self.register_buffer("clip", clip.float())
        # identities are skipped (x·1 and x − 0 are exact, so this changes no value)
        self.register_buffer("scale", None if scale is None or bool((scale == 1).all()) else scale.float().contiguous())
        self.register_buffer("shift", None if shift is None or bool((shift == 0).all()) else shift.float().contiguous())

    def prepare(self, x: Tensor) -> Tensor:
        if self.rotation is not None:
            x = self.rotation(x)
        if self.scale is not None:
            x = x * self.scale
        if self.shift is not None:
            x = x - self.shift
        return x

    def forward(self, x: Tensor, linear: IntLinear, keep: Tensor | None = None) -> Tensor:
        """``linear`` applied to this point's quantized ``x [M, C]``; the rows ``keep`` (bool ``[M]``, the block's
        :class:`~baseq.quant.qmodel.TokenGate`) unquantized, against the weight codes."""
        if keep is None and self.bits < 16 and x.shape[0] <= INT4_ROWS and linear.codes4 is not None \
                and self.clip.numel() in (1, x.shape[0]) and x.dtype == torch.float32 and x.device.type == "cpu":
            # a decoding step: one compiled call, the same bits as the operations below
            ops = native_ops()
            if ops is not None:
                if self.rotation is not None:
                    x = self.rotation(x)
                return ops.point_int4(x, self.scale, self.shift, self.clip, self.bits, linear.codes4, linear.zero4,
                                      linear.wsum, linear.scale_row, linear.bias)
        x = self.prepare(x)
        if self.bits >= 16:
            return linear.forward_float(x)
        a, s, z = quantize_tokens(x, self.clip, self.bits)
        return linear(a, s, z, None if keep is None else (keep, x[keep]))


def _rows(gate: TokenGate | None, start: int = 0, stop: int | None = None) -> Tensor | None:
    """The gate's mask as rows ``[b·t]`` (``start:stop`` of them), or None when it keeps no token there."""
    if gate is None or gate.mask is None:
        return None
    rows = gate.mask.reshape(-1)[start:stop]
    return rows if bool(rows.any()) else None


class KVQuant(nn.Module):
    """R3 on queries/keys, and the per-token, per-KV-head quantization grid of K and V, around the per-channel
    centres ``k_shift`` / ``v_shift`` (``[kv_heads, 1, head_dim]``, broadcasting over ``[batch, kv_heads, tokens,
    head_dim]``; None for zero)."""

    def __init__(self, bits: int, k_clip: Tensor, v_clip: Tensor, rotation: nn.Module | None,
                 k_shift: Tensor | None = None, v_shift: Tensor | None = None, keep_float: bool = False):
        super().__init__()
        self.bits = bits
        self.keep_float = keep_float and bits < 16  # the block gate's kept tokens: float K/V (--keep-massive-kv)
        self.rotation = rotation
        self.register_buffer("k_clip", k_clip.float())
        self.register_buffer("v_clip", v_clip.float())
        for name, shift in (("k_shift", k_shift), ("v_shift", v_shift)):
            self.register_buffer(name, None if shift is None or bits >= 16 else shift.float().unsqueeze(1))

    def fake(self, x: Tensor, clip: Tensor) -> Tensor:
        if self.bits >= 16:
            return x
        s, z = token_grid(x.float(), clip, self.bits)
        return (torch.div(x.float(), s).round_().add_(z).clamp_(0, 2**self.bits - 1) - z) * s

    def centre(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """``(k − μ_K, v − μ_V)``: what is quantized and stored."""
        if self.k_shift is None:
            return k, v
        return k - self.k_shift, v - self.v_shift

    def uncentre(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.k_shift is None:
            return k, v
        return k + self.k_shift, v + self.v_shift


class RuntimeAttention(nn.Module):
    def __init__(self, point: ActPoint, qkv: IntLinear, o_point: ActPoint, o: IntLinear, kv: KVQuant, *,
                 layer_idx: int, heads: int, kv_heads: int, head_dim: int, scaling: float | None = None,
                 qk_norm: tuple[str | None, nn.Module | None, nn.Module | None] = (None, None, None),
                 softcap: float | None = None, gate: TokenGate | None = None):
        super().__init__()
        self.point, self.qkv, self.o_point, self.o_proj, self.kv = point, qkv, o_point, o, kv
        object.__setattr__(self, "gate", gate)  # the decoder layer's (registered there)
        self.layer_idx, self.heads, self.kv_heads, self.head_dim = layer_idx, heads, kv_heads, head_dim
        self.num_key_value_groups = heads // kv_heads
        self.scaling = head_dim ** -0.5 if scaling is None else scaling
        self.qk_norm_kind, self.q_norm, self.k_norm = qk_norm  # "head" | "full" | None
        self.softcap = softcap
        self.is_causal = True

    def forward(self, hidden_states: Tensor, position_embeddings=None, attention_mask=None, cache=None,
                past_key_values=None, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        cache = cache if cache is not None else past_key_values
        b, t, d = hidden_states.shape
        h, kvh, hd = self.heads, self.kv_heads, self.head_dim
        keep = _rows(self.gate)
        kv_keep = self.gate.mask if keep is not None and self.kv.keep_float else None  # [b, t]
        y = self.point(hidden_states.reshape(b * t, d), self.qkv, keep)
        if self.qk_norm_kind is None:
            qk = y[:, :(h + kvh) * hd].view(b, t, h + kvh, hd)
        else:
            q, k = y[:, :h * hd], y[:, h * hd:(h + kvh) * hd]
            if self.qk_norm_kind == "full":  # over all heads, before the reshape (OLMo 2)
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = q.reshape(b, t, h, hd), k.reshape(b, t, kvh, hd)
            if self.qk_norm_kind == "head":  # over each head (Qwen3, Gemma 3)
                q, k = self.q_norm(q), self.k_norm(k)
            qk = torch.cat([q, k], dim=2)
        # queries and keys together: RoPE and the online R3 act per head, so one call serves both
        qk = _rope(qk.transpose(1, 2), *position_embeddings)
        if self.kv.rotation is not None:
            qk = self.kv.rotation(qk)
        q, k = qk[:, :h], qk[:, h:]
        v = y[:, (h + kvh) * hd:].view(b, t, kvh, hd).transpose(1, 2)
        layer = cache.layers[self.layer_idx] if isinstance(cache, QuantizedKVCache) else None
        if layer is not None and t == 1 and layer.get_seq_length() > 0 and layer.bits < 16:
            # decoding: attention on the codes, in one compiled call where it applies
            out = None if kv_keep is not None else layer.step(q, k, v, self.scaling, self.softcap, self.kv.k_shift,
                                                               self.kv.v_shift, attention_mask)
            if out is None:
                layer.append(*self.kv.centre(k, v), keep=kv_keep, values=False)
                out = attend_codes(q, layer, self.scaling, attention_mask, self.softcap, self.kv.k_shift,
                                   self.kv.v_shift)
            return self.o_point(out.reshape(b, h * hd), self.o_proj, keep).view(b, t, -1), None
        k, v = self.kv.centre(k, v)
        if layer is not None:  # stores codes, returns every token's K/V dequantized
            k, v = self.kv.uncentre(*cache.update(k, v, self.layer_idx, keep=kv_keep))
        else:  # same grid, float values (e.g. a cache transformers made, or none)
            fk, fv = self.kv.fake(k, self.kv.k_clip), self.kv.fake(v, self.kv.v_clip)
            if kv_keep is not None:
                m = kv_keep[:, None, :, None]
                fk, fv = torch.where(m, k, fk), torch.where(m, v, fv)
            k, v = self.kv.uncentre(fk, fv)
            if cache is not None:
                k, v = cache.update(k, v, self.layer_idx)
        kwargs.pop("position_ids", None)
        kwargs.pop("use_cache", None)
        if self.softcap is not None:
            out = softcapped_attention(q, k, v, attention_mask, self.scaling, self.softcap)
        else:
            out, _ = sdpa_attention_forward(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling,
                                            **kwargs)
        return self.o_point(out.reshape(b * t, h * hd), self.o_proj, keep).view(b, t, -1), None


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary position embedding of ``x [b, heads, t, d]`` (transformers' formula, ``cos``/``sin`` ``[b, t, r]``);
    with ``r < d`` (partial rotary, Phi-4-mini) only the first ``r`` dims rotate."""
    if x.device.type == "cpu" and x.dtype == cos.dtype == sin.dtype == torch.float32:
        ops = native_ops()
        if ops is not None:  # one compiled call, the same bits
            return ops.rope(x, cos, sin)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat([_rope_full(x[..., :r], cos, sin), x[..., r:]], dim=-1)
    return _rope_full(x, cos, sin)


def _rope_full(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def attend_codes(q: Tensor, layer, scaling: float, mask: Tensor | None, softcap: float | None = None,
                 k_shift: Tensor | None = None, v_shift: Tensor | None = None) -> Tensor:
    """One query token per sequence (``q [b, heads, 1, d]``) against every token of a quantized cache layer,
    computed on the codes: with ``K̂_t = (C_t − z_t)·s_t + μ_K``,

        q·K̂_t = s_t (q·C_t − z_t Σ_i q_i) + q·μ_K,      Σ_t p_t V̂_t = Σ_t (p_t s_t) C_t − Σ_t (p_t s_t) z_t + μ_V,

    so the cache is never dequantized (two matrix products over the codes, the rest is per token); ``softcap``:
    scores ``c·tanh(s / c)`` (Gemma 2); ``k_shift`` / ``v_shift`` (``[kv_heads, 1, d]``): the centres ``μ``
    the cache was quantized around (``q·μ_K`` is the same for every key, so it changes no softmax but a soft-capped
    one; it is added anyway). Returns ``[b, heads, d]``. With the compiled kernels (CPU, ≤ 4-bit cache) the two
    products read the codes two a byte where they are stored (``kv_scores`` / ``kv_weighted``, runtime/native.py);
    else the cache is unpacked into float codes first, whose cost grows with the context."""
    b, h, _, d = q.shape
    ops = native_ops() if q.device.type == "cpu" else None
    held = layer.packed() if ops is not None else None
    if held is not None:
        packed, s, z = held
        kvh = s.shape[1] // 2
    else:
        c, s, z = layer.codes()  # K heads, then V heads
        kvh = c.shape[1] // 2
    sk, zk, sv, zv = s[:, :kvh], z[:, :kvh], s[:, kvh:], z[:, kvh:]
    qg = q.reshape(b, kvh, h // kvh, d)
    if held is not None:
        scores = ops.kv_scores(qg.float(), packed, layer.get_seq_length())  # [b, kv, g, n]
    else:
        scores = qg @ c[:, :kvh].transpose(-1, -2)  # [b, kv, g, n]
    scores = (scores - qg.sum(-1, keepdim=True) * zk.transpose(-1, -2)) * sk.transpose(-1, -2)
    kept = layer.kept()  # tokens stored float (--keep-massive-kv float): their scores from the float keys
    if kept is not None:
        bi, ti, vals = kept
        scores[bi, :, :, ti] = (qg[bi] * vals[:, :kvh, None, :]).sum(-1)
    if k_shift is not None:
        scores = scores + qg @ k_shift.transpose(-1, -2)  # [b, kv, g, 1]
    scores = scores * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:  # [b, 1, 1, n]: bool (True = attend) or additive
        m = mask[:, :, -1:, :].reshape(b, 1, 1, -1)
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m
    probs = torch.softmax(scores, dim=-1)
    pv = probs * sv.transpose(-1, -2)
    if kept is not None:  # their values likewise: out of the codes' sums, added as float
        p_kept = probs[bi, :, :, ti]  # [m, kv, g]
        pv[bi, :, :, ti] = 0
    cv_pv = ops.kv_weighted(pv, packed, kvh)[..., :d] if held is not None else pv @ c[:, kvh:]
    out = cv_pv - pv @ zv  # [b, kv, g, d]
    if kept is not None:
        out.index_add_(0, bi, p_kept[..., None] * vals[:, kvh:, None, :])
    if v_shift is not None:
        out = out + v_shift
    return out.reshape(b, h, d)


class RuntimeMLP(nn.Module):
    """The MLP, over at most ``rows`` tokens at a time: every operation in it is per token (quantization grids,
    integer GEMM rows, epilogues, activations, the online R4), so a long prompt in slabs computes the same values
    while its temporaries stay those of ``rows`` tokens (the 2 × ffn-wide gate/up accumulator and its float
    epilogue: 37 MB each at 512 tokens of Qwen2.5-1.5B, and the allocator keeps the largest working set)."""

    rows = 128

    def __init__(self, point: ActPoint, gate_up: IntLinear, down_point: ActPoint, down: IntLinear,
                 act_fn: nn.Module | None = None, gate: TokenGate | None = None):
        super().__init__()
        self.point, self.gate_up, self.down_point, self.down = point, gate_up, down_point, down
        object.__setattr__(self, "gate", gate)  # the decoder layer's (registered there)
        self.ffn = gate_up.splits[0]
        self.act_fn = act_fn if act_fn is not None else nn.SiLU()  # the model's own (transformers' ACT2FN entry)

    def _tokens(self, x: Tensor, keep: Tensor | None) -> Tensor:
        """The MLP of the rows ``x``; ``keep`` (bool per row, or None): the block gate's float rows among them."""
        gu = self.point(x, self.gate_up, keep)
        h = self.act_fn(gu[:, :self.ffn]) * gu[:, self.ffn:]
        return self.down_point(h, self.down, keep)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        x = x.reshape(b * t, d)
        if x.shape[0] <= self.rows:
            return self._tokens(x, _rows(self.gate)).view(b, t, -1)
        out = None
        for start in range(0, x.shape[0], self.rows):
            part = self._tokens(x[start:start + self.rows], _rows(self.gate, start, start + self.rows))
            if out is None:
                out = part.new_empty(x.shape[0], part.shape[1])
            out[start:start + self.rows] = part
        return out.view(b, t, -1)


class Table(nn.Module):
    """An embedding table / LM head stored as float16, or int8 rows with a float16 scale each."""

    def __init__(self, weight: Tensor | None = None, codes: Tensor | None = None, scale: Tensor | None = None):
        super().__init__()
        self.register_buffer("weight", weight)  # float16 [V, d]
        self.register_buffer("codes", codes)  # int8 [V, d]
        self.register_buffer("row_scale", None if scale is None else scale.float().reshape(-1))  # [V]
        src = weight if weight is not None else codes
        self.rows, self.dim = src.shape
        self.gemv_rows = 8  # up to this many rows, the decoding GEMV (0: exact float32 logits always, for scoring)

    def lookup(self, ids: Tensor) -> Tensor:
        if self.weight is not None:
            return F.embedding(ids, self.weight).float()
        return F.embedding(ids, self.codes).float() * self.row_scale[ids].unsqueeze(-1)

    def logits(self, h: Tensor, chunk: int = 8192) -> Tensor:
        """``h [..., d] @ tableᵀ`` in float32. Many rows (prefill, evaluation): exact float32 GEMMs over slabs of the
        vocabulary, so no float32 copy of the table is kept. A few rows (decoding: at most ``gemv_rows``): one float16
        GEMV (``h`` rounded to float16: logits within ~1e-3 relative of the exact ones), or for an int8 table one int8
        GEMV of ``h`` written as three int8 digits per row (:func:`~baseq.quant.qmodel.float_digits`: ``h`` to ~2⁻²²
        of its largest entry — a single int8 rounding of ``h`` moved SmolLM2's logits by up to 4 % and changed greedy
        tokens; the GEMV reads the table once either way, so the extra rows cost little)."""
        x = h.reshape(-1, self.dim).float().contiguous()
        if x.shape[0] <= self.gemv_rows and self.codes is not None:  # int8 table: x as int8 digits, one int GEMV
            digits, scales = float_digits(x)
            out = combine_digits(int_mm(digits.to(torch.int8), self.codes).float() * scales) * self.row_scale
        elif x.shape[0] <= self.gemv_rows:  # float16 table: a float16 GEMV
            out = F.linear(x.to(self.weight.dtype), self.weight).float()
        else:  # exact float32 logits, a slab of the vocabulary at a time
            out = torch.empty(x.shape[0], self.rows, dtype=torch.float32, device=x.device)
            for i in range(0, self.rows, chunk):
                w = self.weight[i:i + chunk].float() if self.codes is None else \
                    self.codes[i:i + chunk].float() * self.row_scale[i:i + chunk, None]
                out[:, i:i + chunk] = x @ w.t()
        return out.reshape(*h.shape[:-1], self.rows)


class RuntimeEmbedding(nn.Module):
    """Token ids → rows of the table (times the family's embedding scale, Gemma's √hidden), then the online R1 (the
    residual stream is rotated)."""

    def __init__(self, table: Table, rotation: nn.Module | None, scale: float | None = None):
        super().__init__()
        self.table, self.rotation = table, rotation
        # a float32 scalar, as transformers computes it (torch.tensor(√hidden))
        self.register_buffer("scale", None if scale is None else torch.tensor(scale), persistent=False)

    @property
    def weight(self) -> Tensor:
        return self.table.weight if self.table.weight is not None else self.table.codes

    def forward(self, ids: Tensor) -> Tensor:
        x = self.table.lookup(ids)
        if self.scale is not None:
            x = x * self.scale
        return self.rotation(x) if self.rotation is not None else x


class RuntimeHead(nn.Module):
    def __init__(self, table: Table):
        super().__init__()
        self.table = table

    def forward(self, h: Tensor) -> Tensor:
        return self.table.logits(h)


class FinalNorm(nn.Module):
    """R1ᵀ (back to the original basis), then the model's final RMSNorm."""

    def __init__(self, norm: RMSNorm, rotation: nn.Module | None):
        super().__init__()
        self.norm, self.rotation = norm, rotation

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.rotation.inverse(x) if self.rotation is not None else x)
