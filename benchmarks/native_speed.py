"""The runtime's compiled kernels (``baseq/runtime/native.py``) against the torch code they replace, on one packed
model in one process: the folder loaded twice (4-bit codes two a byte + the one-pass token quantizer + attention on
the packed KV codes, and int8 codes + torch's ops), then generation runs alternated A B A B, so both see the same
machine state. Prints the medians of prefill and decode tokens/s and their ratios; the two models' prompt logits are
checked equal first. ``--only attention``: one model, decoding attention with the kernels or the torch path (the
cost that grows with the context: try ``--prefill 4096``).

    python benchmarks/native_speed.py <packed folder> --prefill 512 --decode 64 --repeats 5 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
from contextlib import contextmanager

import torch

import checkout  # noqa: F401,E402  (benchmarks/checkout.py: this checkout's baseq first)

from baseq.load import load
from baseq.runtime import kernels, modules
from baseq.runtime.generate import generate
from baseq.runtime.native import native_ops


@contextmanager
def torch_only(patched=(kernels, modules)):
    """The torch code where ``patched`` (modules that call ``native_ops()``) would take the compiled kernels:
    both for the whole runtime, ``modules`` alone for decoding attention."""
    real = [m.native_ops for m in patched]
    for m in patched:
        m.native_ops = lambda: None
    try:
        yield
    finally:
        for m, r in zip(patched, real):
            m.native_ops = r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=("all", "attention"), default="all")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if native_ops() is None:
        raise SystemExit("the runtime's kernels do not build here")
    fast, _ = load(args.model)
    patched = (modules,) if args.only == "attention" else (kernels, modules)
    if args.only == "attention":
        slow = fast
    else:
        with torch_only(patched):
            slow, _ = load(args.model)
    ids = torch.randint(0, int(fast.config.vocab_size), (1, args.prefill), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = fast(ids[:, :64]).logits
        with torch_only(patched):
            ref = slow(ids[:, :64]).logits
    print(f"logits equal: {torch.equal(got, ref)}")
    runs = {"native": [], "torch": []}
    generate(fast, ids[:, :16], 4)
    with torch_only(patched):
        generate(slow, ids[:, :16], 4)
    for _ in range(args.repeats):
        runs["native"].append(generate(fast, ids, args.decode))
        with torch_only(patched):
            runs["torch"].append(generate(slow, ids, args.decode))
    med = {k: (statistics.median(r.prefill_tok_s for r in v), statistics.median(r.decode_tok_s for r in v))
           for k, v in runs.items()}
    print(f"| kernels ({args.only}) | prefill {args.prefill} tok/s | decode tok/s |  ({args.threads} threads, "
          f"median of {args.repeats}, alternated)")
    print("|---|---:|---:|")
    for k, (p, d) in med.items():
        print(f"| {k} | {p:.1f} | {d:.2f} |")
    print(f"| native / torch | {med['native'][0] / med['torch'][0]:.3f}× | {med['native'][1] / med['torch'][1]:.3f}× |")


if __name__ == "__main__":
    main()
