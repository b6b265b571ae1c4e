"""Markdown (and PNG) comparison of result JSONs written by ``baseq eval --json`` / ``baseq quantize --json``.

Accepted JSON shapes (lenient; unknown keys are ignored):

* eval: ``{"model", "method" (default "fp"), "bits" (default "fp" for fp, else "?"), "ppl", "tasks": {task: {"acc",
  "acc_stderr", "acc_norm", ...}}}``. A task value that is a bare number is taken as its ``acc``.
* quantize: ``{"model", "method", "bits", "ppl_fp", "ppl_quant", "tasks_fp", "tasks_quant"}``: the quantized
  numbers make the row (method default "quant"); the FP numbers, when present, make an extra ``fp`` row.

:func:`rows_from_result` turns one JSON into :class:`Row` s; :func:`make_report` loads files, merges rows of the same
model/method/bits whose numbers do not conflict (the FP row repeated by several quantize runs, or a quantize JSON's
FP perplexity with an eval JSON's FP accuracies) and writes the table:

method | bits | PPL | one column per task (acc ± stderr, in %) | avg acc | PPL gap closed | acc gap closed

"Gap closed" compares each row with the baseline row (``baseline=`` method name; default the ``quarot-gptq``
row if there is one) and the ``fp`` row of the same model:

* PPL: ``(ppl_base - ppl_row) / (ppl_base - ppl_fp) * 100``
* accuracy: ``(avg_row - avg_base) / (avg_fp - avg_base) * 100``, the averages taken over the tasks the three
  rows share.

So the baseline is 0 %, FP is 100 %, and a method closing half the gap is 50 %. Rows of different models are
compared within their model (a "model" column appears when there are several); a model without its own fp or
baseline row uses the report's only fp / baseline row when there is exactly one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BaseqError
from ..io import read_json

DEFAULT_BASELINE = "quarot-gptq"
METRICS = ("acc", "acc_norm", "paper")  # "paper": the per-task metric of the standard suite (baseq.eval.standard)


@dataclass
class Row:
    model: str
    method: str
    bits: str
    ppl: float | None = None
    tasks: dict[str, dict[str, float | None]] = field(default_factory=dict)
    source: str = ""

    @property
    def label(self) -> str:
        return self.method if self.bits in ("", "?", self.method) else f"{self.method} {self.bits}"

    def acc(self, task: str, metric: str = "acc") -> float | None:
        return self.tasks.get(task, {}).get(metric)

    def avg_acc(self, tasks: list[str] | None = None, metric: str = "acc") -> float | None:
        """Mean ``metric`` over ``tasks`` (default: all of this row's tasks); None if any is missing or none given."""
        tasks = list(self.tasks) if tasks is None else tasks
        vals = [self.acc(t, metric) for t in tasks]
        if not vals or any(v is None for v in vals):
            return None
        return sum(vals) / len(vals)


def _number(v: Any, what: str) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                raise ValueError(f"{what} is not a number: {v!r}") from None
        else:
            raise ValueError(f"{what} is not a number: {v!r}")
    return float(v) if math.isfinite(v) else None


def _tasks(obj: Any, what: str) -> dict[str, dict[str, float | None]]:
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise ValueError(f"'{what}' must be an object of tasks")
    out = {}
    for task, r in obj.items():
        if isinstance(r, dict):
            out[str(task)] = {k: _number(v, f"{what}.{task}.{k}") for k, v in r.items()
                              if k in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "paper", "paper_stderr")}
            if "n" in r and isinstance(r["n"], (int, float)):
                out[str(task)]["n"] = r["n"]
        else:
            out[str(task)] = {"acc": _number(r, f"{what}.{task}")}
    return out


