"""Zero-shot accuracy through the lm-eval harness, offline by default.

:func:`zero_shot` scores an in-memory transformers model (FP, simulated-quantized, or a packed folder loaded as the
integer runtime model) with lm-eval's ``HFLM`` wrapper: batched log-likelihood requests, one progress bar per task.

Task names
    * the standard suite (:mod:`baseq.eval.standard`): ``piqa``, ``arc_easy``, ``arc_challenge``, ``hellaswag``,
      ``winogrande``, ``lambada_openai``, ``boolq``, ``openbookqa``, ``siqa``; ``paper`` = all nine. Each runs with
      **lm-eval's own task definition**: a generated YAML ``include:`` s lm-eval's file for that task (prompt,
      choices, target, preprocessing, metrics all come from it) and overrides only the data source
      (``dataset_path: json`` on the local file) and the split names, so no hub access is needed.
    * the BIG-bench tasks (:mod:`baseq.eval.bigbench`): ``bb_siqa``, ``ni_winogrande_029``, ``ni_science_qa_047``,
      ``bb_physical_intuition``. Each is written as a jsonl file plus a generated task YAML (``dataset_path: json``,
      ``output_type: multiple_choice``, metrics ``acc`` and ``acc_norm``). Their old names keep working with the
      ``bb:`` prefix (``bb:siqa``, ``bb:winogrande``, ``bb:science_qa``, ``bb:physical_intuition``), and bare
      ``science_qa`` / ``physical_intuition`` still name them; bare ``siqa`` / ``winogrande`` now mean the standard
      sets.
    * any other name is passed to lm-eval as one of its own tasks or groups (``mmlu``, ...), which fetch their data
      from the Hugging Face hub; ``lmeval:NAME`` forces that (``lmeval:piqa``). When the hub cannot be reached a
      :class:`~baseq.errors.BaseqError` says so.

Results are keyed by the name as given (``paper`` expands to its nine names). Each entry holds ``acc``,
``acc_norm`` (None where lm-eval does not report it), their standard errors, ``n``, ``source``, and for the standard
tasks ``paper`` / ``paper_stderr`` / ``paper_metric`` (the column the papers report: ``acc_norm`` for ARC, HellaSwag,
PIQA, OpenBookQA, ``acc`` otherwise) and, for LAMBADA, ``perplexity``.

Scoring (lm-eval's): ``acc`` = argmax of the summed log-likelihood of each option; ``acc_norm`` = argmax of the
log-likelihood divided by the option's length in characters. For the partial-scoring tasks (WinoGrande, and
``ni_winogrande_029``) the options are in the contexts and the continuation is shared, so lm-eval reports ``acc``
only (for ``ni_winogrande_029`` ``acc_norm`` is set equal to it, as normalisation cannot change the argmax).

The log-likelihoods are lm-eval's (those of a forward over ``(context + continuation)[:-1]`` per request, to float
rounding), computed once for what a multiple-choice item's options share: the options with one context run as one
packed sequence (the context, then each option, attending to the context and to itself only), and only the options'
logits are computed; see :mod:`baseq.eval.scoring`.

``limit`` keeps the first ``limit`` documents of each task (file order = the hub's order), deterministically.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import BaseqError
from ..io import files_digest, write_json
from ..provenance import code_id
from . import bigbench, scoring, standard
from .scoring import quiet_lm_eval

OFFLINE_PREFIX = "bb:"
LMEVAL_PREFIX = "lmeval:"
PAPER = "paper"
_BB_PREFIX = "baseq_bb_"  # names of the generated lm-eval tasks
_STD_PREFIX = "baseq_std_"


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError:
        raise BaseqError("zero-shot evaluation needs lm-eval: pip install 'baseq[eval]'") from None


def _known() -> str:
    return (f"standard: {', '.join(standard.TASKS)} ('{PAPER}' = all nine); BIG-bench: {', '.join(bigbench.TASKS)}")


def parse_task_list(tasks: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """``"paper, bb_siqa"`` or a list -> cleaned, de-duplicated names (order kept; ``paper`` expanded)."""
    if tasks is None:
        return []
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    out: list[str] = []
    for t in tasks:
        t = str(t).strip()
        for name in (standard.PAPER if t == PAPER else [t] if t else []):
            if name not in out:
                out.append(name)
    return out


def resolve_task(name: str) -> tuple[str, str]:
    """``(source, task)`` for a user task name: source ``"standard"`` (a :data:`standard.TASKS` key),
    ``"bigbench"`` (a :data:`bigbench.TASKS` key) or ``"lmeval"`` (lm-eval's own name)."""
    if name.startswith(OFFLINE_PREFIX):
        task = name[len(OFFLINE_PREFIX):]
        task = bigbench.OLD_NAMES.get(task, task)
        if task not in bigbench.TASKS:
            raise BaseqError(f"unknown BIG-bench task '{name}' (known: {', '.join(bigbench.TASKS)}; old names "
                             f"{', '.join(OFFLINE_PREFIX + n for n in bigbench.OLD_NAMES)})")
        return "bigbench", task
    if name.startswith(LMEVAL_PREFIX):
        task = name[len(LMEVAL_PREFIX):]
        if not task:
            raise BaseqError(f"empty lm-eval task name in '{name}'")
        return "lmeval", task
    if name in standard.TASKS:
        return "standard", name
    if name in bigbench.TASKS:
        return "bigbench", name
    if name in bigbench.OLD_NAMES and name not in standard.TASKS:
        return "bigbench", bigbench.OLD_NAMES[name]
    return "lmeval", name


@functools.lru_cache(maxsize=1)
def _default_task_manager():
    """lm-eval's index of its built-in tasks (takes ~10 s to build; built once per process, only if needed)."""
    from lm_eval.tasks import TaskManager

    with quiet_lm_eval():
        return TaskManager()


# --------------------------------------------------------------------------------------------- task configs


def bigbench_config(name: str, data_file: Path, cache: Path) -> dict[str, Any]:
    """The lm-eval task config (as written to YAML) for BIG-bench task ``name`` reading ``data_file`` (jsonl)."""
    task = bigbench.get_task(name)
    cfg: dict[str, Any] = {
        "task": _BB_PREFIX + name,
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


def lm_eval_yaml(task: standard.StandardTask) -> Path:
    """lm-eval's own YAML file for ``task`` (its usual place, else looked up in lm-eval's task index)."""
    import lm_eval.tasks

    path = Path(lm_eval.tasks.__file__).parent / task.yaml
    if path.is_file():
        return path
    entry = _default_task_manager().task_index.get(task.lm_eval)
    if entry is None or not getattr(entry, "yaml_path", None):
        raise BaseqError(f"the installed lm-eval has no task '{task.lm_eval}' (needed for '{task.name}')")
    return Path(entry.yaml_path)


def standard_config(name: str, data_file: Path, cache: Path) -> dict[str, Any]:
    """The task config (as written to YAML) for standard task ``name``: lm-eval's own definition (``include``) with
    only the data source and split names replaced, reading ``data_file`` (jsonl, hub schema) as the evaluated split."""
    task = standard.get_task(name)
    return {
        "include": str(lm_eval_yaml(task)),
        "task": _STD_PREFIX + name,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {task.split: str(data_file)}, "cache_dir": str(cache)},
        "training_split": None,
        "validation_split": task.split if task.split == "validation" else None,
        "test_split": task.split if task.split == "test" else None,
        "fewshot_split": None,
    }


def write_offline_tasks(bb: list[str], std: list[str], folder: Path, tasks_dir: str | Path | None,
                        standard_dir: str | Path | None, limit: int | None) -> None:
    """Write ``<name>.jsonl`` + a task YAML for each BIG-bench (``bb``) and standard (``std``) task into ``folder``
    (first ``limit`` documents). Missing or unreadable files fail here, before any model work."""
    import yaml

    cache = folder / "hf-datasets-cache"
    jobs = [(n, bigbench.load_items(n, tasks_dir, limit), _BB_PREFIX, bigbench_config) for n in bb]
    jobs += [(n, standard.load_docs(n, standard_dir, limit), _STD_PREFIX, standard_config) for n in std]
    for name, docs, prefix, config in jobs:
        data = folder / f"{prefix}{name}.jsonl"
        with open(data, "w", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
        with open(folder / f"{prefix}{name}.yaml", "w", encoding="utf-8") as f:
            yaml.safe_dump(config(name, data, cache), f, sort_keys=False)


@contextlib.contextmanager
def _no_request_building_bar():
    """lm-eval draws an unlabelled bar while it builds a task's requests (a fraction of a second); hide it, so that
    each task shows exactly one bar (the scoring one)."""
    import lm_eval.api.task as task_mod

    original = task_mod.tqdm
    task_mod.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        task_mod.tqdm = original


# --------------------------------------------------------------------------------------------- evaluation


def _num(x) -> float | None:
    if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x):
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


def _unknown_error(unknown: list[str]) -> BaseqError:
    return BaseqError(f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: not an "
                      f"offline task ({_known()}) nor an lm-eval task")


@dataclass
class TaskProgress:
    """The finished tasks of an evaluation, kept in a JSON file as each one finishes (written atomically, under a
    ``key`` that says which model and settings they belong to), so an interrupted run can take them instead of
    scoring them again (``baseq eval --resume``)."""

    path: Path
    key: dict

    def load(self, say: Callable[[str], None], quiet: bool = False) -> dict[str, dict[str, Any]]:
        """The tasks saved under this key; none (one line says why) when the file is for another key or damaged."""
        if not self.path.is_file():
            return {}
        try:
            saved = json.loads(self.path.read_text())
            ok = saved["key"] == self.key and isinstance(saved["tasks"], dict)
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            say(f"'{self.path}' is for another model, --dtype, --limit or task files (or damaged): scoring every task")
            return {}
        if saved.get("code") != code_id():
            say(f"note: tasks finished by other code ({saved.get('code')}) are taken as they are")
        if not quiet:
            say(f"resuming: {len(saved['tasks'])} task(s) already scored ({', '.join(saved['tasks'])})")
        return saved["tasks"]

    def saver(self, done: dict[str, dict[str, Any]]) -> Callable[[str, dict[str, dict[str, Any]]], None]:
        """An ``on_task`` for :func:`zero_shot` that keeps ``done`` and every task finished since."""
        kept = dict(done)

        def on_task(name: str, entries: dict[str, dict[str, Any]]) -> None:
            kept.update(entries)
            write_json(self.path, {"key": self.key, "code": code_id(), "tasks": kept})

        return on_task

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def zero_shot(model, tokenizer, tasks: list[str] | str, tasks_dir: str | Path | None = None, limit: int | None = None,
              batch_size: int | str = 8, device: str | None = "cpu", standard_dir: str | Path | None = None,
              progress: bool = True, done: dict[str, dict[str, Any]] | None = None,
              on_task: Callable[[str, dict[str, dict[str, Any]]], None] | None = None) -> dict[str, dict[str, Any]]:
    """Zero-shot accuracy of ``model`` on ``tasks``: ``{task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr",
    "n", "source", ...}}`` (see the module docstring).

    ``model`` is a transformers causal LM (moved to ``device`` if it is elsewhere; ``device=None`` leaves it),
    ``tokenizer`` its tokenizer. ``standard_dir`` is the folder of the standard task files (default
    ``$BASEQ_CACHE/tasks``, see :func:`baseq.eval.standard.fetch_tasks`), ``tasks_dir`` that of the BIG-bench files
    (default ``$BASEQ_CACHE/bigbench``, see :func:`baseq.eval.bigbench.fetch_bigbench`). ``limit`` keeps the first
    ``limit`` documents per task. Each task runs as its own lm-eval evaluation with its own progress bar
    (``progress=False``: none). ``done``: results of tasks already scored (an interrupted run's, see ``baseq eval
    --resume``), taken as they are and not run again; ``on_task(name, entries)`` is called as each task finishes
    (``entries``: its result rows, one per task name it stands for).
    """
    check_limit(limit)
    names = parse_task_list(tasks)
    if not names:
        raise BaseqError(f"no task given ({_known()})")
    done = {n: e for n, e in (done or {}).items() if n in names}
    resolved = {n: resolve_task(n) for n in names if n not in done}
    if not resolved:
        return {n: done[n] for n in names}

    def of(source: str) -> list[str]:
        return list(dict.fromkeys(t for s, t in resolved.values() if s == source))

    bb, std, hub = of("bigbench"), of("standard"), of("lmeval")
    _require_lm_eval()

    import lm_eval
    from lm_eval.tasks import TaskManager

    runs: dict[tuple[str, str], tuple[Any, list[str]]] = {}  # (source, task) -> (lm-eval object, result keys)
    # each run gets the task manager its task came from: simple_evaluate makes a new one otherwise, which indexes
    # every task YAML lm-eval ships (~16 s a task on a 2-core machine, 2026-12-07: most of a small run's time)
    managers: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="baseq-zeroshot-") as tmp, quiet_lm_eval():
        folder = Path(tmp)
        write_offline_tasks(bb, std, folder, tasks_dir, standard_dir, limit)  # file errors before any model work
        if bb or std:
            local_tm = managers["bigbench"] = managers["standard"] = TaskManager(include_path=str(folder),
                                                                                  include_defaults=False)
            with quiet_lm_eval(logging.ERROR):  # e.g. "boolq: metric acc ... using default aggregation=mean"
                for source, prefix, group in (("bigbench", _BB_PREFIX, bb), ("standard", _STD_PREFIX, std)):
                    for t in group:
                        runs[source, t] = (local_tm.load(prefix + t)["tasks"][prefix + t], [prefix + t])
        if hub:
            default_tm = managers["lmeval"] = _default_task_manager()
            unknown = [t for t in hub if t not in default_tm.all_tasks]
            if unknown:
                raise _unknown_error(unknown)
            for t in hub:
                try:
                    loaded = default_tm.load(t)
                except Exception as e:  # datasets/hub raise many kinds (ConnectionError, HfHubHTTPError, ...)
                    said = str(e).strip().splitlines()
                    raise BaseqError(f"lm-eval task '{t}' needs its dataset from the Hugging Face hub, which could "
                                     f"not be loaded ({type(e).__name__}{': ' + said[0] if said else ''}); the offline "
                                     f"tasks are: {_known()}") from None
                if t in loaded["groups"]:
                    runs["lmeval", t] = (loaded["groups"][t], [t])
                elif t in loaded["tasks"]:
                    runs["lmeval", t] = (loaded["tasks"][t], [t])
                else:  # a tag: one entry per task it expands to
                    runs["lmeval", t] = (list(loaded["tasks"].values()), list(loaded["tasks"]))

        if device is not None:
            import torch

            if torch.device(device) != getattr(model, "device", torch.device(device)):
                model.to(device)
        lm = scoring.scoring_lm(model, tokenizer, batch_size)
        lm.show = progress
        scored: dict[str, dict[str, dict[str, Any]]] = {}  # task name -> its result rows
        # lm-eval prints "bootstrapping for stddev: perplexity" (LAMBADA) on stdout, which the CLI keeps for results
        with _no_request_building_bar(), contextlib.redirect_stdout(io.StringIO()):
            for (source, t), (obj, keys) in runs.items():
                lm.label = t
                out = lm_eval.simple_evaluate(
                    model=lm, tasks=obj if isinstance(obj, list) else [obj], limit=limit,
                    log_samples=False, bootstrap_iters=1000, task_manager=managers[source],
                    random_seed=None, numpy_random_seed=None, torch_random_seed=None,  # leave global RNGs alone
                )
                for name in [n for n, r in resolved.items() if r == (source, t)]:
                    scored[name] = _entries(name, out, source, t, keys)
                    if on_task is not None:
                        on_task(name, scored[name])

    final: dict[str, dict[str, Any]] = {}
    for name in names:
        final.update({name: done[name]} if name in done else scored[name])
    return final


