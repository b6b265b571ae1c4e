"""Screen calibrated rotations (rotation/calibrated.py) on the default model without any quantized forward:
the whip loss and the 4-bit per-token quantization error of the normalised residual stream (R1) and of the o_proj
inputs (R2) under the seeded Hadamard and under trained rotations, on held-out tokens.

    python benchmarks/rotation_sweep.py --steps 100,300 --lr 0.3,1,3
"""

from __future__ import annotations

import argparse
import time

import torch

import checkout  # noqa: F401,E402  (benchmarks/checkout.py: this checkout's baseq first)

from baseq.data import calib_windows
from baseq.models.adapter import LlamaAdapter
from baseq.models.loading import load_model
from baseq.rotation.calibrated import collect_activations, per_token_error, train_rotation, unit_rms
from baseq.rotation.hadamard import orthogonal_matrix


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--steps", default="100")
    p.add_argument("--lr", default="1")
    p.add_argument("--only", choices=("R1", "R2"), help="screen one of the two rotations only")
    args = p.parse_args()
    model, tok = load_model(args.model)
    s = LlamaAdapter(model).shape
    w = calib_windows(tok, "wiki", 512, 2 * args.windows)
    train_r, train_v = collect_activations(model, w[: args.windows], seed=0)
    test_r, test_v = collect_activations(model, w[args.windows:], seed=1)
    g = s.heads // s.kv_heads

    def groups(v):
        x = v.view(s.layers, -1, s.kv_heads, g, s.head_dim).permute(0, 2, 1, 3, 4)
        return x.reshape(s.layers * s.kv_heads, -1, s.head_dim)

    data = {"R1": (train_r[None], test_r[None], orthogonal_matrix(s.hidden, seed=0)[None]),
            "R2": (groups(train_v), groups(test_v), orthogonal_matrix(s.head_dim, seed=1).expand(
                s.layers * s.kv_heads, -1, -1))}
    for name, (tr, te, init) in data.items():
        if args.only and name != args.only:
            continue
        def err(r):
            return sum(per_token_error(te[i], r[i]) for i in range(te.shape[0])) / te.shape[0]

        whip = lambda r: torch.exp(-(unit_rms(te.float()) @ r.float()).abs()).mean().item()  # noqa: E731
        print(f"{name} hadamard: whip {whip(init):.5f}, 4-bit error {err(init):.5f}", flush=True)
        for steps in map(int, args.steps.split(",")):
            for lr in map(float, args.lr.split(",")):
                t0 = time.perf_counter()
                r, _, _ = train_rotation(tr, init, steps=steps, lr=lr, batch=1024 if name == "R1" else 256)
                print(f"{name} steps {steps} lr {lr:g}: whip {whip(r):.5f}, 4-bit error {err(r):.5f} "
                      f"({time.perf_counter() - t0:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
