"""What M float activation rows cost against a packed model's int8 weight codes: a float GEMM with a float copy
of the weight (which the runtime does not keep), torch's int8-weight kernel on the codes with per-channel scales
(``torch._weight_int8pack_mm``), converting all the codes to float on every call, and what baseq does: each
float row as three int8 digit rows (:func:`baseq.quant.qmodel.float_digits`) in the int8 GEMM of the other rows
(here a call with the M rows kept and nothing else: its quantized rows are computed too). The shapes are
Qwen2.5-1.5B's stacked gate/up, down and q/k/v; for keeping a few tokens (the attention sink, one per sequence of
a batch) in float at inference.

    python benchmarks/int8_row_kernel.py --threads 2 --repeats 20 --rows 1,16
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import checkout  # noqa: F401,E402  (benchmarks/checkout.py: this checkout's baseq first)

from baseq.runtime.kernels import IntLinear

SHAPES = [("gate/up", 17920, 1536), ("down", 1536, 8960), ("q/k/v", 2048, 1536)]


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--rows", default="1,16", help="comma list of row counts M")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for m in [int(r) for r in args.rows.split(",")]:
        for name, n, k in SHAPES:
            w = torch.randint(-8, 8, (n, k), dtype=torch.int8)  # 4-bit codes minus their zero point
            s = torch.rand(n) + 0.5
            bias = torch.zeros(n)
            x = torch.randn(m, k)
            wf = w.float() * s[:, None]
            a = median_ms(lambda: F.linear(x, wf), args.repeats)
            b = median_ms(lambda: torch._weight_int8pack_mm(x, w, s), args.repeats)
            c = median_ms(lambda: F.linear(x, w.float()) * s, args.repeats)
            lin = IntLinear([(w + 8).to(torch.uint8)], [torch.full((n, 1), 8, dtype=torch.uint8)], [s[:, None]],
                            [bias], 4)
            codes, scale, keep = torch.zeros(m, k, dtype=torch.int8), torch.ones(m, 1), torch.ones(m, dtype=torch.bool)
            d = median_ms(lambda: lin(codes, scale, None, (keep, x)), args.repeats)
            ref = F.linear(x.double(), wf.double())
            err = float((lin(codes, scale, None, (keep, x)) - ref).abs().max() / ref.abs().max())
            print(f"M={m:<3d} {name:8s} {n}x{k}: float GEMM {a:.3f} ms | int8pack_mm {b:.3f} ms | "
                  f"convert + GEMM {c:.3f} ms | digits (baseq) {d:.3f} ms, relative error {err:.1e}")


if __name__ == "__main__":
    main()
