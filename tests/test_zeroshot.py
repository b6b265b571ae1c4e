"""BIG-bench parsing, the lm-eval zero-shot integration and the task-file fetcher."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from baseq.errors import BaseqError
from baseq.eval import bigbench
from baseq.eval.zeroshot import parse_task_list, resolve_task, zero_shot

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "bigbench"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared BIG-bench files not present at {SHARED}")


# ------------------------------------------------------------------------------------------ synthetic files


def pair(s1: str, a1: str, s2: str, a2: str) -> dict:
    return {"input": "Context Word: x.",
            "target": [f"Sentence 1: {s1} \nAnswer1: {a1}. \nSentence 2: {s2} \nAnswer2: {a2}."]}


WINO = {"name": "subtask029_winogrande_full_object", "examples": [
    pair("The trophy did not fit in the suitcase because the _ was too big.", "trophy",
         "The trophy did not fit in the suitcase because the _ was too small.", "suitcase"),
    pair("Ann gave Beth the book since _ 's reading was done .", "Ann",
         "Ann gave Beth the book since _ 's reading was starting .", "Beth"),
    pair("The GPS beat the map since the _ was accurate.", "GPS", "The GPS beat the map since the _ was wrong.", "GPS"),
    pair("The pan was hotter than the pot as the _ sat on the fire.", "pan",
         "The pan was hotter than the pot as the _ sat on the bench.", "pot"),
    pair("Dogs chase cats, so the _ run.", "cats", "Dogs chase cats, so the _ hunt.", "dogs"),
]}

SCIENCE = {"examples": [
    {"input": "Question: What carries sound to the ear?  (A) light. (B) vibrating air. (C) magnets. (D) heat?",
     "target": ["B."]},
    {"input": "Question: Species A beats species (B) so B  (A) stays with species (A) (B) leaves (C) wins?",
     "target": ["B."]},
    {"input": "Question: Ice is  (A) solid (B) gas (C) plasma (D)?", "target": ["A."]},
]}

SCORES = {"examples": [
    {"input": "Alex went home. What will Alex do next? ", "target_scores": {"Sleep": 1, "Fly": 0, "Swim": 0}},
    {"input": "Does a ball fall down?", "target_scores": {"Yes": 1, "No": 0}},
]}


def write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return path


def test_parse_target_scores(tmp_path):
    write(tmp_path / "social_iqa.json", SCORES)
    items = bigbench.load_items("bb_siqa", tmp_path)
    assert items == [
        {"context": "Question: Alex went home. What will Alex do next?\nAnswer:", "choices": ["Sleep", "Fly", "Swim"],
         "gold": 0},
        {"context": "Question: Does a ball fall down?\nAnswer:", "choices": ["Yes", "No"], "gold": 0},
    ]
    assert bigbench.load_items("bb_siqa", tmp_path, limit=1) == items[:1]


def test_parse_winogrande_pairs(tmp_path):
    write(tmp_path / "winogrande_full_object.json", WINO)
    items = bigbench.load_items("ni_winogrande_029", tmp_path)
    assert len(items) == 8  # 5 pairs, the one with identical answers skipped
    assert items[0] == {"contexts": ["The trophy did not fit in the suitcase because the trophy",
                                     "The trophy did not fit in the suitcase because the suitcase"],
                        "continuation": " was too big.", "gold": 0}
    assert items[1]["gold"] == 1 and items[1]["continuation"] == " was too small."
    assert items[1]["contexts"] == items[0]["contexts"]
    # detokenized: "_ 's" -> "'s", " ." -> "."
    assert items[2] == {"contexts": ["Ann gave Beth the book since Ann", "Ann gave Beth the book since Beth"],
                        "continuation": "'s reading was done.", "gold": 0}
    assert [it["gold"] for it in items] == [0, 1] * 4


def test_parse_lettered_options(tmp_path):
    write(tmp_path / "science_qa.json", SCIENCE)
    items = bigbench.load_items("ni_science_qa_047", tmp_path)
    assert items[0] == {"context": "Question: What carries sound to the ear?\nAnswer:",
                        "choices": ["light", "vibrating air", "magnets", "heat"], "gold": 1}
    # "(A)"/"(B)" inside the question or an option text do not split it
    assert items[1]["choices"] == ["stays with species (A)", "leaves", "wins"]
    assert items[1]["context"] == "Question: Species A beats species (B) so B\nAnswer:"
    # an empty last option that is not the answer is dropped
    assert items[2]["choices"] == ["solid", "gas", "plasma"] and items[2]["gold"] == 0


@needs_shared
def test_parse_shared_files():
    counts = {"bb_siqa": 1954, "ni_winogrande_029": 8998, "ni_science_qa_047": 251, "bb_physical_intuition": 81}
    for name, n in counts.items():
        items = bigbench.load_items(name, SHARED)
        assert len(items) == n, name
        for it in items:
            opts = it["contexts"] if "contexts" in it else it["choices"]
            assert 2 <= len(opts) <= 5 and all(o.strip() for o in opts) and 0 <= it["gold"] < len(opts)
    first = bigbench.load_items("bb_siqa", SHARED, limit=1)[0]
    assert first["choices"] == ["Make a new plan", "Go home and see Riley", "Find somewhere to go"]
    assert first["gold"] == 2 and first["context"].startswith("Question: Tracy didn't go home")
    assert bigbench.load_items("ni_science_qa_047", SHARED, limit=1)[0]["gold"] == 3
    w = bigbench.load_items("ni_winogrande_029", SHARED, limit=2)
    assert w[0]["continuation"] == " were crowded for them." and w[0]["contexts"][1].endswith("since the spaces")


def test_bad_files_name_the_file(tmp_path):
    bad = write(tmp_path / "social_iqa.json", '{"examples": [')
    with pytest.raises(BaseqError, match="social_iqa.json.*not valid JSON"):
        bigbench.load_items("bb_siqa", tmp_path)
    write(bad, {"examples": [{"input": "q", "target_scores": {"a": 1, "b": 1}}]})
    with pytest.raises(BaseqError, match=r"social_iqa.json: example 0: no single best"):
        bigbench.load_items("bb_siqa", tmp_path)
    write(bad, {"nothing": 1})
    with pytest.raises(BaseqError, match="social_iqa.json.*no 'examples'"):
        bigbench.load_items("bb_siqa", tmp_path)
    write(tmp_path / "winogrande_full_object.json", {"examples": [{"target": ["Sentence 1: no answer"]}]})
    with pytest.raises(BaseqError, match="winogrande_full_object.json: example 0"):
        bigbench.load_items("ni_winogrande_029", tmp_path)
    with pytest.raises(BaseqError, match="science_qa.json.*not found"):
        bigbench.load_items("ni_science_qa_047", tmp_path)
    with pytest.raises(BaseqError, match="folder .*nowhere.* not found"):
        bigbench.load_items("bb_siqa", tmp_path / "nowhere")
    with pytest.raises(BaseqError, match="unknown BIG-bench task 'nope'.*bb_siqa, ni_winogrande_029"):
        bigbench.load_items("nope", tmp_path)


def test_task_names():
    assert parse_task_list(" bb_siqa, ni_winogrande_029,,bb_siqa ") == ["bb_siqa", "ni_winogrande_029"]
    assert resolve_task("ni_winogrande_029") == ("bigbench", "ni_winogrande_029")
    assert resolve_task("bb:winogrande") == ("bigbench", "ni_winogrande_029")
    assert resolve_task("winogrande") == ("standard", "winogrande")  # the bare name is the standard set now
    assert resolve_task("lmeval:winogrande") == ("lmeval", "winogrande")
    assert resolve_task("piqa") == ("standard", "piqa")
    with pytest.raises(BaseqError, match="known: bb_siqa, ni_winogrande_029, ni_science_qa_047, bb_physical_intuition"):
        resolve_task("bb:piqa")


@pytest.mark.parametrize("limit", [0, -3])
def test_limit_must_be_positive(limit):
    with pytest.raises(BaseqError, match="positive integer"):
        zero_shot(None, None, ["bb_siqa"], limit=limit)


def test_cli_adapter_args():
    import argparse

    from baseq.eval.zeroshot import add_zero_shot_args, zero_shot_from_args

    parser = argparse.ArgumentParser()
    add_zero_shot_args(parser)
    args = parser.parse_args(["--tasks", "siqa,winogrande", "--tasks-dir", "/x", "--limit", "5"])
    assert (args.tasks, args.tasks_dir, args.limit) == ("siqa,winogrande", "/x", 5)
    assert zero_shot_from_args(None, None, parser.parse_args([])) is None  # no --tasks: nothing to do
    with pytest.raises(BaseqError, match="positive integer"):
        zero_shot_from_args(None, None, parser.parse_args(["--tasks", "bb_siqa", "--limit", "0"]))


# ------------------------------------------------------------------------------------------ scoring


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from baseq.models.loading import load_model
    from baseq.testing import save_tiny_llama

    path = save_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", layers=2)
    return load_model(str(path))


@torch.no_grad()
def loglik(model, tok, context: str, continuation: str) -> float:
    """Sum of log-probs of ``continuation``'s tokens after ``context`` (the byte tokenizer splits cleanly)."""
    ctx = tok.encode(context, add_special_tokens=False)
    cont = tok.encode(continuation, add_special_tokens=False)
    ids = torch.tensor([ctx + cont])
    logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    return sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


