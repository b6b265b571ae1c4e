"""Where a decoding step's time goes: ``torch.profiler`` over a few decoding steps of a packed folder after a prompt
of ``--prefill`` random tokens (the context), per op, in milliseconds per step (self CPU time of the calling thread).

    python benchmarks/decode_profile.py <packed folder> --prefill 8192 --steps 4 --threads 2

``--python``: cProfile instead (cumulative time per Python function, ms a step): how much of a step is the
compiled kernels, our modules' Python and transformers' model and layer code.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from pathlib import Path

import torch

import checkout  # noqa: F401,E402  (benchmarks/checkout.py: this checkout's baseq first)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a packed folder written by 'baseq quantize'")
    p.add_argument("--prefill", type=int, default=512, help="prompt tokens before the profiled steps")
    p.add_argument("--steps", type=int, default=4, help="decoding steps profiled")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=12, help="ops (or functions) shown")
    p.add_argument("--python", action="store_true", help="cProfile: cumulative time per Python function")
    args = p.parse_args()
    from torch.profiler import ProfilerActivity, profile

    from baseq.runtime.generate import new_cache
    from baseq.runtime.load import load_saved

    torch.set_num_threads(args.threads)
    model, _ = load_saved(Path(args.model))
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(min(100, vocab // 2), min(20000, vocab), (1, args.prefill),
                        generator=torch.Generator().manual_seed(0))  # (the 1.5B rows: ids 100..19,999)
    cache = new_cache(model)

    def step(tok):
        return model(tok, use_cache=True, logits_to_keep=1, past_key_values=cache).logits[:, -1].argmax(-1)

    with torch.inference_mode():
        t0 = time.perf_counter()
        tok = step(ids).view(1, 1)
        print(f"prefill {args.prefill} tokens: {time.perf_counter() - t0:.2f} s")
        for _ in range(3):  # warm-up
            tok = step(tok).view(1, 1)
        with cProfile.Profile() if args.python else profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                tok = step(tok).view(1, 1)
            wall = (time.perf_counter() - t0) / args.steps
    if args.python:
        print(f"context {args.prefill + 3}: {wall * 1e3:.1f} ms a step (wall, cProfiled; cumulative seconds below "
              f"are over {args.steps} steps)")
        pstats.Stats(prof).sort_stats("cumulative").print_stats(args.rows)
        return
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops) / 1e3 / args.steps
    print(f"context {args.prefill + 3}: {wall * 1e3:.1f} ms a step (wall, profiled), ops {total:.1f} ms")
    for e in ops[:args.rows]:
        print(f"  {e.key:32s} {e.self_cpu_time_total / 1e3 / args.steps:8.2f} ms  ({e.count // args.steps} calls)")


if __name__ == "__main__":
    main()
