"""Weight scales learned after GPTQ: one factor per output row of every block linear, trained with BASE-Q's
corrections against the FP block output, then folded into the quantization scale.

After GPTQ a linear's weight is ``W = (Q − z) · s`` per row (integer codes ``Q``, zero ``z``, scale ``s``, recorded
on the linear). Training ``W_γ = γ ⊙ W`` (``γ`` per row, starting at 1) moves only the scales: the codes stay,
so the result is a valid quantized weight with scale ``γ s``. Folding rounds ``γ s`` to a float16 value (what the
packed format stores) and rewrites ``W = (Q − z) · γ s`` exactly. The trained ``γ`` sees the quantized inputs'
statistics through the block loss, which GPTQ's per-row min/max (or clip search) never did.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..models.adapter import linears
from ..quant.quantizer import half_exact, record_weight_qparams


class RowScale(nn.Module):
    """Parametrization ``W ↦ γ[:, None] · W`` with a learnable ``γ`` (one per output row)."""

    def __init__(self, rows: int, device=None):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(rows, device=device))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.gamma.to(w.dtype)[:, None]


def attach(layer: nn.Module) -> list[nn.Parameter]:
    """Put a :class:`RowScale` on every block linear's weight; returns the ``γ`` parameters (to train).

    While attached, a linear's recorded scale is set aside (kept for :func:`fold`), so every forward — with or
    without gradients — computes with the float weight ``γ W`` (the exact integer path needs the final scales)."""
    gammas = []
    for lin in linears(layer).values():
        lin._gptq_scale = getattr(lin, "weight_scale", None)
        if lin._gptq_scale is not None:
            lin.weight_scale = None
        parametrize.register_parametrization(lin, "weight", RowScale(lin.out_features, lin.weight.device),
                                             unsafe=True)
        gammas.append(lin.parametrizations.weight[0].gamma)
    return gammas


@torch.no_grad()
def fold(layer: nn.Module) -> None:
    """Remove the parametrizations: each linear gets scale ``half(γ s)`` and weight ``(Q − z) · half(γ s)``
    (where no scale was recorded, e.g. 16-bit weights, simply ``γ W``)."""
    for lin in linears(layer).values():
        if not parametrize.is_parametrized(lin, "weight"):
            continue
        gamma = lin.parametrizations.weight[0].gamma.detach().float()
        parametrize.remove_parametrizations(lin, "weight", leave_parametrized=False)  # back to W = (Q − z) s
        scale, zero = lin.__dict__.pop("_gptq_scale", None), getattr(lin, "weight_zero", None)
        if scale is None:
            lin.weight.mul_(gamma.to(lin.weight.dtype)[:, None])
            continue
        w = lin.weight.float().view(lin.out_features, scale.shape[1], -1)
        codes = torch.round(w / scale[..., None]) + zero[..., None]
        new_scale = half_exact(scale * gamma[:, None])
        lin.weight.copy_(((codes - zero[..., None]) * new_scale[..., None]).view_as(lin.weight))
        record_weight_qparams(lin, new_scale, zero)
