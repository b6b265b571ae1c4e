"""Small file helpers shared by the whole package: JSON read with one-line errors, and atomic writes.

Everything baseq writes for a user (quantized models, converted assets, results, checkpoints) goes through
:func:`atomic_path` (one file) or :func:`atomic_dir` (a folder): the content is written under a temporary name beside
its destination and renamed into place only when complete, so an interrupted or failed run never leaves a
half-written result behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import socket
import struct
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

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


def check_parent(path: Path, flag: str) -> None:
    """Fail when the folders above ``path`` can neither be found nor created (``mkdir -p``): the nearest existing
    ancestor must be a writable folder. Nothing is created here, so a run that fails later leaves nothing behind."""
    existing = Path(os.path.abspath(path)).parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise BaseqError(f"{flag} '{path}': '{existing}' is not a folder")
    if not os.access(existing, os.W_OK):
        raise BaseqError(f"{flag} '{path}': folder '{existing}' is not writable")


@contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """A temporary file path beside ``dest`` to write; renamed onto ``dest`` when the block ends without error,
    deleted otherwise."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _leftover_prefix(dest: Path, kind: str) -> str:
    """Temporary names beside ``dest`` carry this host and process, so a later run can tell a killed run's
    leftovers from a live run's work: ``.NAME.tmp-HOST.PID-XXXX`` (being written), ``.NAME.old-HOST.PID-XXXX``
    (the previous ``dest`` while it is being replaced)."""
    return f".{dest.name}.{kind}-{socket.gethostname()}.{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    return True