def rows_from_result(d: dict, source: str = "") -> list[Row]:
    """Rows described by one result dict (see the module docstring); raises ValueError on wrong types."""
    if not isinstance(d, dict):
        raise ValueError("top level must be a JSON object")
    model = str(d.get("model") or "?")
    quant = any(k in d for k in ("ppl_quant", "tasks_quant", "ppl_fp", "tasks_fp"))
    if not quant:
        method = str(d.get("method") or "fp")
        bits = str(d.get("bits") or ("fp" if method == "fp" else "?"))
        return [Row(model, method, bits, _number(d.get("ppl"), "ppl"), _tasks(d.get("tasks"), "tasks"), source)]
    rows = []
    if d.get("ppl_fp") is not None or d.get("tasks_fp"):
        rows.append(Row(model, "fp", "fp", _number(d.get("ppl_fp"), "ppl_fp"), _tasks(d.get("tasks_fp"), "tasks_fp"),
                        source))
    method = str(d.get("method") or "quant")
    bits = str(d.get("bits") or "?")
    ppl = d.get("ppl_quant", d.get("ppl"))
    tasks = d.get("tasks_quant", d.get("tasks"))
    rows.append(Row(model, method, bits, _number(ppl, "ppl_quant"), _tasks(tasks, "tasks_quant"), source))
    return rows


def _protocols(d: dict) -> dict[str, Any]:
    """What each number of a result JSON was measured on, where it says: the perplexity's text / window length /
    windows, and each task's documents and source files."""
    out: dict[str, Any] = {}
    if isinstance(d, dict) and any(d.get(k) is not None for k in ("ppl", "ppl_quant", "ppl_fp")) and \
            any(d.get(k) is not None for k in ("data", "seqlen", "windows")):
        out["perplexity"] = f"{d.get('data')}, {d.get('seqlen')}-token windows × {d.get('windows')}"
    for key in ("tasks", "tasks_quant", "tasks_fp"):
        tasks = d.get(key) if isinstance(d, dict) else None
        for task, r in (tasks or {}).items() if isinstance(tasks, dict) else ():
            if isinstance(r, dict) and (r.get("n") is not None or r.get("source") is not None):
                out[f"task {task}"] = f"{r.get('n')} documents of {r.get('source')}"
    return out


def load_rows(result_files: list[str | Path]) -> list[Row]:
    """The rows of ``result_files``, merged; files that measured the same thing differently (another text, window
    length or count; another number of documents or other task files) are refused: their gaps would mean nothing."""
    if not result_files:
        raise BaseqError("no result files given")
    rows: list[Row] = []
    seen: dict[str, tuple[str, str]] = {}
    for f in result_files:
        path = Path(f)
        data = read_json(path, "result file")
        try:
            new = rows_from_result(data, source=path.name)
        except ValueError as e:
            raise BaseqError(f"result file {path}: {e}") from None
        for what, how in _protocols(data).items():
            first = seen.setdefault(what, (how, path.name))
            if first[0] != how:
                raise BaseqError(f"{first[1]} and {path.name} measure {what} differently ({first[0]} vs {how}): "
                                 f"one report compares one protocol")
        for r in new:
            if not any(_merge_into(old, r) for old in rows):
                rows.append(r)
    return rows


def _same(a: float | None, b: float | None) -> bool:
    return a is None or b is None or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def _merge_into(old: Row, new: Row) -> bool:
    """Fold ``new`` into ``old`` when both describe the same run: same model/method/bits and no conflicting number.

    This joins e.g. the FP perplexity of a quantize JSON with the FP accuracies of an eval JSON, and drops the FP
    row repeated by several quantize JSONs. Rows that disagree on any number stay separate.
    """
    if (old.model, old.method, old.bits) != (new.model, new.method, new.bits) or not _same(old.ppl, new.ppl):
        return False
    for t in set(old.tasks) & set(new.tasks):
        a, b = old.tasks[t], new.tasks[t]
        if not all(_same(a.get(k), b.get(k)) for k in set(a) & set(b)):
            return False
    old.ppl = old.ppl if old.ppl is not None else new.ppl
    for t, r in new.tasks.items():
        merged = dict(old.tasks.get(t, {}))
        merged.update({k: v for k, v in r.items() if merged.get(k) is None})
        old.tasks[t] = merged
    if new.source and new.source not in old.source.split(", "):
        old.source = ", ".join(x for x in (old.source, new.source) if x)
    return True


def _gap(base: float | None, fp: float | None, row: float | None, lower_is_better: bool) -> float | None:
    if base is None or fp is None or row is None:
        return None
    denom = (base - fp) if lower_is_better else (fp - base)
    if abs(denom) < 1e-12:
        return None
    return ((base - row) if lower_is_better else (row - base)) / denom * 100.0


@dataclass
class _Gaps:
    ppl: float | None = None
    acc: float | None = None


