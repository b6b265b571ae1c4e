"""Time of the weight clip search (``baseq.quant.quantizer._row_qparams`` with ``clip_search``) for several slab
sizes (``CLIP_SEARCH_SLAB``, elements per slab of rows) on weights of a 1.5B model's shapes, median of repeats,
alternating, one process; asserts every slab size picks the same scale and zero as the first:

    python benchmarks/clip_search_slab.py --threads 2 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import checkout  # noqa: F401,E402  (benchmarks/checkout.py: this checkout's baseq first)

from baseq.quant import quantizer

SHAPES = {"down 1536x8960": (1536, 8960), "gate/up 17920x1536": (17920, 1536), "qkv 2048x1536": (2048, 1536)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slabs", default="16,18,20,40", help="log2 of the slab sizes (40: one pass over the weight)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    slabs = [1 << int(s) for s in args.slabs.split(",")]
    g = torch.Generator().manual_seed(0)
    for name, shape in SHAPES.items():
        x = torch.randn(*shape, generator=g)
        times: dict[int, list[float]] = {s: [] for s in slabs}
        ref = None
        for _ in range(args.repeats):
            for s in slabs:
                quantizer.CLIP_SEARCH_SLAB = s
                t = time.perf_counter()
                out = quantizer._row_qparams(x, 4, False, True)
                times[s].append(time.perf_counter() - t)
                ref = out if ref is None else ref
                assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1]), (name, s)
        print(name, {f"2^{s.bit_length() - 1}": round(statistics.median(v), 2) for s, v in times.items()}, flush=True)


if __name__ == "__main__":
    main()
