"""Benchmark: perplexity, calibration wall time and peak RSS of each method on the embedded default model.

Each row runs in its own process (so its peak RSS is its own) and writes a results JSON that ``baseq report``
reads; this script then prints a markdown table with the fraction of QuaRot-GPTQ's perplexity gap to FP that each
row closes (against QuaRot-GPTQ with the same seed), on ``wiki`` and on the second text, ``books``. With several
``--seeds``, every row runs once per seed (the seed drives the rotations, the training order and the calibration
windows) and the table adds each row's mean. Timings depend on the machine and on whatever else runs on it:
compare rows of one run.

    python benchmarks/run.py --out results/bench                 # the default table
    python benchmarks/run.py --out results/bench --rows fp,quarot-gptq-w4a4kv4,baseq-w4a4kv4 \
        --tasks bb_siqa,ni_winogrande_029 --tasks-dir ../shared/data/bigbench --limit 300
    python benchmarks/run.py --out results/paper --rows fp,quarot-gptq-w4a4kv4,baseq-w4a4kv4 --tasks paper --limit 100
    python benchmarks/run.py --out results/seeds --rows quarot-gptq-w4a4kv4,baseq-w4a4kv4 --seeds 0,1
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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/checkout.py, also when imported from a test
from checkout import code_version  # noqa: E402  (this checkout's baseq first)

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
    # issue 11 candidates at W4A4KV4, each alone on top of the default BASE-Q
    "cand-gptaq": {**BASEQ, "weights": "gptaq"},
    "cand-gptaq-alpha1": {**BASEQ, "weights": "gptaq", "gptq": {"asym_alpha": 1.0}},
    "cand-smooth-down": {**BASEQ, "smooth": {"points": "down"}},
    "cand-smooth-all": {**BASEQ, "smooth": {"points": "down,qkv,gate_up"}},
    "cand-rotations": {**BASEQ, "rotation": {"kind": "calibrated"}},
    "cand-weight-scale": {**BASEQ, "train": {"weight_scale": True}},
    "quarot-gptaq-w4a4kv4": {"method": "quarot", "weights": "gptaq", "bits": "W4A4KV4"},
    "cand-combo": {**BASEQ, "weights": "gptaq", "rotation": {"kind": "calibrated"}, "train": {"weight_scale": True}},
    "baseq-large": {**BASEQ, "calib": {"samples": 64, "seqlen": 1024}, "train": {"epochs": 5}},
    # issue 17: the learned-rotation baselines (default budget: 100 steps × 1 × 512 tokens) and BASE-Q on SpinQuant
    "spinquant-w4a4kv4": {"method": "spinquant", "bits": "W4A4KV4"},
    "ostquant-w4a4kv4": {"method": "ostquant", "bits": "W4A4KV4"},
    "baseq-spinquant-w4a4kv4": {**BASEQ, "bits": "W4A4KV4", "rotation": {"kind": "spinquant"}},
    # K/V centred on their calibration means (--kv-shift; default auto: on where k/v_proj have biases, e.g. Qwen2.5)
    "quarot-gptq-noshift-w4a4kv4": {"method": "quarot", "weights": "gptq", "bits": "W4A4KV4", "kv_shift": "off"},
    "quarot-gptq-shift-w4a4kv4": {"method": "quarot", "weights": "gptq", "bits": "W4A4KV4", "kv_shift": "mean"},
    "baseq-noshift-w4a4kv4": {**BASEQ, "bits": "W4A4KV4", "kv_shift": "off"},
    "baseq-shift-w4a4kv4": {**BASEQ, "bits": "W4A4KV4", "kv_shift": "mean"},
    # tokens with a massive residual stream keep float activations (--keep-massive 20)
    "quarot-gptq-keep20-w4a4kv4": {"method": "quarot", "weights": "gptq", "bits": "W4A4KV4", "keep_massive": 20.0},
    "baseq-keep20-w4a4kv4": {**BASEQ, "bits": "W4A4KV4", "keep_massive": 20.0},
    "baseq-keep20-gptaq-w4a4kv4": {**BASEQ, "bits": "W4A4KV4", "keep_massive": 20.0, "weights": "gptaq"},
    # the same tokens kept, but each block fitted as without the option (--keep-massive-fit without)
    "quarot-gptq-keep20after-w4a4kv4": {"method": "quarot", "weights": "gptq", "bits": "W4A4KV4", "keep_massive": 20.0,
                                        "keep_massive_fit": "without"},
    "baseq-keep20after-w4a4kv4": {**BASEQ, "bits": "W4A4KV4", "keep_massive": 20.0, "keep_massive_fit": "without"},
    "quarot-gptq-keep20kv-w4a4kv4": {"method": "quarot", "weights": "gptq", "bits": "W4A4KV4", "keep_massive": 20.0,
                                     "keep_massive_kv": "float"},
    "baseq-keep20kv-w4a4kv4": {**BASEQ, "bits": "W4A4KV4", "keep_massive": 20.0, "keep_massive_kv": "float"},
    # calibrated on both texts (--calib-data wiki+books): GPTAQ fits the calibration text, which was wiki alone
    **{f"{row}-mix-w4a4kv4": {**spec, "calib": {"data": "wiki+books"}} for row, spec in (
        ("quarot-gptq", {"method": "quarot", "weights": "gptq", "bits": "W4A4KV4"}),
        ("baseq", {**BASEQ, "bits": "W4A4KV4"}),
        ("baseq-keep20", {**BASEQ, "bits": "W4A4KV4", "keep_massive": 20.0}),
        ("baseq-keep20-gptaq", {**BASEQ, "bits": "W4A4KV4", "keep_massive": 20.0, "weights": "gptaq"}))},
}
DEFAULT = ["fp", "rtn-w4a4kv4", "gptq-w4a4kv4", "quarot-rtn-w4a4kv4", "quarot-gptq-w4a4kv4", "baseq-w4a4kv4",
           "quarot-gptq-w4a8kv8", "baseq-w4a8kv8", "quarot-gptq-w4a16"]


EVAL_DATA = ("wiki", "books")


def result_name(row: str, seed: int) -> str:
    return row if seed == 0 else f"{row}-seed{seed}"


def run_row(name: str, args) -> dict:
    from baseq.calibrate.pipeline import quantize_model
    from baseq.config import PRESETS, QuantizeConfig
    from baseq.data import eval_windows
    from baseq.eval.perplexity import perplexity
    from baseq.models.loading import load_model

    spec = dict(ROWS[name])
    model, tokenizer = load_model(args.model)
    windows = {d: eval_windows(tokenizer, d, args.seqlen, args.windows) for d in EVAL_DATA}
    import torch

    result = {"row": name, "seed": args.seed, "model": args.model, "data": "wiki", "seqlen": args.seqlen,
              "windows": args.windows, "machine": machine(), "code": code_version(), "threads": torch.get_num_threads(),
              "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if spec["method"] == "fp":
        result.update(method="fp", bits="fp", calib_seconds=0.0)
    else:
        bits = {**PRESETS[spec.pop("bits", "W4A4KV4")],  # + the row's own bits options (else BitsConfig's defaults)
                **{k: spec.pop(k) for k in ("kv_shift", "keep_massive", "keep_massive_fit", "keep_massive_kv")
                   if k in spec}}
        calib = {"samples": args.calib_samples, "seqlen": args.calib_seqlen, "seed": args.seed,
                 **spec.pop("calib", {})}
        cfg = QuantizeConfig.from_dict({**spec, "seed": args.seed, "bits": bits, "calib": calib})
        result["data"] = cfg.calib.data  # the calibration text
        work = Path(args.work) / result_name(name, args.seed) if args.work else None
        if work is not None and (work / "progress.json").is_file():
            result["resumed"] = json.loads((work / "progress.json").read_text()).get("done")
        report = quantize_model(model, tokenizer, cfg, model_spec=args.model, progress=False, work_dir=work,
                                resume=work is not None,
                                log_fn=lambda m: print(f"[{name}] {m}", file=sys.stderr, flush=True))
        result.update(method=name.split("-w4")[0] if not name.startswith("abl") else name, bits=cfg.bits.label,
                      calib_seconds=report["calib_seconds"], config=cfg.to_dict(), kv_shift=report["kv_shift"],
                      calib_peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
        keep = Path(args.keep) / result_name(name, args.seed) if args.keep else None
        model = packed_runtime(model, tokenizer, cfg, result, keep)
    t0 = time.perf_counter()
    result["ppl_by_data"] = {d: perplexity(model, w, batch_size=4, progress=False) for d, w in windows.items()}
    result["ppl"] = result["ppl_by_data"]["wiki"]
    result["eval_seconds"] = round(time.perf_counter() - t0, 1)
    if args.tasks:
        from baseq.eval.zeroshot import zero_shot

        t0 = time.perf_counter()
        result["tasks"] = zero_shot(model, tokenizer, args.tasks, tasks_dir=args.tasks_dir,
                                    standard_dir=args.standard_dir,
                                    limit=args.limit, batch_size=8)
        result["zero_shot_seconds"] = round(time.perf_counter() - t0, 1)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return result


def machine() -> str:
    """The CPU model (``lscpu``'s "Model name") and core count: which machine a row's times belong to."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    except (OSError, subprocess.CalledProcessError):
        name = "?"
    return f"{name}, {os.cpu_count()} cores"


def packed_runtime(model, tokenizer, cfg, result: dict, keep: Path | None = None):
    """The quantized model written in the packed format and loaded back as the integer runtime, which computes the
    same numbers as the simulated model (bit for bit: tests/test_runtime.py) ~2.5× faster; the simulated model for
    what the packed format cannot hold (16-bit weights). ``keep``: write the packed folder there and keep it (for
    ``baseq generate`` / ``baseq bench`` afterwards), else in a temporary folder."""
    import tempfile

    from baseq.calibrate.pipeline import act_spec
    from baseq.load import load

    if cfg.bits.w_bits > 8:
        result["eval_model"] = "simulated"
        return model
    with tempfile.TemporaryDirectory(prefix="baseq-bench-") as tmp:
        from baseq.runtime.packed import save_packed

        b = cfg.bits
        out = save_packed(model, tokenizer, keep or Path(tmp) / "packed", act_spec(cfg),
                          {"method": cfg.label, "bits": b.label, "model": result["model"], "config": cfg.to_dict()},
                          w_bits=b.w_bits, w_group=b.w_group, embed_bits=b.embed_bits, overwrite=True)
        result["disk_mb"] = round(sum(f.stat().st_size for f in out.iterdir()) / 2**20, 1)
        if keep is not None:
            result["packed_folder"] = str(out)
        runtime, _ = load(str(out))
    result["eval_model"] = "packed runtime"
    return runtime


def _closed(ppl: float, base: float | None, fp: float | None) -> str:
    if fp is None or base is None or base <= fp:
        return ""
    return f"{100 * (base - ppl) / (base - fp):.1f} %"


def table(results: list[dict]) -> str:
    """One line per (row, seed), then a mean line for every row run at several seeds. Gap closed: against
    QuaRot-GPTQ at the same bits and seed (its seed mean on the mean lines)."""
    fp = next((r["ppl_by_data"] for r in results if r["method"] == "fp"), None)
    base = {(r["bits"], r.get("seed", 0)): r["ppl_by_data"] for r in results if r["method"] == "quarot-gptq"}
    tasks = list(dict.fromkeys(t for r in results for t in r.get("tasks", {})))
    # the standard tasks show the papers' column (acc_norm for ARC, HellaSwag, PIQA, OBQA), the others acc
    metric = {t: next((r["tasks"][t]["paper_metric"] for r in results if r.get("tasks", {}).get(t, {}).get("paper")
                       is not None), "acc") for t in tasks}
    head = "| row | seed | bits | " + "".join(f"PPL {d} | closed {d} | " for d in EVAL_DATA)
    lines = [head + "".join(f"{t} {metric[t]} | " for t in tasks) + "calibration s | peak RSS MB |",
             "|---|---:|---|" + "---:|---:|" * len(EVAL_DATA) + "---:|" * len(tasks) + "---:|---:|"]

    def line(name, seed, bits, ppls, basel, accs, secs, rss):
        cells = "".join(f"{ppls[d]:.3f} | {_closed(ppls[d], basel and basel.get(d), fp and fp.get(d))} | "
                        for d in EVAL_DATA)
        return f"| {name} | {seed} | {bits} | {cells}{accs}{secs} | {rss} |"

    by_row: dict[str, list[dict]] = {}
    for r in results:
        by_row.setdefault(r["row"], []).append(r)
        accs = "".join(f"{r['tasks'][t][metric[t]]:.3f} ± {r['tasks'][t][metric[t] + '_stderr']:.3f} | "
                       if t in r.get("tasks", {}) else " | " for t in tasks)
        lines.append(line(r["row"], r.get("seed", 0), r["bits"], r["ppl_by_data"],
                          base.get((r["bits"], r.get("seed", 0))), accs, f"{r['calib_seconds']:.0f}",
                          r["peak_rss_mb"]))
    for name, rs in by_row.items():
        if len(rs) < 2:
            continue
        mean = {d: sum(r["ppl_by_data"][d] for r in rs) / len(rs) for d in EVAL_DATA}
        bases = [base.get((rs[0]["bits"], r.get("seed", 0))) for r in rs]
        basel = ({d: sum(b[d] for b in bases) / len(bases) for d in EVAL_DATA} if all(bases) else None)
        seeds = ",".join(str(r.get("seed", 0)) for r in rs)
        lines.append(line(f"**{name}** (mean)", seeds, rs[0]["bits"], mean, basel, " | " * len(tasks),
                          f"{sum(r['calib_seconds'] for r in rs) / len(rs):.0f}",
                          max(r["peak_rss_mb"] for r in rs)))
    return "\n".join(lines)


BASELINES = ("quarot-gptq", "spinquant", "ostquant")  # the papers' baselines (their rows' "method")


def gap_table(results: list[dict]) -> str:
    """The papers' headline: the zero-shot average (the nine standard tasks) of each row, and the share of each
    baseline's gap to FP it narrows, ``1 − (FP − X) / (FP − baseline)``, at the same bits; seeds averaged per row.
    Empty unless FP and some row have all nine tasks."""
    from baseq.eval.zeroshot import paper_average

    avg: dict[tuple[str, str], list[float]] = {}
    method: dict[str, str] = {}
    for r in results:
        a = paper_average(r.get("tasks", {}))
        if a is not None:
            avg.setdefault((r["row"], r["bits"]), []).append(a)
            method[r["row"]] = r["method"]
    fp = next((sum(v) / len(v) for (row, _), v in avg.items() if method[row] == "fp"), None)
    if fp is None or len(avg) < 2:
        return ""
    mean = {k: sum(v) / len(v) for k, v in avg.items()}
    base = {(method[row], bits): m for (row, bits), m in mean.items() if method[row] in BASELINES}
    present = [b for b in BASELINES if any(m == b for m, _ in base)]
    lines = ["| row | bits | seeds | zero-shot average | " + "".join(f"gap narrowed vs {b} | " for b in present),
             "|---|---|---:|---:|" + "---:|" * len(present)]
    for (row, bits), m in mean.items():
        cells = ""
        for b in present:
            ref = base.get((b, bits))
            ok = ref is not None and fp > ref and method[row] not in ("fp", b)
            cells += f"{100 * (1 - (fp - m) / (fp - ref)):.1f} % | " if ok else " | "
        lines.append(f"| {row} | {bits} | {len(avg[(row, bits)])} | {100 * m:.2f} | {cells}")
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
    p.add_argument("--tasks", help="also zero-shot tasks, e.g. paper (the nine standard tasks, `baseq data tasks`) "
                                   "or bb_siqa,ni_winogrande_029 (offline BIG-bench)")
    p.add_argument("--tasks-dir", help="folder of the BIG-bench files (e.g. ../shared/data/bigbench)")
    p.add_argument("--standard-dir", help="folder of the standard task files (default: $BASEQ_CACHE/tasks)")
    p.add_argument("--limit", type=int, help="items per task")
    p.add_argument("--seeds", default="0", help="comma list of seeds; each row runs once per seed (default 0)")
    p.add_argument("--work", help="folder for per-block checkpoints: an interrupted row resumes at its last finished "
                                  "block (its calib_seconds then count this process only; 'resumed' says from where)")
    p.add_argument("--keep", help="folder to keep each row's packed model in (<keep>/<row>), for generate / bench")
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)  # internal: the seed of --row
    p.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process
    args = p.parse_args()
    if args.list:
        print("\n".join(ROWS))
        return 0
    out = Path(args.out)
    if args.row:
        result = run_row(args.row, args)
        (out / f"{result_name(args.row, args.seed)}.json").write_text(json.dumps(result, indent=2))
        return 0
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        print(f"unknown rows: {', '.join(unknown)} (see --list)", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    names = []
    for row in rows:
        for seed in ([0] if row == "fp" else seeds):
            name = result_name(row, seed)
            names.append(name)
            if (out / f"{name}.json").is_file():
                print(f"{name}: done already ({out / (name + '.json')})", file=sys.stderr)
                continue
            run_one(row, seed, out, args)
    results = [json.loads((out / f"{n}.json").read_text()) for n in names]
    text = table(results)
    gaps = gap_table(results)
    if gaps:
        text += "\n\n" + gaps
    (out / "table.md").write_text(text + "\n")
    print(text)
    return 0


def run_one(row: str, seed: int, out: Path, args) -> None:
    """One row at one seed, in its own process."""
    cmd = [sys.executable, __file__, "--row", row, "--seed", str(seed), "--out", str(out), "--model", args.model,
           "--windows", str(args.windows), "--seqlen", str(args.seqlen),
           "--calib-samples", str(args.calib_samples), "--calib-seqlen", str(args.calib_seqlen)]
    for flag in ("tasks", "tasks_dir", "standard_dir", "limit", "work", "keep"):
        if getattr(args, flag) is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    print(f"{result_name(row, seed)}: running", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "TQDM_DISABLE": "1"})


if __name__ == "__main__":
    sys.exit(main())
