"""Learned transforms of SpinQuant (Liu et al. 2024) and OSTQuant (Hu et al. 2025), and their fusing.

The training that produces them runs through the quantized model and lives with calibration
(:mod:`baseq.calibrate.learned_rotations`); what it returns is a :class:`LearnedTransforms`, which this module fuses
into the weights exactly (the FP function does not change) before GPTQ.

**Fusing** (:func:`fuse_transforms`): :func:`~baseq.rotation.fuse.rotate_model` with the learned R1,
:func:`~baseq.rotation.calibrated.apply_value_rotations` with the learned R2 (Qwen's v_proj bias rotates with it),
then the scales (:func:`fuse_scales`). Exact in exact arithmetic; float64 products.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..models.adapter import ModelAdapter
from .calibrated import apply_value_rotations
from .fuse import _right_mul_, rotate_model

SCALES = ("attn", "mlp", "qk", "vo", "ud")  # norm→qkv, norm→gate/up, q/k, v/o, up/down


@dataclass
class LearnedTransforms:
    """What training produced (float64): R1 [hidden, hidden], R2 [layers, kv_heads, hd, hd] and (OSTQuant) scales:
    attn / mlp [layers, hidden], qk [layers, kv_heads, hd/2], vo [layers, kv_heads, hd], ud [layers, ffn]."""

    r1: torch.Tensor
    r2: torch.Tensor
    scales: dict[str, torch.Tensor] | None = None

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor, in a fixed order (for a distributed broadcast)."""
        return [self.r1, self.r2] + ([self.scales[k] for k in SCALES] if self.scales else [])


# ---------------------------------------------------------------------------------------------- fusion

@torch.no_grad()
def fuse_scales(ad: ModelAdapter, scales: dict[str, torch.Tensor]) -> None:
    """Fold OSTQuant's scales into a norm-folded, rotated model (exact): norm→linear pairs (norm weight ``1/s``,
    the linears' input columns ``· s``), q/k (q rows ``/ t``, k rows ``· t``), v/o (v rows ``· s``, o columns
    ``/ s``), up/down (up rows ``· s``, down columns ``/ s``). Row scalings scale the biases too."""
    s = ad.shape

    def rows_(lin: nn.Linear, f: torch.Tensor) -> None:
        lin.weight.data = (lin.weight.data.double() * f[:, None]).to(lin.weight.dtype)
        if lin.bias is not None:
            lin.bias.data = (lin.bias.data.double() * f).to(lin.bias.dtype)

    for i, layer in enumerate(ad.layers):
        for norm, lins, key in ((layer.input_layernorm, ModelAdapter.qkv(layer), "attn"),
                                (layer.post_attention_layernorm, ModelAdapter.gate_up(layer), "mlp")):
            f = scales[key][i].double()
            norm.weight.data = (norm.weight.data.double() / f).to(norm.weight.dtype)
            for lin in lins:
                _right_mul_(lin.weight.data, f)
        a, m = layer.self_attn, layer.mlp
        t = torch.cat([scales["qk"][i]] * 2, dim=-1).double()  # [kv, hd]
        rows_(a.k_proj, t.flatten())
        rows_(a.q_proj, (1 / t)[:, None, :].expand(s.kv_heads, s.groups, s.head_dim).flatten())
        v = scales["vo"][i].double()
        rows_(a.v_proj, v.flatten())
        _right_mul_(a.o_proj.weight.data, (1 / v)[:, None, :].expand(s.kv_heads, s.groups, s.head_dim).flatten())
        u = scales["ud"][i].double()
        rows_(m.up_proj, u)
        _right_mul_(m.down_proj.weight.data, 1 / u)


def fuse_transforms(model: nn.Module, t: LearnedTransforms, seed: int = 0) -> ModelAdapter:
    """Fuse learned transforms into ``model`` (R1 and the online ends by ``rotate_model``, R2 on top of its seeded
    R2, then the scales): the FP function is unchanged. ``seed``: the one ``rotate_model`` uses for its seeded R2."""
    ad = rotate_model(model, seed=seed, r1=t.r1)
    apply_value_rotations(model, t.r2, seed=seed)
    if t.scales is not None:
        fuse_scales(ad, t.scales)
    return ad
