"""``--device``: parsed and checked once, so a missing GPU is one clear line instead of a traceback mid-run; and
host memory: freed memory handed back to the OS (:func:`release_memory`), and the slab size for vocabulary tables."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

from .errors import BaseqError

# Rows of a vocabulary-sized table (embedding, LM head: 151,936 x 1,536 at 1.5B, 0.9 GB in fp32) worked on at a time
# wherever a whole-table operation would make full-size temporaries: dequantizing it from GGUF, rounding it to the
# packed grid, packing it.
TABLE_ROWS = 8192


def check_device(spec: str | torch.device) -> torch.device:
    """The torch device ``spec`` names, checked to exist here. Under ``torchrun`` a bare ``cuda`` means this rank's
    GPU (``cuda:LOCAL_RANK``)."""
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise BaseqError(f"--device '{spec}' is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise BaseqError(f"--device {spec}: {why} (use --device cpu)")
        if device.index is None and "LOCAL_RANK" in os.environ:
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        count = torch.cuda.device_count()
        if (device.index or 0) >= count:
            raise BaseqError(f"--device {spec}: GPU {device.index or 0} requested but only {count} visible")
        return device
    backend = getattr(torch, device.type, None) or getattr(torch.backends, device.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise BaseqError(f"--device {spec}: no {device.type} device is available here (use --device cpu)")
    return device


def available_memory() -> int | None:
    """Bytes of host memory a new process could still take: Linux's ``MemAvailable``, lowered to the cgroup's
    remaining limit inside a container with one (cgroup v2 ``memory.max − memory.current``); elsewhere (macOS,
    Windows) what psutil reports as available; None where unknown."""
    have = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    have = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if have is None:
        try:
            import psutil

            return int(psutil.virtual_memory().available)
        except Exception:  # noqa: BLE001 - no psutil, or it cannot tell: unknown
            return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if have is not None and limit != "max":
            have = min(have, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return have


def release_memory() -> None:
    """Hand freed heap memory back to the OS. glibc keeps it otherwise, and block after block of large temporary
    arrays (rotations, GPTQ) would let the resident size creep up with the model's depth."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
