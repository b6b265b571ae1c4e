"""Offline zero-shot multiple-choice tasks parsed from BIG-bench JSON task files.

The files come unchanged from the ``bigbench==1.0.0`` source archive on the package registry
(``bigbench/benchmark_tasks/...``); :func:`fetch_bigbench` extracts the four we use into
``$BASEQ_CACHE/bigbench/`` (the default tasks folder). Any folder holding the same file names works too
(``tasks_dir=``).

Tasks (:data:`TASKS`) and what one item looks like. The names say where each comes from: ``bb_`` a BIG-bench task,
``ni_`` a Natural-Instructions subtask shipped inside BIG-bench (with its number). Until the standard suite
(:mod:`baseq.eval.standard`) took over ``siqa`` and ``winogrande``, these were called ``siqa``, ``winogrande``,
``science_qa``, ``physical_intuition`` (:data:`OLD_NAMES`; still accepted as ``bb:siqa`` etc.). Note that
``ni_winogrande_029`` is *not* the WinoGrande validation set the papers report: it is built from the twin pairs of
subtask 029.

=========================  ==============================  ============================================
name                       file                            items
=========================  ==============================  ============================================
``bb_siqa``                social_iqa.json                 1,954 questions, 3 options (a few have 2)
``ni_winogrande_029``      winogrande_full_object.json     2 fill-in-the-blank items per twin pair (8,998)
``ni_science_qa_047``      science_qa.json                 251 questions, (A)-(D) options (a few A-C)
``bb_physical_intuition``  physical_intuition.json         81 questions, 2-5 options
=========================  ==============================  ============================================

Two item kinds, both plain dicts (JSON-serialisable, so they can be written as jsonl for lm-eval):

* ``"choice"`` items ``{"context": str, "choices": [str, ...], "gold": int}``: the model scores
  ``context + " " + choice`` for every choice (log-likelihood of the choice only). The context is
  ``"Question: <question>\\nAnswer:"`` and the choices carry no leading space (lm-eval's default
  ``target_delimiter=" "`` adds it).
* ``"partial"`` items (WinoGrande, "partial scoring" as in lm-eval's winogrande task)
  ``{"contexts": [str, str], "continuation": str, "gold": int}``: each option is substituted into the
  blank, ``contexts[i]`` is the sentence up to and including option *i*, ``continuation`` is the rest of
  the sentence after the blank (shared by both options, with its leading space) and the option whose
  context makes the continuation most likely wins. Both items of a pair list the options in the same
  order (Answer1, Answer2), so gold is 0 for "Sentence 1" and 1 for "Sentence 2".

Data quirks handled here (documented so numbers are comparable):

* WinoGrande sentences are lightly detokenized ("_ 's" -> "_'s", "word ." -> "word."), the answers lose
  their trailing period, and the one pair whose two answers are identical is skipped. If the blank
  starts the sentence the option is capitalised.
* science_qa: the options are split on the letters in order ``(A)``, ``(B)``, ... so a literal "(A)"
  inside an option text stays in it. In the source every question ends with "?" glued to the last option,
  which *replaced* that option's last character ("vibrating ai?" for "vibrating air"): the "?" is removed,
  the lost character cannot be recovered (a last option left empty, once, is dropped when it is not the
  answer). Trailing periods of options are removed.
* ``target_scores`` tasks: gold is the single option with the highest score (ties are an error).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..assets import cache_dir, sha256_file
from ..errors import BaseqError
from ..io import atomic_dir, read_json

SDIST = "bigbench==1.0.0"
_TASKS_ROOT = "bigbench/benchmark_tasks/"  # inside the sdist, below its top folder "bigbench-1.0.0/"

Item = dict[str, Any]


class _BadExample(ValueError):
    """Raised by a parser for one example; turned into a BaseqError naming file and index."""


# --------------------------------------------------------------------------------------------- parsers


def _question_context(question: str) -> str:
    return f"Question: {' '.join(question.split())}\nAnswer:"


def parse_target_scores(data: dict) -> list[Item]:
    """BIG-bench "json" tasks with ``input`` + ``target_scores`` (social_iqa, physical_intuition)."""
    items = []
    for i, ex in enumerate(_examples(data)):
        try:
            question = ex["input"]
            scores = ex["target_scores"]
            if not isinstance(question, str) or not isinstance(scores, dict) or len(scores) < 2:
                raise _BadExample(i, "needs a string 'input' and a 'target_scores' object with >= 2 options")
            choices = [str(c).strip() for c in scores]
            values = [float(v) for v in scores.values()]
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, _BadExample):
                raise
            raise _BadExample(i, f"missing or bad field ({e})") from None
        best = max(values)
        if values.count(best) != 1:
            raise _BadExample(i, "no single best option in 'target_scores'")
        items.append({"context": _question_context(question), "choices": choices, "gold": values.index(best)})
    return items


_PAIR = re.compile(
    r"^\s*Sentence 1:\s*(?P<s1>.*?)\s*Answer1:\s*(?P<a1>.*?)\s*Sentence 2:\s*(?P<s2>.*?)\s*Answer2:\s*(?P<a2>.*?)\s*$",
    re.S,
)


def _detok(s: str) -> str:
    s = " ".join(s.split())
    s = re.sub(r" ([.,;:!?])", r"\1", s)
    s = re.sub(r"(\w|_) '(s|re|ve|ll|d|t|m)\b", r"\1'\2", s)
    return s


def _answer(a: str) -> str:
    return a.strip().rstrip(".").strip()


def _blank_item(sentence: str, options: list[str], gold: int) -> Item:
    idx = sentence.index("_")
    if idx == 0:
        options = [o[:1].upper() + o[1:] for o in options]
    return {"contexts": [sentence[:idx] + o for o in options], "continuation": sentence[idx + 1:], "gold": gold}


def parse_winogrande_pairs(data: dict) -> list[Item]:
    """natural_instructions subtask029 (WinoGrande twin pairs) -> two partial-scoring items per pair."""
    items = []
    for i, ex in enumerate(_examples(data)):
        try:
            text = ex["target"][0]
        except (KeyError, IndexError, TypeError):
            raise _BadExample(i, "needs a non-empty 'target' list") from None
        m = _PAIR.match(text) if isinstance(text, str) else None
        if not m:
            raise _BadExample(i, "target[0] is not 'Sentence 1: ... Answer1: ... Sentence 2: ... Answer2: ...'")
        s1, s2 = _detok(m["s1"]), _detok(m["s2"])
        a1, a2 = _answer(m["a1"]), _answer(m["a2"])
        if s1.count("_") != 1 or s2.count("_") != 1:
            raise _BadExample(i, "each sentence needs exactly one blank '_'")
        if not a1 or not a2:
            raise _BadExample(i, "empty answer")
        if a1.lower() == a2.lower():
            continue  # both answers identical: the item cannot discriminate (one pair in the real file)
        items.append(_blank_item(s1, [a1, a2], 0))
        items.append(_blank_item(s2, [a1, a2], 1))
    return items


def parse_lettered_options(data: dict) -> list[Item]:
    """natural_instructions subtask047: "Question: ... (A) .. (B) .. (C) .. (D) ..?" with target like "D."."""
    items = []
    for i, ex in enumerate(_examples(data)):
        try:
            text, target = ex["input"], ex["target"]
            if isinstance(target, list):
                target = target[0]
        except (KeyError, IndexError, TypeError):
            raise _BadExample(i, "needs 'input' and 'target'") from None
        if not isinstance(text, str) or not isinstance(target, str):
            raise _BadExample(i, "'input' and 'target' must be strings")
        text = re.sub(r"^\s*Question:\s*", "", text)
        # split on (A), (B), ... in order
        starts, pos = [], 0
        for k in range(26):
            marker = f"({chr(ord('A') + k)})"
            j = text.find(marker, pos)
            if j < 0:
                break
            starts.append(j)
            pos = j + len(marker)
        if len(starts) < 2:
            raise _BadExample(i, "needs at least options (A) and (B)")
        question = text[: starts[0]].strip()
        bounds = starts[1:] + [len(text)]
        choices = [text[s + 3: e].strip() for s, e in zip(starts, bounds)]
        choices[-1] = choices[-1].removesuffix("?").strip()  # "?" glued to the last option (see module doc)
        choices = [c.rstrip(".").strip() for c in choices]
        letter = target.strip().rstrip(".").strip().strip("()").upper()
        if len(letter) != 1 or not "A" <= letter <= chr(ord("A") + len(choices) - 1):
            raise _BadExample(i, f"target {target!r} is not one of the option letters")
        gold = ord(letter) - ord("A")
        if not choices[-1] and gold != len(choices) - 1 and len(choices) > 2:
            choices.pop()  # the last option was a single character, eaten by the glued "?" (one item)
        if not question or not all(choices):
            raise _BadExample(i, "empty question or option")
        items.append({"context": _question_context(question), "choices": choices, "gold": gold})
    return items


def _examples(data: dict) -> list:
    ex = data.get("examples") if isinstance(data, dict) else None
    if not isinstance(ex, list) or not ex:
        raise _BadExample(None, "no 'examples' list")
    return ex


# --------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class BigBenchTask:
    name: str
    filename: str  # file name in the tasks folder
    member: str  # path below bigbench/benchmark_tasks/ in the sdist
    sha256: str  # of the unchanged file from bigbench==1.0.0
    parser: Callable[[dict], list[Item]]
    kind: str  # "choice" or "partial" (see module doc)
    description: str = ""


TASKS: dict[str, BigBenchTask] = {
    t.name: t
    for t in (
        BigBenchTask("bb_siqa", "social_iqa.json", "social_iqa/task.json",
                     "edc9f568b70ae6d4af0783764dbe4e4f18aa1242c675a93f534338d73a565348",
                     parse_target_scores, "choice", "Social IQa (3 options)"),
        BigBenchTask("ni_winogrande_029", "winogrande_full_object.json",
                     "natural_instructions/subtask029_winogrande_full_object/task.json",
                     "0b50034573d26f63b0b270ac6229ea3535fe4981cb98a8af4c3e184f1635fda2",
                     parse_winogrande_pairs, "partial", "WinoGrande twin pairs, fill-in-the-blank (2 options)"),
        BigBenchTask("ni_science_qa_047", "science_qa.json",
                     "natural_instructions/subtask047_misc_answering_science_questions/task.json",
                     "c58abd303b912f0d15aa16cc76a232b05c0caefda0439b6166bfa5fd4e90695f",
                     parse_lettered_options, "choice", "grade-school science questions (4 options)"),
        BigBenchTask("bb_physical_intuition", "physical_intuition.json", "physical_intuition/task.json",
                     "dd1e8e8fe97e08d064788eed8fb0f1bd13013d5fa028617bdf418685f4ca726f",
                     parse_target_scores, "choice", "physical reasoning questions (2-5 options)"),
    )
}


# the names these tasks had before the standard suite (baseq.eval.standard) took "siqa" and "winogrande"; usable
# with the "bb:" prefix (and bare where no standard task has the name)
OLD_NAMES = {"siqa": "bb_siqa", "winogrande": "ni_winogrande_029", "science_qa": "ni_science_qa_047",
             "physical_intuition": "bb_physical_intuition"}


def get_task(name: str) -> BigBenchTask:
    if name not in TASKS:
        raise BaseqError(f"unknown BIG-bench task '{name}' (known: {', '.join(TASKS)})")
    return TASKS[name]


def default_tasks_dir() -> Path:
    return cache_dir() / "bigbench"


def parse_file(path: str | Path, parser: Callable[[dict], list[Item]]) -> list[Item]:
    """Parse one task file; every problem becomes a BaseqError naming the file."""
    path = Path(path)
    data = read_json(path, "task file")
    try:
        return parser(data)
    except _BadExample as e:
        index, why = e.args
        where = f"example {index}" if index is not None else "file"
        raise BaseqError(f"task file {path}: {where}: {why}") from None


def load_items(name: str, tasks_dir: str | Path | None = None, limit: int | None = None) -> list[Item]:
    """Items of offline task ``name`` (first ``limit`` of them, in file order) from ``tasks_dir``.

    ``tasks_dir`` defaults to :func:`default_tasks_dir` (filled by :func:`fetch_bigbench`).
    """
    task = get_task(name)
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0):
        raise BaseqError(f"limit must be a positive integer, got {limit!r}")
    folder = Path(tasks_dir) if tasks_dir is not None else default_tasks_dir()
    path = folder / task.filename
    if not folder.is_dir():
        hint = "run `baseq data bigbench` to fetch the task files" if tasks_dir is None else "check --tasks-dir"
        raise BaseqError(f"BIG-bench tasks folder {folder} not found ({hint})")
    if not path.is_file():
        hint = "run `baseq data bigbench` to fetch it" if tasks_dir is None else "check --tasks-dir"
        raise BaseqError(f"task file {path} for task '{name}' not found ({hint})")
    items = parse_file(path, task.parser)
    if not items:
        raise BaseqError(f"task file {path} holds no usable items")
    return items[:limit] if limit is not None else items


# --------------------------------------------------------------------------------------------- fetching


def _pip_download_sdist(dest: Path, quiet: bool) -> Path:
    """``pip download`` the bigbench sdist into ``dest``; returns the archive path."""
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
            "-d", str(dest), SDIST]
    extra = shlex.split(os.environ.get("BASEQ_PIP_ARGS", ""))
    said = ""
    # pip prepares the sdist's metadata; if build isolation cannot fetch setuptools, use the installed one
    for flags in ([], ["--no-build-isolation"]):
        # not quiet: pip's own progress bar and messages go to the terminal
        proc = subprocess.run(base + flags + extra + (["--quiet"] if quiet else []), text=True,
                              stdout=subprocess.PIPE if quiet else sys.stderr,
                              stderr=subprocess.PIPE if quiet else None)
        archives = sorted(dest.glob("bigbench-*.tar.gz")) + sorted(dest.glob("bigbench-*.zip"))
        if proc.returncode == 0 and archives:
            return archives[0]
        lines = ((proc.stderr or "") or (proc.stdout or "")).strip().splitlines()
        said = lines[-1] if lines else f"pip exited with status {proc.returncode}"
    raise BaseqError(f"could not download the {SDIST} source archive from the package registry"
                     + (f": {said}" if said else ""))


def extract_tasks(archive: str | Path, dest: Path, verify: bool = True) -> list[Path]:
    """Extract the :data:`TASKS` files from a bigbench sdist (``.tar.gz`` or ``.zip``) into folder ``dest``."""
    archive = Path(archive)
    wanted = {_TASKS_ROOT + t.member: t for t in TASKS.values()}
    found: dict[str, Path] = {}

    def member_key(name: str) -> str | None:
        # strip the sdist's top folder ("bigbench-1.0.0/")
        rest = name.split("/", 1)[1] if "/" in name else name
        return rest if rest in wanted else None

    try:
        if archive.name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                for name in zf.namelist():
                    if (key := member_key(name)) and key not in found:
                        out = dest / wanted[key].filename
                        with zf.open(name) as src, open(out, "wb") as dst:
                            while chunk := src.read(1 << 20):
                                dst.write(chunk)
                        found[key] = out
        else:
            with tarfile.open(archive, "r:*") as tf:
                for m in tf:  # streamed: one pass over the archive
                    if m.isfile() and (key := member_key(m.name)) and key not in found:
                        src = tf.extractfile(m)
                        out = dest / wanted[key].filename
                        with src, open(out, "wb") as dst:
                            while chunk := src.read(1 << 20):
                                dst.write(chunk)
                        found[key] = out
                        if len(found) == len(wanted):
                            break
    except FileNotFoundError:
        raise BaseqError(f"archive {archive} not found") from None
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as e:
        raise BaseqError(f"cannot read archive {archive}: {e}") from None
    missing = [k for k in wanted if k not in found]
    if missing:
        raise BaseqError(f"archive {archive.name} lacks {', '.join(missing)}")
    if verify:
        for key, out in found.items():
            got = sha256_file(out)
            if got != wanted[key].sha256:
                raise BaseqError(f"sha256 mismatch for {key} in {archive.name}: expected {wanted[key].sha256}, got {got}")
    return list(found.values())


def fetch_bigbench(dest: str | Path | None = None, archive: str | Path | None = None, quiet: bool = False,
                   force: bool = False) -> Path:
    """Folder holding the four task files; downloads ``bigbench==1.0.0``'s source archive on first use.

    ``dest`` defaults to ``$BASEQ_CACHE/bigbench`` (:func:`default_tasks_dir`). ``archive`` uses an already
    downloaded sdist instead of calling ``pip download --no-deps --no-binary :all: bigbench==1.0.0`` (about
    360 MB; ``$BASEQ_PIP_ARGS`` adds arguments to pip). Only the needed files are extracted and checked
    (sha256) in a temporary folder beside ``dest``, which is then renamed into place, so ``dest`` is either
    complete or absent. Nothing is done when ``dest`` already holds all files (unless ``force``).
    """
    dest = Path(dest) if dest is not None else default_tasks_dir()
    if not force and dest.is_dir() and all((dest / t.filename).is_file() for t in TASKS.values()):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".bigbench-") as tmp:
        tmp = Path(tmp)
        if archive is None:
            if not quiet:
                print(f"baseq: downloading the {SDIST} source archive (~360 MB) from the package registry",
                      file=sys.stderr)
            (tmp / "dl").mkdir()
            archive = _pip_download_sdist(tmp / "dl", quiet)
        elif not Path(archive).is_file():
            raise BaseqError(f"archive {archive} not found")
        with atomic_dir(dest) as out:  # an incomplete or forced dest is replaced only once extraction succeeded
            extract_tasks(archive, out)
    if not quiet:
        print(f"baseq: BIG-bench task files in {dest}", file=sys.stderr)
    return dest


# --------------------------------------------------------------------------------------------- CLI adapter


def add_bigbench_args(parser) -> None:
    """Arguments of ``baseq data bigbench``."""
    parser.add_argument("--dest", default=None, help="target folder (default: $BASEQ_CACHE/bigbench)")
    parser.add_argument("--archive", default=None, help="use this already downloaded bigbench-1.0.0 sdist")
    parser.add_argument("--force", action="store_true", help="extract again even if the files are there")


def bigbench_main(args) -> int:
    """``baseq data bigbench``: fetch the task files, print the folder and the item counts."""
    dest = fetch_bigbench(getattr(args, "dest", None), archive=getattr(args, "archive", None),
                          force=bool(getattr(args, "force", False)))
    for name in TASKS:
        print(f"{name:20s} {len(load_items(name, dest)):6d} items")
    print(dest)
    return 0
