"""Benchmark: perplexity, calibration wall time and peak RSS of each method on the embedded default model.

Each row runs in its own process (so its peak RSS is its own) and writes a results JSON that ``baseq report``
reads; this script then prints a markdown table with the fraction of QuaRot-GPTQ's perplexity gap to FP that each
row closes. Timings depend on the machine and on whatever else runs on it: compare rows of one run.

    python benchmarks/run.py --out results/bench                 # the default table
    python benchmarks/run.py --out results/bench --rows fp,quarot-gptq-w4a4kv4,baseq-w4a4kv4 \
        --tasks siqa,winogrande --tasks-dir ../shared/data/bigbench --limit 300
    python benchmarks/run.py --list
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

BASEQ = {"method": "baseq"}
ROWS: dict[str, dict] = {
    "fp": {"method": "fp"},
    **{f"{m}-{b.lower()}": {"method": m, "bits": b}
       for b in ("W4A4KV4", "W4A8KV8", "W4A16") for m in ("rtn", "gptq")},
    **{f"quarot-{w}-{b.lower()}": {"method": "quarot", "weights": w, "bits": b}
       for b in ("W4A4KV4", "W4A8KV8", "W4A16") for w in ("rtn", "gptq")},
    "baseq-w4a4kv4": {**BASEQ, "bits": "W4A4KV4"},
    "baseq-w4a8kv8": {**BASEQ, "bits": "W4A8KV8"},
    # ablations at W4A4KV4 (stage 1 off unless named)
    "abl-bias-zero": {**BASEQ, "train": {"bias": True, "scale": False, "clip": False, "bias_init": "zero"}},
    "abl-bias-mean": {**BASEQ, "train": {"bias": True, "scale": False, "clip": False, "bias_init": "mean"}},
    "abl-scale": {**BASEQ, "train": {"bias": False, "scale": True, "clip": False}},
    "abl-bias-scale": {**BASEQ, "train": {"bias": True, "scale": True, "clip": False}},
    "abl-bias-scale-clip-zero-init": {**BASEQ, "train": {"bias_init": "zero"}},
    "abl-quant-inputs": {**BASEQ, "train": {"inputs": "quant"}},
    "abl-revert-if-worse": {**BASEQ, "train": {"revert_if_worse": True}},
    "abl-loss-token": {**BASEQ, "train": {"loss": "token"}},
    "abl-stage1": {**BASEQ, "train": {"transforms": True}},
    "abl-stage1-no-vo-rotation": {**BASEQ, "train": {"transforms": True, "vo_rotation": False}},
}
DEFAULT = ["fp", "rtn-w4a4kv4", "gptq-w4a4kv4", "quarot-rtn-w4a4kv4", "quarot-gptq-w4a4kv4", "baseq-w4a4kv4",
           "quarot-gptq-w4a8kv8", "baseq-w4a8kv8", "quarot-gptq-w4a16"]


def run_row(name: str, args) -> dict:
    from baseq.calibrate.pipeline import quantize_model
    from baseq.config import PRESETS, QuantizeConfig
    from baseq.data import eval_windows
    from baseq.eval.perplexity import perplexity
    from baseq.models.loading import load_model

    spec = dict(ROWS[name])
    model, tokenizer = load_model(args.model)
    windows = eval_windows(tokenizer, "wiki", args.seqlen, args.windows)
    result = {"row": name, "model": args.model, "data": "wiki", "seqlen": args.seqlen, "windows": args.windows}
    if spec["method"] == "fp":
        result.update(method="fp", bits="fp", calib_seconds=0.0)
    else:
        bits = spec.pop("bits", "W4A4KV4")
        cfg = QuantizeConfig.from_dict({**spec, "bits": PRESETS[bits],
                                        "calib": {"samples": args.calib_samples, "seqlen": args.calib_seqlen}})
        report = quantize_model(model, tokenizer, cfg, model_spec=args.model, progress=False,
                                log_fn=lambda m: print(f"[{name}] {m}", file=sys.stderr, flush=True))
        result.update(method=name.split("-w4")[0] if not name.startswith("abl") else name, bits=cfg.bits.label,
                      calib_seconds=report["calib_seconds"], config=cfg.to_dict(),
                      calib_peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    t0 = time.perf_counter()
    result["ppl"] = perplexity(model, windows, batch_size=4, progress=False)
    result["eval_seconds"] = round(time.perf_counter() - t0, 1)
    if args.tasks:
        from baseq.eval.zeroshot import zero_shot

        t0 = time.perf_counter()
        result["tasks"] = zero_shot(model, tokenizer, args.tasks.split(","), tasks_dir=args.tasks_dir,
                                    limit=args.limit, batch_size=8)
        result["zero_shot_seconds"] = round(time.perf_counter() - t0, 1)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return result


def table(results: list[dict]) -> str:
    fp = next((r["ppl"] for r in results if r["method"] == "fp"), None)
    base = {r["bits"]: r["ppl"] for r in results if r["method"] == "quarot-gptq"}
    tasks = sorted({t for r in results for t in r.get("tasks", {})})
    lines = ["| row | bits | PPL | gap to FP closed vs QuaRot-GPTQ | " + "".join(f"{t} acc | " for t in tasks)
             + "calibration s | peak RSS MB |",
             "|---|---|---:|---:|" + "---:|" * len(tasks) + "---:|---:|"]
    for r in results:
        closed = ""
        b = base.get(r["bits"])
        if fp is not None and b is not None and r["method"] != "fp" and b > fp:
            closed = f"{100 * (b - r['ppl']) / (b - fp):.1f} %"
        accs = "".join(f"{r['tasks'][t]['acc']:.3f} ± {r['tasks'][t]['acc_stderr']:.3f} | " if t in r.get("tasks", {})
                       else " | " for t in tasks)
        lines.append(f"| {r['row']} | {r['bits']} | {r['ppl']:.3f} | {closed} | {accs}{r['calib_seconds']:.0f} | "
                     f"{r['peak_rss_mb']} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/bench", help="folder for per-row JSONs and table.md")
    p.add_argument("--rows", default=",".join(DEFAULT), help="comma list of rows (see --list)")
    p.add_argument("--list", action="store_true", help="list the known rows and exit")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--tasks", help="also zero-shot tasks, e.g. siqa,winogrande (offline BIG-bench)")
    p.add_argument("--tasks-dir", help="folder of the BIG-bench files (e.g. ../shared/data/bigbench)")
    p.add_argument("--limit", type=int, help="items per task")
    p.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process
    args = p.parse_args()
    if args.list:
        print("\n".join(ROWS))
        return 0
    out = Path(args.out)
    if args.row:
        result = run_row(args.row, args)
        (out / f"{args.row}.json").write_text(json.dumps(result, indent=2))
        return 0
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        print(f"unknown rows: {', '.join(unknown)} (see --list)", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    for row in rows:
        if (out / f"{row}.json").is_file():
            print(f"{row}: done already ({out / (row + '.json')})", file=sys.stderr)
            continue
        cmd = [sys.executable, __file__, "--row", row, "--out", str(out), "--model", args.model,
               "--windows", str(args.windows), "--seqlen", str(args.seqlen),
               "--calib-samples", str(args.calib_samples), "--calib-seqlen", str(args.calib_seqlen)]
        for flag in ("tasks", "tasks_dir", "limit"):
            if getattr(args, flag) is not None:
                cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        print(f"{row}: running", file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
    results = [json.loads((out / f"{r}.json").read_text()) for r in rows]
    text = table(results)
    (out / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
