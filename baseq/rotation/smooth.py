"""Channel smoothing (SmoothQuant-style scales) at a block's activation quantization points, exact in full precision.

A point quantizes ``x`` (per token, after an optional online rotation ``A``: the R4 Hadamard at the down_proj
input). Dividing channel ``j`` of ``x`` by ``s_j`` where ``x`` is produced and multiplying the matching weight
columns of the consumers by ``s_j`` leaves the block's function unchanged::

    (x / s) A · (W diag(s) A)ᵀ … = x Wᵀ      (for the down_proj: the stored weight is W A, so W = W_stored Aᵀ)

The SmoothRot recipe (Czakó et al., 2025) applies it *before* the Hadamard at the down_proj input, where a few
channels carry massive activations that the rotation alone spreads over every channel of the token:
``s_j = max|x_j|^α / max|W_:,j|^(1−α)``. Points (``PAIRS``):

* ``down``    — producer: up_proj rows (and bias); consumer: down_proj (R4 fused);
* ``qkv``     — producer: the input RMSNorm's weight; consumers: q/k/v (in the R1-rotated basis);
* ``gate_up`` — producer: the post-attention RMSNorm's weight; consumers: gate/up (R1-rotated basis).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import BaseqError
from ..models.adapter import attn_norm, block_points, gate_up, linears, mlp_norm, qkv

PAIRS = ("down", "qkv", "gate_up")


def point_of(layer: nn.Module, pair: str) -> nn.Module:
    """The activation point (``qmodel.ActPoint``) quantizing the consumers' input."""
    return block_points(layer)[pair]


def consumers(layer: nn.Module, pair: str) -> list[nn.Linear]:
    return {"down": lambda: [linears(layer)["down_proj"]], "qkv": lambda: qkv(layer),
            "gate_up": lambda: gate_up(layer)}[pair]()


def rotation_matrix(point: nn.Module, n: int, dtype=torch.float64) -> torch.Tensor | None:
    """The point's online rotation ``A`` as a dense n × n matrix (``x ↦ x A``), or None."""
    rot = getattr(point, "rotation", None)
    if rot is None:
        return None
    return rot(torch.eye(n, dtype=dtype))


def effective_weight(lin: nn.Linear, a: torch.Tensor | None) -> torch.Tensor:
    """The weight as it multiplies the point's *unrotated* input (``W_stored Aᵀ``), float64."""
    w = lin.weight.detach().double()
    return w if a is None else w @ a.T


def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = max|x|^α / max|W|^(1−α)`` per channel (channels that never fire or have no weight get 1)."""
    a, w = act_absmax.double(), weight_absmax.double()
    s = a.clamp_min(1e-5).pow(alpha) / w.clamp_min(1e-5).pow(1 - alpha)
    return torch.where((a > 0) & (w > 0), s, torch.ones_like(s))


@torch.no_grad()
def smooth_pair_(layer: nn.Module, pair: str, s: torch.Tensor) -> None:
    """Divide channel ``j`` of the point's input by ``s_j`` and compensate in the consumers (exact in FP)."""
    s = s.double()
    point = point_of(layer, pair)
    if pair == "down":
        up = linears(layer)["up_proj"]
        up.weight.copy_((up.weight.double() / s[:, None]).to(up.weight.dtype))
        if up.bias is not None:
            up.bias.copy_((up.bias.double() / s).to(up.bias.dtype))
    else:
        norm = attn_norm(layer) if pair == "qkv" else mlp_norm(layer)
        if norm is None:
            raise BaseqError(f"smoothing pair {pair!r} needs a pre-norm to scale; this family has none")
        norm.weight.copy_((norm.weight.double() / s).to(norm.weight.dtype))
    lins = consumers(layer, pair)
    a = rotation_matrix(point, lins[0].in_features)
    for lin in lins:
        w = effective_weight(lin, a) * s[None, :]
        lin.weight.copy_((w if a is None else w @ a).to(lin.weight.dtype))
