"""GPTQ that targets the full-precision output ("asymmetric calibration", after GPTAQ / GPTQv2, Li et al. 2025).

Plain GPTQ fits a linear's quantized weights ``Q`` to its own FP weights on the quantized model's inputs ``X̃``
(rows are tokens): ``min ‖X̃ Qᵀ − X̃ Wᵀ‖²``. The error made upstream (earlier quantized blocks, this block's
quantized linears, the activation quantizer in front of the linear) is invisible to it. Asymmetric calibration
fits to what the full-precision model computes, on its own inputs ``X``: ``min ‖X̃ Qᵀ − X Wᵀ‖²``.

With ``Δ = X − X̃``, ``H = X̃ᵀX̃`` and ``C = Δᵀ X̃`` (the FP-vs-quantized cross term), the objective is, up to a
constant, the symmetric one around a shifted target::

    ‖X̃ Qᵀ − X Wᵀ‖² = ‖X̃ (Q − U)ᵀ‖² + const,   U = W + W C H⁻¹   (the least-squares fit on X̃)

so GPTQ run on ``U`` with the Hessian ``H`` of the quantized inputs minimises the asymmetric objective with the
same greedy, column by column (the greedy is exact for a quadratic, whatever the starting point). GPTAQ's authors
apply the same correction column by column inside the GPTQ loop (only towards columns not yet quantized) and scale
it by ``α = 0.25``; here ``α`` scales the whole shift ``U = W + α W C H⁻¹`` (``α = 1``: the exact least-squares
target). ``H`` is damped like GPTQ's (``percdamp`` × its mean diagonal) before it is inverted.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import BaseqError


class AsymmetricStats:
    """Sums ``H = Σ x̃ x̃ᵀ`` and ``C = Σ (x − x̃) x̃ᵀ`` over ``nsamples`` token rows (float32, unnormalised like
    :class:`~baseq.quant.gptq.GPTQ`'s, so partial sums of several ranks add up exactly), fed with paired batches of
    the quantized model's input ``x̃`` and the FP model's input ``x`` of one linear. ``H⁻¹C`` does not depend on
    the normalisation."""

    def __init__(self, columns: int, device=None):
        self.columns = columns
        self.H = torch.zeros(columns, columns, device=device, dtype=torch.float32)
        self.C = torch.zeros_like(self.H)
        self.nsamples = 0

    @torch.no_grad()
    def add_batch(self, x_quant: Tensor, x_fp: Tensor) -> None:
        if x_quant.shape != x_fp.shape or x_quant.shape[-1] != self.columns:
            raise BaseqError(f"asymmetric GPTQ: paired inputs must have the same shape [..., {self.columns}] "
                             f"(got {tuple(x_quant.shape)} and {tuple(x_fp.shape)})")
        xq = x_quant.reshape(-1, self.columns).to(self.H.device, torch.float32)
        dx = x_fp.reshape(-1, self.columns).to(self.H.device, torch.float32) - xq
        self.H.addmm_(xq.t(), xq)
        self.C.addmm_(dx.t(), xq)
        self.nsamples += xq.shape[0]


@torch.no_grad()
def asymmetric_target(weight: Tensor, H: Tensor, C: Tensor, alpha: float = 1.0, percdamp: float = 0.01) -> Tensor:
    """``U = W + α W C H⁻¹`` (float32, the shape of ``weight`` [out, in]), ``H`` damped by ``percdamp`` × mean diag.

    Inputs that never fire (zero diagonal of ``H``) get no shift, like GPTQ zeroes their columns."""
    if not 0.0 <= alpha:
        raise BaseqError(f"asymmetric GPTQ alpha must be ≥ 0 (got {alpha})")
    W = weight.detach().to(H.device, torch.float32)
    if alpha == 0.0:
        return W.clone()
    H = H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H.diagonal().add_(percdamp * H.diagonal().mean())
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        raise BaseqError("asymmetric GPTQ: the Hessian of the quantized inputs is not positive definite")
    shift = torch.cholesky_solve((W.double() @ C.double()).T, L).T  # (W C) H⁻¹, H symmetric
    shift[:, dead] = 0.0
    out = W + (alpha * shift).float()
    if not torch.isfinite(out).all():
        raise BaseqError("asymmetric GPTQ produced a non-finite target (degenerate calibration data?)")
    return out
