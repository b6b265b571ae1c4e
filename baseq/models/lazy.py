"""Lazily loaded models, for models larger than RAM: the skeleton in memory, each block read from disk when asked for.

:func:`open_lazy` reads a model's config and tokenizer and builds the model with no block weights (the decoder
blocks are templates on the ``meta`` device, costing nothing); only the ends (embedding, final norm, LM head,
rotary tables) are materialised. :meth:`LazyModel.load_block` then builds block ``i`` with its weights read from
the files, tensor by tensor:

* a Hugging Face folder with ``model.safetensors`` or shards + ``model.safetensors.index.json``: each shard
  memory-mapped (``safe_open``) only while its tensors of the block are copied out;
* a ``.gguf`` file (or a GGUF model asset): ``gguf``'s memory-mapped ``GGUFReader``; the block's tensors are
  dequantized one by one, with transformers' own GGUF name mapping and tensor fix-ups, so the values are exactly
  those of an eager ``from_pretrained(gguf_file=...)``.

The caller frees a block by dropping it (the model keeps the meta template).
"""

from __future__ import annotations

import copy
import mmap
import tempfile
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from .. import assets
from ..device import TABLE_ROWS, release_memory
from ..errors import BaseqError
from ..io import read_json, read_safetensors, write_safetensors
from .loading import resolve_dtype

INDEX = "model.safetensors.index.json"


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


class SafetensorsFiles:
    """The tensors of a folder's safetensors file(s), read by name."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        if (self.folder / INDEX).is_file():
            index = read_json(self.folder / INDEX, "safetensors index")
            try:
                self.where = {k: self.folder / v for k, v in index["weight_map"].items()}
            except (KeyError, AttributeError, TypeError):
                raise BaseqError(f"'{self.folder / INDEX}' has no valid weight_map") from None
        elif (self.folder / "model.safetensors").is_file():
            file = self.folder / "model.safetensors"
            with self._open(file, safe_open) as f:
                self.where = {k: file for k in f.keys()}
        else:
            raise BaseqError(f"'{self.folder}' has no safetensors weights (model.safetensors or {INDEX}): lazy "
                             f"loading reads those or a .gguf file")

    @staticmethod
    def _open(file: Path, safe_open):
        if not file.is_file():
            raise BaseqError(f"'{file}' is missing")
        try:
            return safe_open(str(file), framework="pt", device="cpu")
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a bad header
            raise BaseqError(f"'{file}' is truncated or corrupt ({_first_line(e)})") from None

    def keys(self) -> set[str]:
        return set(self.where)

    def read(self, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.where[n], []).append(n)
        out = {}
        for file, group in by_file.items():
            with self._open(file, safe_open) as f:
                for n in group:
                    try:
                        t = f.get_tensor(n)
                    except Exception as e:  # noqa: BLE001
                        raise BaseqError(f"'{file}': cannot read tensor {n} ({_first_line(e)})") from None
                    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):  # codes, not weights
                        raise BaseqError(f"'{file}': tensor {n} is stored as {str(t.dtype).replace('torch.', '')}, "
                                         f"not as float32 / float16 / bfloat16 weights (a quantized checkpoint?)")
                    out[n] = t.to(dtype)
        return out


class GGUFFiles:
    """The tensors of a GGUF file under their transformers names, dequantized when read."""

    def __init__(self, path: Path, skeleton: nn.Module):
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                              get_gguf_hf_weights_map, read_field)

        self.path = Path(path)
        self.reader = GGUFReader(str(path))  # memory-mapped; nothing is read until a tensor's data is touched
        arch = read_field(self.reader, "general.architecture")[0]
        self.processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=skeleton.config.to_dict())
        names = get_gguf_hf_weights_map(skeleton, self.processor)
        self.tensors = {names[t.name]: t for t in self.reader.tensors if t.name in names}

    def keys(self) -> set[str]:
        return set(self.tensors)

    def read(self, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        out = {}
        for n in names:
            t = self.tensors[n]
            try:
                if t.name.startswith("blk.") or len(t.data.shape) != 2 or t.data.shape[0] <= TABLE_ROWS:
                    out[n] = torch.from_numpy(np.array(self._convert(t, t.data), copy=True)).to(dtype)
                else:  # a table (embedding, LM head): whole rows at a time into the result, no full-size temporaries
                    out[n] = self._read_rows(t, dtype)
            except BaseqError:
                raise
            except Exception as e:  # noqa: BLE001 - a truncated file shows up here, as an IndexError or ValueError
                raise BaseqError(f"'{self.path}': cannot read tensor {t.name} ({_first_line(e)})") from None
            self.drop_pages()
        return out

    def _convert(self, t, data):
        """Rows ``data`` of GGUF tensor ``t`` dequantized, with transformers' fix-up for its name."""
        from gguf import dequantize

        return self.processor.process(weights=dequantize(data, t.tensor_type), name=t.name).weights

    def _read_rows(self, t, dtype: torch.dtype) -> torch.Tensor:
        """A 2-D end tensor read ``TABLE_ROWS`` rows at a time (a row of a quantized tensor is whole blocks), each
        part dequantized and fixed up alone and copied into its place: the 151,936 x 1,536 tables of a 1.5B model
        otherwise cost their fp32 size several times over in ``dequantize``'s temporaries. Transformers' fix-ups of
        the ends are per element (a norm's +1) or change the shape (GPT-2's transposed head); the latter is refused
        here rather than silently stitched wrongly."""
        out = None
        rows = t.data.shape[0]
        for start in range(0, rows, TABLE_ROWS):
            part = torch.from_numpy(np.ascontiguousarray(self._convert(t, t.data[start:start + TABLE_ROWS])))
            if out is None:
                out = torch.empty((rows, *part.shape[1:]), dtype=dtype)
            if part.shape[0] != min(TABLE_ROWS, rows - start) or part.shape[1:] != out.shape[1:]:
                raise BaseqError(f"'{self.path}': tensor {t.name} cannot be read by rows (its fix-up reshapes it)")
            out[start:start + part.shape[0]] = part
        return out

    def drop_pages(self) -> None:
        """Let go of the mapped file pages read so far: they would otherwise stay resident (and count in the
        process's RSS) until the end, adding up to the whole file over a run; the next read maps them again."""
        mapped = getattr(self.reader.data, "_mmap", None)  # numpy.memmap's mmap object
        if mapped is not None and hasattr(mmap, "MADV_DONTNEED"):
            try:
                mapped.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError):  # an advice only: without it the pages just stay
                pass


