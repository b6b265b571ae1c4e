"""Time of the online Hadamard transform (``baseq.rotation.hadamard.hadamard_transform``) against an earlier
schedule, alternating, median of repeats, one process. ``--baseline transposing``: the Kronecker factors applied by
a GEMM on the last axis, then a transposed copy bringing the next factor's axis last (before 2026-11-30);
``--baseline greedy``: today's axis-wise GEMMs on the earlier split of the Sylvester part (128s first, the remainder
last: 256 = 128 × 2; before 2026-12-06):

    python benchmarks/hadamard_speed.py --sizes 8960,1536,128 --rows 512 --threads 2
    python benchmarks/hadamard_speed.py --baseline greedy --sizes 256,2048,4096,8192 --rows 2048 --threads 2
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

import checkout  # noqa: F401,E402  (benchmarks/checkout.py: this checkout's baseq first)

from baseq.rotation import hadamard  # noqa: E402
from baseq.rotation.hadamard import _core, _factors_or_raise, _kron_factors, _sylvester, hadamard_transform


def transposing(x: torch.Tensor) -> torch.Tensor:
    """The earlier schedule: for each factor, last one first, a GEMM on the last axis and a transposed copy."""
    n = x.shape[-1]
    m, p = _factors_or_raise(n)
    rows = x.numel() // n
    y = x.reshape(rows, n)
    factors = _kron_factors(m, p)
    for k in reversed(range(len(factors))):
        f = factors[k]
        h = _core(m, y.dtype, y.device) if (k == 0 and m > 1) else _sylvester(f, y.dtype, y.device)
        y = (y.reshape(-1, f) @ h.T).reshape(rows, n // f, f).transpose(1, 2).reshape(rows, n)
    return (y * (1.0 / math.sqrt(n))).reshape(x.shape)


def greedy_factors(m: int, p: int) -> list[int]:
    factors = [m] if m > 1 else []
    while p > 1:
        factors.append(min(p, 128))
        p //= factors[-1]
    return factors


def greedy(x: torch.Tensor) -> torch.Tensor:
    """baseq's own transform with the earlier greedy split of the Sylvester part (a small factor left last): the
    library's loop, only its factor list swapped while it runs."""
    saved, hadamard._kron_factors = hadamard._kron_factors, greedy_factors
    try:
        return hadamard_transform(x)
    finally:
        hadamard._kron_factors = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="8960,1536,128")
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--baseline", choices=["transposing", "greedy"], default="transposing")
    args = ap.parse_args()
    base = {"transposing": transposing, "greedy": greedy}[args.baseline]
    torch.set_num_threads(args.threads)
    print(f"| n | factors | rows | {args.baseline} ms | baseq ms | speed-up | max abs diff |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for n in (int(s) for s in args.sizes.split(",")):
        x = torch.randn(args.rows, n)
        diff = (hadamard_transform(x) - base(x)).abs().max().item()
        times = {base: [], hadamard_transform: []}
        for _ in range(args.repeats):
            for f in times:
                t = time.perf_counter()
                f(x)
                times[f].append(time.perf_counter() - t)
        old, new = (statistics.median(times[f]) * 1e3 for f in (base, hadamard_transform))
        print(f"| {n} | {' × '.join(map(str, _kron_factors(*_factors_or_raise(n))))} | {args.rows} | {old:.1f} | "
              f"{new:.1f} | {old / new:.2f}× | {diff:.1e} |")


if __name__ == "__main__":
    main()