def test_scores_match_hand_computation_choice(tiny, tmp_path):
    model, tok = tiny
    questions = [f"Item {i}: which word comes next after {'abc'[i % 3]}?" for i in range(10)]
    options = [["yes", "no"], ["red", "blue"], ["up", "down"], ["cat", "elephant"], ["a b", "c"],
               ["one", "two"], ["north", "south"], ["hot", "cold"], ["left", "right"], ["sun", "moon"]]

    def dump(golds):
        write(tmp_path / "physical_intuition.json", {"examples": [
            {"input": q, "target_scores": {o: int(j == g) for j, o in enumerate(opts)}}
            for q, opts, g in zip(questions, options, golds)]})

    dump([0] * 10)
    items = bigbench.load_items("bb_physical_intuition", tmp_path, limit=8)
    lls = [[loglik(model, tok, it["context"], " " + c) for c in it["choices"]] for it in items]
    pred = [max(range(2), key=lambda j: ll[j]) for ll in lls]
    pred_norm = [max(range(2), key=lambda j: ll[j] / len(it["choices"][j])) for ll, it in zip(lls, items)]
    # gold = the hand prediction for the first 5 items, the other option for the rest
    golds = [p if i < 5 else 1 - p for i, p in enumerate(pred)] + [0, 0]
    dump(golds)
    res = zero_shot(model, tok, ["bb_physical_intuition"], tasks_dir=tmp_path, limit=8, batch_size=4)
    r = res["bb_physical_intuition"]
    assert r["n"] == 8
    assert r["acc"] == pytest.approx(5 / 8)
    assert r["acc_norm"] == pytest.approx(sum(p == g for p, g in zip(pred_norm, golds)) / 8)
    assert 0 <= r["acc_stderr"] <= 1 and 0 <= r["acc_norm_stderr"] <= 1