def clear_leftovers(dest: str | Path) -> None:
    """Tidy what a run killed outright (SIGKILL, power loss) left beside ``dest``: its temporary folder is removed,
    and if it died between moving the previous ``dest`` aside and putting the new one in place, the previous one
    is put back. Only this host's runs whose process is gone are touched; a live run's folders are left alone."""
    dest = Path(dest)
    parent = dest.resolve().parent
    if not parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(dest.name)}\.(tmp|old)-(.+)\.(\d+)-[^-.]+")
    host = socket.gethostname()
    for path in sorted(parent.iterdir(), key=lambda p: p.name.startswith(f".{dest.name}.tmp-")):  # old ones first
        m = pattern.fullmatch(path.name)
        if not m or m.group(2) != host or _alive(int(m.group(3))):
            continue
        if m.group(1) == "old" and (path / "x").exists() and not os.path.lexists(dest):
            os.replace(path / "x", dest)
            print(f"baseq: put '{dest}' back (a run replacing it was killed midway)", file=sys.stderr)
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """A fresh temporary folder beside ``dest`` to fill; when the block ends without error it takes ``dest``'s
    place (an existing ``dest`` is removed only then), otherwise it is deleted and ``dest`` is left untouched.
    Leftovers of a run killed outright are cleared first (:func:`clear_leftovers`)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    clear_leftovers(dest)
    parent = dest.resolve().parent
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=_leftover_prefix(dest, "tmp")))
    try:
        yield tmp
        if dest.exists():
            old = Path(tempfile.mkdtemp(dir=parent, prefix=_leftover_prefix(dest, "old")))
            os.replace(dest, old / "x")
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def files_digest(path: str | Path, edge: int = 1 << 20, probes: int = 32) -> str:
    """A cheap identity of a file or a folder's files (not its path): names and sizes, the first and last ``edge``
    bytes of each (headers, configs, the first and last weights) and ``probes`` evenly spaced 64 KiB samples between
    them (other contents of the same shapes differ there). Reads ≤ 4 MiB a file; hidden files are skipped."""
    path = Path(path).expanduser()
    h = hashlib.sha256()
    for f in sorted(path.iterdir()) if path.is_dir() else [path]:
        if not f.is_file() or f.name.startswith("."):
            continue
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= 2 * edge + probes * (1 << 16):
                h.update(fh.read())
                continue
            for at in [0, *(edge + (size - 2 * edge) * k // (probes + 1) for k in range(1, probes + 1))]:
                fh.seek(at)
                h.update(fh.read(edge if at == 0 else 1 << 16))
            fh.seek(size - edge)
            h.update(fh.read(edge))
    return h.hexdigest()[:16]


def write_json(path: str | Path, payload: Any) -> None:
    """Write ``payload`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")


_SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                       "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


class Rows:
    """A tensor that :func:`write_safetensors` writes a slab of rows at a time, so it is never whole in memory:
    its shape and dtype now, its rows ``make(start, stop)`` (a tensor of that dtype) when the file is written."""

    def __init__(self, shape: tuple[int, ...], dtype, make: Callable[[int, int], Any], rows: int):
        self.shape, self.dtype, self.make, self.rows = tuple(shape), dtype, make, rows

    def numel(self) -> int:
        return math.prod(self.shape)

    def element_size(self) -> int:
        return self.dtype.itemsize

    def slabs(self) -> Iterator[Any]:
        for start in range(0, self.shape[0], self.rows):
            yield self.make(start, min(start + self.rows, self.shape[0]))

    def whole(self) -> Any:
        """All rows as one tensor (small tables, tests): what the file holds."""
        import torch

        return torch.cat(list(self.slabs()))


def write_safetensors(path: str | Path, tensors: Callable[[], Iterable[tuple[str, Any]]],
                      metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file holding one tensor in memory at a time: ``tensors()`` is called twice, first for
    the header (names, dtypes, shapes), then for the bytes, and must give the same tensors in the same order both
    times (e.g. blocks read back from disk one by one); a :class:`Rows` is written slab by slab. The file is the
    format's plain layout: an 8-byte little-endian header length, the JSON header (padded to 8 bytes), then each
    tensor's bytes in order."""
    import torch

    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    specs, offset = [], 0
    for name, t in tensors():
        size = t.numel() * t.element_size()
        dtype = _SAFETENSORS_DTYPES[str(t.dtype).removeprefix("torch.")]
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        specs.append((name, dtype, tuple(t.shape)))
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for (name, t), spec in zip(tensors(), specs, strict=True):
            if (name, _SAFETENSORS_DTYPES[str(t.dtype).removeprefix("torch.")], tuple(t.shape)) != spec:
                raise ValueError(f"write_safetensors: the second pass gave {name} where {spec[0]} was announced")
            for part in t.slabs() if isinstance(t, Rows) else [t]:
                if part.dtype != t.dtype or tuple(part.shape[1:]) != tuple(t.shape[1:]):
                    raise ValueError(f"write_safetensors: a slab of {name} is {part.dtype} {tuple(part.shape)}")
                f.write(part.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def safetensors_header(file: str | Path) -> tuple[dict, int]:
    """``({tensor name: header entry}, offset of the data)`` of a safetensors file, after checking that the header is
    valid and that the file holds every byte it announces (a missing, truncated or corrupt file is one clear error
    naming it)."""
    from safetensors import safe_open

    file = Path(file)
    if not file.is_file():
        raise BaseqError(f"'{file}' is missing")
    try:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
        if file.stat().st_size < 8 + n + end:
            raise ValueError(f"{file.stat().st_size} bytes, the header announces {8 + n + end}")
        with safe_open(str(file), framework="pt"):  # the library's own validation of the header
            pass
    except Exception as e:  # noqa: BLE001 - safetensors raises SafetensorError / OSError / ValueError for bad files
        raise corrupt_file(file, e) from None
    return header, 8 + n


def corrupt_file(file: Path, e: Exception) -> BaseqError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return BaseqError(f"'{file}' is truncated or corrupt ({first})")


def read_tensor(file: str | Path, base: int, entry: dict):
    """One tensor of a safetensors file (``entry``: its header entry, ``base``: where the data starts), read into
    memory of its own with a plain file read. Not through a memory map: a mapped file's pages count in the
    process's resident size for as long as any tensor made from the map lives (one small tensor kept, e.g. a bias,
    keeps the whole file's pages)."""
    import torch

    start, end = entry["data_offsets"]
    dtype = getattr(torch, _TORCH_DTYPES[entry["dtype"]])
    buf = bytearray(end - start)
    with open(file, "rb") as fh:
        fh.seek(base + start)
        if fh.readinto(buf) != len(buf):
            raise ValueError("the file ends before the tensor does")
    return (torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)).reshape(entry["shape"])


def map_tensor(file: str | Path, base: int, entry: dict):
    """One tensor of a safetensors file as a private (copy-on-write) memory map of it, for a large table read a few
    rows at a time (an untied embedding): only the pages actually read become resident, the rest stays on disk.
    (Everything else is read with :func:`read_tensor`: a map's touched pages stay resident while it lives.)"""
    import mmap

    import torch

    start, end = entry["data_offsets"]
    dtype = getattr(torch, _TORCH_DTYPES[entry["dtype"]])
    if end == start:
        return torch.empty(entry["shape"], dtype=dtype)
    with open(file, "rb") as fh:
        view = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)  # the map outlives the file handle
    if len(view) < base + end:
        raise ValueError("the file ends before the tensor does")
    count = (end - start) // torch.empty(0, dtype=dtype).element_size()
    return torch.frombuffer(view, dtype=dtype, count=count, offset=base + start).reshape(entry["shape"])


_TORCH_DTYPES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}


def read_safetensors(file: str | Path) -> dict[str, Any]:
    """Every tensor of a safetensors file, each in memory of its own (:func:`read_tensor`), or one clear error."""
    file = Path(file)
    header, base = safetensors_header(file)
    try:
        return {name: read_tensor(file, base, entry) for name, entry in header.items()}
    except (KeyError, TypeError, ValueError, RuntimeError, OSError) as e:
        raise corrupt_file(file, e) from None
