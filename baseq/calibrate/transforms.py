"""Stage 1 of BASE-Q: compensated transforms, trained per block and then fused exactly into the weights.

Learnable, all compensated (the full-precision block function does not change):

* ``s_v`` — a per-channel scale on V (rows of ``W_v``), undone in the matching ``W_o`` columns;
* ``R_g`` — an orthogonal rotation per KV head on V's output and, inversely, on the o_proj input of every query
  head of the group (Cayley parametrization ``R = (I − A)⁻¹(I + A)``, ``A`` skew-symmetric, starts at identity);
* ``s_o``, ``s_d`` — per-channel scales at the o_proj and down_proj quantization points (multiplied before the
  quantizer, divided out of ``W_o`` / ``W_down`` columns).

Trained against the FP block output with the weights fake-quantized (round-to-nearest, straight-through) and all
activation/KV quantizers on; then the transformed full-precision weights are written back, ready for GPTQ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from ..models.adapter import layer_spec, linears
from ..quant.quantizer import WeightQuantConfig, fake_quantize_weight
from .engine import BlockContext
from .stages import block_loss, settled_loss, training_set
from .train import fit


def cayley(p: torch.Tensor) -> torch.Tensor:
    """Orthogonal matrices from unconstrained ``p`` [..., d, d]: ``(I − A)⁻¹(I + A)`` with ``A = p − pᵀ``."""
    a = p - p.transpose(-1, -2)
    eye = torch.eye(p.shape[-1], dtype=p.dtype, device=p.device).expand_as(p)
    return torch.linalg.solve(eye - a, eye + a)


@dataclass
class _Shape:
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, layer: nn.Module) -> "_Shape":
        hd = layer.self_attn.head_dim
        lin = linears(layer)
        return cls(lin["o_proj"].in_features // hd, lin["v_proj"].out_features // hd, hd)


class TransformParams(nn.Module):
    """The learnable transforms of one block and the (full-precision) weights they produce."""

    def __init__(self, layer: nn.Module, rotation: bool, scales: bool):
        super().__init__()
        lin = linears(layer)
        self.paths = layer_spec(layer).linear_paths()
        v, o, down = lin["v_proj"], lin["o_proj"], lin["down_proj"]
        self.shape = s = _Shape.of(layer)
        self.base = {"v_w": v.weight.detach().clone().float(), "v_b": v.bias.detach().clone().float(),
                     "o_w": o.weight.detach().clone().float(), "d_w": down.weight.detach().clone().float(),
                     "o_s": o.act.scale.detach().clone().float(), "d_s": down.act.scale.detach().clone().float()}
        self.rot = nn.Parameter(torch.zeros(s.kv_heads, s.head_dim, s.head_dim)) if rotation else None
        self.log_v = nn.Parameter(torch.zeros(s.kv_heads * s.head_dim)) if scales else None
        self.log_o = nn.Parameter(torch.zeros(s.heads * s.head_dim)) if scales else None
        self.log_d = nn.Parameter(torch.zeros(down.in_features)) if scales else None

    def weights(self) -> dict[str, torch.Tensor]:
        s, b = self.shape, self.base
        hd, kv, groups = s.head_dim, s.kv_heads, s.heads // s.kv_heads
        w_v, b_v, w_o = b["v_w"].view(kv, hd, -1), b["v_b"].view(kv, hd), b["o_w"].view(-1, s.heads, hd)
        if self.rot is not None:
            r = cayley(self.rot.float())  # v' = v R  ⇒  W_v' = Rᵀ W_v ;  o-input' = o R  ⇒  W_o' = W_o R
            w_v = torch.einsum("gji,gjc->gic", r, w_v)
            b_v = torch.einsum("gj,gji->gi", b_v, r)
            w_o = torch.einsum("ohj,hji->ohi", w_o, r.repeat_interleave(groups, dim=0))
        w_v, b_v, w_o = w_v.reshape(kv * hd, -1), b_v.reshape(-1), w_o.reshape(w_o.shape[0], -1)
        o_s, d_s, w_d = b["o_s"], b["d_s"], b["d_w"]
        if self.log_v is not None:
            sv = self.log_v.float().exp()
            w_v, b_v = w_v * sv[:, None], b_v * sv
            so = self.log_o.float().exp()
            w_o = w_o / (sv.view(kv, 1, hd).expand(kv, groups, hd).reshape(-1) * so)
            o_s = o_s * so
            sd = self.log_d.float().exp()
            w_d, d_s = w_d / sd, d_s * sd
        p = self.paths
        return {f"{p['v_proj']}.weight": w_v, f"{p['v_proj']}.bias": b_v, f"{p['o_proj']}.weight": w_o,
                f"{p['o_proj']}.act.scale": o_s, f"{p['down_proj']}.weight": w_d, f"{p['down_proj']}.act.scale": d_s}


class CompensatedTransformStage:
    name = "transforms"
    needs_data = True
    needs_fp = True  # trained against the FP block output

    def __init__(self, wcfg: WeightQuantConfig, epochs: int = 3, lr: float = 5e-3, batch_size: int = 4,
                 rotation: bool = True, scales: bool = True, seed: int = 0, samples: int = 0, loss: str = "mse"):
        self.wcfg = WeightQuantConfig(bits=wcfg.bits, group_size=wcfg.group_size, sym=wcfg.sym, clip_search=False)
        self.epochs, self.lr, self.batch_size = epochs, lr, batch_size
        self.rotation, self.scales, self.seed, self.samples = rotation, scales, seed, samples
        self.loss_kind = settled_loss(loss)

    def run(self, ctx: BlockContext) -> None:
        layer = ctx.layer
        tp = TransformParams(layer, self.rotation, self.scales).to(ctx.device)
        params = [p for p in tp.parameters()]
        if not params or self.epochs == 0:
            return
        lin, paths = linears(layer), tp.paths
        fixed = {f"{paths[n]}.weight": fake_quantize_weight(lin[n].weight, self.wcfg)
                 for n in ("q_proj", "k_proj", "gate_proj", "up_proj")}

        def forward(x):
            w = tp.weights()
            for name in (f"{paths['v_proj']}.weight", f"{paths['o_proj']}.weight", f"{paths['down_proj']}.weight"):
                w[name] = fake_quantize_weight(w[name], self.wcfg)
            dtype = lin["o_proj"].weight.dtype
            state = {k: v.to(dtype) for k, v in {**w, **fixed}.items()}
            out = functional_call(layer, state, (x,), ctx.kwargs, strict=False)
            return out[0] if isinstance(out, tuple) else out

        x, y = training_set(ctx, self.samples)
        n = x.shape[0]
        before = 0.0
        if n:
            with torch.no_grad():
                before = sum(block_loss(forward(b.to(ctx.device)), t.to(ctx.device), self.loss_kind).item() * len(b)
                             for b, t in zip(x.split(self.batch_size), y.split(self.batch_size))) / n
        ctx.log["t_loss_before"] = ctx.comm.mean(before, n)

        def step_loss(local: torch.Tensor) -> torch.Tensor:
            return block_loss(forward(x[local].to(ctx.device)), y[local].to(ctx.device), self.loss_kind)

        ctx.comm.broadcast_(params)
        ctx.log["t_loss_last"] = fit([{"params": params, "lr": self.lr}], step_loss, ctx.shard.first(self.samples),
                                     epochs=self.epochs, batch_size=self.batch_size,
                                     seed=self.seed * 100003 + ctx.index + 7, comm=ctx.comm, what="transform",
                                     index=ctx.index, progress=ctx.progress)
        ctx.comm.broadcast_(params)
        with torch.no_grad():
            for name, value in tp.weights().items():
                target = layer.get_parameter(name)
                target.copy_(value.to(target.dtype))