def _entries(name: str, out: dict, source: str, t: str, keys: list[str]) -> dict[str, dict[str, Any]]:
    """The result rows of the task ``name`` (run as ``t``): one, or for an lm-eval tag one per task it expands to."""
    if source == "lmeval" and keys != [t]:
        return {k: _entry(out, k, f"lm-eval {k} (hub)") for k in keys}
    if source == "standard":
        e = _entry(out, keys[0], f"{standard.WHEEL} {standard._ROOT}{standard.TASKS[t].member}")
        metric = standard.TASKS[t].paper_metric
        e.update(paper=e[metric], paper_stderr=e[f"{metric}_stderr"], paper_metric=metric)
    elif source == "bigbench":
        e = _entry(out, keys[0], f"bigbench==1.0.0 {bigbench.TASKS[t].member}",
                   same_norm=bigbench.TASKS[t].kind == "partial")
    else:
        e = _entry(out, t, f"lm-eval {t} (hub)")
    return {name: e}


def _entry(out: dict, key: str, source: str, same_norm: bool = False) -> dict[str, Any]:
    """One task's numbers from a ``simple_evaluate`` output."""
    results, nsamp = out["results"], out.get("n-samples", {})
    group_subtasks = out.get("group_subtasks", {})

    def n_of(k: str) -> int | None:
        if k in nsamp:
            return int(nsamp[k].get("effective", nsamp[k].get("original")))
        subs = group_subtasks.get(k)
        if subs:
            ns = [n_of(s) for s in subs]
            return sum(ns) if all(n is not None for n in ns) else None
        return None

    r = results.get(key, {})
    acc, acc_se = _num(r.get("acc,none")), _num(r.get("acc_stderr,none"))
    if same_norm:
        norm, norm_se = acc, acc_se
    else:
        norm, norm_se = _num(r.get("acc_norm,none")), _num(r.get("acc_norm_stderr,none"))
    e = {"acc": acc, "acc_stderr": acc_se, "acc_norm": norm, "acc_norm_stderr": norm_se, "n": n_of(key),
         "source": source}
    if "perplexity,none" in r:
        e |= {"perplexity": _num(r.get("perplexity,none")), "perplexity_stderr": _num(r.get("perplexity_stderr,none"))}
    return e


