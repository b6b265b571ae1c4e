"""Small file helpers shared by the whole package: JSON read with one-line errors, and atomic writes.

Everything baseq writes for a user (quantized models, converted assets, results, checkpoints) goes through
:func:`atomic_path` (one file) or :func:`atomic_dir` (a folder): the content is written under a temporary name beside
its destination and renamed into place only when complete, so an interrupted or failed run never leaves a
half-written result behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import BaseqError


def read_json(path: str | Path, what: str = "file") -> Any:
    """Parsed JSON of ``path``; a missing, unreadable or malformed file becomes a BaseqError naming it."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise BaseqError(f"{what} {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BaseqError(f"cannot read {what} {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise BaseqError(f"{what} {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


@contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """A temporary file path beside ``dest`` to write; renamed onto ``dest`` when the block ends without error,
    deleted otherwise."""
    dest = Path(dest)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """A fresh temporary folder beside ``dest`` to fill; when the block ends without error it takes ``dest``'s
    place (an existing ``dest`` is removed only then), otherwise it is deleted and ``dest`` is left untouched."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.resolve().parent, prefix=f".{dest.name}.tmp-"))
    try:
        yield tmp
        if dest.exists():
            old = Path(tempfile.mkdtemp(dir=dest.resolve().parent, prefix=f".{dest.name}.old-"))
            os.replace(dest, old / "x")
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | Path, payload: Any) -> None:
    """Write ``payload`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
