"""What one float activation row costs against a packed model's int8 weight codes: a float GEMV with a float copy
of the weight (which the runtime does not keep), torch's int8-weight kernel on the codes with per-channel scales
(``torch._weight_int8pack_mm``), and converting the codes to float on every call. The shapes are Qwen2.5-1.5B's
stacked gate/up, down and q/k/v; for keeping a few tokens (the attention sink) in float at inference.

    python benchmarks/int8_row_kernel.py --threads 2 --repeats 20
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

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
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for name, n, k in SHAPES:
        w = torch.randint(-8, 8, (n, k), dtype=torch.int8)  # 4-bit codes minus their zero point
        s = torch.rand(n) + 0.5
        x = torch.randn(1, k)
        wf = w.float() * s[:, None]
        a = median_ms(lambda: F.linear(x, wf), args.repeats)
        b = median_ms(lambda: torch._weight_int8pack_mm(x, w, s), args.repeats)
        c = median_ms(lambda: F.linear(x, w.float()) * s, args.repeats)
        same = torch.allclose(torch._weight_int8pack_mm(x, w, s), F.linear(x, wf), rtol=1e-4, atol=1e-3)
        print(f"{name:8s} {n}x{k}: float GEMV {a:.3f} ms | int8pack_mm {b:.3f} ms | convert + GEMV {c:.3f} ms | "
              f"close: {same}")


if __name__ == "__main__":
    main()
