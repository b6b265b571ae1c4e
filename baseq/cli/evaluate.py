"""``baseq eval``: perplexity of a model on a text, and the zero-shot tasks (``--tasks``)."""

from __future__ import annotations

import sys
import time

from ..errors import BaseqError
from ..eval.zeroshot import check_tasks
from ..io import write_json
from ..provenance import code_id
from .common import (add_eval_data_args, add_model_args, check_json_path, print_table, run_zero_shot,
                     sharded_perplexity, task_progress, task_rows, task_summary, too_big)


def cmd_eval(args) -> int:
    from ..data import eval_windows
    from ..device import check_device
    from ..eval.perplexity import perplexity
    from ..load import load as load_model
    from ..runtime.generate import check_context

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
        from ..models.lazy import open_lazy

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
        from ..calibrate.comm import Communicator

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


def add_parser(sub) -> None:
    from ..eval.zeroshot import add_zero_shot_args

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
