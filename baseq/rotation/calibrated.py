"""Calibrated rotations (after DartQuant, Shao et al. 2025): R1 and per-layer, per-KV-head R2 trained on cached
activations with a distribution loss, no model forward in the loop.

The Hadamard spreads outliers but knows nothing about the data; a rotation fitted to it flattens the coordinates
further. For rotated activations ``z = x R`` of tokens normalised to unit RMS the *whip* loss ``mean exp(−|z|)`` is
minimal exactly when every ``|z_i| = 1`` (``exp(−√u)`` is convex in ``u = z²`` and ``Σ z² = n`` is fixed), i.e.
when no coordinate is an outlier and none is wasted near zero: what a per-token 4-bit quantizer wants. It needs no
quantizer, no labels and no forward pass through the model, and it does not overfit the calibration set the way an
end-to-end loss does.

* R1 (hidden × hidden, global): trained on the normalised residual stream at every block's two RMSNorms (what the
  qkv and gate/up quantizers see, up to R1);
* R2 (head_dim × head_dim, one per layer and KV head): trained on the o_proj input of the query heads of that KV
  group (V's output, which R1 does not change).

Orthogonality by QR (``R = Q`` of ``QR(Z)``, signs fixed so that ``diag(R) > 0``: a smooth, exact map from any
full-rank ``Z``), initialised at the seeded randomized Hadamard the method would use otherwise; plain SGD with
momentum and a cosine schedule. Fusing the result is as exact as fusing the Hadamard.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.adapter import ModelAdapter, attn_norm, linears, mlp_norm
from .fuse import _mul_in, _mul_out
from .hadamard import orthogonal_matrix


def qr_orthogonal(z: torch.Tensor) -> torch.Tensor:
    """The orthogonal factor of ``z`` [..., n, n] with a positive-diagonal R (differentiable, unique)."""
    q, r = torch.linalg.qr(z)
    d = torch.diagonal(r, dim1=-2, dim2=-1)
    return q * torch.where(d < 0, -1.0, 1.0).to(q.dtype).unsqueeze(-2)


def whip_loss(z: torch.Tensor) -> torch.Tensor:
    """``mean exp(−|z|)`` over every coordinate (z: rotated vectors of unit RMS)."""
    return torch.exp(-z.abs()).mean()


def unit_rms(x: torch.Tensor) -> torch.Tensor:
    return x / x.pow(2).mean(-1, keepdim=True).clamp_min(1e-12).sqrt()


def train_rotation(x: torch.Tensor, init: torch.Tensor, steps: int = 100, lr: float = 1.0, batch: int = 1024,
                   seed: int = 0) -> tuple[torch.Tensor, float, float]:
    """Rotations minimising :func:`whip_loss` of ``unit_rms(x) @ R``.

    ``x``: [groups, tokens, n] (one rotation per group, trained together); ``init``: [groups, n, n] orthogonal.
    Returns (R float64 [groups, n, n], loss before, loss after) — the losses over all of ``x``."""
    x = unit_rms(x.float())
    z = nn.Parameter(init.float().clone())
    opt = torch.optim.SGD([z], lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    gen = torch.Generator().manual_seed(seed)

    def full_loss() -> float:
        with torch.no_grad():
            return whip_loss(x @ qr_orthogonal(z)).item()

    before = full_loss()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[1], (min(batch, x.shape[1]),), generator=gen)
        loss = whip_loss(x[:, idx] @ qr_orthogonal(z))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        r = qr_orthogonal(z.detach().double())
    return r, before, full_loss()


@torch.no_grad()
def collect_activations(model: nn.Module, windows: torch.Tensor, tokens: int = 512, batch_size: int = 4,
                        seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """From the FP model (before any rotation): ``tokens`` sampled tokens per layer of (a) the normalised residual
    stream at both RMSNorms [2 · layers · tokens, hidden] and (b) the o_proj input [layers, tokens, heads · head_dim].
    Hooks only; memory is O(layers · tokens · hidden)."""
    ad = ModelAdapter(model)
    gen = torch.Generator().manual_seed(seed)
    resid: dict[int, list] = {}
    vo: dict[int, list] = {}
    hooks = []

    def keep(store, key, x):
        x = x.detach().flatten(0, -2).float().cpu()
        store.setdefault(key, []).append(x)

    for i, layer in enumerate(ad.layers):
        for j, norm in enumerate((attn_norm(layer), mlp_norm(layer))):
            hooks.append(norm.register_forward_pre_hook(
                lambda m, args, k=2 * i + j: keep(resid, k, unit_rms(args[0].float()))))
        hooks.append(linears(layer)["o_proj"].register_forward_pre_hook(
            lambda m, args, k=i: keep(vo, k, args[0])))
    try:
        for batch in windows.split(batch_size):
            model(batch.to(ad.embed.weight.device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()

    def sample(chunks: list) -> torch.Tensor:
        x = torch.cat(chunks)
        return x[torch.randperm(x.shape[0], generator=gen)[:tokens]]

    r = torch.cat([sample(resid[k]) for k in sorted(resid)])
    v = torch.stack([sample(vo[k]) for k in sorted(vo)])
    return r, v


def calibrate_rotations(model: nn.Module, windows: torch.Tensor, seed: int = 0, r1: bool = True, r2: bool = True,
                        steps: int = 100, lr: float = 1.0, tokens: int = 512, log: dict | None = None):
    """Trained (R1 [hidden, hidden] or None, R2 [layers, kv_heads, head_dim, head_dim] or None), float64, each
    starting from the randomized Hadamard :func:`rotation.fuse.rotate_model` would use with ``seed``."""
    s = ModelAdapter(model).shape
    resid, vo = collect_activations(model, windows, tokens=tokens, seed=seed)
    log = log if log is not None else {}
    q1 = q2 = None
    if r1:
        init = orthogonal_matrix(s.hidden, seed=seed)[None]
        q1, log["r1_loss_before"], log["r1_loss_after"] = train_rotation(resid[None], init, steps, lr, seed=seed)
        q1 = q1[0]
    if r2:
        # [layers, tokens, heads, hd] -> per (layer, kv head): the tokens of all its query heads
        g = s.heads // s.kv_heads
        x = vo.view(s.layers, -1, s.kv_heads, g, s.head_dim).permute(0, 2, 1, 3, 4)
        x = x.reshape(s.layers * s.kv_heads, -1, s.head_dim)
        init = orthogonal_matrix(s.head_dim, seed=seed + 1).expand(x.shape[0], -1, -1)
        q2, log["r2_loss_before"], log["r2_loss_after"] = train_rotation(x, init, steps, lr, batch=256,
                                                                         seed=seed + 1)
        q2 = q2.view(s.layers, s.kv_heads, s.head_dim, s.head_dim)
    return q1, q2


@torch.no_grad()
def apply_value_rotations(model: nn.Module, r2: torch.Tensor, seed: int = 0) -> None:
    """Replace the seeded R2 that :func:`rotate_model` fused (``orthogonal_matrix(head_dim, seed + 1)``) by the
    trained per-layer, per-KV-head ``r2`` [layers, kv_heads, hd, hd]: fuse ``R2_seedᵀ R2`` on top (exact)."""
    ad = ModelAdapter(model)
    s = ad.shape
    base = orthogonal_matrix(s.head_dim, seed=seed + 1)
    g = s.heads // s.kv_heads
    for layer, rl in zip(ad.layers, r2):
        delta = [base.T @ r for r in rl.double()]
        lin = linears(layer)
        _mul_out(lin["v_proj"], torch.block_diag(*delta))
        _mul_in(lin["o_proj"], torch.block_diag(*[delta[h // g] for h in range(s.heads)]))


def per_token_error(x: torch.Tensor, r: torch.Tensor, bits: int = 4, clip: float = 0.9) -> float:
    """Mean squared error of asymmetric per-token ``bits``-bit quantization of ``unit_rms(x) @ r`` (a diagnostic
    for screening: what the activation quantizer loses)."""
    z = unit_rms(x.float()) @ r.float()
    lo, hi = z.amin(-1, keepdim=True), z.amax(-1, keepdim=True)
    mid, half = (hi + lo) / 2, (hi - lo) / 2 * clip
    scale = (2 * half / (2**bits - 1)).clamp_min(1e-8)
    q = torch.clamp(torch.round((z - (mid - half)) / scale), 0, 2**bits - 1) * scale + (mid - half)
    return (q - z).pow(2).mean().item()

