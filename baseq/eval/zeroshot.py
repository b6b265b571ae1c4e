"""Zero-shot multiple-choice accuracy through the lm-eval harness, offline by default.

:func:`zero_shot` scores an in-memory transformers model (FP or quantized) with lm-eval's ``HFLM`` wrapper.

Task names
    * ``siqa``, ``winogrande``, ``science_qa``, ``physical_intuition``: offline tasks parsed from the
      BIG-bench JSON files (:mod:`baseq.eval.bigbench`). For each, the parsed items are written as a jsonl
      file plus a generated lm-eval task YAML (``dataset_path: json``, ``output_type: multiple_choice``,
      metrics ``acc`` and ``acc_norm``) in a temporary folder, registered with
      ``lm_eval.tasks.TaskManager(include_path=...)`` under the name ``baseq_bb_<name>``.
    * any other name is passed to lm-eval as one of its own tasks (``piqa``, ``arc_easy``, ``hellaswag``,
      groups like ``mmlu``...). Those fetch their dataset from the Hugging Face hub; when that fails a
      :class:`~baseq.errors.BaseqError` says so.
    * name clash: a bare offline name (``winogrande``) means the offline task. Prefixes force one side:
      ``bb:winogrande`` (offline) and ``lmeval:winogrande`` (lm-eval's hub task). Results are keyed by the
      name as given, so ``winogrande,lmeval:winogrande`` gives two entries.

Scoring (identical to lm-eval's, since lm-eval does it): ``acc`` = argmax of the summed log-likelihood of
each option; ``acc_norm`` = argmax of log-likelihood divided by the option's length in characters. For the
offline ``winogrande`` (partial scoring: the options are in the contexts and the continuation is shared)
length normalisation cannot change the argmax, so ``acc_norm`` equals ``acc``. For lm-eval tasks that do
not report ``acc_norm`` it is ``None``.

``limit`` keeps the first ``limit`` items of each task (file order), deterministically.

Reference (SmolLM2-135M-Instruct, dequantized fp32, this module, 2 CPU cores): ``siqa`` first 300 items
acc 0.357, acc_norm 0.453; ``winogrande`` first 400 items acc 0.6125 (about 11 minutes together on a
loaded 2-core machine; ~0.3-0.5 s per option).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

from ..errors import BaseqError
from . import bigbench

OFFLINE_PREFIX = "bb:"
LMEVAL_PREFIX = "lmeval:"
_LM_PREFIX = "baseq_bb_"  # name of the generated lm-eval tasks


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError:
        raise BaseqError("zero-shot evaluation needs lm-eval: pip install 'baseq[eval]'") from None


def parse_task_list(tasks: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """``"siqa, winogrande"`` or a list -> cleaned, de-duplicated names (order kept)."""
    if tasks is None:
        return []
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    out: list[str] = []
    for t in tasks:
        t = str(t).strip()
        if t and t not in out:
            out.append(t)
    return out


def resolve_task(name: str) -> tuple[str, str]:
    """``(source, task)`` for a user task name: source ``"offline"`` (a :data:`bigbench.TASKS` key) or ``"lmeval"``."""
    if name.startswith(OFFLINE_PREFIX):
        task = name[len(OFFLINE_PREFIX):]
        if task not in bigbench.TASKS:
            raise BaseqError(f"unknown offline task '{task}' (known offline tasks: {', '.join(bigbench.TASKS)})")
        return "offline", task
    if name.startswith(LMEVAL_PREFIX):
        task = name[len(LMEVAL_PREFIX):]
        if not task:
            raise BaseqError(f"empty lm-eval task name in '{name}'")
        return "lmeval", task
    if name in bigbench.TASKS:
        return "offline", name
    return "lmeval", name


@functools.lru_cache(maxsize=1)
def _default_task_manager():
    """lm-eval's index of its built-in tasks (takes ~10 s to build; built once per process, only if needed)."""
    from lm_eval.tasks import TaskManager

    with _quiet_lm_eval():
        return TaskManager()


@contextlib.contextmanager
def _quiet_lm_eval(level: int = logging.WARNING):
    """Raise lm-eval's logger to ``level`` and silence datasets' progress bars for the duration."""
    logger = logging.getLogger("lm_eval")
    old = logger.level
    logger.setLevel(level)
    try:
        import datasets

        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover
        datasets, bars = None, False
    try:
        yield
    finally:
        logger.setLevel(old)
        if bars:
            datasets.enable_progress_bars()


