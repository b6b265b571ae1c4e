"""The reference point for the runtime's speed: llama.cpp (through llama-cpp-python) on the same GGUF file, measured
the way ``baseq bench`` measures (batch 1, a prefill of N deterministic tokens, then greedy decoding through the
KV cache, medians of repeats, peak RSS of the process).

llama-cpp-python is not a dependency of baseq (it builds llama.cpp from source); install it in a separate
environment and point the script at the GGUF that ``baseq`` fetched:

    python -m venv /tmp/lcp && /tmp/lcp/bin/pip install llama-cpp-python==0.3.36
    /tmp/lcp/bin/python benchmarks/llama_cpp_bench.py --gguf "$(python -c 'from baseq import assets; \\
        print(assets.fetch("smollm2-135m"))')" --threads 2 --json results/llama_cpp.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", required=True)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--decode", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    a = p.parse_args()

    import numpy as np
    from llama_cpp import Llama

    def greedy(llm) -> int:  # argmax of the last position's logits (what llama.cpp computed for it)
        return int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).argmax())

    t0 = time.perf_counter()
    llm = Llama(model_path=a.gguf, n_ctx=a.prefill + a.decode + 16, n_threads=a.threads, n_threads_batch=a.threads,
                n_batch=a.prefill, verbose=False, logits_all=False)
    load_s = time.perf_counter() - t0
    rng = random.Random(0)
    ids = [rng.randrange(1000, llm.n_vocab()) for _ in range(a.prefill)]
    runs = []
    for r in range(a.repeats + 1):  # the first is a warm-up
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        tok = greedy(llm)
        t1 = time.perf_counter()
        for _ in range(a.decode - 1):
            llm.eval([tok])
            tok = greedy(llm)
        t2 = time.perf_counter()
        if r:
            runs.append((a.prefill / (t1 - t0), (a.decode - 1) / (t2 - t1), t1 - t0))
    out = {"spec": a.gguf, "engine": "llama.cpp (llama-cpp-python)", "threads": a.threads, "load_s": round(load_s, 2),
           "prefill_tok_s": statistics.median(r[0] for r in runs),
           "decode_tok_s": statistics.median(r[1] for r in runs),
           "ttft_s": statistics.median(r[2] for r in runs),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           "disk_mb": round(os.path.getsize(a.gguf) / 2**20, 1)}
    print(json.dumps(out))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
