"""A packed folder's prompt and decoding steps timed in one process: a prompt of ``--prefill`` random tokens, then
``--steps`` greedy decoding steps on its cache, median of ``--repeats`` (after one warm-up). For old-against-new
pairs: alternate ``PYTHONPATH=<old checkout>`` and this checkout, one process each, alone on the machine.

    python benchmarks/prefill_decode.py <packed folder> --prefill 512 --steps 32 --repeats 5 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import checkout  # noqa: F401,E402  (benchmarks/checkout.py: this checkout's baseq first)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a packed folder written by 'baseq quantize'")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from baseq.runtime.generate import new_cache
    from baseq.runtime.load import load_saved

    model, _ = load_saved(Path(args.model))
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(min(100, vocab // 2), min(20000, vocab), (1, args.prefill),
                        generator=torch.Generator().manual_seed(0))

    def step(x, cache):
        return model(x, use_cache=True, logits_to_keep=1, past_key_values=cache).logits[:, -1].argmax(-1, keepdim=True)

    prompt, decode = [], []
    with torch.inference_mode():
        for rep in range(args.repeats + 1):
            cache = new_cache(model)
            t0 = time.perf_counter()
            tok = step(ids, cache)
            t1 = time.perf_counter()
            for _ in range(args.steps):
                tok = step(tok, cache)
            if rep:
                prompt.append(t1 - t0)
                decode.append((time.perf_counter() - t1) / args.steps)
    print(f"{checkout.code_version()}: prefill {args.prefill} tokens {statistics.median(prompt):.3f} s, "
          f"a decoding step {statistics.median(decode) * 1e3:.1f} ms (medians of {args.repeats})")


if __name__ == "__main__":
    main()
