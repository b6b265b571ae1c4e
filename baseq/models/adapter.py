"""The model adapter: a causal LM recognised as one of the families of ``models/arch.py`` and checked against it.

:class:`ModelAdapter` finds the family from ``config.model_type``, checks the module structure and the weight
shapes against the family's :class:`~baseq.models.arch.ArchSpec` and the config, and refuses everything else with
one line naming the class and the first thing that does not match (``unsupported model Qwen3MoeForCausalLM: layer 0
mlp has experts (MoE is not supported yet)``) — before any work. Nothing is ever quantized "by structure" with a
guess.

Block-level helpers (:func:`linears`, :func:`qkv`, :func:`gate_up`, :func:`block_points`, :func:`split_fused`...)
take one decoder layer and find its family from the layer's attention config, so a block read lazily from disk is
handled like one in memory. ``LlamaAdapter`` / ``LlamaShape`` remain as aliases of the general names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import BaseqError
from .arch import ArchSpec, spec_for_config, supported_families


def _get(module: nn.Module, dotted: str):
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


@dataclass
class ModelShape:
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads


LlamaShape = ModelShape


def shape_of_config(config, layers: int | None = None) -> ModelShape:
    heads = config.num_attention_heads
    return ModelShape(hidden=config.hidden_size, ffn=config.intermediate_size,
                      layers=layers if layers is not None else config.num_hidden_layers, heads=heads,
                      kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                      head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads)


# ------------------------------------------------------------------------------------------------ block helpers


def layer_spec(layer: nn.Module) -> ArchSpec:
    """The family of a decoder layer (from its attention module's config)."""
    config = _get(layer, "self_attn.config")
    spec = spec_for_config(config) if config is not None else None
    if spec is None:
        raise BaseqError(f"internal error: no architecture family for layer {type(layer).__name__}")
    return spec


class FusedLinear(nn.Module):
    """A fused projection split into its parts (exact): ``forward(x) = cat(part(x) for part)`` along the last dim."""

    def __init__(self, parts: dict[str, nn.Module]):
        super().__init__()
        for name, lin in parts.items():
            self.add_module(name, lin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(x) for m in self.children()], dim=-1)