def test_scores_match_hand_computation_partial(tiny, tmp_path):
    model, tok = tiny
    write(tmp_path / "winogrande_full_object.json", WINO)
    items = bigbench.load_items("ni_winogrande_029", tmp_path, limit=6)
    hand = [max(range(2), key=lambda j: loglik(model, tok, it["contexts"][j], it["continuation"])) == it["gold"]
            for it in items]
    res = zero_shot(model, tok, "ni_winogrande_029,bb:winogrande", tasks_dir=tmp_path, limit=6)
    assert set(res) == {"ni_winogrande_029", "bb:winogrande"}  # keyed by the name as given; the old name still works
    r = res["ni_winogrande_029"]
    assert r["n"] == 6 and 0.0 <= r["acc"] <= 1.0
    assert r["acc"] == pytest.approx(sum(hand) / 6)
    assert r["acc_norm"] == r["acc"]  # shared continuation: normalisation cannot change the argmax
    assert res["bb:winogrande"] == r


def test_unknown_and_hub_tasks(tiny, tmp_path, monkeypatch):
    """Unknown names list the offline tasks; a hub task that cannot reach the hub says so (hub forced offline)."""
    import datasets
    import huggingface_hub

    model, tok = tiny
    with pytest.raises(BaseqError, match=r"unknown task 'no_such_task_xyz'.*piqa, arc_easy.*bb_siqa, ni_winogrande_029"):
        zero_shot(model, tok, ["no_such_task_xyz"], tasks_dir=tmp_path, limit=2)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(BaseqError, match="'piqa' needs its dataset from the Hugging Face hub"):
        zero_shot(model, tok, ["lmeval:piqa"], tasks_dir=tmp_path, limit=2)


