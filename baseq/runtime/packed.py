"""The packed format (``baseq-packed/1``, the default output of ``baseq quantize``) and building the integer runtime
model from it.

A packed folder holds the HF ``config.json`` and ``generation_config.json``, the tokenizer, ``baseq.json`` (format,
weight/activation/KV bits, clipping, the online rotations described by size and seed — rebuilt at load, never stored
as matrices — and the config that produced the model) and ``model.safetensors`` (or shards + an index) with:

=================================  ===============================================================================
``layers.{i}.{proj}.codes``        uint8, two 4-bit codes per byte (column 2k in the low nibble); one per byte above
                                   4 bits; ``proj`` ∈ q, k, v, o, gate, up, down
``layers.{i}.{proj}.scale/zero``   float16 scale (float32 where a scale is not a float16 value) and uint8 integer zero
                                   point per output channel ``[out, 1]`` or per group ``[out, in / group]``
``layers.{i}.{proj}.bias``         float32 (the folded BASE-Q shifts ``W·b`` live here)
``layers.{i}.{point}.clip/scale/shift``  the activation points qkv, o, gate_up, down: clipping factor, asymmetric
                                   scale, shift (float32 vectors)
``layers.{i}.kv.k_clip/v_clip``    KV clipping factors (per KV head when learned)
``layers.{i}.kv.k_shift/v_shift``  the centres K and V are quantized around, ``[kv_heads, head_dim]`` (only when
                                   calibrated; absent = zero)
``layers.{i}.keep.threshold``      ``--keep-massive``: the residual-stream RMS from which a token keeps float
                                   activations in the block (a float32 scalar; only with ``act_spec.keep_massive``)
``layers.{i}.attn_norm/mlp_norm``  pre-norm scales (effective ``g`` of ``g·x̂``: ``1 + w`` for Gemma; BASE-Q's scales
                                   folded in); absent for a family without pre-norms (OLMo 2)
``layers.{i}.post_attn_norm/...``  ``post_mlp_norm``, ``q_norm``, ``k_norm``: post-norm and q/k-norm scales, for the
                                   families that have them (effective scales too)
``embed.weight``                   float16 ``[vocab, hidden]``, unrotated; or ``embed.codes`` int8 + ``embed.scale``
                                   (``--embed-bits 8``); ``lm_head.*`` likewise when not tied to the embedding
``norm.weight``                    the final RMSNorm's effective scale; ``r1.matrix`` only for a learned residual
                                   rotation
=================================  ===============================================================================

The family (``models/arch.py``) comes from ``config.json``; a post-norm family's online R1 at the qkv and gate/up
points is described in ``baseq.json`` (``online_rotations.r1``) like R3/R4. Loading builds the model skeleton on the
meta device (no float weights are ever materialised), unpacks each
linear once into int8 (``c − z``), concatenates q/k/v and gate/up, and swaps in the modules of
:mod:`baseq.runtime.modules`.
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from ..config import BitsConfig
from ..device import TABLE_ROWS, release_memory
from ..errors import BaseqError
from ..io import Rows, atomic_dir, map_tensor, read_tensor, safetensors_header, write_json, write_safetensors
from ..models.adapter import ModelAdapter, block_points, layer_spec
from ..quant.qmodel import ActSpec, TokenGate, install_gate
from ..quant.quantizer import embedding_scale, half_exact
from ..rotation.fuse import (
    OnlineRotation,
    ResidualRotation,
    RotatedEmbedding,
    RotatedNorm,
    residual_rotation,
)
from ..rotation.hadamard import has_hadamard
from .format import (PACKED_FORMAT, check_out_dir, model_record, read_config, read_generation_config, read_meta,
                     save_model_files)
from .kernels import IntLinear, keep_freed_memory, pack_nibbles
from .kvcache import QuantizedKVCache
from .modules import (
    ActPoint,
    FinalNorm,
    KVQuant,
    RMSNorm,
    RuntimeAttention,
    RuntimeEmbedding,
    RuntimeHead,
    RuntimeMLP,
    Table,
)

PROJ = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
        "down": "down_proj"}
SHARD_BYTES = 1 << 29  # start a new safetensors shard after ~512 MB: a shard's tensors wait in memory until it is
# written (streamed, no serialized copy), so this bounds what saving adds to a lazy run's peak
INDEX = "model.safetensors.index.json"


# ============================================================================================ writing


def _scale16(scale: Tensor) -> Tensor:
    """float16 when that is lossless (it is for scales chosen by baseq's quantizers), else float32."""
    s = scale.detach().float().contiguous()
    return s.half() if torch.equal(half_exact(s), s) and torch.equal(s.half().float(), s) else s


def pack_linear(lin: nn.Module, bits: int, name: str) -> dict[str, Tensor]:
    """Integer codes of a quantized linear from its dequantized weight and recorded grid (exactly recovered)."""
    scale, zero = getattr(lin, "weight_scale", None), getattr(lin, "weight_zero", None)
    if scale is None or zero is None:
        raise BaseqError(f"{name} has no recorded quantization grid (quantized before baseq recorded grids?): "
                         f"save it with --format fake")
    w = lin.weight.detach().float().cpu()
    scale, zero = scale.detach().float().cpu(), zero.detach().float().cpu()
    gs = w.shape[1] // scale.shape[1]
    sc, zc = scale.repeat_interleave(gs, 1), zero.repeat_interleave(gs, 1)
    q = torch.round(w / sc) + zc
    maxq = 2**bits - 1
    back = (q - zc) * sc
    # 16-bit models: within the dtype's rounding of each weight (bfloat16's reaches ~0.05 of a step near the grid's
    # ends) plus a margin; far from half a step, so the codes are the recorded ones
    tol = 0.0 if lin.weight.dtype == torch.float32 else torch.finfo(lin.weight.dtype).eps * w.abs() + 1e-2 * sc
    if q.min() < 0 or q.max() > maxq or ((back - w).abs() > tol).any():
        raise BaseqError(f"{name}: the weights are not on their recorded {bits}-bit grid")
    q = q.to(torch.uint8)
    bias = lin.bias.detach().float().cpu() if getattr(lin, "bias", None) is not None else torch.zeros(w.shape[0])
    return {"codes": pack_nibbles(q) if bits <= 4 else q.contiguous(), "scale": _scale16(scale),
            "zero": zero.to(torch.uint8).contiguous(), "bias": bias.contiguous()}


def _clip_tensor(quantizer) -> Tensor:
    c = quantizer.clip_factor()
    return (c.detach().float().cpu() if isinstance(c, Tensor) else torch.tensor(float(c), dtype=torch.float32))


def pack_layer(layer: nn.Module, w_bits: int) -> dict[str, Tensor]:
    """Every tensor the runtime needs for one decoder layer of a quantized (fake-quant structure) model."""
    out: dict[str, Tensor] = {}
    spec = layer_spec(layer)
    paths = spec.linear_paths()
    for short, name in PROJ.items():
        for k, v in pack_linear(layer.get_submodule(paths[name]), w_bits, paths[name]).items():
            out[f"{short}.{k}"] = v
    for short, point in block_points(layer).items():
        if not bool(point.shift_folded) and point.shift.abs().max() > 0:
            raise BaseqError(f"the {short} point: its bias shift was never folded into the next linear")
        out[f"{short}_point.clip"] = _clip_tensor(point.quantizer)
        out[f"{short}_point.scale"] = point.scale.detach().float().cpu().contiguous()
        out[f"{short}_point.shift"] = point.shift.detach().float().cpu().contiguous()
    kv = layer.self_attn.kv_point
    out["kv.k_clip"], out["kv.v_clip"] = _clip_tensor(kv.k), _clip_tensor(kv.v)
    if bool(kv.k_shift.any()) or bool(kv.v_shift.any()):
        out["kv.k_shift"] = kv.k_shift.detach().float().cpu().contiguous()
        out["kv.v_shift"] = kv.v_shift.detach().float().cpu().contiguous()
    for key, path in norm_slots(spec).items():
        out[key] = effective_scale(layer.get_submodule(path), spec.norm_offset)
    gate = getattr(layer, "keep_gate", None)
    if gate is not None:
        out["keep.threshold"] = gate.threshold.detach().float().cpu().reshape(())
    return out


def norm_slots(spec) -> dict[str, str]:
    """``{packed name: module path}`` of the norms a block of ``spec``'s family stores."""
    slots = {"attn_norm": spec.attn_norm, "mlp_norm": spec.mlp_norm}
    if spec.post_norms:
        slots.update(post_attn_norm=spec.post_norms[0], post_mlp_norm=spec.post_norms[1])
    if spec.qk_norm:
        slots.update(q_norm="self_attn.q_norm", k_norm="self_attn.k_norm")
    return {k: v for k, v in slots.items() if v is not None}


def effective_scale(norm: nn.Module, offset: float) -> Tensor:
    """The ``g`` of a norm computing ``g·x̂``: a QuantRMSNorm's weight, otherwise ``w + offset`` (Gemma: ``1 + w``),
    computed as the model computes it (float32)."""
    from ..quant.qmodel import QuantRMSNorm

    w = norm.weight.detach().float().cpu()
    return (w if isinstance(norm, QuantRMSNorm) or not offset else w + offset).contiguous()


def pack_table(weight: Tensor, bits: int) -> dict[str, Tensor | Rows]:
    """An embedding / LM-head table already on its float16 (``bits`` 16) or per-row int8 grid, in its stored form:
    checked (and its int8 scales computed) now, ``TABLE_ROWS`` rows at a time; the stored table itself is a
    :class:`~baseq.io.Rows`, converted slab by slab as the shard is written, so no full-size copy is ever made
    (Qwen2.5-1.5B: 467 MB per table, the peak of a lazy calibration's write)."""
    w = weight.detach().cpu()
    scale = None if bits == 16 else torch.empty(w.shape[0], 1, dtype=torch.float32)
    for start in range(0, w.shape[0], TABLE_ROWS):
        part = w[start:start + TABLE_ROWS].float()
        if bits == 16:
            if not torch.equal(part.half().float(), part):
                raise BaseqError("the embedding table is not on its float16 grid (quantized with --embed-bits 8?)")
            continue
        s = embedding_scale(part)
        q = torch.round(part / s)
        if q.abs().max() > 127 or not torch.equal(q * s, part):
            raise BaseqError("the embedding table is not on its int8 grid (quantized with --embed-bits 16?)")
        scale[start:start + TABLE_ROWS] = s
    if bits == 16:
        return {"weight": Rows(w.shape, torch.float16, lambda i, j: w[i:j].half(), TABLE_ROWS)}
    codes = Rows(w.shape, torch.int8, lambda i, j: torch.round(w[i:j].float() / scale[i:j]).to(torch.int8), TABLE_ROWS)
    return {"codes": codes, "scale": _scale16(scale.reshape(-1))}


class ShardWriter:
    """Tensors written into safetensors shards of at most ~``limit`` bytes as they come (one block in memory)."""

    def __init__(self, folder: Path, limit: int = SHARD_BYTES):
        self.folder, self.limit = Path(folder), limit
        self.pending: dict[str, Tensor] = {}
        self.size = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total = 0

    def add(self, tensors: dict[str, Tensor]) -> None:
        incoming = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.size + incoming > self.limit:  # a large group (an embedding table) starts its own shard
            self.flush()
        for name, t in tensors.items():
            self.pending[name] = t if isinstance(t, Rows) else t.contiguous()
            self.size += t.numel() * t.element_size()
        if self.size >= self.limit:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"shard-{len(self.files) + 1:05d}.safetensors"
        pending = self.pending  # streamed from the tensors: no serialized copy of the shard in memory
        write_safetensors(self.folder / name, lambda: pending.items(), metadata={"format": PACKED_FORMAT})
        self.files.append((name, list(self.pending)))
        self.total += self.size
        self.pending, self.size = {}, 0

    def finish(self) -> None:
        self.flush()
        if len(self.files) == 1:
            (self.folder / self.files[0][0]).rename(self.folder / "model.safetensors")
            return
        n = len(self.files)
        weight_map = {}
        for i, (old, names) in enumerate(self.files, 1):
            new = f"model-{i:05d}-of-{n:05d}.safetensors"
            (self.folder / old).rename(self.folder / new)
            weight_map.update({k: new for k in names})
        write_json(self.folder / INDEX, {"metadata": {"total_size": self.total}, "weight_map": weight_map})


def _ends(model) -> tuple[nn.Module, nn.Module, ResidualRotation | None]:
    """(embedding module, final norm module, R1) of a model whose ends may carry the online R1."""
    base = model.model
    embed = base.embed_tokens.embed if isinstance(base.embed_tokens, RotatedEmbedding) else base.embed_tokens
    norm = base.norm.norm if isinstance(base.norm, RotatedNorm) else base.norm
    return embed, norm, residual_rotation(model)


def save_packed(model, tokenizer, out: Path, spec: ActSpec, meta: dict, *, w_bits: int, w_group: int,
                embed_bits: int = 16, overwrite: bool = False, shard_bytes: int = SHARD_BYTES,
                layers: Callable[[], Iterable[tuple[int, nn.Module]]] | None = None,
                ends_away: Callable[[], AbstractContextManager] | None = None) -> Path:
    """Write the fake-quant model ``model`` (as built by ``quantize_model``) in the packed format. ``layers``: a
    callable giving ``(i, block)`` pairs to write instead of the model's own blocks (a lazy run's blocks, read back
    one at a time); the shards are written as the blocks come, so one block is in memory at a time. ``ends_away``:
    a context inside which the blocks are written while the model's ends (embedding, head) wait elsewhere (a lazy
    run's :meth:`LazyModel.ends_parked`), so the ends and the blocks' shards are never in memory together."""
    out = Path(out)
    check_out_dir(out, overwrite)
    if w_bits > 8:
        raise BaseqError("the packed format stores quantized weights (w-bits 2..8); use --format fake")
    ad = ModelAdapter(model)
    s = ad.shape
    embed, norm, r1 = _ends(model)
    tied = model.lm_head.weight.data_ptr() == embed.weight.data_ptr()
    with atomic_dir(out) as tmp:
        writer = ShardWriter(tmp, shard_bytes)
        with ends_away() if ends_away is not None else nullcontext():
            for i, layer in (layers() if layers is not None else enumerate(ad.layers)):
                writer.add({f"layers.{i}.{k}": v for k, v in pack_layer(layer, w_bits).items()})
            if ends_away is not None:
                writer.flush()
        writer.add({f"embed.{k}": v for k, v in pack_table(embed.weight, embed_bits).items()})
        if not tied:
            writer.add({f"lm_head.{k}": v for k, v in pack_table(model.lm_head.weight, embed_bits).items()})
        writer.add({"norm.weight": effective_scale(norm, ad.spec.norm_offset)})
        if r1 is not None and r1.learned:
            writer.add({"r1.matrix": r1.matrix.detach().float().cpu().contiguous()})
        writer.finish()
        save_model_files(model, tokenizer, tmp)
        online = None
        if spec.online_rotations:
            def describe(n: int, seed: int) -> dict:
                kind = "hadamard" if has_hadamard(n) else "seeded orthogonal (no Hadamard of this order)"
                return {"n": n, "seed": seed, "kind": kind}

            online = {"r3": describe(s.head_dim, spec.seed + 3), "r4": describe(s.ffn, spec.seed + 4)}
            if not ad.spec.r1_fusable:  # post-norm family: R1 online at the qkv and gate/up points
                online["r1"] = describe(s.hidden, spec.seed)
        write_json(tmp / "baseq.json", {
            "format": PACKED_FORMAT, "family": ad.spec.family, "act_spec": asdict(spec),
            "weights": {"bits": w_bits, "group_size": w_group}, "embed_bits": embed_bits, "tied": tied,
            "residual_rotation": r1.describe() if r1 is not None else None, "online_rotations": online,
            "shape": {"layers": s.layers, "hidden": s.hidden, "ffn": s.ffn, "heads": s.heads,
                      "kv_heads": s.kv_heads, "head_dim": s.head_dim, "vocab": embed.weight.shape[0]},
            **meta})
    return out


# ============================================================================================ loading


class _Tensors:
    """The packed tensors of a folder, read one at a time from the safetensors shards, each checked for presence
    and shape.

    Read with plain file reads at the offsets the shard's header gives, not through a memory map: the pages of a
    mapped file count in the process's resident size for as long as it is mapped (Qwen2.5-1.5B, one 1.6 GB shard:
    +1.6 GB of peak RSS while loading, on top of the tensors' own copies). The one exception is an untied embedding
    table (``mapped``): it is only ever looked up a few rows at a time, so a map of it stays mostly on disk."""

    def __init__(self, path: Path):
        self.path = Path(path)
        index = self.path / INDEX
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError) as e:
                raise BaseqError(f"'{index}' is not a valid shard index ({e})") from None
        else:
            files = ["model.safetensors"]
        self.file = files[0] if len(files) == 1 else INDEX
        self.where: dict[str, tuple[Path, int, dict]] = {}  # name → (file, start of its data, header entry)
        for f in files:
            header, base = safetensors_header(self.path / f)  # a truncated or corrupt file fails here, with its name
            self.where.update({k: (self.path / f, base, v) for k, v in header.items()})

    def take(self, name: str, shape: tuple | None = None, optional: bool = False,
             mapped: bool = False) -> Tensor | None:
        """The tensor ``name``, read into memory of its own, or with ``mapped`` a copy-on-write map of the file."""
        if name not in self.where:
            if optional:
                return None
            raise BaseqError(f"'{self.path / self.file}' has no tensor '{name}' (written by another version, or "
                             f"damaged)")
        file, base, entry = self.where.pop(name)
        try:
            t = (map_tensor if mapped else read_tensor)(file, base, entry)
        except (KeyError, TypeError, ValueError, RuntimeError, OSError) as e:
            raise BaseqError(f"'{self.path / self.file}': tensor '{name}' cannot be read ({e})") from None
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise BaseqError(f"'{self.path / self.file}': tensor '{name}' has shape {tuple(t.shape)}, config.json "
                             f"implies {tuple(shape)}")
        return t

    def finish(self) -> None:
        if self.where:
            raise BaseqError(f"'{self.path / self.file}' has unexpected tensors ({', '.join(sorted(self.where)[:3])}, "
                             f"...): it does not match its baseq.json")