def _part_sizes(layer: nn.Module, parts: tuple[str, ...], out_features: int) -> list[int]:
    if parts == ("q_proj", "k_proj", "v_proj"):
        s = shape_of_config(layer.self_attn.config)
        return [s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim]
    if out_features % len(parts):
        raise BaseqError(f"internal error: cannot split {out_features} outputs into {parts}")
    return [out_features // len(parts)] * len(parts)


def split_fused(layer: nn.Module) -> None:
    """Replace the family's fused projections (Phi-3's ``qkv_proj``, ``gate_up_proj``) by :class:`FusedLinear`
    containers of separate ``nn.Linear`` parts, in place (idempotent; works on meta-device templates too)."""
    spec = layer_spec(layer)
    for path, parts in spec.fused:
        parent_path, _, name = path.rpartition(".")
        parent = layer.get_submodule(parent_path)
        lin = getattr(parent, name)
        if isinstance(lin, FusedLinear):
            continue
        sizes = _part_sizes(layer, parts, lin.out_features)
        pieces, start = {}, 0
        for part, n in zip(parts, sizes):
            new = nn.Linear(lin.in_features, n, bias=lin.bias is not None, device=lin.weight.device,
                            dtype=lin.weight.dtype)
            new.weight = nn.Parameter(lin.weight.data[start:start + n].clone(), requires_grad=False)
            if lin.bias is not None:
                new.bias = nn.Parameter(lin.bias.data[start:start + n].clone(), requires_grad=False)
            pieces[part] = new
            start += n
        setattr(parent, name, FusedLinear(pieces))


def linears(layer: nn.Module) -> dict[str, nn.Module]:
    """The block's seven linears in GPTQ's sequential order (qkv → o → gate/up → down); fused ones split first."""
    split_fused(layer)
    return {name: layer.get_submodule(path) for name, path in layer_spec(layer).linear_paths().items()}


def qkv(layer: nn.Module) -> list[nn.Module]:
    lin = linears(layer)
    return [lin["q_proj"], lin["k_proj"], lin["v_proj"]]


def gate_up(layer: nn.Module) -> list[nn.Module]:
    lin = linears(layer)
    return [lin["gate_proj"], lin["up_proj"]]


def attn_norm(layer: nn.Module) -> nn.Module | None:
    path = layer_spec(layer).attn_norm
    return layer.get_submodule(path) if path else None


def mlp_norm(layer: nn.Module) -> nn.Module | None:
    path = layer_spec(layer).mlp_norm
    return layer.get_submodule(path) if path else None


def block_points(layer: nn.Module) -> dict:
    """The block's four activation quantization points (``quant/qmodel.ActPoint``): qkv, o, gate_up, down.

    The qkv and gate_up points live in the pre-norm (``QuantRMSNorm.act``), or — when an online R1 sits between
    norm and point, or the family has no pre-norm — in the sublayer's ``in_point`` (``qmodel.InputPoint``)."""
    lin = linears(layer)

    def input_point(sub: str, norm: nn.Module | None):
        slot = getattr(layer.get_submodule(sub), "in_point", None)
        return slot.act if slot is not None else norm.act

    return {"qkv": input_point("self_attn", attn_norm(layer)), "o": lin["o_proj"].act,
            "gate_up": input_point("mlp", mlp_norm(layer)), "down": lin["down_proj"].act}


# ------------------------------------------------------------------------------------------------ the adapter


def _moe(layer: nn.Module, config) -> bool:
    mlp = getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe", None)
    return (mlp is not None and (hasattr(mlp, "experts") or hasattr(mlp, "router"))) or \
        bool(getattr(config, "num_local_experts", 0) or getattr(config, "num_experts", 0))


def _is_rmsnorm(norm) -> bool:
    return isinstance(norm, nn.Module) and isinstance(getattr(norm, "weight", None), torch.Tensor) and \
        getattr(norm, "bias", None) is None


class ModelAdapter:
    """Where the embeddings, blocks, norms, linears and head of a supported model are, and its family (``spec``)."""

    qkv = staticmethod(qkv)
    gate_up = staticmethod(gate_up)
    linears = staticmethod(linears)

    def __init__(self, model: nn.Module):
        self.model = model
        cls = type(model).__name__

        def refuse(why: str):
            raise BaseqError(f"unsupported model {cls}: {why}")

        config = getattr(model, "config", None)
        base_layers = _get(model, "model.layers")
        if config is None or base_layers is None or len(base_layers) == 0:
            refuse(f"no model.layers: none of the supported families ({supported_families()})")
        if _moe(base_layers[0], config):
            refuse("layer 0 mlp has experts (MoE is not supported yet)")
        spec = spec_for_config(config)
        if spec is None:
            refuse(f"model_type '{getattr(config, 'model_type', None)}' is none of the supported families "
                   f"({supported_families()})")
        self.spec = spec
        missing = [p for p in (spec.embed, spec.layers, spec.final_norm, spec.head) if _get(model, p) is None]
        if missing:
            refuse(f"no {', '.join(missing)} (expected of a {spec.family} model)")
        if getattr(config, "use_bidirectional_attention", False):
            refuse("bidirectional attention is not a causal LM")
        self.shape = s = shape_of_config(config, layers=len(self.layers))
        if s.heads % s.kv_heads:
            refuse(f"{s.heads} attention heads are not a multiple of {s.kv_heads} KV heads")
        act = getattr(config, spec.act_key, None)
        if act not in spec.activations:
            refuse(f"MLP activation {spec.act_key}={act!r} (a {spec.family} model uses "
                   f"{' or '.join(spec.activations)})")
        fused = dict(spec.fused)
        for i, layer in enumerate(self.layers):
            self._check_layer(i, layer, spec, s, fused, refuse)

    @staticmethod
    def _check_layer(i, layer, spec: ArchSpec, s: ModelShape, fused: dict, refuse) -> None:
        nq, nkv = s.heads * s.head_dim, s.kv_heads * s.head_dim
        expect = {"self_attn.q_proj": (nq, s.hidden), "self_attn.k_proj": (nkv, s.hidden),
                  "self_attn.v_proj": (nkv, s.hidden), "self_attn.o_proj": (s.hidden, nq),
                  "mlp.gate_proj": (s.ffn, s.hidden), "mlp.up_proj": (s.ffn, s.hidden),
                  "mlp.down_proj": (s.hidden, s.ffn)}
        for path, parts in fused.items():
            if _get(layer, path) is not None and not isinstance(_get(layer, path), FusedLinear):
                rows = sum(expect.pop(f"{path.split('.')[0]}.{p}")[0] for p in parts)
                expect[path] = (rows, s.hidden)
            else:  # already split
                for p in parts:
                    expect[f"{path}.{p}"] = expect.pop(f"{path.split('.')[0]}.{p}")
        for path, shape in expect.items():
            lin = _get(layer, path)
            if lin is None or not isinstance(getattr(lin, "weight", None), torch.Tensor):
                refuse(f"layer {i} has no {path} (expected of a {spec.family} model)")
            if tuple(lin.weight.shape) != shape:
                refuse(f"layer {i} {path} has shape {tuple(lin.weight.shape)}, the config implies {shape}")
        norms = {p: (s.hidden,) for p in spec.pre_norms + spec.post_norms}
        if spec.qk_norm:
            norms.update({"self_attn.q_norm": (s.head_dim,) if spec.qk_norm == "head" else (nq,),
                          "self_attn.k_norm": (s.head_dim,) if spec.qk_norm == "head" else (nkv,)})
        elif _get(layer, "self_attn.q_norm") is not None:
            refuse(f"layer {i} has q/k norms, which a {spec.family} model does not")
        for path, shape in norms.items():
            norm = _get(layer, path)
            if norm is None:
                refuse(f"layer {i} has no {path} (expected of a {spec.family} model)")
            if not _is_rmsnorm(norm):
                refuse(f"layer {i} {path} is not an RMSNorm (a weight and no bias)")
            if tuple(norm.weight.shape) != shape:
                refuse(f"layer {i} {path} has shape {tuple(norm.weight.shape)}, expected {shape}")

    @property
    def embed(self) -> nn.Module:
        return self.model.get_submodule(self.spec.embed)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.spec.layers)

    @property
    def final_norm(self) -> nn.Module:
        return self.model.get_submodule(self.spec.final_norm)

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.get_submodule(self.spec.head)

    @property
    def kv_bias(self) -> bool:
        """Whether the keys or values of the model *as loaded* carry a bias (k_proj / v_proj / a fused qkv_proj);
        after :func:`~baseq.quant.qmodel.quantize_structure` every linear has one."""
        return any(getattr(m, "bias", None) is not None for layer in self.layers
                   for name, m in layer.self_attn.named_children() if name in ("k_proj", "v_proj", "qkv_proj"))


LlamaAdapter = ModelAdapter
