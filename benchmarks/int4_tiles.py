"""The compiled register tiles (``int4_mm`` above 8 rows, the prompt's 4-bit products on CPUs without VNNI) against
the float32 GEMM of the same integers that they replaced there (``kernels.float_int_mm`` on a kept float32 copy of
the codes; the activations' conversion counted, the weight's not), on Qwen2.5-1.5B's four linear shapes.

``--march`` builds the kernels for another CPU into a folder of their own (e.g. ``znver3``: AVX2 with 16 vector
registers, no AVX-512, to stand in for an AVX2-only machine on an AVX-512 one); ``native`` is what the runtime builds.

    python benchmarks/int4_tiles.py --march znver3 --rows 16,128,512 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import checkout  # noqa: F401,E402  (benchmarks/checkout.py: this checkout's baseq first)

from baseq.runtime import native
from baseq.runtime.kernels import pack_nibbles

SHAPES = [(2048, 1536), (1536, 1536), (17920, 1536), (1536, 8960)]  # q/k/v, o, gate/up, down (N, K)


def build(march: str):
    if march == "native":
        return native.native_ops()
    from torch.utils.cpp_extension import load

    flags = [f for f in native._flags() if not f.startswith("-march")] + [f"-march={march}"]
    where = Path(tempfile.gettempdir()) / f"baseq-ops-{march}"
    where.mkdir(exist_ok=True)
    load("baseq_ops", sources=[str(native.SOURCE)], extra_cflags=flags, build_directory=str(where),
         is_python_module=False, verbose=False)
    return torch.ops.baseq_ops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--march", default="native")
    ap.add_argument("--rows", default="16,128,512")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ops = build(args.march)
    gen = torch.Generator().manual_seed(0)

    def median_ms(f) -> float:
        f()
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e3

    print(f"| N × K | M | tiles ms | float32 GEMM ms | ratio |  (-march={args.march}, {args.threads} threads)")
    print("|---|---:|---:|---:|---:|")
    for n, k in SHAPES:
        c = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
        z = torch.randint(0, 16, (n,), generator=gen, dtype=torch.int32)
        p, wf = pack_nibbles(c), (c.int() - z[:, None]).float()
        for m in (int(r) for r in args.rows.split(",")):
            a = torch.randint(-15, 16, (m, k), generator=gen, dtype=torch.int8)
            assert torch.equal(ops.int4_mm(a, p, z), torch.mm(a.float(), wf.t()).to(torch.int32))  # exact, both
            tiles = median_ms(lambda: ops.int4_mm(a, p, z))
            gemm = median_ms(lambda: torch.mm(a.float(), wf.t()).to(torch.int32))
            print(f"| {n} × {k} | {m} | {tiles:.2f} | {gemm:.2f} | {gemm / tiles:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
