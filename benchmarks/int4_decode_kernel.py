"""Could decode read 4-bit weights instead of int8? A packed model's decode is one token against every weight, so its
GEMMs run at memory bandwidth over the int8-held codes (Qwen2.5-1.5B: 1.31 GB per token). torch has a CPU kernel
that reads 4-bit packed weights, ``_weight_int4pack_mm_for_cpu`` (float activations, per-group scale and zero):
with scale 1 and zero ``8 − z_j`` its weights are exactly the runtime's integers ``c − z_j``, and the activation
codes are small integers, so an exact kernel would give the int8 GEMM's sums bit for bit. This times it at M rows
against the runtime's int8 GEMM (``baseq.runtime.kernels.int_mm``) and reports each one's largest error against the
exact integer sums, for Qwen2.5-1.5B's stacked gate/up, down and q/k/v shapes:

    python benchmarks/int4_decode_kernel.py --threads 2 --repeats 20 --rows 1,4
"""

from __future__ import annotations

import argparse

import torch

import checkout  # noqa: F401,E402  (benchmarks/checkout.py: this checkout's baseq first)

from baseq.runtime.kernels import int_mm
from int8_row_kernel import median_ms  # noqa: E402  (a sibling script: one warm-up call, then the median)

SHAPES = [("gate/up", 17920, 1536), ("down", 1536, 8960), ("q/k/v", 2048, 1536)]
GROUP = 256  # a group size the kernel takes (32, 64, 128 or 256) dividing every K above


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--rows", default="1,4")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    aten = torch.ops.aten
    gen = torch.Generator().manual_seed(0)
    print("| shape | N × K | M | int8 GEMM ms | int4 bf16 ms | int4 bf16 max error | int4 fp32 ms "
          "| int4 fp32 max error |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, n, k in SHAPES:
        c = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)  # 4-bit codes, per-channel zero points
        z = torch.randint(0, 16, (n, 1), generator=gen, dtype=torch.int32)
        w8 = (c - z).to(torch.int8)
        packed = aten._convert_weight_to_int4pack_for_cpu(c, 1)
        sz = torch.empty(k // GROUP, n, 2)
        sz[..., 0], sz[..., 1] = 1.0, (8 - z[:, 0]).float()  # (c − 8)·1 + (8 − z) = c − z
        for m in (int(r) for r in args.rows.split(",")):
            a = torch.randint(-15, 16, (m, k), generator=gen, dtype=torch.int8)  # centred 4-bit activation codes
            exact = int_mm(a, w8).double()
            row = [f"{name}", f"{n} × {k}", str(m), f"{median_ms(lambda: int_mm(a, w8), args.repeats):.2f}"]
            for dt in (torch.bfloat16, torch.float32):
                x, s = a.to(dt), sz.to(dt)
                got = aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, s).double()
                ms = median_ms(lambda: aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, s), args.repeats)
                row += [f"{ms:.2f}", f"{(got - exact).abs().max().item():g}"]
            print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
