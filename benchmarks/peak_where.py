"""Benchmark: *where* a baseq command reaches its peak RSS — the Python stack of the main thread at each new maximum.

rss_timeline.py says when (and in which progress-bar phase) the resident memory peaked, sampling every few seconds
from outside; this runs the command in-process, reads the RSS every ``--every`` seconds from a thread, and keeps the
main thread's stack (baseq frames only) whenever the RSS passes its running maximum by ``--step`` MB. The last
entries are the peak's code path. ``--layers N`` keeps only the first N decoder blocks of a ``--lazy`` model (the
ends, embedding and head, stay whole), so the end-of-run phases of a large model can be studied in minutes.

    python benchmarks/peak_where.py --layers 2 --json peak.json -- quantize --model qwen2.5-1.5b --lazy \\
        --method baseq --calib-samples 32 --calib-seqlen 512 --no-eval --out /tmp/q15-2blocks
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import threading
import time
import traceback
from pathlib import Path

import checkout  # noqa: E402  (benchmarks/checkout.py: this checkout's baseq first)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def baseq_stack(frame) -> list[str]:
    """The stack's baseq frames, outermost first, as ``file:line function``."""
    return [f"{Path(fs.filename).name}:{fs.lineno} {fs.name}" for fs in traceback.extract_stack(frame)
            if "/baseq/" in fs.filename]


def truncate_lazy(n: int) -> None:
    """Make ``open_lazy`` give models with only their first ``n`` decoder blocks."""
    from baseq.models import lazy as lazy_mod

    original = lazy_mod.open_lazy

    def open_first(spec, dtype="float32"):
        lz, tok = original(spec, dtype=dtype)
        layers = lz.model.model.layers
        lz.model.model.layers = type(layers)(list(layers)[:n])
        lz.templates = lz.templates[:n]
        cfg = lz.model.config
        cfg.num_hidden_layers = n
        if getattr(cfg, "layer_types", None):
            cfg.layer_types = cfg.layer_types[:n]
        return lz, tok

    lazy_mod.open_lazy = open_first


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--every", type=float, default=0.02, help="seconds between RSS readings")
    p.add_argument("--step", type=float, default=16.0, help="MB above the running maximum that records a stack")
    p.add_argument("--layers", type=int, help="keep only the first N decoder blocks of a --lazy model")
    p.add_argument("--json", help="write the maxima (time, RSS, stack) to this JSON file")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="the baseq command line, after --")
    args = p.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise SystemExit("peak_where: give a baseq command after --")
    if args.layers:
        truncate_lazy(args.layers)
    from baseq.cli import main as baseq_main

    main_id = threading.get_ident()
    maxima: list[dict] = []
    done = threading.Event()
    t0 = time.perf_counter()

    def sample() -> None:
        top = 0.0
        while not done.is_set():
            r = rss_mb()
            if r > top + args.step or (r > top and maxima and time.perf_counter() - t0 - maxima[-1]["t"] > 5):
                frame = sys._current_frames().get(main_id)
                maxima.append({"t": round(time.perf_counter() - t0, 2), "rss_mb": round(r),
                               "stack": baseq_stack(frame) if frame is not None else []})
            top = max(top, r)
            time.sleep(args.every)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = 0
    try:
        baseq_main(cmd)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    done.set()
    sampler.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"cmd": cmd, "layers": args.layers, "exit": code, "peak_rss_mb_getrusage": round(peak),
           "code": checkout.code_version(), "maxima": maxima}
    for m in maxima[-8:]:
        print(f"{m['t']:9.2f} s {m['rss_mb']:6d} MB  " + " > ".join(m["stack"][-4:]), file=sys.stderr)
    print(f"peak_where: getrusage peak {out['peak_rss_mb_getrusage']} MB, exit {code}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
