"""Benchmark: data-parallel calibration on one machine — 1 process × T threads against N ranks × T/N threads.

Each row is one `baseq quantize` (BASE-Q W4A4KV4 on the embedded SmolLM2-135M unless --model/--args say
otherwise): the plain command with OMP_NUM_THREADS=T, then `torchrun --standalone --nproc-per-node N -m baseq
quantize ...` with OMP_NUM_THREADS=T/N. Wall time is the whole process (load, FP eval, calibration, eval, write);
calibration seconds and perplexities come from the result JSONs. Timings are only meaningful on an otherwise idle
machine (OMP threads of several processes on the same cores slow each other down); perplexities are deterministic
at a given thread count, and 1 × 2 and 2 × 1 differ only at float rounding (expect < 1 %).

    python benchmarks/dist_bench.py --out results/dist                       # the full rows (~25 min here)
    python benchmarks/dist_bench.py --out results/dist-smoke --smoke         # a 1-minute check that it all runs
    python benchmarks/dist_bench.py --out results/dist --repeats 3           # median of 3 per row
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import checkout  # noqa: E402  (benchmarks/checkout.py: this checkout's baseq first; child_env)

SMOKE = ["--calib-samples", "4", "--calib-seqlen", "128", "--epochs", "1", "--windows", "4", "--seqlen", "128"]


def run_row(name: str, cmd: list[str], threads: int, out: Path) -> dict:
    env = checkout.child_env(OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads((out / f"{name}.json").read_text())
    return {"wall_s": round(wall, 1), "calib_s": result["calib_seconds"], "ppl_fp": result.get("ppl_fp"),
            "ppl_quant": result.get("ppl_quant"), "rank0_peak_rss_mb": round(result["peak_rss_mb"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the result JSONs and quantized models")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", type=int, default=2, help="cores to use: T (default 2)")
    p.add_argument("--ranks", type=int, default=2, help="N ranks of T/N threads each (default 2)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="a tiny calibration, to check that the rows run")
    p.add_argument("args", nargs=argparse.REMAINDER, help="more `baseq quantize` flags after --")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = (SMOKE if args.smoke else []) + [a for a in args.args if a != "--"]
    rows = {}
    for repeat in range(args.repeats):
        for name, threads, launcher in (
                ("single", args.threads, [sys.executable, "-m", "baseq"]),
                ("ranks", max(1, args.threads // args.ranks),
                 [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                  str(args.ranks), "-m", "baseq"])):
            cmd = launcher + ["quantize", "--model", args.model, "--out", str(out / name), "--overwrite", "--quiet",
                              "--json", str(out / f"{name}.json"), *extra]
            r = run_row(name, cmd, threads, out)
            rows.setdefault(name, []).append(r)
            print(json.dumps({"row": name, "repeat": repeat, **r}), flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "?") if Path("/proc/cpuinfo").exists() else "?"
    print(f"\n{cpu}, {time.strftime('%Y-%m-%d')}, median of {args.repeats}\n")
    print("| run | wall s | calibration s | PPL FP | PPL quantized | rank-0 peak RSS MB |\n|---|---:|---:|---:|---:|---:|")
    labels = {"single": f"1 process × {args.threads} threads",
              "ranks": f"{args.ranks} ranks × {max(1, args.threads // args.ranks)} thread(s)"}
    for name, rs in rows.items():
        med = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
        print(f"| {labels[name]} | {med('wall_s'):.1f} | {med('calib_s'):.1f} | {rs[0]['ppl_fp']:.3f} | "
              f"{rs[0]['ppl_quant']:.3f} | {med('rank0_peak_rss_mb'):.0f} |")
    (out / "summary.json").write_text(json.dumps({"cpu": cpu, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
