"""What a folder written by ``baseq quantize`` is: format names and its ``baseq.json`` (tensors are read with
:func:`baseq.io.read_safetensors`).

Every problem with a saved folder (a missing or malformed ``baseq.json``, a missing field, an unknown format
version, a truncated or corrupt weights file, shapes that do not match) becomes one :class:`BaseqError` naming the
file and what is wrong.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import BaseqError
from ..io import check_parent, clear_leftovers

PACKED_FORMAT = "baseq-packed/1"
FAKE_FORMAT = "baseq-fake-quant/2"
FAKE_FORMAT_V1 = "baseq-fake-quant/1"
FORMATS = (PACKED_FORMAT, FAKE_FORMAT, FAKE_FORMAT_V1)
META = "baseq.json"


def is_saved_folder(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / META).is_file()


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Fail before any work when ``out`` cannot become the output folder (missing parent folders are created when
    it is written). What a run killed outright left beside it is cleared first (:func:`~baseq.io.clear_leftovers`:
    its temporary folder, or the previous folder it was replacing, put back)."""
    out = Path(out)
    clear_leftovers(out)
    if out.exists() and not out.is_dir():
        raise BaseqError(f"--out '{out}' exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise BaseqError(f"--out '{out}' exists and is not empty (pass --overwrite to replace it)")
    check_parent(out, "--out")


def read_meta(path: Path, required: tuple[str, ...] = ("format",)) -> dict:
    """The parsed ``baseq.json`` of a saved folder, with its format checked."""
    f = Path(path) / META
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except OSError as e:
        raise BaseqError(f"cannot read '{f}': {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise BaseqError(f"'{f}' is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise BaseqError(f"'{f}' must hold a JSON object")
    fmt = meta.get("format")
    if fmt not in FORMATS:
        raise BaseqError(f"'{f}' has format {fmt!r}; this baseq reads {', '.join(FORMATS)} "
                         f"(a newer baseq wrote it?)")
    missing = [k for k in required if k not in meta]
    if missing:
        raise BaseqError(f"'{f}' is missing the field(s) {', '.join(missing)}")
    return meta


def read_config(path: Path):
    """The transformers config of a saved folder; a missing or broken config.json is one error line."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - transformers raises several types for a bad or missing config.json
        raise BaseqError(f"'{Path(path) / 'config.json'}' is not a valid model config: {str(e).splitlines()[0]}") \
            from None


def save_model_files(model, tokenizer, folder: Path) -> None:
    """The HF files a saved folder carries beside its weights: ``config.json``, ``generation_config.json`` (its stop
    tokens: a chat model's end-of-turn ids often live only there) and the tokenizer."""
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def read_generation_config(model, path: Path) -> None:
    """Give ``model`` the saved folder's ``generation_config.json`` when it has one."""
    from transformers import GenerationConfig

    if (Path(path) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)


def model_record(meta: dict, **extra) -> dict:
    """What a loaded model says about itself (``model.baseq_config``): method, bits, and the code that made it
    when ``baseq.json`` records one."""
    return {"method": meta.get("method", "?"), "bits": meta.get("bits", "?"), **extra,
            **({"made_by": meta["made_by"]} if "made_by" in meta else {})}
