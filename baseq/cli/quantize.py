"""``baseq quantize``: the options (each config field's flag is declared on the field, ``config.flag``), the memory
check that picks ``--lazy``, the run (one process or a torchrun rank), and the written folder."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..errors import BaseqError
from ..eval.zeroshot import check_tasks
from ..io import write_json
from ..config import positive_seconds
from ..methods import ROTATION_SOURCES
from ..provenance import made_by
from .common import (add_eval_data_args, add_model_args, check_json_path, peak_rss_mb, print_table, run_zero_shot,
                     sharded_perplexity, task_rows, task_summary, too_big)


def model_path(spec: str) -> dict:
    """``{"model_path": absolute path}`` when the model was a local folder or file (``baseq bench``'s default
    baseline, found from any working directory), else nothing."""
    p = Path(spec).expanduser()
    return {"model_path": str(p.resolve())} if p.exists() else {}


def config_from_args(args):
    """The typed config: a --config file (if any) first, then every flag the user gave on top of it."""
    from ..config import BUDGETS, PRESETS, QuantizeConfig

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
    if args.weights is not None:
        cfg.check_weights()
    cfg.validate()
    check_given_flags(cfg, given_flags(args))
    return cfg


def given_flags(args) -> list:
    """``(section, field)`` of the config flags given on the command line."""
    return [(section, f) for section, f in flag_fields() if getattr(args, flag_dest(f), None) is not None]


def reads_calibration(cfg, kv_shift: bool) -> bool:
    """Whether the run reads the calibration text: a stage that needs data, or rotations learned from it."""
    from ..calibrate.pipeline import needs_calibration

    return needs_calibration(cfg, kv_shift) or cfg.fitted_rotations


def unused_calibration(cfg, given) -> str | None:
    """A warning when calibration options were given to a run that reads no calibration data (they are shared by
    every calibrating method, so a sweep may pass them to all: said, not refused); else None."""
    if reads_calibration(cfg, cfg.bits.kv_shift == "mean"):  # ("auto" stays off in the data-free methods)
        return None
    unused = [f.metadata["flag"] for s, f in given if s == "calib"]
    return (f"warning: {', '.join(unused)} not used: {cfg.label} {cfg.bits.label} reads no calibration data"
            if unused else None)


def check_given_flags(cfg, given) -> None:
    """Refuse flags given on the command line that this run would not use: BASE-Q's training options with another
    method, a learned rotation's training options with the seeded Hadamards (or no rotations). (A --config file may
    hold such sections for other methods: they stay inert.)"""
    m = cfg.spec
    if not m.baseq_stages and (unused := [f.metadata["flag"] for s, f in given if s == "train"]):
        raise BaseqError(f"{', '.join(unused)}: BASE-Q's training options; method {m.name} does not train "
                         f"(use --method baseq)")
    if not cfg.fitted_rotations and (
            unused := [f.metadata["flag"] for s, f in given if s == "rotation" and f.name != "kind"]):
        learned = " / ".join(r for r in m.rotations if ROTATION_SOURCES[r].fitted)
        why = (f"method {m.name} has no rotations (--method spinquant / ostquant learn them)" if not m.rotate else
               f"the seeded Hadamards are not trained (--rotations {learned} learns them)")
        raise BaseqError(f"{', '.join(unused)}: options of learned rotations' training; {why}")


def flag_fields():
    from ..config import flag_fields as fields

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


def choose_lazy(args, cfg, comm=None) -> None:
    """``--lazy`` / ``--no-lazy`` as given; neither: lazy when the whole model would not fit in the memory available
    to this machine's ranks (:func:`too_big`) — one note line — or, where a lazy run is not possible, one warning line
    and the eager run. ``comm``: the run's communicator (rank 0 speaks); None: one process."""
    from ..calibrate.comm import Communicator

    comm = comm or Communicator()
    if args.lazy is not None:
        return
    args.lazy = False
    what = too_big(args, copies=2, ranks=comm.local_size)
    if what is None:
        return
    main = comm.is_main
    try:
        from ..calibrate.rotations import check_lazy

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
    from ..calibrate.comm import from_env, launched_by_torchrun
    from ..device import check_device

    cfg = config_from_args(args)
    device = check_device(args.device)
    comm = from_env(device, timeout=args.dist_timeout)  # one process unless started by torchrun
    if comm.is_main and (warning := unused_calibration(cfg, given_flags(args))):
        print(f"baseq: {warning}", file=sys.stderr)
    try:
        choose_lazy(args, cfg, comm)
        if args.tasks and (launched_by_torchrun() or args.lazy):
            raise BaseqError(f"--tasks is not run {'under torchrun' if not args.lazy else 'with --lazy'}: evaluate "
                             f"the written model with 'baseq eval --model OUT --tasks ...' instead")
        if args.lazy:
            from ..calibrate.rotations import check_lazy

            check_lazy(cfg)
        return quantize_command(args, cfg, device, comm)
    finally:
        comm.close()