def task_config(name: str, data_file: Path, cache: Path) -> dict[str, Any]:
    """The lm-eval task config (as written to YAML) for offline task ``name`` reading ``data_file`` (jsonl)."""
    task = bigbench.get_task(name)
    cfg: dict[str, Any] = {
        "task": _LM_PREFIX + name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}, "cache_dir": str(cache)},
        "test_split": "test",
        "output_type": "multiple_choice",
        "num_fewshot": 0,
        "metadata": {"version": 1.0, "source": f"bigbench==1.0.0 {task.member}"},
    }
    if task.kind == "partial":
        # the gold index is "doc_to_text" (an int: lm-eval then takes the choices as alternative contexts)
        cfg |= {"doc_to_text": "gold", "doc_to_choice": "contexts", "doc_to_target": "continuation",
                "target_delimiter": "", "metric_list": [_metric("acc")]}
    else:
        cfg |= {"doc_to_text": "context", "doc_to_choice": "choices", "doc_to_target": "gold",
                "target_delimiter": " ", "metric_list": [_metric("acc"), _metric("acc_norm")]}
    return cfg


def _metric(name: str) -> dict[str, Any]:
    return {"metric": name, "aggregation": "mean", "higher_is_better": True}


def write_offline_tasks(names: list[str], folder: Path, tasks_dir: str | Path | None, limit: int | None) -> None:
    """Write ``<name>.jsonl`` + ``<name>.yaml`` for each offline task into ``folder`` (first ``limit`` items)."""
    import yaml

    for name in names:
        items = bigbench.load_items(name, tasks_dir, limit)
        data = folder / f"{name}.jsonl"
        with open(data, "w", encoding="utf-8") as f:
            for item in items:
                f.write(json.dumps(item, ensure_ascii=False) + "\n")
        with open(folder / f"{_LM_PREFIX}{name}.yaml", "w", encoding="utf-8") as f:
            yaml.safe_dump(task_config(name, data, folder / "hf-datasets-cache"), f, sort_keys=False)


def _num(x) -> float | None:
    if isinstance(x, (int, float)) and math.isfinite(x):
        return float(x)
    return None


def check_limit(limit) -> None:
    """``--limit``: None or a positive integer (checked before any model work)."""
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise BaseqError(f"--limit must be a positive integer, got {limit!r}")
    if limit <= 0:
        raise BaseqError(f"--limit must be a positive integer, got {limit}")


def zero_shot(model, tokenizer, tasks: list[str] | str, tasks_dir: str | Path | None = None, limit: int | None = None,
              batch_size: int | str = 8, device: str | None = "cpu") -> dict[str, dict[str, Any]]:
    """Zero-shot accuracy of ``model`` on ``tasks``: ``{task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}}``.

    ``model`` is a transformers causal LM (moved to ``device`` if it is elsewhere; ``device=None`` leaves it),
    ``tokenizer`` its tokenizer. ``tasks_dir`` is the folder of the BIG-bench files (default
    ``$BASEQ_CACHE/bigbench``, see :func:`baseq.eval.bigbench.fetch_bigbench`). ``limit`` keeps the first
    ``limit`` items per task. See the module docstring for task names and scoring.
    """
    check_limit(limit)
    names = parse_task_list(tasks)
    if not names:
        raise BaseqError(f"no task given (offline tasks: {', '.join(bigbench.TASKS)})")
    resolved = {n: resolve_task(n) for n in names}
    offline = list(dict.fromkeys(t for s, t in resolved.values() if s == "offline"))
    hub = list(dict.fromkeys(t for s, t in resolved.values() if s == "lmeval"))
    _require_lm_eval()

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="baseq-zeroshot-") as tmp, _quiet_lm_eval():
        folder = Path(tmp)
        write_offline_tasks(offline, folder, tasks_dir, limit)  # parse errors surface before any model work
        local_tm = TaskManager(include_path=str(folder), include_defaults=False)
        objs: list = []
        for t in offline:
            objs.append(local_tm.load(_LM_PREFIX + t)["tasks"][_LM_PREFIX + t])

        hub_keys: dict[str, list[str]] = {}  # hub name -> lm-eval result keys
        if hub:
            default_tm = _default_task_manager()
            unknown = [t for t in hub if t not in default_tm.all_tasks]
            if unknown:
                raise BaseqError(f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: "
                                 f"not an offline task (known offline tasks: {', '.join(bigbench.TASKS)}) "
                                 "nor an lm-eval task")
            for t in hub:
                try:
                    loaded = default_tm.load(t)
                except Exception as e:  # datasets/hub raise many kinds (ConnectionError, HfHubHTTPError, ...)
                    said = str(e).strip().splitlines()
                    raise BaseqError(f"lm-eval task '{t}' needs its dataset from the Hugging Face hub, which could "
                                     f"not be loaded ({type(e).__name__}{': ' + said[0] if said else ''}); the offline "
                                     f"tasks are: {', '.join(bigbench.TASKS)}") from None
                if t in loaded["groups"]:
                    objs.append(loaded["groups"][t])
                    hub_keys[t] = [t]
                else:
                    objs.extend(loaded["tasks"].values())
                    hub_keys[t] = [t] if t in loaded["tasks"] else list(loaded["tasks"])

        if device is not None:
            import torch

            if torch.device(device) != getattr(model, "device", torch.device(device)):
                model.to(device)
        with _quiet_lm_eval(logging.ERROR):  # HFLM warns that a model object disables some of its options
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(
            model=lm, tasks=objs, task_manager=local_tm,
            limit=limit if hub else None,  # offline files already hold only the first `limit` items
            log_samples=False, bootstrap_iters=1000,
            random_seed=None, numpy_random_seed=None, torch_random_seed=None,  # leave global RNGs alone
        )

    results, nsamp = out["results"], out.get("n-samples", {})
    group_subtasks = out.get("group_subtasks", {})

    def n_of(key: str) -> int | None:
        if key in nsamp:
            return int(nsamp[key].get("effective", nsamp[key].get("original")))
        subs = group_subtasks.get(key)
        if subs:
            ns = [n_of(s) for s in subs]
            return sum(ns) if all(n is not None for n in ns) else None
        return None

    def entry(key: str, same_norm: bool = False) -> dict[str, Any]:
        r = results.get(key, {})
        acc, acc_se = _num(r.get("acc,none")), _num(r.get("acc_stderr,none"))
        if same_norm:
            norm, norm_se = acc, acc_se
        else:
            norm, norm_se = _num(r.get("acc_norm,none")), _num(r.get("acc_norm_stderr,none"))
        return {"acc": acc, "acc_stderr": acc_se, "acc_norm": norm, "acc_norm_stderr": norm_se, "n": n_of(key)}

    final: dict[str, dict[str, Any]] = {}
    for name in names:
        source, t = resolved[name]
        if source == "offline":
            final[name] = entry(_LM_PREFIX + t, same_norm=bigbench.TASKS[t].kind == "partial")
        else:
            keys = hub_keys[t]
            if keys == [t]:
                final[name] = entry(t)
            else:  # a tag: one entry per task it expands to
                for k in keys:
                    final[k] = entry(k)
    return final