def paper_average(results: dict[str, dict[str, Any]]) -> float | None:
    """Mean paper metric over the nine standard tasks (None unless all nine were run)."""
    return standard.paper_average(results)


# --------------------------------------------------------------------------------------------- CLI adapters


def add_zero_shot_args(parser) -> None:
    """``--tasks``, ``--standard-dir``, ``--tasks-dir``, ``--limit`` for ``baseq eval`` (and ``baseq quantize``)."""
    parser.add_argument("--tasks", default=None,
                        help="comma-separated zero-shot tasks, scored by lm-eval offline: the standard suite "
                        + ", ".join(standard.TASKS) + f" ('{PAPER}' = all nine; `baseq data tasks` fetches them); "
                        "the BIG-bench tasks " + ", ".join(bigbench.TASKS) + "; other names go to lm-eval's own "
                        "tasks (need the HF hub; prefix lmeval: forces that)")
    parser.add_argument("--standard-dir", default=None,
                        help="folder of the standard task files (default: $BASEQ_CACHE/tasks, filled by "
                        "`baseq data tasks`)")
    parser.add_argument("--tasks-dir", default=None,
                        help="folder of the BIG-bench task files (default: $BASEQ_CACHE/bigbench, "
                        "filled by `baseq data bigbench`)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N documents of each task")


