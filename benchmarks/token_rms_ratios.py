"""Is ``--keep-massive``'s rule fragile? Per block, the residual-stream RMS of each token entering the block over the
median token's (the ratio the gate compares with RATIO), on a full-precision model: the largest ratios, and the
largest ratio below RATIO next to the smallest at or above it. A wide empty band around RATIO means a tiny change
of the values cannot move a token across the gate.

    python benchmarks/token_rms_ratios.py --model smollm2-135m --data wiki --windows 8 --ratio 20
"""

from __future__ import annotations

import argparse

import torch

import checkout  # noqa: F401,E402  (benchmarks/checkout.py: this checkout's baseq first)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="wiki")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--ratio", type=float, default=20.0)
    p.add_argument("--top", type=int, default=6)
    args = p.parse_args()

    from baseq.data import eval_windows
    from baseq.models.loading import load_model
    from baseq.quant.qmodel import token_rms

    model, tokenizer = load_model(args.model)
    ids = eval_windows(tokenizer, args.data, args.seqlen, args.windows)
    ratios: dict[int, torch.Tensor] = {}

    def hook(i):
        def pre(module, a, k):
            r = token_rms(a[0] if a else k["hidden_states"]).flatten()
            ratios[i] = (r / r.median()).sort(descending=True).values
        return pre

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in handles:
        h.remove()
    print(f"{args.model}, {args.windows} × {args.seqlen} tokens of {args.data}; ratio = token RMS / median token RMS")
    print(f"| block | kept (≥ {args.ratio:g}) | smallest kept | largest not kept | top {args.top} |")
    print("|---:|---:|---:|---:|---|")
    for i, rel in sorted(ratios.items()):
        kept = rel[rel >= args.ratio]
        below = rel[rel < args.ratio]
        low = f"{float(kept[-1]):.1f}" if len(kept) else "—"
        print(f"| {i} | {len(kept)} | {low} | {float(below[0]):.1f} | "
              f"{', '.join(f'{float(x):.1f}' for x in rel[:args.top])} |")


if __name__ == "__main__":
    main()