# --------------------------------------------------------------------------------------------- CLI adapters


def add_zero_shot_args(parser) -> None:
    """``--tasks``, ``--tasks-dir``, ``--limit`` for ``baseq eval`` (and ``baseq quantize``)."""
    parser.add_argument("--tasks", default=None,
                        help="comma-separated zero-shot tasks: offline " + ", ".join(bigbench.TASKS)
                        + "; other names go to lm-eval (need the HF hub); prefixes bb: / lmeval: force one side")
    parser.add_argument("--tasks-dir", default=None,
                        help="folder of the BIG-bench task files (default: $BASEQ_CACHE/bigbench, "
                        "filled by `baseq data bigbench`)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N items of each task")


def check_tasks(tasks: str | list[str] | None, tasks_dir: str | Path | None = None, limit: int | None = None) -> None:
    """Fail before any model work on a task list that cannot run: an unknown name, a missing or unreadable offline
    task file, an lm-eval name lm-eval does not know (its task index takes a few seconds to build)."""
    if limit is not None:
        check_limit(limit)
    names = parse_task_list(tasks)
    if not names:
        return
    resolved = [resolve_task(n) for n in names]
    for source, task in resolved:
        if source == "offline":
            bigbench.load_items(task, tasks_dir, 1)
    hub = [t for s, t in resolved if s == "lmeval"]
    if hub:
        _require_lm_eval()
        known = _default_task_manager().all_tasks
        unknown = [t for t in hub if t not in known]
        if unknown:
            raise BaseqError(f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: "
                             f"not an offline task (known offline tasks: {', '.join(bigbench.TASKS)}) "
                             "nor an lm-eval task")


def zero_shot_from_args(model, tokenizer, args, batch_size: int | str = 8, device: str | None = "cpu"):
    """Run :func:`zero_shot` as asked by :func:`add_zero_shot_args`' options; ``None`` when no ``--tasks``."""
    names = parse_task_list(getattr(args, "tasks", None))
    if not names:
        if getattr(args, "limit", None) is not None:
            check_limit(args.limit)
        return None
    return zero_shot(model, tokenizer, names, tasks_dir=getattr(args, "tasks_dir", None),
                     limit=getattr(args, "limit", None), batch_size=batch_size, device=device)


def format_zero_shot(results: dict[str, dict[str, Any]]) -> str:
    """A small plain-text table of :func:`zero_shot` results (for the CLI)."""
    lines = [f"{'task':20s} {'n':>6s} {'acc':>15s} {'acc_norm':>15s}"]

    def cell(v, se):
        if v is None:
            return "-"
        return f"{v:.4f}" + (f" ±{se:.4f}" if se is not None else "")

    for task, r in results.items():
        n = "-" if r.get("n") is None else str(r["n"])
        lines.append(f"{task:20s} {n:>6s} {cell(r.get('acc'), r.get('acc_stderr')):>15s} "
                     f"{cell(r.get('acc_norm'), r.get('acc_norm_stderr')):>15s}")
    return "\n".join(lines)
