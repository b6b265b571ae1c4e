"""Which baseq a benchmark measures: the checkout its script sits in, put first on ``sys.path`` on import (else an
editable install of another checkout — e.g. main, while the script runs from a worktree — would be imported), unless
``PYTHONPATH`` names one on purpose (old-against-new comparisons: ``PYTHONPATH=<old checkout> python
benchmarks/x.py``). Child processes get the same choice (:func:`child_env`), and each result can say which commit
ran (:func:`code_version`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if not os.environ.get("PYTHONPATH"):
    sys.path.insert(0, str(REPO))


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a ``python -m baseq`` child: this process's baseq (``PYTHONPATH``), plus ``extra``."""
    return {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH") or str(REPO), **extra}


def code_version() -> str:
    """The commit of the checkout whose baseq this process imported (``-dirty`` when its files differ from it)."""
    import baseq

    root = str(Path(baseq.__file__).resolve().parents[1])
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"? ({root})"
    return head + ("-dirty" if dirty else "")
