"""The fake-quantized format (``--format fake``, for research): dequantized weights + every quantization-point parameter.

A ``baseq-fake-quant/2`` folder holds the HF ``config.json``, the tokenizer, ``model.safetensors`` with the model's
state (the rotated blocks with dequantized-quantized weights, activation/KV point parameters; the embedding table
once when tied) and ``baseq.json`` describing the structure (activation/KV bits, clipping, online rotations, the
residual rotation R1) and the config that produced it. Loading rebuilds the same :mod:`baseq.quant.qmodel` model,
which runs in floating point (simulated quantization). ``baseq-fake-quant/1`` folders (R1 fused into an untied
embedding and head) still load.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors.torch import save_file
from torch import nn

from ..io import atomic_dir, read_safetensors, write_json, write_safetensors
from ..quant.qmodel import ActSpec, quantize_structure
from ..rotation.fuse import ResidualRotation, install_end_rotations, residual_rotation
from .format import (FAKE_FORMAT, FAKE_FORMAT_V1, check_out_dir, model_record, read_generation_config, read_meta,
                     save_model_files)

TIED_KEY = "lm_head.weight"


def is_tied(model) -> bool:
    return model.lm_head.weight.data_ptr() == model.model.get_input_embeddings().weight.data_ptr()


def save_fake(model, tokenizer, out: Path, spec: ActSpec, meta: dict, overwrite: bool = False,
              layers: Callable[[], Iterable[tuple[int, nn.Module]]] | None = None) -> Path:
    """Write ``model`` in the fake-quant format. ``layers``: a callable giving ``(i, block)`` pairs to write instead
    of the model's own blocks (a lazy run's blocks, read back one at a time); ``model.safetensors`` is streamed, so
    one block is in memory at a time."""
    out = Path(out)
    check_out_dir(out, overwrite)
    tied = is_tied(model)
    r1 = residual_rotation(model)

    aliases: dict[str, str] = {}  # a key whose tensor is another key's (a learned R1 at both ends): saved once
    first: dict[tuple, str] = {}
    for k, v in model.state_dict().items():
        if k.startswith("model.layers.") or v.is_meta or not v.numel() or (tied and k == TIED_KEY):
            continue
        where = (v.device, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype)
        if first.setdefault(where, k) != k:
            aliases[k] = first[where]

    def tensors():
        for k, v in model.state_dict().items():
            if not (tied and k == TIED_KEY) and not (layers is not None and k.startswith("model.layers.")) \
                    and k not in aliases:
                yield k, v
        for i, layer in layers() if layers is not None else ():
            for k, v in layer.state_dict().items():
                yield f"model.layers.{i}.{k}", v

    with atomic_dir(out) as tmp:
        save_model_files(model, tokenizer, tmp)
        if layers is None:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors()}, tmp / "model.safetensors",
                      metadata={"format": FAKE_FORMAT})
        else:
            write_safetensors(tmp / "model.safetensors", tensors, metadata={"format": FAKE_FORMAT})
        write_json(tmp / "baseq.json", {"format": FAKE_FORMAT, "act_spec": asdict(spec), "tied": tied,
                                        "residual_rotation": r1.describe() if r1 is not None else None,
                                        **({"aliases": aliases} if aliases else {}), **meta})
    return out


def load_fake(path: Path, meta: dict, dtype=torch.float32, device="cpu"):
    from transformers import AutoModelForCausalLM

    from ..models.loading import load_tokenizer
    from .format import read_config

    path = Path(path)
    spec = meta_act_spec(path, meta)
    config = read_config(path)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = read_safetensors(path / "model.safetensors")
    if meta["format"] == FAKE_FORMAT:
        for k, src in (meta.get("aliases") or {}).items():  # tensors saved once for two keys
            if src not in state:
                raise_mismatch(path, [src], [])
            state[k] = state[src]
        r1 = meta.get("residual_rotation")
        if r1 is not None:
            learned = state.get("model.embed_tokens.rotation.matrix")
            install_end_rotations(model, ResidualRotation(r1["n"], seed=r1["seed"], matrix=learned))
        if meta.get("tied"):
            table = "model.embed_tokens.embed.weight" if r1 is not None else "model.embed_tokens.weight"
            if table not in state:
                raise_mismatch(path, [table], [])
            state[TIED_KEY] = state[table]
    else:  # v1: dense online-rotation matrices were saved; they are rebuilt from their seeds now
        state = {k: v for k, v in state.items() if not k.endswith(".rotation.matrix")}
    quantize_structure(model, spec, fuse_online=False)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise_mismatch(path, missing, unexpected)
    if meta.get("tied"):
        model.lm_head.weight = model.model.get_input_embeddings().weight
    for p in model.parameters():
        p.requires_grad_(False)
    model.baseq_config = model_record(meta)
    read_generation_config(model, path)
    tokenizer = load_tokenizer(path, int(config.vocab_size))
    model = model.to(device=device, dtype=dtype)
    if dtype != torch.float32 and any(v.dtype == dtype for v in state.values()):
        # calibrated in `dtype`: the tensors it kept in float32 (the quantization points' scales, shifts, clips; the
        # weights' scales) stay float32, as they computed during calibration
        for name, v in state.items():
            if v.dtype == torch.float32 and name != TIED_KEY:
                owner, _, leaf = name.rpartition(".")
                module = model.get_submodule(owner)
                if leaf in module._parameters:
                    module._parameters[leaf].data = v.to(device)
                elif leaf in module._buffers:
                    module._buffers[leaf] = v.to(device)
    return model.eval(), tokenizer


def meta_act_spec(path: Path, meta: dict) -> ActSpec:
    from ..errors import BaseqError

    try:
        return ActSpec(**meta["act_spec"])
    except (KeyError, TypeError) as e:
        raise BaseqError(f"'{path}/baseq.json' has no valid act_spec ({e})") from None


def raise_mismatch(path: Path, missing, unexpected):
    from ..errors import BaseqError

    raise BaseqError(f"'{path}/model.safetensors' does not match its baseq.json "
                     f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")


__all__ = ["save_fake", "load_fake", "read_meta", "FAKE_FORMAT", "FAKE_FORMAT_V1"]
