"""The fake-quantized model: where activations and the KV cache are quantized inside a decoder block.

Four activation quantization points per block, each an :class:`ActPoint` computing ``Q(x·s − b) (+ b)``
(optional online rotation first, ``s`` the BASE-Q asymmetric scale, ``b`` the bias, both per channel):

* qkv input    — in the :class:`QuantRMSNorm` replacing the attention pre-norm (``input_layernorm``), or, when an
  online R1 follows that norm or the family has none (post-norm families), in ``self_attn.in_point``
  (:class:`~baseq.rotation.fuse.InputPoint`)
* o_proj input — in the :class:`QuantLinear` replacing ``o_proj``
* gate/up input — likewise, in the MLP pre-norm's :class:`QuantRMSNorm` or in ``mlp.in_point``
* down_proj input — in the :class:`QuantLinear` replacing ``down_proj`` (after the online R4 Hadamard)

With ``ActSpec.keep_massive`` (``--keep-massive``), a block's :class:`TokenGate` picks, from the residual stream
entering the block, the tokens whose RMS is at least a calibrated threshold (Qwen2.5's attention-sink token: 100–180×
the median): at the block's four points their activations are not quantized, and the linears after those points
multiply them, as three int8 digits each (:func:`float_digits`, exact to ~2⁻²² of the row's largest entry), against
the weights' integer codes (:func:`digits_linear`, as the runtime does, in the same integer GEMM as the other rows).

Pre-norms become :class:`QuantRMSNorm` holding their *effective* scale (``w``, or ``1 + w`` for Gemma's norms);
post-norms and q/k norms stay the model's own modules. K and V are quantized per token and per KV head by
:class:`KVPoint` (after the online R3 Hadamard on queries and keys), through an attention function registered with
transformers as ``"baseq"`` (SDPA, or an eager path applying attention-logit soft-capping, which SDPA lacks). Every
block linear becomes a :class:`QuantLinear` with a bias, so that folded BASE-Q biases (``W·b``) have a place to go
and saved models load into one fixed structure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BaseqError
from ..models.adapter import ModelAdapter, layer_spec, linears, split_fused
from ..rotation.fuse import InputPoint, OnlineRotation, ResidualRotation, install_input_point
from .quantizer import ActQuantizer, KVQuantizer

ATTN_NAME = "baseq"


@dataclass(frozen=True)
class ActSpec:
    """How activations and the KV cache are quantized (structure-defining: saved with the model)."""

    a_bits: int = 4
    kv_bits: int = 4
    a_clip: float = 0.9
    kv_clip: float = 0.95
    learnable_clip: bool = False
    online_rotations: bool = True  # R3 on queries/keys, R4 on the down_proj input
    seed: int = 0
    keep_massive: float = 0.0  # > 0: a TokenGate per block (tokens with a massive residual stream stay float)
    keep_kv: str = "quantized"  # "float": the kept tokens' K/V stay float too


def _beta(clip: float) -> float:
    clip = min(clip, 1 - 1e-6)
    return math.log(clip / (1 - clip))


class TokenGate(nn.Module):
    """Which tokens of a block keep float activations (``--keep-massive``): those whose residual stream entering the
    block has an RMS over channels of at least ``threshold`` (calibrated per block: a ratio times the calibration
    tokens' median; infinite = none). A rule on the token's own values, not its position, so prefill, decoding and
    any batch layout keep the same tokens. :func:`install_gate` has the block set :attr:`mask` (``[..., tokens]``
    bool, or None when no token is kept) on each forward; the block's points read it."""

    def __init__(self, threshold: float | torch.Tensor = float("inf")):
        super().__init__()
        self.register_buffer("threshold", torch.as_tensor(threshold, dtype=torch.float32).clone())
        self.mask: torch.Tensor | None = None

    def observe(self, h: torch.Tensor) -> None:
        keep = token_rms(h.detach()) >= self.threshold
        self.mask = keep if bool(keep.any()) else None

    def extra_repr(self) -> str:
        return f"threshold={float(self.threshold):.4g}"


def token_rms(h: torch.Tensor) -> torch.Tensor:
    """Each token's root mean square over channels (float32), ``h [..., C] → [...]``."""
    return h.float().pow(2).mean(-1).sqrt()


def _observe_block_input(layer: nn.Module, args, kwargs) -> None:
    layer.keep_gate.observe(args[0] if args else kwargs["hidden_states"])


def install_gate(layer: nn.Module, gate: TokenGate) -> None:
    """Give a decoder block ``gate`` (as ``layer.keep_gate``) and have every forward of the block set its mask from
    the block's input first. (A module-level hook: a deep copy of the block observes with its own gate.)"""
    layer.keep_gate = gate
    layer.register_forward_pre_hook(_observe_block_input, with_kwargs=True)


def kept_tokens(gate: TokenGate | None, x: torch.Tensor) -> torch.Tensor | None:
    """The gate's current mask for an input ``x [..., tokens, C]`` of one of its block's points (None: none kept)."""
    if gate is None or gate.mask is None:
        return None
    if gate.mask.shape != x.shape[:-1]:
        raise RuntimeError(f"a token gate's mask {tuple(gate.mask.shape)} does not fit the point's input "
                           f"{tuple(x.shape)}: the point ran outside its block's forward")
    return gate.mask


class ActPoint(nn.Module):
    """``x ↦ Q(R(x)·scale − shift) + shift`` per token; after folding the ``+ shift`` lives in the next bias. Tokens
    its block's ``gate`` keeps pass unquantized (``R(x)·scale − shift``, the ``+ shift`` likewise)."""

    def __init__(self, channels: int, bits: int, clip: float, learnable_clip: bool, rotation: nn.Module | None,
                 gate: TokenGate | None = None):
        super().__init__()
        object.__setattr__(self, "gate", gate)  # the block's (registered there, not here)
        self.rotation = rotation
        self.scale = nn.Parameter(torch.ones(channels), requires_grad=False)
        self.shift = nn.Parameter(torch.zeros(channels), requires_grad=False)
        self.register_buffer("shift_folded", torch.tensor(False))
        self.quantizer = ActQuantizer(bits, clip_ratio=min(clip, 1.0), learnable_clip=learnable_clip and bits < 16,
                                      beta_init=_beta(clip))
        if self.quantizer.beta is not None:
            self.quantizer.beta.requires_grad_(False)
        self.quantize = True  # switched off to compute full-precision targets

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotation is not None:
            x = self.rotation(x)
        x = x * self.scale.to(x.dtype) - self.shift.to(x.dtype)
        unshift = not bool(self.shift_folded) and bool(self.shift.detach().any())
        keep = kept_tokens(self.gate, x) if self.quantize and self.quantizer.enabled else None
        if self.quantize and self.quantizer.enabled and not torch.is_grad_enabled() and not unshift \
                and x.dtype == torch.float32 and self.quantizer.groups == 1:
            # inference: keep the integers with the values, so the next linear can compute exactly (QuantLinear)
            codes, scale = self.quantizer.codes(x)
            out = codes * scale  # the fake-quantized x, bit for bit
            if keep is not None:
                out = torch.where(keep.unsqueeze(-1), x, out)
                out.baseq_keep = keep
            out.baseq_codes, out.baseq_scale = codes, scale
            return out
        if self.quantize:
            q = self.quantizer(x)
            x = q if keep is None else torch.where(keep.unsqueeze(-1), x, q)
        if unshift:
            x = x + self.shift.to(x.dtype)
        return x


class QuantRMSNorm(nn.Module):
    """RMSNorm ``g·x̂`` (``g`` the effective scale) followed by an activation quantization point (or none)."""

    def __init__(self, weight: torch.Tensor, eps: float, act: ActPoint | None):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.eps = eps
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        h = self.weight * h.to(dtype)
        return self.act(h) if self.act is not None else h


class QuantLinear(nn.Linear):
    """A linear with (dequantized) quantized weights, a bias, and optionally its own input quantization point."""

    def __init__(self, linear: nn.Linear, act: ActPoint | None = None):
        super().__init__(linear.in_features, linear.out_features, bias=True,
                         device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            self.weight.copy_(linear.weight)
            self.bias.copy_(linear.bias if linear.bias is not None else torch.zeros_like(self.bias))
        self.weight.requires_grad_(False)
        self.bias.requires_grad_(False)
        self.act = act
        # set by GPTQ / RTN (quant.quantizer.record_weight_qparams): what the packed format stores codes with
        self.register_buffer("weight_scale", None)
        self.register_buffer("weight_zero", None)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("weight_scale", "weight_zero"):  # adopt the saved shapes ([out, groups])
            if prefix + name in state_dict:
                self._buffers[name] = torch.empty_like(state_dict[prefix + name], device=self.weight.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = self.act(x)
        codes = getattr(x, "baseq_codes", None)
        if codes is None or self.weight_scale is None or self.weight.dtype != torch.float32:
            return F.linear(x, self.weight, self.bias)
        w_int = weight_ints(self.weight, self.weight_scale)
        y = exact_linear(codes, x.baseq_scale, w_int, self.weight_scale, self.bias)
        keep = getattr(x, "baseq_keep", None)
        if keep is not None:  # the gate's float tokens, against the integer codes as the runtime computes them
            y[keep] = digits_linear(*float_digits(x[keep]), w_int, self.weight_scale, self.bias)
        return y


def weight_ints(weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """The integers ``c − z`` behind a quantized weight ``[N, K]`` (float, integer-valued; exact, see pack_linear)."""
    gs = weight.shape[1] // weight_scale.shape[1]
    return torch.round(weight / weight_scale.repeat_interleave(gs, dim=1))


KEPT_DIGITS = 3  # int8 digits per kept (float) row: 7 + 7 + 7 bits below the row's largest entry
DIGIT_BASE = 128  # each digit's scale is the previous one's / 128 (a power of two: exact)


def float_digits(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float rows ``x [m, K]`` as integer digits for the integer GEMM (the ``--keep-massive`` tokens):
    ``x ≈ Σ_j d_j·s_j`` with ``s_0 = max|x|/127`` and ``s_{j+1} = s_j/128``, ``|d_0| ≤ 127``, ``|d_j| ≤ 65`` after.
    Each step is exact in float32 (``u − round(u)`` and ``·128`` lose no bits), so the only errors are ``x/s_0``'s
    rounding and the last digit's (≤ ``s_0/2/128²`` per entry, ~2⁻²² of the row's largest entry: float32 keeps
    2⁻²⁴). Returns the digits ``[m·3, K]`` (a row's three digit rows together; integer-valued float32) and their
    scales ``[m·3, 1]``."""
    x = x.float()
    s = (x.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-30)  # a zero row: digits 0
    u = x / s
    digits, scales = [], []
    for j in range(KEPT_DIGITS):
        d = torch.round(u).clamp_(-127, 127)
        digits.append(d)
        scales.append(s / DIGIT_BASE**j)
        u = (u - d) * DIGIT_BASE
    m, k = x.shape
    return torch.stack(digits, 1).reshape(m * KEPT_DIGITS, k), torch.stack(scales, 1).reshape(m * KEPT_DIGITS, 1)


def combine_digits(t: torch.Tensor) -> torch.Tensor:
    """Rows ``[m·3, N]`` of a linear's per-digit products, already scaled by their digits' scales, summed per kept
    row in a fixed order (``d_0 + d_1 + d_2``): the runtime and the simulated model both call this."""
    t = t.view(-1, KEPT_DIGITS, t.shape[-1])
    out = t[:, 0]
    for j in range(1, KEPT_DIGITS):
        out = out + t[:, j]
    return out


def digits_linear(digits: torch.Tensor, scale: torch.Tensor, w_int: torch.Tensor, weight_scale: torch.Tensor,
                  bias: torch.Tensor) -> torch.Tensor:
    """The kept rows given as :func:`float_digits` times the weight's integers ``w_int = c − z`` ``[N, K]`` and
    scales ``[N, G]``, plus ``bias``: ``[m, N]``. The integer sums are formed in float64 (exact: the runtime's int32
    GEMM gives the same integers), then the runtime's float epilogue in its order
    (``baseq.runtime.kernels.IntLinear``), so both compute the same bits."""
    groups = weight_scale.shape[1]
    gs = w_int.shape[1] // groups
    where = digits.device if digits.device.type != "mps" else torch.device("cpu")  # MPS has no float64
    d, w = digits.to(where, torch.float64), w_int.to(where, torch.float64)

    def sums(cols: slice) -> torch.Tensor:
        return F.linear(d[:, cols], w[:, cols]).to(digits.device, torch.float32)

    if groups == 1:
        return torch.addcmul(bias, combine_digits(sums(slice(None)) * scale), weight_scale[:, 0])
    out = None
    for g in range(groups):
        part = sums(slice(g * gs, (g + 1) * gs)) * weight_scale[:, g]
        out = part if out is None else out.add_(part)
    return combine_digits(out * scale) + bias


def exact_linear(codes: torch.Tensor, scale: torch.Tensor, w_int: torch.Tensor, weight_scale: torch.Tensor,
                 bias: torch.Tensor) -> torch.Tensor:
    """``F.linear(codes·scale, weight, bias)``, the weight given by its integers ``w_int`` (:func:`weight_ints`) and
    scales, computed the way the integer runtime computes it: the sums of integer
    products ``Σ_k (q_k − z)(c_jk − z_j)`` first — exact in float32 (integers below 2^24) — then the runtime's float
    epilogue in its order (``baseq.runtime.kernels.IntLinear``). So a simulated model and its packed runtime compute
    the same numbers, and neither depends on the summation order of a float GEMM."""
    groups = weight_scale.shape[1]
    gs = w_int.shape[1] // groups
    if groups == 1:
        return torch.addcmul(bias, F.linear(codes, w_int) * scale, weight_scale[:, 0])
    out = None
    for g in range(groups):
        part = F.linear(codes[..., g * gs:(g + 1) * gs], w_int[:, g * gs:(g + 1) * gs]) * weight_scale[:, g]
        out = part if out is None else out.add_(part)
    return torch.addcmul(bias, out, scale)


class KVPoint(nn.Module):
    """Online R3 on queries and keys (after RoPE), then per-token, per-KV-head quantization of K and V, each around
    a per-channel shift: ``K̂ = Q(K − μ_K) + μ_K`` (BASE-Q's ``Q(x − b) + b`` applied to the cache).

    The shifts (``k_shift``, ``v_shift``: ``[kv_heads, head_dim]``, zero unless calibrated) matter where the keys
    carry a large constant: Qwen2.5's k_proj biases make the same few channels of every key huge, and a per-token
    4-bit grid spanning them loses the token-dependent part (Qwen2.5-1.5B, W16A16KV4: perplexity 3,421 unshifted,
    8.65 with the channel means subtracted; FP 8.67). Both are free at inference: ``q·μ_K`` is the same for every
    key of a query, so softmax ignores it (the runtime still adds it, to compute what this module computes), and the
    attention weights sum to one, so ``μ_V`` is added once to each head's output."""

    def __init__(self, kv_heads: int, head_dim: int, spec: ActSpec, gate: TokenGate | None = None):
        super().__init__()
        object.__setattr__(self, "gate", gate)  # the block's, when its kept tokens' K/V stay float
        self._kept: torch.Tensor | None = None  # [b, n] kept keys so far (decoding with a cache of float K/V)
        self.rotation = OnlineRotation(head_dim, seed=spec.seed + 3) if spec.online_rotations else None
        learn = spec.learnable_clip and spec.kv_bits < 16
        self.k = KVQuantizer(kv_heads, spec.kv_bits, min(spec.kv_clip, 1.0), learn, _beta(spec.kv_clip))
        self.v = KVQuantizer(kv_heads, spec.kv_bits, min(spec.kv_clip, 1.0), learn, _beta(spec.kv_clip))
        for q in (self.k, self.v):
            if q.beta is not None:
                q.beta.requires_grad_(False)
        self.k_shift = nn.Parameter(torch.zeros(kv_heads, head_dim), requires_grad=False)
        self.v_shift = nn.Parameter(torch.zeros(kv_heads, head_dim), requires_grad=False)
        self.quantize = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("k_shift", "v_shift"):  # saved before the shifts existed: no shift
            state_dict.setdefault(prefix + name, torch.zeros_like(getattr(self, name)))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def rotate(self, query, key):
        return (self.rotation(query), self.rotation(key)) if self.rotation is not None else (query, key)

    def forward(self, query, key, value):
        query, key = self.rotate(query, key)
        if self.quantize:
            keep = self.kept_keys(query, key)
            qk, qv = quantize_shifted(self.k, key, self.k_shift), quantize_shifted(self.v, value, self.v_shift)
            if keep is None:
                return query, qk, qv
            keep = keep[:, None, :, None]
            key, value = torch.where(keep, key, qk), torch.where(keep, value, qv)
        return query, key, value

    def kept_keys(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
        """Which keys (``[b, n]`` bool) keep float values (``--keep-massive-kv float``): the block gate's mask of the
        new tokens, after those of earlier calls when ``key`` holds a cache's earlier tokens too (simulated
        decoding); None when none is kept."""
        if self.gate is None:
            return None
        b, _, t, _ = query.shape
        n = key.shape[2]
        mask = self.gate.mask
        if mask is None:
            mask = torch.zeros(b, t, dtype=torch.bool, device=key.device)
        elif mask.shape != (b, t):
            raise RuntimeError(f"a token gate's mask {tuple(mask.shape)} does not fit the queries {tuple(query.shape)}")
        if n == t:
            self._kept = mask
        elif self._kept is not None and self._kept.shape == (b, n - t):
            self._kept = torch.cat([self._kept, mask], dim=1)
        elif self._kept is not None and self._kept.shape[0] == b and n - t < self._kept.shape[1]:
            raise BaseqError("--keep-massive-kv float: the simulated (fake-format) model cannot decode with a cache past "
                             "a sliding window (its layers drop the oldest keys); use the packed format")
        else:
            seen = None if self._kept is None else tuple(self._kept.shape)
            raise RuntimeError(f"--keep-massive-kv float: {n} keys for {t} new tokens, but the earlier calls saw "
                               f"{seen} (a cache this module did not fill)")
        return self._kept if bool(self._kept.any()) else None


def quantize_shifted(quantizer: KVQuantizer, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``Q(x − μ) + μ`` with ``μ [kv_heads, head_dim]`` broadcast over ``x [b, kv_heads, t, head_dim]``."""
    if not shift.requires_grad and not bool(shift.detach().any()):
        return quantizer(x)
    if not quantizer.enabled:
        return x
    mu = shift.to(x.dtype).unsqueeze(1)
    return quantizer(x - mu) + mu


def softcapped_attention(query, key, value, mask, scaling: float, softcap: float) -> torch.Tensor:
    """Attention with logit soft-capping (``c·tanh(s / c)`` on the scaled scores, Gemma 2), which SDPA cannot do.
    ``query [b, h, q, d]``, ``key``/``value [b, kv, n, d]``, ``mask`` bool (True = attend), additive, or None (causal,
    as SDPA's ``is_causal``). Returns ``[b, q, h, d]`` like transformers' attention functions."""
    g = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(g, dim=1), value.repeat_interleave(g, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        ql, kl = scores.shape[-2:]
        if ql > 1:
            causal = torch.ones(ql, kl, dtype=torch.bool, device=scores.device).tril(kl - ql)
            scores = scores.masked_fill(~causal, float("-inf"))
    elif mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    else:
        scores = scores + mask
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous()


def baseq_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    point = getattr(module, "kv_point", None)
    if point is not None:
        query, key, value = point(query, key, value)
    softcap = kwargs.pop("softcap", None)
    if softcap is not None:
        scaling = kwargs.get("scaling")
        scaling = module.head_dim ** -0.5 if scaling is None else scaling
        return softcapped_attention(query, key, value, attention_mask, scaling, softcap), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTN_NAME, baseq_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)


def quantize_structure(model: nn.Module, spec: ActSpec, fuse_online: bool = True) -> ModelAdapter:
    """Swap norms, linears and attention of every block for their quantized counterparts.

    With ``spec.online_rotations`` and ``fuse_online``, the inverse of the online R4 is fused into ``W_down`` here
    (the model function is unchanged); a saved model is rebuilt with ``fuse_online=False``."""
    ad = ModelAdapter(model)
    for layer in ad.layers:
        quantize_layer(layer, spec, ad.shape, fuse_online)
    use_quantized_attention(model)
    return ad


def quantize_layer(layer: nn.Module, spec: ActSpec, s, fuse_online: bool = True) -> None:
    """:func:`quantize_structure` for one block (``s``: the model's ModelShape); the model must also go through
    :func:`use_quantized_attention` once.

    Post-norm families with ``spec.online_rotations``: the qkv and gate/up points take the online R1 (the one
    ``rotate_layer`` installed, or — rebuilding a saved model — a new one from ``spec.seed``)."""
    arch = layer_spec(layer)
    split_fused(layer)
    gate = None
    if spec.keep_massive > 0:
        gate = getattr(layer, "keep_gate", None)
        if gate is None:
            gate = TokenGate()
            install_gate(layer, gate)

    def point(channels: int, rotation=None) -> ActPoint:
        return ActPoint(channels, spec.a_bits, spec.a_clip, spec.learnable_clip, rotation, gate)

    shared_r1 = None
    for sub, norm_path in (("self_attn", arch.attn_norm), ("mlp", arch.mlp_norm)):
        sublayer = layer.get_submodule(sub)
        slot = getattr(sublayer, "in_point", None)
        online = slot.rotation if slot is not None else None
        if online is None and not arch.r1_fusable and spec.online_rotations:
            shared_r1 = shared_r1 or ResidualRotation(s.hidden, seed=spec.seed)
            online = shared_r1
        norm_act = None
        if online is not None or norm_path is None:
            install_input_point(sublayer, InputPoint(None, point(s.hidden, online)))
        else:
            norm_act = point(s.hidden)
        if norm_path is not None:
            norm = layer.get_submodule(norm_path)
            weight = norm.weight if isinstance(norm, QuantRMSNorm) else norm.weight.detach() + arch.norm_offset
            _set(layer, norm_path, QuantRMSNorm(weight, _eps(norm), norm_act))
    lin = linears(layer)
    paths = arch.linear_paths()
    for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
        _set(layer, paths[name], QuantLinear(lin[name]))
    _set(layer, paths["o_proj"], QuantLinear(lin["o_proj"], point(s.heads * s.head_dim)))
    r4 = OnlineRotation(s.ffn, seed=spec.seed + 4) if spec.online_rotations else None
    down = QuantLinear(lin["down_proj"], point(s.ffn, r4))
    if r4 is not None and fuse_online:
        w = down.weight.data
        down.weight.data = r4(w.double()).to(w.dtype)
    _set(layer, paths["down_proj"], down)
    layer.self_attn.kv_point = KVPoint(s.kv_heads, s.head_dim, spec, gate if spec.keep_kv == "float" else None)


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def use_quantized_attention(model: nn.Module) -> None:
    """Route every attention of ``model`` through the ``baseq`` attention function (KV quantization points)."""
    register_attention()
    model.config._attn_implementation = ATTN_NAME
    for m in model.modules():
        if hasattr(m, "config") and m.config is not model.config:
            m.config._attn_implementation = ATTN_NAME


def _eps(norm: nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def points(module: nn.Module) -> list[ActPoint | KVPoint]:
    return [m for m in module.modules() if isinstance(m, (ActPoint, KVPoint))]


def set_quantize(module: nn.Module, on: bool) -> None:
    """Switch every activation/KV quantizer below ``module`` on or off (rotations stay)."""
    for p in points(module):
        p.quantize = on
