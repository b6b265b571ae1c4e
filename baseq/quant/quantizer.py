"""Fake (simulated) quantizers for weights, activations and the KV cache.

Everything here quantizes and immediately dequantizes ("fake quantization"), so the
result has the input's shape and dtype but takes at most ``2**bits`` distinct values
per quantization group.  Rounding uses a straight-through estimator (STE), so the
functions are differentiable and can be used while training rotations/biases/clipping.

Conventions (unsigned integer codes ``q`` in ``[0, 2**bits - 1]``, dequant ``(q - zero) * scale``):

* asymmetric weights: range ``[min(w_min, 0), max(w_max, 0)]`` (zero always representable,
  exactly like GPTQ's reference quantizer); ``scale = (hi - lo) / (2**b - 1)``,
  ``zero = round(-lo / scale)``, an integer in ``[0, 2**b - 1]``.
* symmetric weights: ``zero = 2**(b-1)`` (so ``q - zero`` is a signed b-bit integer in
  ``[-2**(b-1), 2**(b-1) - 1]``) and ``scale = absmax / (2**(b-1) - 1)``, i.e. ``+absmax``
  and ``-absmax`` are both exactly representable (the extra negative level is unused
  unless clipping shrinks the range).
* activations / KV cache: per-token dynamic asymmetric ``[min, max]`` shrunk towards its
  midpoint by a clipping factor ``c`` (fixed, or ``sigmoid(beta)`` with a learnable
  ``beta``); the integer zero point is not clamped, so every token gets exactly
  ``2**b`` levels covering the clipped range.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from baseq.device import TABLE_ROWS
from baseq.errors import BaseqError

__all__ = [
    "round_ste",
    "WeightQuantConfig",
    "weight_qparams",
    "quantize_dequantize",
    "fake_quantize_weight",
    "ActQuantizer",
    "KVQuantizer",
    "CLIP_SEARCH_RATIOS",
    "CLIP_SEARCH_NORM",
    "CLIP_SEARCH_SLAB",
    "half_exact",
    "minmax_codes",
    "record_weight_qparams",
    "quantize_embedding_",
    "embedding_scale",
]

#: Shrink ratios tried by the weight clip search (1.00, 0.99, ..., 0.75); 1.0 = no clipping.
CLIP_SEARCH_RATIOS: tuple[float, ...] = tuple(round(1.0 - 0.01 * i, 2) for i in range(26))
#: Exponent of the error norm minimised by the clip search (GPTQ/QuaRot use 2.4).
CLIP_SEARCH_NORM: float = 2.4
#: Elements per slab of rows the clip search works on: each ratio's temporaries then stay in the CPU's cache
#: instead of streaming a whole weight's worth through memory 26 times (same values, row by row).
CLIP_SEARCH_SLAB: int = 1 << 18

_SCALE_EPS = 1e-8  # weights: guards against zero scales
_ACT_SCALE_EPS = 1e-6  # activations / KV: guards constant tokens (e.g. all-zero padding)


def _check_bits(bits: object) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not (2 <= bits <= 8 or bits == 16):
        raise BaseqError(f"bits must be an integer in 2..8, or 16 to disable quantization (got {bits!r})")
    return bits


def round_ste(x: Tensor) -> Tensor:
    """``round(x)`` in the forward pass, identity gradient in the backward pass."""
    return x + (torch.round(x) - x).detach()


# --------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class WeightQuantConfig:
    """How to quantize a weight matrix ``[out_features, in_features]``.

    bits: 2..8, or 16 = no quantization.
    group_size: 0 = one scale/zero per output row; otherwise groups of ``group_size``
        consecutive input columns share a scale/zero (must divide ``in_features``).
    sym: symmetric (zero point fixed at ``2**(bits-1)``) instead of asymmetric.
    clip_search: pick, per row/group, the range shrink ratio in :data:`CLIP_SEARCH_RATIOS`
        minimising the ``|w - q(w)|^CLIP_SEARCH_NORM`` error.
    """

    bits: int = 4
    group_size: int = 0
    sym: bool = False
    clip_search: bool = True

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        gs = self.group_size
        if isinstance(gs, bool) or not isinstance(gs, int) or gs < 0:
            raise BaseqError(f"group_size must be a non-negative integer, 0 = per output channel (got {gs!r})")

    @property
    def enabled(self) -> bool:
        return self.bits < 16

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1


def quantize_dequantize(x: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """``(clamp(round(x / scale) + zero, 0, maxq) - zero) * scale`` (no STE; plain rounding)."""
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return (q - zero) * scale


def half_exact(scale: Tensor) -> Tensor:
    """``scale`` rounded to the nearest float16 value wherever that is a positive finite number (else unchanged):
    quantization scales chosen this way are stored in 16 bits by the packed format without changing a single
    dequantized value."""
    s16 = scale.to(torch.float16).to(scale.dtype)
    return torch.where((s16 > 0) & torch.isfinite(s16), s16, scale)


def _qparams_from_range(lo: Tensor, hi: Tensor, bits: int, sym: bool) -> tuple[Tensor, Tensor]:
    """scale/zero from a range with ``lo <= 0 <= hi`` (asym) or ``hi = absmax`` (sym); scales are float16 values
    (:func:`half_exact`)."""
    maxq = 2**bits - 1
    if sym:
        scale = half_exact((hi / (2 ** (bits - 1) - 1)).clamp_min(_SCALE_EPS))
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        scale = half_exact(((hi - lo) / maxq).clamp_min(_SCALE_EPS))
        zero = torch.round(-lo / scale).clamp_(0, maxq)
    return scale, zero


def _row_qparams(x: Tensor, bits: int, sym: bool, clip_search: bool) -> tuple[Tensor, Tensor]:
    """Per-row scale and zero (each shape ``[rows]``, float32) for a 2-D tensor ``[rows, n]``."""
    x = x.detach().float()
    zeros = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
    lo = torch.minimum(x.amin(dim=1), zeros)
    hi = torch.maximum(x.amax(dim=1), zeros)
    if sym:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    # all-zero rows: any non-degenerate range works (zero maps exactly to 0)
    dead = (lo == 0) & (hi == 0)
    lo = torch.where(dead, -1.0, lo)
    hi = torch.where(dead, 1.0, hi)

    scale, zero = _qparams_from_range(lo, hi, bits, sym)
    if not clip_search:
        return scale, zero
    step = max(1, CLIP_SEARCH_SLAB // max(x.shape[1], 1))
    for a in range(0, x.shape[0], step):
        rows = slice(a, a + step)
        scale[rows], zero[rows] = _clip_search(x[rows], lo[rows], hi[rows], scale[rows], zero[rows], bits, sym)
    return scale, zero


def _clip_search(x: Tensor, lo: Tensor, hi: Tensor, scale: Tensor, zero: Tensor, bits: int,
                 sym: bool) -> tuple[Tensor, Tensor]:
    """Per row, the (scale, zero) of the shrink ratio with the smallest error norm (ties: the larger range)."""
    best = torch.full_like(scale, float("inf"))
    for ratio in CLIP_SEARCH_RATIOS:
        s, z = _qparams_from_range(lo * ratio, hi * ratio, bits, sym)
        err = (quantize_dequantize(x, s[:, None], z[:, None], 2**bits - 1) - x).abs_().pow_(CLIP_SEARCH_NORM)
        err = err.sum(dim=1)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


def _group_count(w: Tensor, cfg: WeightQuantConfig) -> int:
    if w.dim() != 2:
        raise BaseqError(f"weight quantization expects a 2-D weight [out, in], got shape {tuple(w.shape)}")
    in_features = w.shape[1]
    if cfg.group_size == 0:
        return 1
    if in_features % cfg.group_size != 0:
        raise BaseqError(
            f"group_size {cfg.group_size} does not divide in_features {in_features}"
        )
    return in_features // cfg.group_size


def weight_qparams(w: Tensor, cfg: WeightQuantConfig) -> tuple[Tensor, Tensor]:
    """Scale and zero point for ``w`` ``[out, in]``.

    Both are float32 tensors of shape ``[out, n_groups]`` (``n_groups = 1`` per channel,
    else ``in // group_size``); broadcast them against ``w.view(out, n_groups, -1)`` after
    ``.unsqueeze(-1)`` (for ``n_groups = 1`` they also broadcast against ``w`` directly).
    ``zero`` holds integer values in ``[0, 2**bits - 1]`` (``2**(bits-1)`` when symmetric).
    """
    if not cfg.enabled:
        raise BaseqError("weight_qparams called with bits=16 (quantization disabled)")
    n_groups = _group_count(w, cfg)
    out = w.shape[0]
    rows = w.detach().reshape(out * n_groups, -1)
    scale, zero = _row_qparams(rows, cfg.bits, cfg.sym, cfg.clip_search)
    return scale.view(out, n_groups), zero.view(out, n_groups)


def quantize_embedding_(weight: Tensor, bits: int, rows: int = TABLE_ROWS) -> None:
    """Round an embedding table / LM head ``[rows, dim]`` in place to what the packed format stores: ``bits=16``
    float16 values; ``bits=8`` symmetric int8 per row, ``(q) * scale`` with ``q`` in [-127, 127] and a float16
    ``scale = absmax / 127`` (so the row's largest entry is exact up to the scale's rounding). Every row is rounded
    alone, so this runs ``rows`` rows at a time: the temporaries of a whole 151,936-row table would cost its fp32
    size (0.9 GB at 1.5B) two to four times over."""
    if bits not in (16, 8):
        raise BaseqError(f"embedding bits must be 16 or 8 (got {bits})")
    with torch.no_grad():
        for start in range(0, weight.shape[0], rows):
            part = weight[start:start + rows]
            if bits == 16:
                part.copy_(part.to(torch.float16))
            else:
                w = part.float()
                scale = embedding_scale(w)
                part.copy_(torch.clamp(torch.round(w / scale), -127, 127) * scale)


def embedding_scale(w: Tensor) -> Tensor:
    """Per-row int8 scale ``[rows, 1]`` of an embedding table (float16 values, > 0)."""
    return half_exact((w.float().abs().amax(dim=1, keepdim=True) / 127).clamp_min(_SCALE_EPS))


def record_weight_qparams(layer: nn.Module, scale: Tensor, zero: Tensor) -> None:
    """Keep the scale and integer zero point ``[out, n_groups]`` a weight was quantized with on its layer (as the
    buffers ``weight_scale`` / ``weight_zero``, so checkpoints keep them): the packed format stores the integer codes
    ``round(w / scale) + zero`` from them."""
    layer.register_buffer("weight_scale", scale.detach().float().to(layer.weight.device).contiguous())
    layer.register_buffer("weight_zero", zero.detach().float().to(layer.weight.device).contiguous())


def fake_quantize_weight(w: Tensor, cfg: WeightQuantConfig,
                         qparams: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Quantize-dequantize ``w`` ``[out, in]``; returns ``w``'s dtype.

    The qparams (computed here unless given) are treated as constants; the gradient wrt ``w`` is the identity
    (straight-through rounding) except for values clipped by the range (gradient 0).
    """
    if not cfg.enabled:
        return w
    scale, zero = qparams if qparams is not None else weight_qparams(w, cfg)
    out, n_groups = scale.shape
    wg = w.float().reshape(out, n_groups, -1)
    scale, zero = scale.unsqueeze(-1), zero.unsqueeze(-1)
    q = torch.clamp(round_ste(wg / scale) + zero, 0, cfg.maxq)
    return ((q - zero) * scale).reshape(w.shape).to(w.dtype)


# --------------------------------------------------------------------- activations


def _minmax_fake_quant(x: Tensor, clip: Tensor | float, bits: int) -> Tensor:
    """Asymmetric fake quantization of ``x`` (float32) with one range per vector along the
    last dim; the range ``[min, max]`` is shrunk towards its midpoint by ``clip``
    (a float or a tensor broadcastable to ``x[..., :1]``)."""
    maxq = 2**bits - 1
    lo = x.amin(dim=-1, keepdim=True)
    hi = x.amax(dim=-1, keepdim=True)
    mid = (hi + lo) * 0.5
    half = (hi - lo) * 0.5 * clip
    scale = torch.clamp(2.0 * half / maxq, min=_ACT_SCALE_EPS)
    zero = round_ste((half - mid) / scale)  # = round(-lo' / scale), lo' = mid - half
    q = torch.clamp(round_ste(x / scale) + zero, 0, maxq)
    return (q - zero) * scale


def minmax_codes(x: Tensor, clip: Tensor | float, bits: int) -> tuple[Tensor, Tensor]:
    """The integers behind :func:`_minmax_fake_quant` (same operations, no gradient): centred codes ``q − zero``
    (integer-valued float32, x's shape) and the per-row ``scale`` ``[..., 1]``; their product is the fake-quantized
    ``x`` bit for bit."""
    maxq = 2**bits - 1
    lo = x.amin(dim=-1, keepdim=True)
    hi = x.amax(dim=-1, keepdim=True)
    mid = (hi + lo) * 0.5
    half = (hi - lo) * 0.5 * clip
    scale = torch.clamp(2.0 * half / maxq, min=_ACT_SCALE_EPS)
    zero = torch.round((half - mid) / scale)
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return q - zero, scale


def _check_clip(clip_ratio: float) -> float:
    if not (0.0 < float(clip_ratio) <= 1.0):
        raise BaseqError(f"clip_ratio must be in (0, 1] (got {clip_ratio!r})")
    return float(clip_ratio)


class _ClipQuantizerBase(nn.Module):
    def _init_clip(self, bits, clip_ratio, learnable_clip, beta_init, beta_shape: tuple[int, ...]) -> None:
        self.bits = _check_bits(bits)
        self.clip_ratio = _check_clip(clip_ratio)
        self.learnable_clip = bool(learnable_clip)
        if self.learnable_clip:
            init = 2.0 if beta_init is None else float(beta_init)
            self.beta = nn.Parameter(torch.full(beta_shape, init, dtype=torch.float32))
        else:
            self.register_parameter("beta", None)

    @property
    def enabled(self) -> bool:
        return self.bits < 16

    def clip_factor(self) -> Tensor | float:
        """Current clipping factor: ``sigmoid(beta)`` if learnable, else ``clip_ratio``."""
        if self.beta is not None:
            return torch.sigmoid(self.beta)
        return self.clip_ratio

    def _clip_repr(self) -> str:
        if self.beta is not None:
            return f"learnable_clip=True, beta_shape={tuple(self.beta.shape)}"
        return f"clip_ratio={self.clip_ratio}"


class ActQuantizer(_ClipQuantizerBase):
    """Per-token dynamic asymmetric fake quantization along the last dim of ``x [..., C]``.

    Each token (and, with ``groups > 1``, each of ``groups`` equal contiguous chunks of
    its ``C`` channels) gets its own range ``[min, max]``, shrunk towards the midpoint by
    ``c`` (``sigmoid(beta)`` when ``learnable_clip``, ``beta`` initialised to ``beta_init``
    or 2.0; otherwise the fixed ``clip_ratio``).  ``scale = 2*half/(2**bits-1)``,
    ``zero = round(-lo'/scale)``; exactly ``2**bits`` levels.  Rounding is straight-through,
    so gradients reach ``x`` and ``beta``.  Computes in float32, returns the input dtype.
    ``bits=16`` is the identity.  ``beta`` is a scalar for ``groups=1``, else ``[groups]``.
    """

    def __init__(self, bits: int = 4, clip_ratio: float = 1.0, learnable_clip: bool = False,
                 beta_init: float | None = None, groups: int = 1):
        super().__init__()
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise BaseqError(f"groups must be a positive integer (got {groups!r})")
        self.groups = groups
        self._init_clip(bits, clip_ratio, learnable_clip, beta_init, () if groups == 1 else (groups,))

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        dtype = x.dtype
        xf = x.float()
        clip = self.clip_factor()
        if self.groups == 1:
            if isinstance(clip, Tensor):
                clip = clip.to(xf.device)
            return _minmax_fake_quant(xf, clip, self.bits).to(dtype)
        channels = x.shape[-1]
        if channels % self.groups != 0:
            raise BaseqError(f"ActQuantizer: {self.groups} groups do not divide the {channels} channels")
        xg = xf.reshape(*x.shape[:-1], self.groups, channels // self.groups)
        if isinstance(clip, Tensor):
            clip = clip.to(xf.device).unsqueeze(-1)  # [groups, 1]
        return _minmax_fake_quant(xg, clip, self.bits).reshape(x.shape).to(dtype)

    def codes(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(q − zero, scale)`` of :meth:`forward` (one group only; no gradient): see :func:`minmax_codes`."""
        if self.groups != 1 or not self.enabled:
            raise ValueError("codes() needs an enabled quantizer with one group")
        clip = self.clip_factor()
        xf = x.float()
        return minmax_codes(xf, clip.detach().to(xf.device) if isinstance(clip, Tensor) else clip, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, groups={self.groups}, {self._clip_repr()}"


class KVQuantizer(_ClipQuantizerBase):
    """Fake quantizer for K or V tensors ``[batch, num_kv_heads, seq, head_dim]``.

    Per token and per KV head (every ``(b, h, t)`` vector of ``head_dim`` values gets its
    own scale/zero), asymmetric, with the same midpoint-shrink clipping as
    :class:`ActQuantizer`; a learnable ``beta`` has shape ``[num_kv_heads]``.
    ``bits=16`` is the identity.
    """

    def __init__(self, num_kv_heads: int, bits: int = 4, clip_ratio: float = 1.0,
                 learnable_clip: bool = False, beta_init: float | None = None):
        super().__init__()
        if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads < 1:
            raise BaseqError(f"num_kv_heads must be a positive integer (got {num_kv_heads!r})")
        self.num_kv_heads = num_kv_heads
        self._init_clip(bits, clip_ratio, learnable_clip, beta_init, (num_kv_heads,))

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        if x.dim() != 4 or x.shape[1] != self.num_kv_heads:
            raise BaseqError(
                f"KVQuantizer expects [batch, {self.num_kv_heads}, seq, head_dim], got shape {tuple(x.shape)}"
            )
        clip = self.clip_factor()
        if isinstance(clip, Tensor):
            clip = clip.to(x.device).view(1, -1, 1, 1)
        return _minmax_fake_quant(x.float(), clip, self.bits).to(x.dtype)

    def extra_repr(self) -> str:
        return f"num_kv_heads={self.num_kv_heads}, bits={self.bits}, {self._clip_repr()}"
