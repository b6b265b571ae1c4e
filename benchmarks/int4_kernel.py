"""The runtime's compiled 4-bit kernel (``baseq/runtime/native.py``) against torch's int8 GEMM, over a whole model's
linears so that nothing sits in the cache between calls — as in a real forward: Qwen2.5-1.5B's 28 layers of q/k/v,
o, gate/up and down shapes (1.5 G weights: 1.31 GB as int8, 0.65 GB as nibbles). For each M (tokens per call) one
pass over every linear, median of ``--repeats``:

* ``int8``: ``torch._int_mm`` on int8 codes (the runtime before the kernel);
* ``nibbles``: ``int4_mm`` on the 4-bit codes (the runtime at ``M ≤ INT4_ROWS``);
* ``unpack + int8``: the codes unpacked into one kept buffer, then ``torch._int_mm`` (the runtime above it);
* ``unpack (fresh) + int8``: the same into a new tensor each call (why the runtime keeps a buffer).

    python benchmarks/int4_kernel.py --threads 2 --repeats 5 --rows 1,2,4,8,16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import checkout  # noqa: F401,E402  (benchmarks/checkout.py: this checkout's baseq first)

from baseq.runtime.kernels import pack_nibbles
from baseq.runtime.native import native_ops

LAYER = [(2048, 1536), (1536, 1536), (17920, 1536), (1536, 8960)]  # q/k/v, o, gate/up, down (N, K)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rows", default="1,2,4,8,16")
    ap.add_argument("--layers", type=int, default=28)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ops = native_ops()
    if ops is None:
        raise SystemExit("the 4-bit kernel is not available here")
    gen = torch.Generator().manual_seed(0)
    mats = []
    for n, k in LAYER * args.layers:
        c = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
        z = torch.randint(0, 16, (n,), generator=gen, dtype=torch.int32)
        mats.append(((c.int() - z[:, None]).to(torch.int8), pack_nibbles(c), z))
    buf = torch.empty(max(n * k for n, k in LAYER), dtype=torch.int8)

    def kept(p, z, k):
        w = buf[:p.shape[0] * k].view(p.shape[0], k)
        ops.int4_unpack(p, z, w)
        return w

    def fresh(p, z, k):
        w = torch.empty(p.shape[0], k, dtype=torch.int8)
        ops.int4_unpack(p, z, w)
        return w

    ways = {"int8": lambda a, w, p, z: torch._int_mm(a, w.t()),
            "nibbles": lambda a, w, p, z: ops.int4_mm(a, p, z),
            "unpack + int8": lambda a, w, p, z: torch._int_mm(a, kept(p, z, w.shape[1]).t()),
            "unpack (fresh) + int8": lambda a, w, p, z: torch._int_mm(a, fresh(p, z, w.shape[1]).t())}
    print(f"| M | {' | '.join(ways)} |  (ms per pass over {len(mats)} linears, {args.threads} threads)")
    print("|---:|" + "---:|" * len(ways))
    for m in (int(r) for r in args.rows.split(",")):
        acts = {k: torch.randint(-15, 16, (m, k), generator=gen, dtype=torch.int8) for k in (1536, 8960)}
        row = []
        for way in ways.values():
            times = []
            for rep in range(args.repeats + 1):  # the first pass warms up
                t = time.perf_counter()
                for w, p, z in mats:
                    way(acts[w.shape[1]], w, p, z)
                if rep:
                    times.append(time.perf_counter() - t)
            row.append(statistics.median(times) * 1e3)
        print(f"| {m} | " + " | ".join(f"{v:.1f}" for v in row) + " |", flush=True)


if __name__ == "__main__":
    main()
