"""GPTQ (Frantar et al., 2022) and round-to-nearest weight quantization of ``nn.Linear``.

Both write the *dequantized* (fake-quantized) weight back into ``layer.weight`` in place,
keeping its dtype; with ``bits=16`` they do nothing.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from baseq.errors import BaseqError
from baseq.quant.quantizer import (
    WeightQuantConfig,
    _group_count,
    _row_qparams,
    fake_quantize_weight,
    quantize_dequantize,
    record_weight_qparams,
    weight_qparams,
)

__all__ = ["GPTQ", "rtn_quantize_"]

_MAX_DAMP_RETRIES = 4  # damping grows x10 per retry


class GPTQ:
    """Quantizes one ``nn.Linear`` with GPTQ.

    Feed calibration inputs with :meth:`add_batch` (or register :meth:`hook` as a forward
    hook), then call :meth:`quantize`.  ``H`` holds the unnormalised sum ``sum_n x_n x_n^T``
    over the ``nsamples`` input rows (tokens) seen so far, in float32 on the layer's device,
    so partial sums from several processes add up exactly as they are (all-reduce ``H`` and
    ``nsamples``); it is normalised once, to ``2/N * sum_n x_n x_n^T``, by :meth:`hessian`.
    """

    def __init__(self, layer: nn.Linear):
        if not isinstance(layer, nn.Linear):
            raise BaseqError(f"GPTQ supports nn.Linear layers only (got {type(layer).__name__})")
        self.layer = layer
        self.columns = layer.in_features
        self.rows = layer.out_features
        self.H: Tensor | None = torch.zeros(
            self.columns, self.columns, device=layer.weight.device, dtype=torch.float32
        )
        self.nsamples = 0

    # ------------------------------------------------------------------ statistics
    @torch.no_grad()
    def add_batch(self, inp: Tensor) -> None:
        """Accumulate the Hessian proxy from inputs ``[..., in_features]``."""
        if self.H is None:
            raise BaseqError("GPTQ.add_batch called after quantize()/free()")
        if inp.shape[-1] != self.columns:
            raise BaseqError(
                f"GPTQ.add_batch: input has {inp.shape[-1]} features, layer expects {self.columns}"
            )
        x = inp.detach().reshape(-1, self.columns).to(device=self.H.device, dtype=torch.float32)
        self.H.addmm_(x.t(), x)
        self.nsamples += x.shape[0]

    def hessian(self) -> Tensor:
        """The normalised Hessian proxy ``2/N * sum_n x_n x_n^T`` (a new tensor)."""
        if self.H is None:
            raise BaseqError("GPTQ.hessian called after quantize()/free()")
        if self.nsamples == 0:
            raise BaseqError("GPTQ.quantize called before any calibration data was added")
        return self.H * (2.0 / self.nsamples)

    def hook(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        """Forward-hook adapter: ``layer.register_forward_hook(gptq.hook)``."""
        self.add_batch(args[0])

    def free(self) -> None:
        """Release the accumulated Hessian."""
        self.H = None

    # ------------------------------------------------------------------ quantization
    def _inverse_hessian_chol(self, H: Tensor, percdamp: float) -> Tensor:
        """Upper Cholesky factor of ``(H + damp*I)^-1``, increasing damping on failure."""
        base = float(torch.mean(torch.diag(H)))
        damp_frac = percdamp
        for attempt in range(_MAX_DAMP_RETRIES + 1):
            # at most three matrices of H's size alive at once (a large layer's H is hundreds of MB)
            Hd = H.clone()
            Hd.diagonal().add_(damp_frac * base)
            L, info = torch.linalg.cholesky_ex(Hd)
            del Hd
            if int(info) == 0:
                Hinv = torch.cholesky_inverse(L)
                del L
                U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
                del Hinv
                if int(info) == 0 and torch.isfinite(U).all():
                    if attempt > 0:
                        warnings.warn(
                            f"GPTQ: Hessian not positive definite; succeeded with damping {damp_frac:g} "
                            f"(requested {percdamp:g})",
                            RuntimeWarning,
                            stacklevel=3,
                        )
                    return U
            damp_frac = damp_frac * 10 if damp_frac > 0 else 1e-4
        raise BaseqError(
            f"GPTQ: Cholesky decomposition failed even with damping {damp_frac / 10:g}; "
            "the calibration inputs are degenerate"
        )

    @torch.no_grad()
    def quantize(self, cfg: WeightQuantConfig, blocksize: int = 128, percdamp: float = 0.01,
                 act_order: bool = True, static_groups: bool = False) -> float:
        """Quantize ``layer.weight`` in place; returns the summed GPTQ loss
        ``sum_i (w_i - q_i)^2 / (2 [H^-1]_ii^2)`` and frees ``H``.

        ``act_order`` processes columns by descending ``diag(H)``.  With ``group_size > 0``
        the qparams of each group are computed at the group's first column from the current
        (error-compensated) weights, or, with ``static_groups``, all up front from the
        original weights.  Groups always refer to the *original* column order, so
        ``act_order`` with groups requires static groups and enables them (with a warning).
        """
        if not cfg.enabled:
            self.free()
            return 0.0
        if self.H is None:
            raise BaseqError("GPTQ.quantize called after free()")
        if self.nsamples == 0:
            raise BaseqError("GPTQ.quantize called before any calibration data was added")
        if blocksize < 1:
            raise BaseqError(f"blocksize must be >= 1 (got {blocksize})")
        if percdamp < 0:
            raise BaseqError(f"percdamp must be >= 0 (got {percdamp})")
        if not torch.isfinite(self.H).all():
            raise BaseqError("GPTQ: calibration inputs contain NaN/inf")

        weight = self.layer.weight
        W = weight.detach().to(device=self.H.device, dtype=torch.float32).clone()
        n_groups = _group_count(W, cfg)
        gs = cfg.group_size
        maxq = cfg.maxq
        ncols = self.columns

        H, self.H = self.H, None
        H.mul_(2.0 / self.nsamples)  # normalised once, in place (no second copy of a large Hessian)
        dead = torch.diag(H) == 0
        H[dead, dead] = 1.0
        W[:, dead] = 0.0

        if gs and act_order and not static_groups:
            warnings.warn(
                "GPTQ: act_order with group quantization uses static groups "
                "(group parameters from the original weights)",
                stacklevel=2,
            )
            static_groups = True

        if gs and static_groups:
            # per (row, group) params from the original weights, indexed by original group id
            s_all, z_all = _row_qparams(W.reshape(self.rows * n_groups, gs), cfg.bits, cfg.sym, cfg.clip_search)
            group_scale = s_all.view(self.rows, n_groups)
            group_zero = z_all.view(self.rows, n_groups)
        elif not gs:
            row_scale, row_zero = _row_qparams(W, cfg.bits, cfg.sym, cfg.clip_search)

        if act_order:
            perm = torch.argsort(torch.diag(H), descending=True)
            W = W[:, perm]
            H = H.index_select(0, perm)
            H = H.index_select(1, perm)
            invperm = torch.argsort(perm)
        else:
            perm = torch.arange(ncols, device=W.device)

        Hinv = self._inverse_hessian_chol(H, percdamp)
        del H

        if gs and not static_groups:
            # every group must lie inside one block so that its params see current weights
            blocksize = max(gs, blocksize - blocksize % gs)

        Q = torch.zeros_like(W)
        dyn_scale, dyn_zero = [], []  # per-group params chosen on the fly (groups without static_groups)
        losses = torch.zeros(self.rows, device=W.device, dtype=torch.float32)
        for i1 in range(0, ncols, blocksize):
            i2 = min(i1 + blocksize, ncols)
            count = i2 - i1
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(count):
                col = i1 + i
                w = W1[:, i]
                d = Hinv1[i, i]
                if not gs:
                    scale, zero = row_scale, row_zero
                elif static_groups:
                    g = int(perm[col]) // gs
                    scale, zero = group_scale[:, g], group_zero[:, g]
                elif col % gs == 0:
                    scale, zero = _row_qparams(W1[:, i:i + gs], cfg.bits, cfg.sym, cfg.clip_search)
                    dyn_scale.append(scale)
                    dyn_zero.append(zero)
                q = quantize_dequantize(w, scale, zero, maxq)
                Q1[:, i] = q
                err = (w - q) / d
                losses += (w - q).pow(2) / (d * d) / 2
                W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
                Err1[:, i] = err
            Q[:, i1:i2] = Q1
            if i2 < ncols:
                W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

        if act_order:
            Q = Q[:, invperm]
        if not torch.isfinite(Q).all():
            raise BaseqError("GPTQ produced non-finite weights (degenerate calibration data?)")
        weight.data.copy_(Q.to(device=weight.device, dtype=weight.dtype))
        if not gs:
            record_weight_qparams(self.layer, row_scale[:, None], row_zero[:, None])
        elif static_groups:
            record_weight_qparams(self.layer, group_scale, group_zero)
        else:
            record_weight_qparams(self.layer, torch.stack(dyn_scale, 1), torch.stack(dyn_zero, 1))
        return float(losses.sum())


@torch.no_grad()
def rtn_quantize_(layer: nn.Linear, cfg: WeightQuantConfig) -> None:
    """Round-to-nearest quantization of ``layer.weight`` in place (uses ``cfg.clip_search``)."""
    if not cfg.enabled:
        return
    weight = layer.weight
    scale, zero = weight_qparams(weight.detach().float(), cfg)
    weight.data.copy_(fake_quantize_weight(weight.detach().float(), cfg, (scale, zero)).to(weight.dtype))
    record_weight_qparams(layer, scale, zero)
