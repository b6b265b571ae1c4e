"""GPTQ solve time for one SmolLM2-135M block's shapes: each linear solved alone vs the linears of a group stacked
(q/k/v, gate/up share their Hessian; rows are independent in GPTQ, so stacking gives the same weights). Random
Hessians from 4,096 Gaussian tokens; interleaved repeats, median.

    python benchmarks/gptq_solve.py
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

import checkout  # noqa: F401,E402  (benchmarks/checkout.py: this checkout's baseq first)

from baseq.quant.gptq import GPTQ
from baseq.quant.quantizer import WeightQuantConfig

GROUPS = {"qkv": (576, [576, 192, 192]), "o": (576, [576]), "gate_up": (576, [1536, 1536]), "down": (1536, [576])}


def hessian(d: int, n: int = 4096) -> torch.Tensor:
    x = torch.randn(n, d)
    return 2 / n * x.T @ x


def main(repeats: int = 3) -> None:
    torch.manual_seed(0)
    cfg = WeightQuantConfig(bits=4)
    res: dict[str, list[float]] = {"separate": [], "stacked": []}
    for _ in range(repeats):
        for mode in res:
            t0 = time.perf_counter()
            for d, outs in GROUPS.values():
                h = hessian(d)
                lins = [nn.Linear(d, sum(outs), bias=False)] if mode == "stacked" else \
                    [nn.Linear(d, o, bias=False) for o in outs]
                for lin in lins:
                    s = GPTQ(lin)
                    s.H, s.nsamples = h.clone(), 4096
                    s.quantize(cfg)
            res[mode].append(time.perf_counter() - t0)
    for k, v in res.items():
        print(f"{k}: {[round(x, 2) for x in v]} s, median {statistics.median(v):.2f} s")
    print(f"separate / stacked: {statistics.median(res['separate']) / statistics.median(res['stacked']):.2f}")


if __name__ == "__main__":
    main()
