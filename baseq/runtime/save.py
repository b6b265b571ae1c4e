"""Save and load quantized models (no pickle: safetensors + JSON).

A saved folder holds the HF ``config.json`` (embeddings untied), the tokenizer, ``model.safetensors`` with the
rotated, dequantized-quantized weights and every quantization-point parameter, and ``baseq.json`` describing the
quantized structure (activation/KV bits, clipping, online rotations) and the config that produced it. The folder is
written to a temporary sibling and renamed at the end, so a failed run never leaves a half-written result.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import BaseqError
from ..quant.qmodel import ActSpec, quantize_structure

FORMAT = "baseq-fake-quant/1"


def check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise BaseqError(f"--out '{out}' exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise BaseqError(f"--out '{out}' exists and is not empty (pass --overwrite to replace it)")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise BaseqError(f"--out '{out}': folder '{parent}' does not exist")
    if not os.access(parent, os.W_OK):
        raise BaseqError(f"--out '{out}': folder '{parent}' is not writable")


def save_quantized(model, tokenizer, out: Path, spec: ActSpec, meta: dict, overwrite: bool = False) -> Path:
    out = Path(out)
    check_out_dir(out, overwrite)
    tmp = Path(tempfile.mkdtemp(dir=out.resolve().parent, prefix=f".{out.name}.tmp-"))
    try:
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, tmp / "model.safetensors", metadata={"format": FORMAT})
        (tmp / "baseq.json").write_text(json.dumps({"format": FORMAT, "act_spec": asdict(spec), **meta}, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_quantized(path: Path, dtype=torch.float32, device="cpu"):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    try:
        meta = json.loads((path / "baseq.json").read_text())
        spec = ActSpec(**meta["act_spec"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BaseqError(f"'{path}/baseq.json' is not a valid baseq description: {e}") from None
    if meta.get("format") != FORMAT:
        raise BaseqError(f"'{path}' has format {meta.get('format')!r}; this baseq reads {FORMAT}")
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    quantize_structure(model, spec, fuse_online=False)
    state = load_file(path / "model.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise BaseqError(f"'{path}/model.safetensors' does not match its baseq.json "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for p in model.parameters():
        p.requires_grad_(False)
    model.baseq_config = {"method": meta.get("method", "?"), "bits": meta.get("bits", "?")}
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.to(device=device, dtype=dtype).eval(), tokenizer