def quantize_command(args, cfg, device, comm) -> int:
    from ..calibrate.engine import on_device
    from ..calibrate.pipeline import check_model, kv_shift_on, needs_calibration, quantize_model, quantized_layers
    from ..data import calib_windows, eval_windows
    from ..load import load as load_model
    from ..runtime.format import check_out_dir, is_saved_folder
    from ..runtime.generate import check_context

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
        from ..models.lazy import open_lazy, park_folder

        lazy, tokenizer = open_lazy(args.model, dtype=args.dtype)
        model = lazy.model
    else:
        model, tokenizer = load_model(args.model, dtype=args.dtype, device="cpu")  # blocks visit the device in turn
    ad = check_model(model, cfg)  # before the full-precision evaluation
    calibrated = needs_calibration(cfg, kv_shift_on(cfg, ad))
    if calibrated and comm.world_size > cfg.calib.samples:
        raise BaseqError(f"{comm.world_size} ranks for {cfg.calib.samples} calibration windows: every rank needs at "
                         f"least one (raise --calib-samples or start fewer ranks)")
    if reads_calibration(cfg, kv_shift_on(cfg, ad)):
        check_context(model, cfg.calib.seqlen, "--calib-seqlen")
    if cfg.rotate and ROTATION_SOURCES[cfg.rotation_source].end_to_end:
        check_context(model, cfg.rotation.seqlen, "--rotation-seqlen")
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
                                                              **model_path(args.model),
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
            ("out", f"{out} ({args.format}, {result['disk_mb']:.1f} MiB)"),
            ("calibration s", f"{report['calib_seconds']:.1f}"), ("peak RSS", f"{result['peak_rss_mb']:.0f} MiB")]
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
    from ..calibrate.pipeline import act_spec

    if fmt == "packed":
        from ..runtime.packed import save_packed

        b = cfg.bits
        save_packed(model, tokenizer, out, act_spec(cfg), meta, w_bits=b.w_bits, w_group=b.w_group,
                    embed_bits=b.embed_bits, overwrite=True, layers=layers, ends_away=ends_away)
    else:
        from ..runtime.save import save_fake

        save_fake(model, tokenizer, out, act_spec(cfg), meta, overwrite=True, layers=layers)


def check_packed(model, out: Path, window) -> dict:
    """NLL of the simulated model and of the packed folder (integer runtime) on ``window``."""
    from ..eval.perplexity import nll_sum
    from ..load import load

    runtime, _ = load(str(out))
    ref, n = nll_sum(model, window, progress=False)
    got, _ = nll_sum(runtime, window, progress=False)
    del runtime
    return {"nll_simulated": ref / n, "nll_runtime": got / n, "rel_diff": (got - ref) / ref}


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def add_quantize_args(p: argparse.ArgumentParser) -> None:
    from ..config import BUDGETS, PRESETS, WEIGHTS
    from ..methods import METHOD_REGISTRY

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
    g.add_argument("--dist-timeout", type=positive_seconds, default=1800.0, metavar="SECONDS",
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


def add_parser(sub) -> None:
    from ..eval.zeroshot import add_zero_shot_args

    p = sub.add_parser("quantize", help="quantize a model (default: BASE-Q W4A4KV4 of the embedded model)",
                       description="Quantize a model and write it to a folder that 'baseq eval --model DIR' loads. "
                                   "With no arguments: BASE-Q W4A4KV4 on the embedded SmolLM2-135M, perplexity "
                                   "before and after on 64 × 512 tokens of 'wiki'.")
    add_quantize_args(p)
    add_zero_shot_args(p)
    p.set_defaults(func=cmd_quantize)