class LazyModel:
    """A causal LM whose decoder blocks stay on disk until :meth:`load_block`."""

    def __init__(self, model: nn.Module, files, dtype: torch.dtype, source: str):
        self.model, self.files, self.dtype, self.source = model, files, dtype, source
        self.templates = list(model.model.layers)  # weightless (meta) blocks; never materialised themselves
        self._load_ends()

    def __len__(self) -> int:
        return len(self.templates)

    def _read(self, wanted: dict[str, str]) -> dict[str, torch.Tensor]:
        """``{state name: file name}`` read from the files; a missing tensor is one clear error."""
        missing = sorted(f for f in wanted.values() if f not in self.files.keys())
        if missing:
            raise BaseqError(f"'{self.source}' lacks tensor(s) {', '.join(missing[:3])}"
                             + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
        tensors = self.files.read(list(wanted.values()), self.dtype)
        return {k: tensors[f] for k, f in wanted.items()}

    def _load_ends(self) -> None:
        model = self.model
        names = [k for k in model.state_dict() if not k.startswith("model.layers.")]
        tied = getattr(model.config, "tie_word_embeddings", False) or "lm_head.weight" not in self.files.keys()
        if tied:
            names.remove("lm_head.weight")
        model.load_state_dict(self._read({k: k for k in names}), strict=False, assign=True)
        if tied:
            model.lm_head.weight = model.model.embed_tokens.weight
        for p in model.parameters():
            p.requires_grad_(False)
        release_memory()  # the readers' temporary copies (dequantized tables) leave a fragmented heap behind

    @contextmanager
    def ends_parked(self, folder: Path | None = None) -> Iterator[None]:
        """Inside the block, the ends' weights (embedding, final norm, LM head: 1.8 GB in fp32 at 1.5B, a third of a
        lazy run's memory) wait in a file instead of RAM; they come back, bit for bit and owned (not mapped), when it
        ends, also on an error. For the block-by-block loop, which needs none of them (the blocks' inputs are
        captured before it). Parameters only: buffers (rotary tables, an online rotation's matrix) may be shared
        with the blocks. The file is ``folder/ends.safetensors``, written by this process alone (one folder per rank:
        :func:`park_folder`): one an interrupted run left there is replaced, and it goes at the end (the folder
        too, if then empty); without ``folder``, a temporary one."""
        params = [p for name, p in self.model.named_parameters()
                  if not name.startswith("model.layers.") and p.device.type == "cpu" and p.numel()]
        if not params:
            yield
            return
        if folder is None:
            with tempfile.TemporaryDirectory(prefix="baseq-ends-") as tmp, self.ends_parked(Path(tmp)):
                yield
            return
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "ends.safetensors"
        try:
            write_safetensors(path, lambda: ((str(k), p.data) for k, p in enumerate(params)))
            for p in params:
                p.data = torch.empty(0, dtype=p.dtype)
            release_memory()
            try:
                yield
            finally:
                state = read_safetensors(path)  # owned memory, not a map of the file
                for k, p in enumerate(params):
                    p.data = state[str(k)]
        finally:
            path.unlink(missing_ok=True)
            with suppress(OSError):  # only if empty: nothing else of the caller's goes
                folder.rmdir()

    def template(self, i: int) -> nn.Module:
        """Block ``i`` without weights (on the meta device), to build into."""
        return copy.deepcopy(self.templates[i])

    def blocks(self) -> Iterator[tuple[int, nn.Module]]:
        """``(i, block i)`` for every block in order, each read when asked for (for streamed evaluations)."""
        return ((i, self.load_block(i)) for i in range(len(self)))

    def load_block(self, i: int) -> nn.Module:
        """A new block ``i`` with its weights read from the files (CPU, the model dtype)."""
        layer = self.template(i)
        state = self._read({k: f"model.layers.{i}.{k}" for k in layer.state_dict()})
        layer.load_state_dict(state, strict=True, assign=True)
        for p in layer.parameters():
            p.requires_grad_(False)
        return layer.eval()


def park_folder(work_dir: Path, rank: int = 0) -> Path:
    """Where rank ``rank`` parks the ends of a lazy run in ``work_dir`` (:meth:`LazyModel.ends_parked`): a fixed
    name, so a resumed run reuses what an interrupted one left (1.8 GB at 1.5B) instead of adding to it."""
    return Path(work_dir) / f"ends.rank{rank}"


def open_lazy(spec: str, dtype="float32") -> tuple[LazyModel, object]:
    """(LazyModel, tokenizer) for an asset name, a local HF folder with safetensors weights, or a .gguf file."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .loading import _quiet_transformers, check_full_precision, check_vocab

    dtype = resolve_dtype(dtype)
    path = Path(spec).expanduser()
    if spec in assets.ASSETS and assets.ASSETS[spec].filename.endswith(".gguf"):
        path = assets.fetch(spec)
    if path.is_dir() and (path / "baseq.json").is_file():
        raise BaseqError(f"'{spec}' was written by baseq quantize: it is quantized already")
    if path.is_dir():
        check_full_precision(path, lazy=True)
        where, kwargs = str(path), {}
    elif path.is_file() and path.suffix.lower() == ".gguf":
        where, kwargs = str(path.parent), {"gguf_file": path.name}
    else:
        raise BaseqError(f"lazy loading reads a local Hugging Face folder with safetensors weights, a .gguf file or a "
                         f"model asset; '{spec}' is none of these")
    _quiet_transformers()
    try:
        config = AutoConfig.from_pretrained(where, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        with init_empty_weights():  # parameters on the meta device; buffers (rotary tables) real
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a broken folder or file
        raise BaseqError(f"'{spec}' is not a loadable causal language model: {_first_line(e)}") from None
    check_vocab(spec, tokenizer, config.vocab_size)
    try:
        files = GGUFFiles(path, model) if kwargs else SafetensorsFiles(path)
    except BaseqError:
        raise
    except Exception as e:  # noqa: BLE001
        raise BaseqError(f"'{spec}': cannot read its weights ({_first_line(e)})") from None
    return LazyModel(model.eval(), files, dtype, str(path)), tokenizer
