"""Where a packed model's decode (and prefill) time goes: token quantization, integer GEMMs with their epilogue,
online Hadamards, attention with the quantized KV cache, the LM head, and everything else (norms, RoPE, residuals,
transformers' layer code, Python dispatch).

Attribution is by Python function (cProfile cumulative time of the runtime's own functions, which includes the torch
operations they run); the profiler slows everything a little, so read the shares, not the absolute numbers.

    python benchmarks/runtime_breakdown.py out/smollm2-135m-baseq-W4A4KV4 --prefill 512 --decode 32 --threads 2
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time

import torch

import checkout  # noqa: F401,E402  (benchmarks/checkout.py: this checkout's baseq first)

CATEGORIES = {  # (file suffix, function name) -> category; first match wins, nested calls are subtracted below
    "quantize": [("runtime/kernels.py", "quantize_tokens")],
    "GEMM + epilogue": [("runtime/kernels.py", "forward")],
    "Hadamard (R3, R4, R1)": [("rotation/hadamard.py", "hadamard_transform")],
    "attention + KV cache": [("runtime/modules.py", "attend_codes"), ("runtime/kvcache.py", "append"),
                             ("runtime/kvcache.py", "update"), ("sdpa_attention.py", "sdpa_attention_forward")],
    "LM head": [("runtime/modules.py", "logits")],
}


def _cum(stats: pstats.Stats, file: str, name: str) -> float:
    return sum(v[3] for (f, _, n), v in stats.stats.items() if f.endswith(file) and n == name)


def breakdown(model, ids: torch.Tensor, steps: int) -> dict:
    from baseq.runtime.generate import _cache_kw, new_cache

    kw = _cache_kw(model)
    out = {}
    with torch.no_grad():
        for phase in ("prefill", "decode"):
            cache = new_cache(model)
            x = ids if phase == "prefill" else ids[:, :1]
            if phase == "decode":
                model(ids, use_cache=True, logits_to_keep=1, **{kw: cache})
            prof = cProfile.Profile()
            t0 = time.perf_counter()
            prof.enable()
            for _ in range(1 if phase == "prefill" else steps):
                model(x, use_cache=True, logits_to_keep=1, **{kw: cache})
            prof.disable()
            total = time.perf_counter() - t0
            st = pstats.Stats(prof)
            shares = {cat: sum(_cum(st, f, n) for f, n in fns) for cat, fns in CATEGORIES.items()}
            # GEMM's forward includes nothing else of ours; quantize runs inside ActPoint, not inside the GEMM
            shares["other (norms, RoPE, residuals, layer code, Python)"] = max(0.0, total - sum(shares.values()))
            per = steps if phase == "decode" else 1
            out[phase] = {k: round(1000 * v / per, 2) for k, v in shares.items()}
            out[phase]["total ms" + (" per token" if phase == "decode" else "")] = round(1000 * total / per, 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from baseq.load import load

    model, _ = load(a.model)
    ids = torch.randint(0, model.config.vocab_size, (1, a.prefill), generator=torch.Generator().manual_seed(0))
    breakdown(model, ids[:, :16], 2)  # warm-up
    res = breakdown(model, ids, a.decode)
    for phase, rows in res.items():
        print(f"{phase} ({a.threads} threads):")
        for k, v in rows.items():
            print(f"  {k:55s} {v:8.2f} ms")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "threads": a.threads, **res}, f, indent=2)


if __name__ == "__main__":
    main()
