"""Load a causal LM and its tokenizer from an asset name, a local HF folder, a local .gguf file or a hub id.

GGUF files are read by transformers (``gguf_file=``) and dequantized; for named assets the converted model is kept
as a plain safetensors folder in the cache, so the (slow) GGUF conversion happens once. Folders written by
``baseq quantize`` are loaded by :mod:`baseq.runtime`; :func:`baseq.load.load` dispatches between the two.
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
from pathlib import Path

import torch

from .. import assets
from ..errors import BaseqError
from ..io import atomic_dir, files_digest

DEFAULT_MODEL = "smollm2-135m"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise BaseqError(f"unknown dtype '{dtype}' (choose from {', '.join(DTYPES)})")
    return DTYPES[dtype]


def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def check_full_precision(folder: Path, lazy: bool = False) -> None:
    """Refuse a folder whose weights are stored quantized, before transformers tries to load it (which would ask
    for optimum or bitsandbytes, or take the codes for weights). FP8 checkpoints load eagerly: transformers
    dequantizes them; read block by block (``lazy``) they would not be."""
    import json

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return  # loading says what is wrong with it
    q = config.get("quantization_config") if isinstance(config, dict) else None  # (GPTQ, AWQ, bnb, FP8, ...)
    method = None if not q else str((q.get("quant_method") if isinstance(q, dict) else None) or "unknown")
    if method is None or method == "fp8" and not lazy:
        return
    how = ("read it without --lazy (transformers dequantizes FP8 when it loads the whole model)" if method == "fp8"
           else "baseq quantizes a full-precision (or bf16 / fp16) checkpoint: use the model's unquantized release")
    raise BaseqError(f"'{folder}' is quantized already (quant_method={method}): {how}")


def source_digest(spec: str) -> str:
    """A cheap identity of a model source, for resuming: an asset's sha256; a local folder or file's
    :func:`~baseq.io.files_digest` (its files, not its path); a hub id as given."""
    if spec in assets.ASSETS:
        return assets.get_asset(spec).sha256[:16]
    return files_digest(spec) if Path(spec).expanduser().exists() else spec


def check_vocab(where: str, tokenizer, rows: int) -> None:
    """Refuse a tokenizer whose base vocabulary is larger than the embedding (its ids would index past the table).
    Added special tokens are not counted: converting a GGUF tokenizer may add one the model never sees."""
    n = getattr(tokenizer, "vocab_size", None) or len(tokenizer)
    if n > rows:
        raise BaseqError(f"'{where}': its tokenizer has {n:,} tokens but the model's embedding only {rows:,} rows: "
                         f"the tokenizer belongs to another model")


def load_tokenizer(source: str | Path, rows: int, where: str | None = None, **kwargs):
    """The tokenizer of a model folder (or GGUF file: ``gguf_file=``) whose embedding has ``rows`` rows; a missing or
    broken one, or one of another model, is one error line naming ``where``."""
    from transformers import AutoTokenizer

    where = where or str(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception as e:  # noqa: BLE001 - missing or broken tokenizer files, in many types
        first = str(e).strip().splitlines()[0].rstrip(": ") if str(e).strip() else type(e).__name__
        raise BaseqError(f"'{where}': its tokenizer does not load (tokenizer.json / tokenizer.model missing or "
                         f"broken?): {first}") from None
    check_vocab(where, tokenizer, rows)
    return tokenizer


def _from_pretrained(source: str, dtype: torch.dtype, **kwargs):
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    where = str(Path(source) / kwargs["gguf_file"]) if "gguf_file" in kwargs else source
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except KeyError as e:  # a GGUF (or config) without a field transformers needs
        raise BaseqError(f"'{where}' is not a loadable causal language model: missing key {e}") from None
    except ValueError as e:  # transformers' way of saying "not a causal LM / unknown architecture"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BaseqError(f"'{where}' is not a loadable causal language model: {first}") from None
    tokenizer = load_tokenizer(source, model.get_input_embeddings().num_embeddings, where, **kwargs)
    if getattr(model.config, "quantization_config", None) is not None and "gguf_file" in kwargs:
        del model.config.quantization_config  # the weights are dequantized now
        model.hf_quantizer = None
        model.is_quantized = False
    return model.eval(), tokenizer


def _local(source: str, dtype: torch.dtype, label: str, **kwargs):
    """_from_pretrained for a local folder or .gguf file: a broken one (bad config.json, missing or corrupt weights,
    bad tokenizer) raises OSError, SafetensorError, validation errors... all of them the user's input."""
    try:
        return _from_pretrained(source, dtype, **kwargs)
    except BaseqError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers/safetensors/gguf raise many types for a broken input
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise BaseqError(f"'{label}' is not a loadable causal language model: {type(e).__name__}: {first}") from None


def _gguf(path: Path, dtype: torch.dtype):
    return _local(str(path.parent), dtype, str(path), gguf_file=path.name)


def asset_folder(name: str) -> Path:
    """Where the converted (full-precision safetensors) copy of a model asset lives in the cache."""
    return assets.cache_dir() / "models" / f"{name}-{assets.get_asset(name).sha256[:12]}"


