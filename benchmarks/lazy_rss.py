"""Benchmark: peak RSS of `baseq quantize` with and without --lazy, for a wide tiny model at two depths.

With the model in memory, the peak grows with the number of blocks; with --lazy it should stay at about the ends
(embedding, head) + one block + the activations, whatever the depth. Each row is one `baseq quantize` process
(QuaRot-GPTQ W4A4KV4, no evaluation, one thread) on a random Llama saved in safetensors shards; its peak RSS is the
process's own (getrusage of the child), so it includes loading and writing the result.

    python benchmarks/lazy_rss.py                         # hidden 1024, ffn 3072, 4 and 16 layers
    python benchmarks/lazy_rss.py --layers 4,16 --hidden 1024 --ffn 3072 --json results/lazy_rss.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import checkout  # noqa: E402  (benchmarks/checkout.py: this checkout's baseq first; child_env)


def make_model(folder: Path, layers: int, hidden: int, ffn: int) -> float:
    """A random wide tiny Llama in 100 MB safetensors shards; returns its weights' size in MB. Built in a child
    process: Linux counts a parent's resident memory at fork into its children's peak RSS."""
    code = ("import sys; from baseq.testing import byte_tokenizer, tiny_llama; "
            f"m = tiny_llama(hidden={hidden}, ffn={ffn}, layers={layers}, heads={hidden // 64}, "
            f"kv_heads={hidden // 128}, tied=True, seed=0); "
            f"m.save_pretrained(sys.argv[1], max_shard_size='100MB'); byte_tokenizer().save_pretrained(sys.argv[1]); "
            "print(sum(p.numel() * p.element_size() for p in m.parameters()) / 2**20)")
    out = subprocess.run([sys.executable, "-c", code, str(folder)], check=True, capture_output=True, text=True,
                         env=checkout.child_env())
    return float(out.stdout.strip().splitlines()[-1])


def run(model: Path, out: Path, mode: str, text: str, samples: int, seqlen: int) -> dict:
    """One `baseq quantize` process; its own peak RSS (MB, from wait4) and wall time."""
    cmd = [sys.executable, "-m", "baseq", "quantize", "--model", str(model), "--method", "quarot",
           "--calib-data", text, "--calib-samples", str(samples), "--calib-seqlen", str(seqlen), "--no-eval",
           "--quiet", "--out", str(out), "--overwrite", *(["--lazy"] if mode.startswith("lazy") else [])]
    env = checkout.child_env(OMP_NUM_THREADS="1")
    if mode.endswith("+mmap"):  # glibc: every allocation ≥ 1 MB its own mapping, returned when freed
        env["MALLOC_MMAP_THRESHOLD_"] = str(2**20)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return {"peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="4,16")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=3072)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--modes", default="eager,lazy,lazy+mmap",
                   help="eager: the model in memory; lazy: --lazy; lazy+mmap: --lazy with MALLOC_MMAP_THRESHOLD_=1MB")
    p.add_argument("--json")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="baseq-lazy-rss-") as tmp:
        tmp = Path(tmp)
        text = tmp / "text.txt"
        words = "the of and a to in is was for on that with as by at from his her it an were are which".split()
        text.write_text(" ".join(words[(i * 7919) % len(words)] for i in range(20000)))
        for layers in map(int, args.layers.split(",")):
            folder = tmp / f"m{layers}"
            size = make_model(folder, layers, args.hidden, args.ffn)
            for mode in args.modes.split(","):
                r = run(folder, tmp / f"out{layers}{mode}", mode, str(text), args.samples, args.seqlen)
                rows.append({"layers": layers, "mode": mode, "weights_mb": round(size, 1), **r})
                print(json.dumps(rows[-1]), flush=True)
    print("\n| layers | weights MB | mode | peak RSS MB | seconds |\n|---:|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['layers']} | {r['weights_mb']:.0f} | {r['mode']} | {r['peak_rss_mb']:.0f} | {r['seconds']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
