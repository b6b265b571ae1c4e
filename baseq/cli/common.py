"""What the commands share: the argument parser's error format, the model and text arguments, result tables, the
zero-shot rows, the memory check, perplexity over a communicator's shards."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import positive_int
from ..errors import BaseqError
from ..io import check_parent


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
    from ..eval.zeroshot import zero_shot_from_args

    return zero_shot_from_args(model, tokenizer, args, batch_size=args.batch_size, device=args.device, **kw)


def task_progress(args, model):
    """With ``--tasks`` and ``--json``: where each finished task is kept (``JSON.partial``), keyed by the model (its
    resolved path and its files' digest: a folder re-quantized in place is another model), ``--dtype``, ``--limit``,
    the model's maker and the task files' digests (re-extracted files, another --standard-dir); else None."""
    if not getattr(args, "tasks", None) or not args.json:
        return None
    from ..eval.zeroshot import TaskProgress, task_files
    from ..models.loading import source_digest

    spec = Path(args.model).expanduser()
    return TaskProgress(Path(args.json + ".partial"),
                        {"model": str(spec.resolve()) if spec.exists() else args.model,
                         "model_files": source_digest(args.model), "dtype": getattr(args, "dtype", None),
                         "limit": args.limit, "made_by": (getattr(model, "baseq_config", None) or {}).get("made_by"),
                         "task_files": task_files(args.tasks, getattr(args, "tasks_dir", None),
                                                  getattr(args, "standard_dir", None))})


def task_rows(tasks: dict) -> list[tuple[str, str]]:
    """One row per task (acc, acc_norm, LAMBADA's perplexity, which metric the paper column uses), and the paper
    average when all nine standard tasks are there."""
    from ..eval.zeroshot import paper_average

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
    from ..eval.zeroshot import paper_average

    avg = paper_average(tasks or {})
    return {} if avg is None else {"paper_avg": avg}


def too_big(args, copies: int, ranks: int = 1) -> str | None:
    """None when ``copies`` of the model ``args.model`` (plus the process) fit in the memory available, times the
    ``ranks`` started on this machine, or when that cannot be told (a packed folder, a hub id); else the words saying
    how much is needed and how much there is."""
    from ..device import available_memory
    from ..models.loading import eager_peak
    from ..runtime.format import is_saved_folder

    have = available_memory()
    if have is None or is_saved_folder(Path(args.model).expanduser()):
        return None
    need = eager_peak(args.model, args.dtype, have // ranks, copies)
    if need is None or need * ranks <= have:
        return None
    return (f"the whole model needs ~{need * ranks / 1e9:.1f} GB of memory{f' ({ranks} ranks)' if ranks > 1 else ''}"
            f", {have / 1e9:.1f} GB are available")


def sharded_perplexity(model, windows, batch_size: int, device, comm, progress: bool, layers=None) -> float:
    """Perplexity over ``windows``, each rank scoring its shard: with the whole model on ``device``, or, given
    ``layers`` (a callable giving the blocks one at a time: lazy runs), block by block."""
    import math

    from ..calibrate.engine import on_device, streamed_nll_sum
    from ..eval.perplexity import nll_sum
    from ..models.adapter import ModelAdapter

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
