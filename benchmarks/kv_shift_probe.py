"""Probe: does a model's 4-bit KV cache need ``--kv-shift``? Two measurements, no calibration run.

1. Perplexity with only the KV cache quantized (W16A16KV4: R1–R4 fused, FP weights and activations), K/V quantized
   as they are (``none``), around the channel means of the evaluated windows themselves (``k``: keys only, ``kv``:
   both) — an upper bound of what the calibrated shift (means over calibration text) can do.
2. Where k_proj's bias sits among the RoPE frequency pairs: the share of its energy in pairs turning less than once
   per ``--seqlen`` tokens, for which a constant per channel is a good model of ``RoPE_t(b)``.

    python benchmarks/kv_shift_probe.py --model qwen2.5-1.5b            # 4 × 256 `wiki` tokens, layers 0, 1, 7
    python benchmarks/kv_shift_probe.py --model smollm2-135m --modes none,kv
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import checkout  # noqa: F401,E402  (benchmarks/checkout.py: this checkout's baseq first)


def kv_only_perplexity(spec: str, mode: str, windows: int, seqlen: int) -> float:
    from baseq.data import eval_windows
    from baseq.eval.perplexity import perplexity
    from baseq.models.loading import load_model
    from baseq.quant.qmodel import ActSpec, KVPoint, quantize_structure
    from baseq.rotation.fuse import rotate_model

    model, tok = load_model(spec)
    ids = eval_windows(tok, "wiki", seqlen, windows)
    rotate_model(model, seed=0)
    quantize_structure(model, ActSpec(a_bits=16, kv_bits=4))

    def forward(self, query, key, value):  # the means of this batch's own keys / values
        query, key = self.rotate(query, key)
        mk = key.mean(dim=(0, 2), keepdim=True) if "k" in mode else 0
        mv = value.mean(dim=(0, 2), keepdim=True) if "v" in mode else 0
        return query, self.k(key - mk) + mk, self.v(value - mv) + mv

    KVPoint.forward = forward
    return perplexity(model, ids, batch_size=2, progress=False)


def bias_by_frequency(spec: str, layers: list[int], seqlen: int) -> None:
    from baseq.models.loading import load_model

    model, _ = load_model(spec)
    cfg = model.config
    theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta") or getattr(cfg, "rope_theta", 10000.0)
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    half = hd // 2
    period = 2 * math.pi / theta ** (-2 * torch.arange(half, dtype=torch.float64) / hd)  # tokens per turn
    for i in layers:
        bias = model.model.layers[i].self_attn.k_proj.bias
        if bias is None:
            print(f"layer {i}: k_proj has no bias")
            continue
        b = bias.detach().double().view(-1, hd)
        share = (b[:, :half] ** 2 + b[:, half:] ** 2).sum(0)  # rotate_half pairs (j, j + half)
        share = share / share.sum()
        top = share.topk(4).indices.tolist()
        print(f"layer {i}: rope theta {theta:g}; bias energy in pairs turning < once per {seqlen} tokens: "
              f"{share[period > seqlen].sum().item():.3f}; largest pairs {top}, periods "
              f"{[round(period[j].item()) for j in top]} tokens")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-1.5b")
    p.add_argument("--modes", default="none,k,kv")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--layers", default="0,1,7")
    a = p.parse_args()
    bias_by_frequency(a.model, [int(x) for x in a.layers.split(",")], 512)
    for mode in a.modes.split(","):  # (each mode loads the model afresh: the rotation is fused in place)
        t0 = time.perf_counter()
        ppl = kv_only_perplexity(a.model, mode, a.windows, a.seqlen)
        print(f"W16A16KV4, shift {mode}: perplexity {ppl:.3f} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
