"""Load a folder written by ``baseq quantize``: the packed format as the integer runtime model, the fake-quant
format as the simulated model."""

from __future__ import annotations

from pathlib import Path

import torch

from .format import FAKE_FORMAT, FAKE_FORMAT_V1, PACKED_FORMAT, read_meta


def load_saved(path: Path, dtype="float32", device="cpu"):
    from ..models.loading import resolve_dtype

    path = Path(path)
    meta = read_meta(path, required=("format", "act_spec"))
    dtype = resolve_dtype(dtype)
    if meta["format"] == PACKED_FORMAT:
        from ..errors import BaseqError
        from .packed import load_packed

        if dtype != torch.float32:  # refused, not dropped
            raise BaseqError(f"--dtype {str(dtype).removeprefix('torch.')}: a packed folder runs on its integer codes "
                             f"with float32 activations (only the fake format takes --dtype)")

        return load_packed(path, meta, device=device)
    assert meta["format"] in (FAKE_FORMAT, FAKE_FORMAT_V1)
    from .save import load_fake

    return load_fake(path, meta, dtype=dtype, device=device)


__all__ = ["load_saved", "torch"]