def test_missing_tasks_dir_is_user_error(tiny, tmp_path):
    model, tok = tiny
    with pytest.raises(BaseqError, match="BIG-bench tasks folder .* not found"):
        zero_shot(model, tok, ["bb_siqa"], tasks_dir=tmp_path / "absent", limit=2)


# ------------------------------------------------------------------------------------------ fetching


def make_sdist(path: Path, skip: str | None = None) -> dict[str, bytes]:
    contents = {}
    with tarfile.open(path, "w:gz") as tf:
        for name in ["README.md"] + [bigbench._TASKS_ROOT + t.member for t in bigbench.TASKS.values()]:
            if skip and name.endswith(skip):
                continue
            data = json.dumps({"examples": [], "file": name}).encode()
            info = tarfile.TarInfo("bigbench-1.0.0/" + name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
            contents[name] = data
    return contents


def test_fetch_from_archive(tmp_path, monkeypatch):
    archive = tmp_path / "bigbench-1.0.0.tar.gz"
    contents = make_sdist(archive)
    for name, t in list(bigbench.TASKS.items()):
        sha = hashlib.sha256(contents[bigbench._TASKS_ROOT + t.member]).hexdigest()
        monkeypatch.setitem(bigbench.TASKS, name, dataclasses.replace(t, sha256=sha))
    dest = tmp_path / "cache" / "bigbench"
    assert bigbench.fetch_bigbench(dest, archive=archive, quiet=True) == dest
    assert sorted(p.name for p in dest.iterdir()) == sorted(t.filename for t in bigbench.TASKS.values())
    assert (dest / "social_iqa.json").read_bytes() == contents[bigbench._TASKS_ROOT + "social_iqa/task.json"]
    assert [p.name for p in dest.parent.iterdir()] == ["bigbench"]  # no temp dirs left
    # already complete: nothing to do even without an archive
    assert bigbench.fetch_bigbench(dest, quiet=True) == dest


def test_fetch_checks_archive(tmp_path):
    archive = tmp_path / "bigbench-1.0.0.tar.gz"
    make_sdist(archive)
    dest = tmp_path / "cache" / "bigbench"
    with pytest.raises(BaseqError, match="sha256 mismatch"):  # synthetic files are not the real ones
        bigbench.fetch_bigbench(dest, archive=archive, quiet=True)
    assert not dest.exists() and list(dest.parent.iterdir()) == []
    make_sdist(archive, skip="physical_intuition/task.json")
    with pytest.raises(BaseqError, match="lacks .*physical_intuition/task.json"):
        bigbench.fetch_bigbench(dest, archive=archive, quiet=True)
    write(archive, "not a tarball")
    with pytest.raises(BaseqError, match="cannot read archive"):
        bigbench.fetch_bigbench(dest, archive=archive, quiet=True)
    with pytest.raises(BaseqError, match="not found"):
        bigbench.fetch_bigbench(dest, archive=tmp_path / "missing.tar.gz", quiet=True)


@pytest.mark.integration
@needs_shared
def test_real_model_siqa_small():
    """Real SmolLM2-135M on the first 40 BIG-bench SIQA items: a sane accuracy (chance is 1/3)."""
    from baseq.models.loading import load_model

    model, tok = load_model("smollm2-135m")
    r = zero_shot(model, tok, ["bb_siqa"], tasks_dir=SHARED, limit=40)["bb_siqa"]
    assert r["n"] == 40 and 0.15 <= r["acc_norm"] <= 0.7
