"""Where a command's memory goes: its resident set size sampled over time, beside its own stderr lines.

Runs the command, samples the VmRSS of its process and their descendants every ``--every`` seconds and
timestamps each stderr line it prints (tqdm redraws count as lines; the stream also passes through to this
script's stderr, so the command's own log is kept where it is redirected), then prints the peak, the last stderr line
before the peak (the phase it happened in), the getrusage peak (which also catches a spike between samples) and a
coarse timeline.

    python benchmarks/rss_timeline.py --json results/rss.json -- \\
        python -m baseq quantize --model qwen2.5-1.5b --lazy --method quarot --weights rtn --kv-shift off \\
        --no-eval --out /tmp/q15
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path


def rss_mb(pid: int) -> float | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(r"VmRSS:\s+(\d+) kB", text)
    return int(m.group(1)) / 1024 if m else None


def tree_rss_mb(pid: int) -> float | None:
    """RSS of ``pid`` and all its descendants (a wrapper such as ``/usr/bin/time`` or a shell holds ~nothing; the
    work happens in its child)."""
    total, todo, seen = None, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        r = rss_mb(p)
        if r is not None:
            total = (total or 0.0) + r
        for children in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                todo += [int(c) for c in children.read_text().split()]
            except OSError:
                pass
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--every", type=float, default=0.5)
    p.add_argument("--json")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    args = p.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise SystemExit("rss_timeline: give a command after --")

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, errors="replace")
    lines: list[tuple[float, str]] = []

    def read() -> None:
        buf = ""
        while True:
            ch = proc.stderr.read(1)
            if not ch:
                break
            sys.stderr.write(ch)
            if ch in "\r\n":
                sys.stderr.flush()
                if buf.strip():
                    lines.append((time.perf_counter() - t0, buf.strip()))
                buf = ""
            else:
                buf += ch

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    samples: list[tuple[float, float]] = []
    while proc.poll() is None:
        r = tree_rss_mb(proc.pid)
        if r is not None:
            samples.append((time.perf_counter() - t0, r))
        time.sleep(args.every)
    reader.join(timeout=5)
    wall = time.perf_counter() - t0
    ru_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    t_peak, peak = max(samples, key=lambda s: s[1]) if samples else (0.0, 0.0)

    def phase(t: float) -> str:
        before = [line for s, line in lines if s <= t]
        return before[-1][:160] if before else "(start)"

    step = max(wall / 40, args.every)
    timeline, next_t = [], 0.0
    for t, r in samples:
        if t >= next_t:
            timeline.append({"t": round(t, 1), "rss_mb": round(r), "phase": phase(t)})
            next_t = t + step
    out = {"cmd": " ".join(cmd), "exit": proc.returncode, "wall_s": round(wall, 1),
           "peak_rss_mb_sampled": round(peak), "peak_at_s": round(t_peak, 1), "peak_phase": phase(t_peak),
           "peak_rss_mb_getrusage": round(ru_peak), "timeline": timeline, "stderr_tail": [x for _, x in lines[-5:]]}
    for row in timeline:
        print(f"{row['t']:8.1f} s {row['rss_mb']:7d} MB  {row['phase'][:100]}")
    print(f"peak {out['peak_rss_mb_sampled']} MB sampled at {out['peak_at_s']} s ({out['peak_phase'][:100]}); "
          f"getrusage peak {out['peak_rss_mb_getrusage']} MB; wall {out['wall_s']} s; exit {out['exit']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