def _convert(gguf: Path, folder: Path) -> None:
    """Dequantize ``gguf`` with transformers and save it as an fp32 safetensors folder. Measured on the 2-core box:
    SmolLM2-135M ~10 s; Gemma 3 270M ~1 min (mostly its 262k-token tokenizer), peak RSS 3.2 GB; Qwen2.5 1.5B
    ~1.6 min, peak RSS 8.8 GB, 7.1 GB on disk (untied head). The model is freed before the folder is read back,
    so the two copies never coexist."""
    model, tokenizer = _gguf(gguf, torch.float32)
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _asset_model(name: str, dtype: torch.dtype):
    gguf = assets.fetch(name)
    folder = asset_folder(name)
    if not (folder / "config.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        say = lambda msg: print(f"baseq: {msg}", file=sys.stderr)  # noqa: E731
        with assets.locked(folder.parent, say):  # one conversion at a time; stale leftovers are ours to remove
            if not (folder / "config.json").is_file():
                for stale in folder.parent.glob(f".{folder.name}.*"):  # of a conversion that was killed
                    shutil.rmtree(stale, ignore_errors=True)
                say(f"converting asset '{name}' to a full-precision safetensors folder (once): {folder}")
                _convert(gguf, folder)
                gc.collect()
    return _from_pretrained(str(folder), dtype)


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick check before any hub download (which would otherwise retry for ~20 s): False when the hub is
    switched off (``HF_HUB_OFFLINE``) or its endpoint does not accept a connection within ``timeout`` seconds."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


def _hub(spec: str, dtype: torch.dtype):
    try:
        return _from_pretrained(spec, dtype, local_files_only=True)
    except (OSError, BaseqError):
        pass
    if not hub_reachable():
        raise BaseqError(f"'{spec}' is no local folder or file, and no Hugging Face hub is reachable to look it up "
                         f"as a hub id")
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    try:
        return _from_pretrained(spec, dtype)
    except OSError as e:
        raise BaseqError(f"could not load '{spec}' from the Hugging Face hub (is it reachable?): "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None


# An eager ``quantize`` peaks at about twice the model's weights plus the process: measured (fp32, 32 × 512
# calibration tokens, 2 cores) SmolLM2-135M 2.4 GB for 0.54 GB of weights, Qwen2.5-1.5B 14.2 GB for 7.1 GB (its
# SpinQuant training 15.2 GB), which this estimate puts at 2.6 and 15.7 GB.
EAGER_OVERHEAD = 3 * 2**29  # 1.5 GiB: Python, torch and transformers, the calibration windows and their activations


def _weight_count(path: Path, gguf_bound: int | None) -> int | None:
    """Weights in a safetensors folder or a GGUF file, from headers; for a GGUF file no more than ``gguf_bound``
    by its size (≥ 2 bits a weight) is taken as is, since its tensor table sits behind the tokenizer (a 12 s read
    for Gemma 3's)."""
    from math import prod

    from ..io import safetensors_header

    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            return None
        return sum(prod(e["shape"]) for f in files for e in safetensors_header(f)[0].values())
    if path.is_file() and path.suffix.lower() == ".gguf":
        bound = path.stat().st_size * 4
        if gguf_bound is not None and bound <= gguf_bound:
            return bound
        import gguf

        return sum(int(t.n_elements) for t in gguf.GGUFReader(path).tensors)
    return None


def eager_peak(spec: str, dtype="float32", have: int | None = None, copies: int = 2) -> int | None:
    """Estimated peak bytes of working on ``spec`` with the whole model in memory — ``copies`` times its weights at
    ``dtype`` plus :data:`EAGER_OVERHEAD`: 2 for ``quantize``, 1 for an evaluation (measured at 1.5B: 7.4 GB for 7.1
    GB of weights) — read from file headers without loading it; None for a hub id or an unreadable source (loading
    says why). ``have``: the bytes available, so that a GGUF file whose size already shows that it fits is not
    parsed."""
    size = torch.empty((), dtype=resolve_dtype(dtype)).element_size()
    path = Path(spec).expanduser()
    if spec in assets.ASSETS:
        if not assets.ASSETS[spec].filename.endswith(".gguf"):
            return None
        path = asset_folder(spec) if (asset_folder(spec) / "config.json").is_file() else assets.fetch(spec)
    bound = None if have is None else max(0, (have - EAGER_OVERHEAD) // (copies * size))
    try:
        n = _weight_count(path, bound)
    except Exception:  # noqa: BLE001 - a broken file: loading it says what is wrong, in one line
        return None
    return None if n is None else copies * n * size + EAGER_OVERHEAD


def load_model(spec: str = DEFAULT_MODEL, dtype="float32", device="cpu"):
    """(model, tokenizer) for ``spec``: an asset name, a local folder, a local .gguf file, or a hub id."""
    dtype = resolve_dtype(dtype)
    path = Path(spec).expanduser()
    if spec in assets.ASSETS:
        if not assets.ASSETS[spec].filename.endswith(".gguf"):
            raise BaseqError(f"asset '{spec}' is not a model")
        model, tokenizer = _asset_model(spec, dtype)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise BaseqError(f"'{spec}' is a folder without config.json: not a Hugging Face model folder")
        check_full_precision(path)
        model, tokenizer = _local(str(path), dtype, spec)
    elif path.is_file():
        if path.suffix.lower() != ".gguf":
            raise BaseqError(f"'{spec}' is a file but not a .gguf model")
        model, tokenizer = _gguf(path, dtype)
    elif spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        model, tokenizer = _hub(spec, dtype)
    else:
        known = ", ".join(n for n, a in assets.ASSETS.items() if a.filename.endswith(".gguf"))
        raise BaseqError(f"unknown model '{spec}': not a model asset ({known}), an existing path, or a hub id")
    return model.to(device), tokenizer