def _linear_parts(t: _Tensors, prefix: str, out_f: int, in_f: int, bits: int, groups: int):
    packed_cols = (in_f + 1) // 2 if bits <= 4 else in_f
    codes = t.take(f"{prefix}.codes", (out_f, packed_cols))  # still two a byte at ≤ 4 bits (IntLinear's packed_k)
    return (codes, t.take(f"{prefix}.zero", (out_f, groups)), t.take(f"{prefix}.scale", (out_f, groups)).float(),
            t.take(f"{prefix}.bias", (out_f,)))


def _fused(t: _Tensors, prefix: str, names: list[str], outs: list[int], in_f: int, bits: int, groups: int,
           nibbles: bool):
    parts = [_linear_parts(t, f"{prefix}.{n}", o, in_f, bits, groups) for n, o in zip(names, outs)]
    return IntLinear(*[list(x) for x in zip(*parts)], bits=bits, nibbles=nibbles, packed_k=in_f if bits <= 4 else None)


def _table(t: _Tensors, prefix: str, bits: int, vocab: int, hidden: int, mapped: bool = False) -> Table:
    if bits == 16:
        return Table(weight=t.take(f"{prefix}.weight", (vocab, hidden), mapped=mapped))
    return Table(codes=t.take(f"{prefix}.codes", (vocab, hidden), mapped=mapped),
                 scale=t.take(f"{prefix}.scale", (vocab,)))


