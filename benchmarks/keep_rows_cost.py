"""What ``--keep-massive`` costs at inference: one forward of a packed model over a batch of text windows (the shape
of a zero-shot or perplexity batch), with the block gates as calibrated and with every gate shut (threshold
infinite: no token kept, the same model otherwise), alternating, median of repeats, in one process.

    python benchmarks/keep_rows_cost.py --model out/qwen-keep20 --batch 8 --seqlen 160 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import checkout  # noqa: F401,E402  (benchmarks/checkout.py: this checkout's baseq first)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a packed folder made with --keep-massive")
    p.add_argument("--data", default="wiki")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=160)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from baseq.data import eval_windows
    from baseq.quant.qmodel import TokenGate
    from baseq.runtime.load import load_saved

    model, tok = load_saved(Path(args.model))
    gates = [m for m in model.modules() if isinstance(m, TokenGate)]
    if not gates:
        raise SystemExit(f"{args.model}: no token gates (not made with --keep-massive)")
    calibrated = [g.threshold.clone() for g in gates]
    ids = eval_windows(tok, args.data, args.seqlen, args.batch)

    def forward(on: bool) -> tuple[float, int]:
        for g, t in zip(gates, calibrated):
            g.threshold.copy_(t if on else torch.tensor(float("inf")))
        with torch.no_grad():
            t0 = time.perf_counter()
            model(ids, use_cache=False, logits_to_keep=1)
            seconds = time.perf_counter() - t0
        return seconds, sum(int(g.mask.sum()) for g in gates if g.mask is not None)

    forward(True)  # warm-up
    on, off = [], []
    kept = 0
    for _ in range(args.repeats):
        seconds, kept = forward(True)
        on.append(seconds)
        off.append(forward(False)[0])
    a, b = statistics.median(on), statistics.median(off)
    print(f"{args.batch} x {args.seqlen} tokens, {args.threads} threads: gates as calibrated {a:.3f} s "
          f"({kept} kept rows over {len(gates)} blocks) | gates shut {b:.3f} s | ratio {a / b:.3f}")


if __name__ == "__main__":
    main()
