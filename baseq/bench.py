"""``baseq bench``: prefill and decode speed, time to first token, peak RSS and bytes on disk of a model and its
full-precision baseline, measured the same way in one run.

Each model is measured in a fresh worker process (``python -m baseq.bench``), one after the other and with
the same number of threads, so each peak RSS is that model's own (loading included) and neither run disturbs the
other. A worker loads the model, warms up, then repeats ``repeats`` times: a prefill forward over ``prefill``
deterministic token ids (batch 1, logits of the last position only, first token picked) and ``decode`` greedy tokens
through the KV cache; the medians are reported.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .errors import BaseqError


def disk_bytes(spec: str) -> int | None:
    """Bytes on disk of what ``spec`` loads from: a folder's files, a .gguf file, or an asset's converted folder."""
    from . import assets
    from .models.loading import asset_folder

    p = Path(spec).expanduser()
    if spec in assets.ASSETS:
        p = asset_folder(spec)
    if p.is_file():
        return p.stat().st_size
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return None


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def measure(spec: str, prefill: int, decode: int, repeats: int, threads: int, device: str = "cpu") -> dict:
    """One model's figures (runs in the worker process)."""
    import torch

    from .load import load
    from .runtime.generate import check_context, generate
    from .runtime.kernels import IntLinear, keep_freed_memory

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model, _ = load(spec, device=device)
    load_s = time.perf_counter() - t0
    keep_freed_memory()  # the same allocator setting for the model and its baseline (the runtime sets it anyway)
    check_context(model, prefill + decode, "--prefill plus --decode")
    vocab = int(model.config.vocab_size)
    ids = torch.randint(0, vocab, (1, prefill), generator=torch.Generator().manual_seed(0))
    generate(model, ids[:, :16], 4)  # warm-up
    runs = [generate(model, ids, decode) for _ in range(repeats)]
    held = sorted({m.held for m in model.modules() if isinstance(m, IntLinear)})
    return {"spec": spec, "load_s": round(load_s, 2),
            "prefill_tok_s": statistics.median(r.prefill_tok_s for r in runs),
            "decode_tok_s": statistics.median(r.decode_tok_s for r in runs),
            "ttft_s": statistics.median(r.prefill_s for r in runs),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "disk_mb": (lambda b: None if b is None else round(b / 2**20, 1))(disk_bytes(spec)),
            "method": (getattr(model, "baseq_config", None) or {}).get("method", "fp"),
            "weights_held": " + ".join(held) or None,  # how a packed model holds its linears (IntLinear.held)
            "repeats": [{"prefill_tok_s": r.prefill_tok_s, "decode_tok_s": r.decode_tok_s} for r in runs]}


def run_worker(spec: str, prefill: int, decode: int, repeats: int, threads: int, device: str) -> dict:
    cmd = [sys.executable, "-m", "baseq.bench", spec, "--prefill", str(prefill), "--decode", str(decode),
           "--repeats", str(repeats), "--threads", str(threads), "--device", device]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        said = (proc.stderr or proc.stdout).strip().splitlines()
        why = said[-1].removeprefix("baseq: error: ") if said else f"exit code {proc.returncode}"
        if proc.returncode == -signal.SIGKILL:  # what the kernel's out-of-memory killer sends
            why = "its process was killed (SIGKILL: out of memory?)"
        raise BaseqError(f"benchmarking '{spec}' failed: {why}")
    return json.loads(lines[-1])


def bench(model: str, baseline: str | None, prefill: int, decode: int, repeats: int, threads: int,
          device: str = "cpu", progress=print) -> dict:
    result = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_model(), "threads": threads, "prefill": prefill,
              "decode": decode, "repeats": repeats}
    for key, spec in (("model", model), ("baseline", baseline)):
        if spec is None:
            continue
        progress(f"measuring {key} {spec}")
        result[key] = run_worker(spec, prefill, decode, repeats, threads, device)
    if baseline is not None:
        m, b = result["model"], result["baseline"]
        result["ratio"] = {k: (m[k] / b[k] if m[k] and b[k] else None)
                           for k in ("prefill_tok_s", "decode_tok_s", "ttft_s", "peak_rss_mb", "disk_mb")}
    return result


def default_baseline(spec: str) -> str | None:
    """The model a quantized folder was made from (its ``baseq.json`` says: the absolute path of a local model, or
    an asset name, or a hub id), if it can still be found (a relative path recorded by an older baseq: from the
    working directory). Raises a BaseqError — before anything is measured — when it cannot be found."""
    from .assets import ASSETS
    from .runtime.format import is_saved_folder, read_meta

    p = Path(spec).expanduser()
    if not is_saved_folder(p):
        return None
    meta = read_meta(p)
    model, path = meta.get("model"), meta.get("model_path")
    if not model or model in ASSETS:
        return model or None
    for candidate in (path, model):  # (older folders recorded the path as typed: relative to where it was typed)
        if candidate and Path(candidate).expanduser().exists():
            return str(Path(candidate).expanduser().resolve())
    if path is None and model.count("/") == 1 and not model.startswith((".", "/", "~")):  # a hub id
        return model
    raise BaseqError(f"the model '{spec}' was made from ('{path or model}') is not found: pass --baseline PATH "
                     f"(or --baseline none)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m baseq.bench", description="worker of 'baseq bench'")
    p.add_argument("spec")
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--decode", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    try:
        out = measure(a.spec, a.prefill, a.decode, a.repeats, a.threads, a.device)
    except BaseqError as e:
        print(f"baseq: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
