"""Per-block channel smoothing stage (SmoothRot-style, ``rotation/smooth.py``), with α chosen per block and point.

For each smoothed point: one FP pass of the block over the calibration windows records the point's input on a
subsample of tokens; each α of the grid (and "no smoothing") is scored by the error of the consumers' outputs when
the point's input is smoothed, rotated, activation-quantized and multiplied by the smoothed weights quantized
round-to-nearest, against the FP outputs; the best is applied (exactly: the FP block function does not change).
Runs before GPTQ, on the block's FP inputs.
"""

from __future__ import annotations

import torch

from ..quant.qmodel import set_quantize
from ..quant.quantizer import WeightQuantConfig, fake_quantize_weight
from ..rotation.smooth import consumers, effective_weight, point_of, rotation_matrix, smooth_pair_, smoothing_scales
from .engine import BlockContext

ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7)


class SmoothStage:
    name = "smooth"
    needs_data = True
    needs_fp = True  # statistics of the FP block's inputs

    def __init__(self, pairs: tuple[str, ...], wcfg: WeightQuantConfig, alpha: float | None = None,
                 tokens: int = 4096, seed: int = 0):
        self.pairs, self.wcfg, self.alpha, self.tokens, self.seed = pairs, wcfg, alpha, tokens, seed

    @torch.no_grad()
    def inputs(self, ctx: BlockContext, point) -> torch.Tensor:
        """The point's (unrotated) input for a seeded subsample of the calibration tokens, FP block."""
        seen = []
        handle = point.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().flatten(0, -2).cpu()))
        try:
            set_quantize(ctx.layer, False)
            ctx.run(ctx.fp_in)
        finally:
            set_quantize(ctx.layer, True)
            handle.remove()
        x = torch.cat(seen).float()
        # the subsample is drawn from every rank's tokens (rank r holds windows after ranks < r's), so several
        # ranks score the same tokens as one process would
        comm = ctx.comm
        sizes = comm.sizes(x.shape[0])
        total, off = sum(sizes), sum(sizes[:comm.rank])
        if total <= self.tokens:
            return comm.gather(x)
        g = torch.Generator().manual_seed(self.seed * 7919 + ctx.index)
        idx = torch.randperm(total, generator=g)[: self.tokens]
        if comm.world_size == 1:
            return x[idx]
        owner = torch.bucketize(idx, torch.tensor(sizes).cumsum(0), right=True)  # the rank holding each token
        rows = comm.gather(x[idx[owner == comm.rank] - off])  # grouped by rank, each in idx order
        out = torch.empty_like(rows)
        out[torch.cat([(owner == r).nonzero().flatten() for r in range(comm.world_size)])] = rows
        return out

    @torch.no_grad()
    def score(self, x: torch.Tensor, w_eff: torch.Tensor, a, quantizer, s: torch.Tensor) -> float:
        """Output error of the quantized consumers when the point's input is smoothed by ``s``."""
        ref = x.double() @ w_eff.T
        xs = (x.double() / s).float()
        w = (w_eff * s).float()
        if a is not None:
            xs, w = xs @ a.float(), w @ a.float()
        y = quantizer(xs).double() @ fake_quantize_weight(w, self.wcfg).double().T
        return (y - ref).pow(2).mean().item()

    def run(self, ctx: BlockContext) -> None:
        for pair in self.pairs:
            point = point_of(ctx.layer, pair)
            lins = consumers(ctx.layer, pair)
            x = self.inputs(ctx, point)
            a = rotation_matrix(point, x.shape[-1])
            w_eff = torch.cat([effective_weight(lin, a) for lin in lins])
            act_max, w_max = x.abs().amax(0), w_eff.abs().amax(0)
            candidates = {None: torch.ones(x.shape[-1], dtype=torch.float64)}
            for alpha in ([self.alpha] if self.alpha is not None else ALPHAS):
                candidates[alpha] = smoothing_scales(act_max, w_max, alpha)
            errs = {alpha: self.score(x, w_eff, a, point.quantizer, s) for alpha, s in candidates.items()}
            best = min(errs, key=errs.get) if self.alpha is None else self.alpha
            ctx.log[f"smooth_{pair}_alpha"] = -1.0 if best is None else float(best)
            ctx.log[f"smooth_{pair}_gain"] = errs[best] / errs[None] if errs[None] > 0 else 1.0
            chosen = torch.cat([torch.tensor([0.0 if best is None else 1.0], dtype=torch.float64), candidates[best]])
            ctx.comm.broadcast_([chosen])  # (every rank scored the same tokens; rank 0's choice holds everywhere)
            if chosen[0]:
                smooth_pair_(ctx.layer, pair, chosen[1:])
