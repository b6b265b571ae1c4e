"""Optimisers on the orthogonal group (square Stiefel manifold): Cayley SGD (SpinQuant) and Cayley-retracted Adam
(OSTQuant).

For a loss ``f(R)`` with Euclidean gradient ``G = ∂f/∂R`` at an orthogonal ``R``, the skew-symmetric matrix

    Ω = ½ (RᵀG − GᵀR)

is the gradient in the Lie algebra: ``R Ω`` is the projection of ``G`` on the tangent space at ``R``, and the curve
``R(α) = R (I − α/2 Ω)(I + α/2 Ω)⁻¹`` (the Cayley transform of ``−αΩ``) stays exactly orthogonal for every α
(``(I − A)(I + A)⁻¹`` is orthogonal for skew ``A``). Its slope at α = 0 is ``−R Ω``, and
``⟨G, −RΩ⟩ = −½(‖G‖² − ⟨RᵀG, GᵀR⟩) ≤ 0`` (Cauchy–Schwarz), with equality only where the Riemannian gradient
vanishes: a small enough step descends. The (I + α/2 Ω) system is solved exactly (``torch.linalg.solve``; the
reference implementations iterate a fixed point instead), in float64, so ``RᵀR = I`` holds to float64 round-off in
the master copy kept here; the parameter itself is its float32 copy.

* :class:`CayleySGD` — SpinQuant's step (after Li et al. 2020, "Efficient Riemannian optimization on the Stiefel
  manifold via the Cayley transform"): ``α = min(lr, 1 / (‖Ω‖₁ + ε))`` with ``‖·‖₁`` the matrix 1-norm (largest
  absolute column sum), no momentum.
* :class:`CayleyAdam` — Adam's moments kept on ``Ω`` in the Lie algebra (elementwise second moments of a skew
  matrix are symmetric, so the normalised step ``m̂ / (√v̂ + ε)`` is skew again), then the same Cayley retraction
  with step ``lr``.

Parameters may be batched ``[..., n, n]`` (one rotation per leading index, each with its own α).
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer


def skew(a: torch.Tensor) -> torch.Tensor:
    return (a - a.transpose(-1, -2)) / 2


def lie_gradient(r: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Ω = ½ (RᵀG − GᵀR)."""
    return skew(r.transpose(-1, -2) @ g)


def cayley_retract(r: torch.Tensor, omega: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
    """``R (I − α/2 Ω)(I + α/2 Ω)⁻¹`` (exact solve; ``alpha`` a number or a tensor of the batch shape)."""
    a = torch.as_tensor(alpha, dtype=r.dtype, device=r.device)
    a = a.reshape(*a.shape, 1, 1) / 2
    eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
    return torch.linalg.solve(eye + a * omega, r @ (eye - a * omega), left=False)


def one_norm(m: torch.Tensor) -> torch.Tensor:
    """Matrix 1-norm (largest absolute column sum) of each matrix of a batch."""
    return m.abs().sum(-2).amax(-1)


def orthogonality_error(r: torch.Tensor) -> float:
    """``max |RᵀR − I|`` over a (batch of) matrix(es)."""
    r = r.detach().double()
    eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
    return float((r.transpose(-1, -2) @ r - eye).abs().max())


class _Stiefel(Optimizer):
    """Common part: a float64 master copy of every (orthogonal) parameter, written back to the parameter."""

    def _master(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "master" not in state:  # the float32 parameter is orthogonal to ~1e-7: start from its nearest-in-QR
            q, r = torch.linalg.qr(p.detach().double())  # float64 orthogonal factor (signs fixed: Q ≈ p)
            d = torch.diagonal(r, dim1=-2, dim2=-1)
            state["master"] = q * torch.where(d < 0, -1.0, 1.0).to(q.dtype).unsqueeze(-2)
        return state["master"]

    def _write(self, p: torch.Tensor, r: torch.Tensor) -> None:
        self.state[p]["master"] = r
        p.data.copy_(r.to(p.dtype))


class CayleySGD(_Stiefel):
    """SpinQuant's Cayley SGD: ``R ← R (I − α/2 Ω)(I + α/2 Ω)⁻¹``, ``α = min(lr, 1/(‖Ω‖₁ + ε))``."""

    def __init__(self, params, lr: float = 1.5, eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                r = self._master(p)
                omega = lie_gradient(r, p.grad.double())
                alpha = torch.clamp(1.0 / (one_norm(omega) + group["eps"]), max=group["lr"])
                self.state[p]["alpha"] = alpha
                self._write(p, cayley_retract(r, omega, alpha))
        return loss


class CayleyAdam(_Stiefel):
    """Adam in the Lie algebra + Cayley retraction (see the module docstring)."""

    def __init__(self, params, lr: float = 1e-2, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                r = self._master(p)
                state = self.state[p]
                omega = lie_gradient(r, p.grad.double())
                if "m" not in state:
                    state["m"], state["v"], state["t"] = torch.zeros_like(omega), torch.zeros_like(omega), 0
                state["t"] += 1
                t = state["t"]
                state["m"].mul_(b1).add_(omega, alpha=1 - b1)
                state["v"].mul_(b2).addcmul_(omega, omega, value=1 - b2)
                direction = (state["m"] / (1 - b1**t)) / ((state["v"] / (1 - b2**t)).sqrt() + group["eps"])
                self._write(p, cayley_retract(r, skew(direction), group["lr"]))
        return loss
