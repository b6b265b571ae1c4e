"""Which code made a result: baseq's version and a hash of its own sources (``0.1.0+3f2a…``), recorded in every
packed folder (``baseq.json``: ``made_by``), in the JSON reports of ``quantize``, ``eval`` and ``bench``, in each
calibrated block's log and in the resumable checkpoints — so a row can be traced to its code, and a run resumed
after the code changed says that its result mixes two versions (it is not refused: a bug fix between two halves
of a two-hour run is a fair reason to go on, but the folder must say so)."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from . import __version__

UNKNOWN = "unknown (written before baseq recorded its code)"


@functools.cache
def code_id() -> str:
    """``<version>+<first 12 hex digits of the sha256 of the package's .py files, by path>``."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return f"{__version__}+{h.hexdigest()[:12]}"


def mixed_code(saved: str | None, what: str) -> str | None:
    """One warning line if ``what`` (e.g. "blocks 0–5") was made by other code than this; None if by this code."""
    saved = saved or UNKNOWN
    if saved == code_id():
        return None
    return (f"warning: {what} were made by other baseq code ({saved}; this is {code_id()}): the result mixes "
            f"both — drop --resume to redo them")


def made_by(others: set[str] | None = None) -> dict:
    """The ``made_by`` record of a result: this code, and any other code whose resumed work it includes."""
    rest = sorted((others or set()) - {code_id()})
    return {"code": code_id(), **({"mixed_with": rest} if rest else {})}