def compute_gaps(rows: list[Row], baseline: str | None = None, metric: str = "acc") -> tuple[dict[int, _Gaps], str | None]:
    """Per row index: gap closed (PPL, acc) vs the baseline of its model. Returns (gaps, baseline method used)."""
    methods = list(dict.fromkeys(r.method for r in rows))
    if baseline is not None and baseline not in methods:
        raise BaseqError(f"baseline '{baseline}' is none of the methods in the results ({', '.join(methods)})")
    base_method = baseline or (DEFAULT_BASELINE if DEFAULT_BASELINE in methods else None)
    gaps: dict[int, _Gaps] = {}
    if base_method is None:
        return gaps, None
    # compare within a model; a model lacking its own fp/baseline row (e.g. rows of a quantized folder evaluated by
    # path) falls back to the only fp/baseline row of the report, if there is exactly one
    all_fp = [r for r in rows if r.method == "fp"]
    all_base = [r for r in rows if r.method == base_method]
    for i, r in enumerate(rows):
        base = next((b for b in all_base if b.model == r.model), all_base[0] if len(all_base) == 1 else None)
        fp = next((f for f in all_fp if f.model == r.model), all_fp[0] if len(all_fp) == 1 else None)
        if base is None or fp is None:
            continue
        common = [t for t in r.tasks if t in base.tasks and t in fp.tasks]
        acc_gap = None
        if common:
            acc_gap = _gap(base.avg_acc(common, metric), fp.avg_acc(common, metric), r.avg_acc(common, metric),
                           lower_is_better=False)
        gaps[i] = _Gaps(_gap(base.ppl, fp.ppl, r.ppl, lower_is_better=True), acc_gap)
    return gaps, base_method


def _pct(v: float | None, se: float | None = None) -> str:
    if v is None:
        return "—"
    return f"{100 * v:.1f}" + (f" ± {100 * se:.1f}" if se is not None else "")


def _signed(v: float | None) -> str:
    return "—" if v is None else f"{v:+.1f}%"


def _ppl(v: float | None) -> str:
    return "—" if v is None else (f"{v:.2f}" if v < 1000 else f"{v:.4g}")


def render_markdown(rows: list[Row], baseline: str | None = None, metric: str = "acc") -> str:
    """The markdown report for ``rows`` (see the module docstring)."""
    tasks = list(dict.fromkeys(t for r in rows for t in r.tasks))
    gaps, base_method = compute_gaps(rows, baseline, metric)
    several_models = len({r.model for r in rows}) > 1
    head = (["model"] if several_models else []) + ["method", "bits", "PPL"]
    align = ["---"] * len(head)
    head += tasks + ([f"avg {metric}"] if tasks else [])
    if base_method:
        head += ["PPL gap closed", "acc gap closed"]
    align += ["---:"] * (len(head) - len(align))
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    partial = False
    for i, r in enumerate(rows):
        cells = ([r.model] if several_models else []) + [r.method, r.bits, _ppl(r.ppl)]
        cells += [_pct(r.acc(t, metric), r.tasks.get(t, {}).get(f"{metric}_stderr")) if t in r.tasks else "—"
                  for t in tasks]
        if tasks:
            own = [t for t in tasks if r.acc(t, metric) is not None]
            avg = r.avg_acc(own, metric) if own else None
            mark = ""
            if own and len(own) < len(tasks):
                mark, partial = " †", True
            cells.append(_pct(avg) + mark)
        if base_method:
            g = gaps.get(i, _Gaps())
            cells += [_signed(g.ppl), _signed(g.acc)]
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    if tasks:
        notes.append(f"Task columns: zero-shot `{metric}` in % (± standard error)"
                     + (": `acc_norm` for ARC-e/c, HellaSwag, PIQA, OpenBookQA, `acc` for WinoGrande, LAMBADA, BoolQ, "
                        "SIQA (as the QuaRot / SpinQuant tables); other tasks have none." if metric == "paper" else "."))
    if partial:
        notes.append("† average over the tasks this row has, not all columns.")
    if base_method:
        notes.append(f"Gap closed vs `{base_method}` (0%) and `fp` (100%) of the same model: "
                     "PPL (ppl_base − ppl)/(ppl_base − ppl_fp); accuracy (avg − avg_base)/(avg_fp − avg_base), "
                     "averaged over the tasks the three rows share.")
    else:
        notes.append(f"No baseline row (method `{DEFAULT_BASELINE}` or --baseline), so no gap-closed columns.")
    sources = list(dict.fromkeys(r.source for r in rows if r.source))
    if sources:
        notes.append("Sources: " + ", ".join(f"`{s}`" for s in sources) + ".")
    return "\n".join(["# baseq results", "", *lines, "", *notes]) + "\n"


