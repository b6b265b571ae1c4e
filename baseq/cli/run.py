"""``baseq generate`` (streamed text) and ``baseq bench`` (speed, memory and size against the baseline)."""

from __future__ import annotations

import math
import sys

from ..config import positive_int
from ..errors import BaseqError
from ..io import write_json
from ..provenance import code_id
from .common import add_model_args, check_json_path, peak_rss_mb, print_table, too_big


def cmd_generate(args) -> int:
    from ..device import check_device
    from ..load import load
    from ..runtime.generate import TextStream, eos_ids, generate, prompt_ids

    if args.max_new_tokens < 1:
        raise BaseqError(f"--max-new-tokens must be at least 1 (got {args.max_new_tokens})")
    if not (math.isfinite(args.temperature) and args.temperature >= 0) or not 0 < args.top_p <= 1:
        raise BaseqError("--temperature must be a finite number ≥ 0 and --top-p in (0, 1]")
    if not 0 <= args.seed < 2**63:
        raise BaseqError(f"--seed must be in 0 … 2⁶³ − 1 (got {args.seed})")
    check_device(args.device)
    if args.top_p < 1 and args.temperature == 0:
        raise BaseqError("--top-p only applies when sampling: add --temperature above 0 (0 = greedy)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if what := too_big(args, copies=1):
        print(f"baseq: warning: {what}; it may run out of memory (a packed folder from 'baseq quantize' runs in "
              f"less than half)", file=sys.stderr)
    model, tokenizer = load(args.model, dtype=args.dtype, device=args.device)
    ids = prompt_ids(tokenizer, args.prompt, args.chat)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    stream = TextStream(tokenizer, write)
    stats = generate(model, ids, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                     seed=args.seed, eos=eos_ids(model, tokenizer), on_token=stream)
    stream.close()
    write("\n")
    if not args.quiet:
        print(f"baseq: {stats.prompt_tokens} prompt tokens in {stats.prefill_s:.2f} s ({stats.prefill_tok_s:.0f} tok/s), "
              f"{stats.new_tokens} new tokens ({stats.decode_tok_s:.1f} tok/s after the first); "
              f"peak RSS {peak_rss_mb():.0f} MiB", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    import torch

    from ..bench import bench, default_baseline
    from ..device import check_device

    check_json_path(args.json)
    check_device(args.device)
    for name, least in (("prefill", 1), ("decode", 2), ("repeats", 1)):  # decode speed: tokens after the first
        if getattr(args, name) < least:
            raise BaseqError(f"--{name} must be at least {least} (got {getattr(args, name)})")
    baseline = args.baseline if args.baseline is not None else default_baseline(args.model)
    if baseline in ("", "none"):
        baseline = None
    threads = args.threads or torch.get_num_threads()
    say = (lambda m: None) if args.quiet else (lambda m: print(f"baseq: {m}", file=sys.stderr))
    res = bench(args.model, baseline, args.prefill, args.decode, args.repeats, threads, args.device, progress=say)
    res["code"] = code_id()
    rows = [("machine", f"{res['cpu']}, {threads} threads, {res['date']}"),
            ("workload", f"prefill {args.prefill} tokens, decode {args.decode}, median of {args.repeats}")]
    for key in ("model", "baseline"):
        if key in res:
            r = res[key]
            disk = f"{r['disk_mb']:.1f} MiB" if r["disk_mb"] is not None else "?"
            held = f", weights held {r['weights_held']}" if r.get("weights_held") else ""
            rows.append((f"{key}: {r['spec']}", f"prefill {r['prefill_tok_s']:.0f} tok/s, decode "
                         f"{r['decode_tok_s']:.1f} tok/s, TTFT {r['ttft_s']:.3f} s, peak RSS {r['peak_rss_mb']:.0f} MiB, "
                         f"disk {disk}{held}"))
    if "ratio" in res:
        q = res["ratio"]
        fmt = lambda v: "-" if v is None else f"{v:.2f}×"  # noqa: E731
        rows.append(("model / baseline", f"prefill {fmt(q['prefill_tok_s'])}, decode {fmt(q['decode_tok_s'])}, "
                     f"TTFT {fmt(q['ttft_s'])}, peak RSS {fmt(q['peak_rss_mb'])}, disk {fmt(q['disk_mb'])}"))
    print_table("baseq bench", rows)
    if args.json:
        write_json(args.json, res)
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("generate", help="generate text with a model (full precision or packed), streamed",
                       description="Generate text after a prompt, streamed to stdout (greedy unless --temperature). "
                                   "Works on full-precision models and on folders written by 'baseq quantize'.")
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--threads", type=positive_int, help="torch threads (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no statistics line on stderr")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="speed, memory and size of a model against its full-precision baseline",
                       description="Prefill and decode tokens/s, time to first token, peak RSS and bytes on disk of "
                                   "a model and its baseline (default: the model a quantized folder was made "
                                   "from), each in its own process with the same threads; medians of --repeats.")
    p.add_argument("--model", required=True, help="model to measure (a packed folder, or anything --model takes)")
    p.add_argument("--baseline", help="baseline model (default: the source of a quantized folder; 'none' = skip)")
    p.add_argument("--prefill", type=int, default=512, help="prompt tokens (default 512)")
    p.add_argument("--decode", type=int, default=128, help="generated tokens (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="repeats; medians reported (default 3)")
    p.add_argument("--threads", type=positive_int, help="torch threads for both (default: torch's)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--json", help="write the figures to this JSON file (keys model, baseline)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_bench)
