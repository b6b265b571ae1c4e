"""Small file helpers shared by the CLI and the evaluation modules: JSON read with one-line errors, atomic write."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

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


def write_json(path: str | Path, payload: Any) -> None:
    """Write atomically: a temp file beside the target, renamed into place."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