def render_plot(rows: list[Row], path: str | Path, metric: str = "acc", baseline: str | None = None) -> Path:
    """PNG with two bar panels: PPL per row (lower is better) and average accuracy per row (higher is better)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise BaseqError("the plot needs matplotlib: pip install 'baseq[eval]'") from None
    path = Path(path)
    several_models = len({r.model for r in rows}) > 1
    labels = [(f"{r.model}\n" if several_models else "") + r.method + ("" if r.bits in ("fp", "?", "") else f"\n{r.bits}")
              for r in rows]
    tasks = list(dict.fromkeys(t for r in rows for t in r.tasks))
    base_method = baseline or DEFAULT_BASELINE

    def color(r: Row) -> str:
        return "#7f7f7f" if r.method == "fp" else ("#d62728" if r.method == base_method else "#1f77b4")

    fig = Figure(figsize=(min(16.0, max(8.0, 2.4 * len(rows))), 4.2), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    panels = [("perplexity (lower is better)", [r.ppl for r in rows], "{:.2f}"),
              (f"average {metric}, {len(tasks)} task{'s' if len(tasks) != 1 else ''} (higher is better)",
               [(100 * a if (a := r.avg_acc([t for t in tasks if r.acc(t, metric) is not None] or None, metric))
                 is not None else None) for r in rows], "{:.1f}%")]
    for ax, (title, vals, fmt) in zip(axes, panels):
        xs = list(range(len(rows)))
        heights = [v if v is not None else 0.0 for v in vals]
        bars = ax.bar(xs, heights, color=[color(r) for r in rows], edgecolor="black", linewidth=0.5)
        for b, v in zip(bars, vals):
            ax.annotate("n/a" if v is None else fmt.format(v), (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(xs, labels, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        known = [v for v in vals if v is not None]
        if known and min(known) > 0 and max(known) / min(known) > 20:  # e.g. a collapsed W4A4 model's PPL
            ax.set_yscale("log")
            ax.set_title(title + ", log scale", fontsize=10)
        elif known:
            ax.set_ylim(0, max(known) * 1.15)
        else:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="gray")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def make_report(result_files: list[str | Path], out_md: str | Path, baseline: str | None = None,
                plot: str | Path | None = None, metric: str = "acc") -> str:
    """Write the markdown comparison of ``result_files`` to ``out_md`` (and a PNG to ``plot``); returns the markdown."""
    if metric not in METRICS:
        raise BaseqError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    rows = load_rows(result_files)
    md = render_markdown(rows, baseline, metric)
    out_md = Path(out_md)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(md, encoding="utf-8")
    if plot is not None:
        render_plot(rows, plot, metric, baseline)
    return md


# --------------------------------------------------------------------------------------------- CLI adapter


def add_report_args(parser) -> None:
    """Arguments of ``baseq report``."""
    parser.add_argument("results", nargs="+", help="result JSON files (from baseq eval/quantize --json)")
    parser.add_argument("-o", "--out", default="report.md", help="markdown output (default: report.md)")
    parser.add_argument("--baseline", default=None,
                        help=f"method the gap is measured from (default: {DEFAULT_BASELINE} if present)")
    parser.add_argument("--plot", default=None, help="also write a PNG chart here")
    parser.add_argument("--metric", default="acc", choices=list(METRICS),
                        help="accuracy metric to show: acc, acc_norm, or paper (each standard task's column in the "
                             "papers: acc_norm for ARC, HellaSwag, PIQA, OpenBookQA, acc for the others)")


def report_main(args) -> int:
    """``baseq report``: write the markdown (and plot), print the markdown."""
    md = make_report(args.results, args.out, baseline=getattr(args, "baseline", None), plot=getattr(args, "plot", None),
                     metric=getattr(args, "metric", "acc") or "acc")
    print(md, end="")
    print(f"wrote {args.out}" + (f" and {args.plot}" if getattr(args, "plot", None) else ""))
    return 0
