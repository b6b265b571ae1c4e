"""The benchmark's tables (benchmarks/run.py): the papers' "gap narrowed" figure from the zero-shot averages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from baseq.eval.standard import PAPER, TASKS


@pytest.fixture(scope="module")
def run():
    spec = importlib.util.spec_from_file_location("bench_run", Path(__file__).parents[1] / "benchmarks" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(row, method, avg, seed=0, bits="W4A4KV4"):
    return {"row": row, "method": method, "bits": "fp" if method == "fp" else bits, "seed": seed,
            "tasks": {t: {TASKS[t].paper_metric: avg} for t in PAPER}}


def test_gap_narrowed_follows_the_papers_definition(run):
    results = [_row("fp", "fp", 0.60), _row("quarot-gptq-w4a4kv4", "quarot-gptq", 0.50),
               _row("spinquant-w4a4kv4", "spinquant", 0.54),
               _row("baseq-w4a4kv4", "baseq", 0.56), _row("baseq-w4a4kv4", "baseq", 0.58, seed=1)]
    text = run.gap_table(results)
    baseq = next(line for line in text.splitlines() if line.startswith("| baseq-w4a4kv4"))
    cells = [c.strip() for c in baseq.strip("|").split("|")]
    # mean of the two seeds 0.57: 1 − (0.60 − 0.57) / (0.60 − 0.50) = 70 %; vs SpinQuant 1 − 0.03 / 0.06 = 50 %
    assert cells[:6] == ["baseq-w4a4kv4", "W4A4KV4", "2", "57.00", "70.0 %", "50.0 %"]
    quarot = next(line for line in text.splitlines() if line.startswith("| quarot-gptq-w4a4kv4"))
    assert [c.strip() for c in quarot.strip("|").split("|")][4] == ""  # no gap against itself


def test_no_gap_table_without_the_nine_tasks(run):
    partial = [{"row": "fp", "method": "fp", "bits": "fp", "tasks": {"piqa": {"acc_norm": 0.6}}},
               {"row": "baseq-w4a4kv4", "method": "baseq", "bits": "W4A4KV4", "tasks": {"piqa": {"acc_norm": 0.5}}}]
    assert run.gap_table(partial) == ""