def _shape_of(config) -> dict:
    heads = config.num_attention_heads
    return {"layers": config.num_hidden_layers, "hidden": config.hidden_size, "ffn": config.intermediate_size,
            "heads": heads, "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads, "vocab": config.vocab_size}


def load_packed(path: Path, meta: dict | None = None, device="cpu"):
    """(runtime model, tokenizer) for a packed folder."""
    from transformers import AutoModelForCausalLM
    from transformers.activations import ACT2FN

    from ..models.loading import _quiet_transformers, load_tokenizer

    _quiet_transformers()
    path = Path(path)
    meta = meta or read_meta(path)
    required = ("act_spec", "weights", "embed_bits", "tied", "residual_rotation", "online_rotations", "shape")
    missing = [k for k in required if k not in meta]
    if missing:
        raise BaseqError(f"'{path / 'baseq.json'}' is missing the field(s) {', '.join(missing)}")
    try:
        spec = ActSpec(**meta["act_spec"])
        w_bits, group = int(meta["weights"]["bits"]), int(meta["weights"]["group_size"])
        embed_bits = int(meta["embed_bits"])
    except (KeyError, TypeError, ValueError) as e:
        raise BaseqError(f"'{path / 'baseq.json'}' has an invalid field ({e})") from None
    # the bits it was quantized with are recorded twice more (the label, the config): a hand edit shows
    stored = {"w_bits": w_bits, "a_bits": spec.a_bits, "kv_bits": spec.kv_bits}
    label = BitsConfig(**stored).label
    bits = (meta.get("config") or {}).get("bits")
    off = [f"{k} {v} (config: {bits[k]})" for k, v in stored.items() if k in bits and bits[k] != v] \
        if isinstance(bits, dict) else []
    if isinstance(meta.get("bits"), str) and meta["bits"] != label:
        off.append(f"{label} (label: {meta['bits']})")
    if off:
        raise BaseqError(f"'{path / 'baseq.json'}' contradicts itself: {', '.join(off)} — edited by hand?")
    config = read_config(path)
    shape = _shape_of(config)
    if meta["shape"] != shape:
        raise BaseqError(f"'{path}': config.json describes {shape}, baseq.json was written for {meta['shape']}")
    t = _Tensors(path)
    on_cpu = torch.device(device).type == "cpu"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    ad = ModelAdapter(model)
    s, arch = ad.shape, ad.spec
    online = meta["online_rotations"]
    r3 = OnlineRotation(s.head_dim, seed=online["r3"]["seed"]) if online else None
    r4 = OnlineRotation(s.ffn, seed=online["r4"]["seed"]) if online else None
    r1_in = ResidualRotation(s.hidden, seed=online["r1"]["seed"]) if online and "r1" in online else None
    if online and r1_in is None and not arch.r1_fusable:  # (online R1 is exact for any family; required here)
        raise BaseqError(f"'{path / 'baseq.json'}': a rotated {arch.family} model needs online_rotations.r1")
    act_fn = ACT2FN[getattr(config, arch.act_key)]
    eps = float(config.rms_norm_eps)
    kv_specs = []
    for i, layer in enumerate(ad.layers):
        p = f"layers.{i}"
        norms = {key: RMSNorm(t.take(f"{p}.{key}", (s.head_dim,) if arch.qk_norm == "head" and key[0] in "qk"
                                     else (s.heads * s.head_dim,) if key == "q_norm"
                                     else (s.kv_heads * s.head_dim,) if key == "k_norm" else (s.hidden,)), eps)
                 for key in norm_slots(arch)}
        orig = layer.self_attn

        def point(name: str, rotation=None, channels: int = s.hidden) -> ActPoint:
            return ActPoint(spec.a_bits, t.take(f"{p}.{name}_point.clip"), t.take(f"{p}.{name}_point.scale",
                            (channels,)), t.take(f"{p}.{name}_point.shift", (channels,)), rotation)

        def fused(names: list[str], outs: list[int], in_f: int) -> IntLinear:
            return _fused(t, p, names, outs, in_f, w_bits, 1 if group == 0 else in_f // group, nibbles=on_cpu)

        kv = KVQuant(spec.kv_bits, t.take(f"{p}.kv.k_clip").reshape(1, -1, 1, 1),
                     t.take(f"{p}.kv.v_clip").reshape(1, -1, 1, 1), r3,
                     t.take(f"{p}.kv.k_shift", (s.kv_heads, s.head_dim), optional=True),
                     t.take(f"{p}.kv.v_shift", (s.kv_heads, s.head_dim), optional=True),
                     keep_float=spec.keep_massive > 0 and spec.keep_kv == "float")
        gate = None
        if spec.keep_massive > 0:
            gate = TokenGate(t.take(f"{p}.keep.threshold", ()))
            install_gate(layer, gate)
        nq, nkv, attn_in = s.heads * s.head_dim, s.kv_heads * s.head_dim, s.heads * s.head_dim
        layer.self_attn = RuntimeAttention(
            point("qkv", r1_in), fused(["q", "k", "v"], [nq, nkv, nkv], s.hidden),
            point("o", channels=attn_in), fused(["o"], [s.hidden], attn_in), kv,
            layer_idx=i, heads=s.heads, kv_heads=s.kv_heads, head_dim=s.head_dim, scaling=float(orig.scaling),
            qk_norm=(arch.qk_norm, norms.pop("q_norm", None), norms.pop("k_norm", None)),
            softcap=getattr(orig, "attn_logit_softcapping", None), gate=gate)
        layer.mlp = RuntimeMLP(
            point("gate_up", r1_in), fused(["gate", "up"], [s.ffn, s.ffn], s.hidden),
            point("down", r4, channels=s.ffn), fused(["down"], [s.hidden], s.ffn),
            act_fn, gate)
        slots = norm_slots(arch)
        for key, norm in norms.items():
            _set(layer, slots[key], norm)
        kv_specs.append((spec.kv_bits, kv.k_clip, kv.v_clip))
        if spec.a_bits >= 16:  # weight-only quantization: float GEMMs (see IntLinear.use_float_weights)
            for lin in (layer.self_attn.qkv, layer.self_attn.o_proj, layer.mlp.gate_up, layer.mlp.down):
                lin.use_float_weights()
        release_memory()  # this layer's unpacking temporaries, before the next layer's (the heap would grow)
    vocab = shape["vocab"]
    r1_meta = meta["residual_rotation"]
    r1 = None
    if r1_meta is not None:
        matrix = t.take("r1.matrix", (s.hidden, s.hidden)) if r1_meta.get("kind") == "learned" else None
        r1 = ResidualRotation(s.hidden, seed=int(r1_meta["seed"]), matrix=matrix)
    # An untied embedding is only looked up (a few rows per token): it stays a map of its file, so only the rows of
    # tokens seen become resident (Qwen2.5-1.5B: 0.47 GB of float16 not held). A tied table is read whole by the head.
    table = _table(t, "embed", embed_bits, vocab, s.hidden, mapped=not meta["tied"] and on_cpu)
    model.model.embed_tokens = RuntimeEmbedding(table, r1, arch.embed_scale(config))
    model.lm_head = RuntimeHead(table if meta["tied"] else _table(t, "lm_head", embed_bits, vocab, s.hidden))
    model.model.norm = FinalNorm(RMSNorm(t.take("norm.weight", (s.hidden,)), eps), r1)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    t.finish()
    left = [n for n, x in list(model.named_parameters()) + list(model.named_buffers()) if x.is_meta]
    if left:
        raise BaseqError(f"internal error: the runtime model still has unset tensors ({', '.join(left[:3])})")
    model.config._attn_implementation = "sdpa"
    read_generation_config(model, path)
    model.baseq_config = model_record(meta, format=PACKED_FORMAT)
    model.baseq_kv_specs = kv_specs
    model.tie_weights = lambda *a, **k: None  # the runtime shares a tied table itself (no embed_tokens.weight here)
    _default_quantized_cache(model)
    model.eval()
    tokenizer = load_tokenizer(path, int(config.vocab_size))
    release_memory()
    keep_freed_memory()  # from here on: the runtime's allocator setting (after loading, which it would fragment)
    return model.to(device), tokenizer


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _default_quantized_cache(model) -> None:
    """Make ``model.generate`` keep its KV cache quantized (a :class:`QuantizedKVCache`) unless the caller passes a
    cache or a cache implementation of their own."""
    prepare = getattr(model, "_prepare_cache_for_generation", None)
    if prepare is None:  # another transformers version: generate still works, with a float cache
        return

    def with_quantized_cache(generation_config, model_kwargs, *args, **kwargs):
        if (model_kwargs.get("cache") is None and model_kwargs.get("past_key_values") is None
                and generation_config.use_cache is not False and generation_config.cache_implementation is None):
            model_kwargs["cache"] = QuantizedKVCache(model.baseq_kv_specs)
        return prepare(generation_config, model_kwargs, *args, **kwargs)

    model._prepare_cache_for_generation = with_quantized_cache


def new_cache(model) -> QuantizedKVCache | None:
    """A fresh quantized KV cache for a runtime model (None for other models)."""
    specs = getattr(model, "baseq_kv_specs", None)
    return QuantizedKVCache(specs) if specs is not None else None