def task_files(tasks: str | list[str] | None, tasks_dir: str | Path | None = None,
               standard_dir: str | Path | None = None) -> dict[str, str]:
    """What the offline tasks among ``tasks`` read: {task: :func:`~baseq.io.files_digest` of its file} (lm-eval's own
    tasks are left out: the hub names them). Part of a resumable evaluation's key, so results scored on other task
    files (re-extracted, another --standard-dir) are not taken."""
    out = {}
    for name in parse_task_list(tasks):
        source, task = resolve_task(name)
        if source == "standard":
            path = Path(standard_dir or standard.default_dir()) / standard.get_task(task).filename
        elif source == "bigbench":
            path = Path(tasks_dir or bigbench.default_tasks_dir()) / bigbench.get_task(task).filename
        else:
            continue
        out[name] = files_digest(path) if path.is_file() else "missing"
    return out


def check_tasks(tasks: str | list[str] | None, tasks_dir: str | Path | None = None, limit: int | None = None,
                standard_dir: str | Path | None = None) -> None:
    """Fail before any model work on a task list that cannot run: an unknown name, a missing or unreadable task
    file, an lm-eval name lm-eval does not know (its task index takes a few seconds to build)."""
    if limit is not None:
        check_limit(limit)
    names = parse_task_list(tasks)
    if not names:
        given = [flag for flag, v in (("--limit", limit), ("--tasks-dir", tasks_dir), ("--standard-dir", standard_dir))
                 if v is not None]
        if given:  # refused, not dropped
            raise BaseqError(f"{' and '.join(given)} only appl{'y' if len(given) > 1 else 'ies'} to zero-shot tasks: "
                             f"add --tasks")
        return
    resolved = [resolve_task(n) for n in names]
    for source, task in resolved:
        if source == "bigbench":
            bigbench.load_items(task, tasks_dir, 1)
        elif source == "standard":
            standard.load_docs(task, standard_dir, 1)
    hub = [t for s, t in resolved if s == "lmeval"]
    if hub:
        _require_lm_eval()
        known = _default_task_manager().all_tasks
        unknown = [t for t in hub if t not in known]
        if unknown:
            raise _unknown_error(unknown)


def zero_shot_from_args(model, tokenizer, args, batch_size: int | str = 8, device: str | None = "cpu", **kw):
    """Run :func:`zero_shot` as asked by :func:`add_zero_shot_args`' options (``kw``: its ``done`` / ``on_task``);
    ``None`` when no ``--tasks``."""
    names = parse_task_list(getattr(args, "tasks", None))
    if not names:
        if getattr(args, "limit", None) is not None:
            check_limit(args.limit)
        return None
    return zero_shot(model, tokenizer, names, tasks_dir=getattr(args, "tasks_dir", None),
                     limit=getattr(args, "limit", None), batch_size=batch_size, device=device,
                     standard_dir=getattr(args, "standard_dir", None),
                     progress=not getattr(args, "quiet", False), **kw)


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
    avg = paper_average(results)
    if avg is not None:
        lines.append(f"{'paper average (9)':20s} {'':>6s} {avg:>15.4f}")
    return "\n".join(lines)
