"""One entry point for every model a user can name: ``load(spec)`` → (model, tokenizer).

A folder written by ``baseq quantize`` (it holds ``baseq.json``) is loaded by :mod:`baseq.runtime` — the packed
format as the integer runtime model, the fake-quant format as the simulated model; anything else (an asset name,
an HF folder, a .gguf file, a hub id) by :mod:`baseq.models.loading` as a full-precision model. This module sits
above both, so neither imports the other.
"""

from __future__ import annotations

from pathlib import Path

from .models.loading import DEFAULT_MODEL, load_model
from .runtime.format import is_saved_folder


def load(spec: str = DEFAULT_MODEL, dtype="float32", device="cpu"):
    if is_saved_folder(Path(spec).expanduser()):
        from .runtime.load import load_saved

        return load_saved(Path(spec).expanduser(), dtype=dtype, device=device)
    return load_model(spec, dtype=dtype, device=device)
