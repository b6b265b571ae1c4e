"""How much of a 4-bit model's loss comes from a few tokens? Perplexity of a packed folder with the activations and
K/V of some tokens computed in float (their weights stay 4-bit), against the folder as it is.

Modes (``--modes``, comma-separated):

* ``none``: the packed model as it is (the same perplexity as ``baseq eval``: a sanity check);
* ``massive``: in each block, the tokens whose residual-stream input is ``--ratio`` times the window's median token
  (RMS over channels) or more — Qwen2.5's massive-activation tokens — keep float activations at every quantization
  point of that block and float K/V;
* ``first``: the first ``--first`` positions of each window, the same way (the attention-sink position);
  ``first-acts`` / ``first-kv``: only their activations / only their K/V;
* ``all``: every token (the weight-only model, W4A16KV16): the floor of what activations and KV cost;
  ``all-acts`` / ``all-kv``: every token's activations only (W4A16KV4) / K/V only (W4A4KV16) — the split of the
  activation/KV gap between the two;
* ``point:KIND`` (KIND one of ``qkv``, ``o``, ``up``, ``down``): every token's activations in float at that
  quantization point of every block only (the inputs of q/k/v, o_proj, gate/up, down_proj) — where the activation
  part of the gap sits;
* ``blocks:A-B``: every token's activations and K/V in float in blocks A to B (inclusive, from 0) only — which
  blocks the activation/KV part of the gap comes from.

The share of the activation/KV gap a mode recovers is (ppl_none − ppl_mode) / (ppl_none − ppl_all). Also printed:
per block, how many tokens were massive and their median ratio. A diagnosis, not a method: nothing is saved.

    python benchmarks/outlier_tokens.py --model out/qwen-quarot --data wiki --windows 16 --json q.json
    python benchmarks/outlier_tokens.py --compare q.json b.json   # each mode's cost in both, and the share b removed
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import checkout  # noqa: F401,E402  (benchmarks/checkout.py: this checkout's baseq first)


class Keep:
    """Which tokens of the current block are kept in float: a [batch, tokens] mask (None: none), at the
    activation points (``acts``) and/or in K/V (``kv``)."""

    mask: torch.Tensor | None = None
    acts: bool = True
    kv: bool = True
    bits: int = 16  # the kept tokens' activations: 16 = float, else quantized to this many bits (no clipping)
    points: frozenset | None = None  # the point kinds where ``acts`` applies (None: every point)


POINT_KINDS = {"self_attn.point": "qkv", "self_attn.o_point": "o", "mlp.point": "up", "mlp.down_point": "down"}


def name_points(model) -> None:
    """Tag each activation point of the packed model with its kind (``qkv``, ``o``, ``up``, ``down``)."""
    from baseq.runtime import modules

    for name, m in model.named_modules():
        if isinstance(m, modules.ActPoint):
            m.kind = next((k for suffix, k in POINT_KINDS.items() if name.endswith(suffix)), None)


def patch_runtime(keep: Keep) -> None:
    from baseq.runtime import modules
    from baseq.runtime.kernels import quantize_tokens

    modules.RuntimeMLP.rows = 1 << 30  # one slab: rows map to (window, position) as in the attention

    def point_forward(self, x, linear, _rows=None):  # (_rows: the runtime's own --keep-massive rows, unused here)
        x = self.prepare(x)
        if self.bits >= 16:
            return linear.forward_float(x)
        a, s, z = quantize_tokens(x, self.clip, self.bits)
        y = linear(a, s, z)
        if (keep.acts and keep.mask is not None and keep.mask.any()
                and (keep.points is None or getattr(self, "kind", None) in keep.points)):
            rows = keep.mask.reshape(-1)
            assert rows.numel() == x.shape[0], "a point saw rows that are not the block's tokens"
            if keep.bits >= 16:
                y[rows] = torch.nn.functional.linear(x[rows].float(), linear.dequantized(), linear.bias).to(y.dtype)
            else:  # the same integer kernel at more bits, no clipping
                y[rows] = linear(*quantize_tokens(x[rows], torch.ones_like(self.clip), keep.bits)).to(y.dtype)
        return y

    def kv_fake(self, x, clip, _fake=modules.KVQuant.fake):
        y = _fake(self, x, clip)
        if keep.kv and keep.mask is not None and keep.mask.any():  # x [batch, kv_heads, tokens, head_dim]
            m = keep.mask[:, None, :, None].expand_as(y)
            y = torch.where(m, x.float().to(y.dtype), y)
        return y

    modules.ActPoint.forward = point_forward
    modules.KVQuant.fake = kv_fake


def install_rule(model, keep: Keep, mode: str, ratio: float, first: int, stats: dict) -> list:
    from baseq.quant.qmodel import token_rms

    layers = model.model.layers
    chosen = block_range(mode) if mode.startswith("blocks:") else range(0)  # blocks:A-B, parsed once

    def pre(i):
        def hook(_module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            rms = token_rms(h)  # [batch, tokens]
            rel = rms / rms.median(dim=-1, keepdim=True).values
            big = rel >= ratio
            s = stats.setdefault(i, {"massive": 0, "ratios": [], "in_first": 0})
            s["massive"] += int(big.sum())
            s["in_first"] += int(big[:, :first].sum())
            s["ratios"] += rel[big].tolist()
            if mode == "massive":
                keep.mask = big
            elif mode.startswith("first"):
                keep.mask = torch.zeros_like(big)
                keep.mask[:, :first] = True
            elif mode.startswith(("all", "point:")) or i in chosen:
                keep.mask = torch.ones_like(big)
            else:
                keep.mask = None
        return hook

    return [layer.register_forward_pre_hook(pre(i), with_kwargs=True) for i, layer in enumerate(layers)]


def block_range(mode: str) -> range:
    """``blocks:A-B`` → the blocks A to B inclusive."""
    try:
        a, b = (int(v) for v in mode[len("blocks:"):].split("-"))
    except ValueError:
        raise SystemExit(f"outlier_tokens: {mode!r} is not blocks:A-B (two block numbers)") from None
    return range(a, b + 1)


def compare(base_json: str, other_json: str) -> None:
    """Each mode's cost (perplexity as is − with the mode) in two runs on the same windows, and the share of the
    first's cost that the second removed."""
    a, b = (json.loads(Path(f).read_text()) for f in (base_json, other_json))
    if (a["data"], a["windows"], a["seqlen"]) != (b["data"], b["windows"], b["seqlen"]):
        raise SystemExit("outlier_tokens: the two runs did not evaluate the same windows")
    ra, rb = a["rows"], b["rows"]
    print(f"{'mode':12s} {'cost ' + Path(base_json).stem:>24s} {'cost ' + Path(other_json).stem:>24s}  removed")
    print(f"{'none (ppl)':12s} {ra['none']['ppl']:24.3f} {rb['none']['ppl']:24.3f}")
    for mode in [m for m in ra if m in rb and isinstance(ra[m], dict) and "ppl" in ra[m] and m != "none"]:
        ca, cb = ra["none"]["ppl"] - ra[mode]["ppl"], rb["none"]["ppl"] - rb[mode]["ppl"]
        print(f"{mode:12s} {ca:24.3f} {cb:24.3f}  {1 - cb / ca:7.1%}" if ca > 0 else f"{mode:12s} {ca:24.3f} {cb:24.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compare", nargs=2, metavar=("BASE_JSON", "OTHER_JSON"),
                   help="compare two --json results instead of running")
    p.add_argument("--model", help="a folder written by 'baseq quantize' (packed)")
    p.add_argument("--data", default="wiki")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--modes", default="none,massive,first,all")
    p.add_argument("--ratio", type=float, default=20.0, help="massive: RMS at least this many times the median")
    p.add_argument("--first", type=int, default=1)
    p.add_argument("--keep-bits", type=int, default=16, help="the kept tokens' activations: 16 = float, or 8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the rows here after each mode; modes already in the file are not run again")
    args = p.parse_args()
    if args.compare:
        return compare(*args.compare)
    if not args.model:
        p.error("--model is required (or --compare)")
    torch.set_num_threads(args.threads)

    from baseq.data import eval_windows
    from baseq.eval.perplexity import nll_sum
    from baseq.runtime.load import load_saved

    keep = Keep()
    keep.bits = args.keep_bits
    patch_runtime(keep)
    model, tok = load_saved(Path(args.model))
    name_points(model)
    modes = args.modes.split(",")
    for mode in modes:  # every mode checked before the first runs
        if mode.startswith("point:") and mode[6:] not in POINT_KINDS.values():
            raise SystemExit(f"outlier_tokens: unknown point {mode[6:]!r} (one of {', '.join(POINT_KINDS.values())})")
        if mode.startswith("blocks:") and not set(block_range(mode)) <= set(range(len(model.model.layers))):
            raise SystemExit(f"outlier_tokens: {mode!r}: the model has blocks 0-{len(model.model.layers) - 1}")
    ids = eval_windows(tok, args.data, args.seqlen, args.windows)
    out = {"model": args.model, "data": args.data, "windows": args.windows, "seqlen": args.seqlen,
           "keep_bits": args.keep_bits, "ratio": args.ratio, "first": args.first, "rows": {}}
    if args.json and Path(args.json).exists():  # a cut run: its finished modes stay, the rest run
        done = json.loads(Path(args.json).read_text())
        if {k: v for k, v in done.items() if k != "rows"} != {k: v for k, v in out.items() if k != "rows"}:
            raise SystemExit(f"outlier_tokens: {args.json} holds another run's rows (other model, data or settings)")
        out = done
    rows = out["rows"]
    for mode in modes:
        if mode in rows:
            print(f"{mode:8s} ppl {rows[mode]['ppl']:9.4f}  (from {args.json})", flush=True)
            continue
        stats: dict = {}
        hooks = install_rule(model, keep, mode, args.ratio, args.first, stats)
        keep.acts, keep.kv = not mode.endswith("-kv"), not (mode.endswith("-acts") or mode.startswith("point:"))
        keep.points = frozenset([mode[6:]]) if mode.startswith("point:") else None
        t0 = time.perf_counter()
        with torch.no_grad():
            total, count = nll_sum(model, ids, batch_size=1, progress=False)
        for h in hooks:
            h.remove()
        keep.mask = None
        ppl = math.exp(total / count)
        rows[mode] = {"ppl": round(ppl, 4), "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{mode:8s} ppl {ppl:9.4f}  ({rows[mode]['seconds']} s)", flush=True)
        if mode == "none":
            blocks = {i: {"massive_per_window": round(s["massive"] / args.windows, 2),
                          "massive_in_first": s["in_first"],
                          "median_ratio": round(float(torch.tensor(s["ratios"]).median()), 1) if s["ratios"] else None}
                      for i, s in stats.items()}
            rows["blocks"] = blocks
            print("block: massive tokens per window (median RMS ratio) — "
                  + ", ".join(f"{i}: {b['massive_per_window']} ({b['median_ratio']})" for i, b in blocks.items()))
            n_all, n_first = sum(s["massive"] for s in stats.values()), sum(s["in_first"] for s in stats.values())
            rows["massive_in_first"] = [n_first, n_all]
            print(f"massive tokens among the first {args.first} position(s): {n_first} of {n_all}")
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))
    if "none" in rows and "all" in rows:
        gap = rows["none"]["ppl"] - rows["all"]["ppl"]
        for mode in [m for m in rows if m not in ("none", "all", "blocks", "massive_in_first")]:
            if gap > 0:
                rows[mode]["share_of_act_kv_gap"] = round((rows["none"]["ppl"] - rows[mode]["ppl"]) / gap, 3)
                print(f"{mode}: recovers {rows[mode]['share_of_act_kv_gap']:.1%} of the activation/KV gap")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
