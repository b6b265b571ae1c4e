"""Stages run by the engine on one block: weight quantization (RTN, GPTQ) and BASE-Q's correction training.

A stage is a small object with a ``name`` and ``run(ctx)`` that changes ``ctx.layer`` in place and may add entries
to ``ctx.log``. Methods are compositions of stages (see ``calibrate/pipeline.py``).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import GPTQConfig, TrainConfig
from ..errors import BaseqError
from ..models.adapter import LlamaAdapter
from ..quant.gptaq import AsymmetricStats, asymmetric_target
from ..quant.gptq import GPTQ, rtn_quantize_
from ..quant.qmodel import ActPoint, set_quantize
from ..quant.quantizer import WeightQuantConfig, record_weight_qparams
from . import weight_scale
from .engine import BlockContext

# GPTQ's sequential order: each group sees inputs produced by the already-quantized groups before it.
SEQUENTIAL = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


class RTNStage:
    name = "rtn"

    def __init__(self, wcfg: WeightQuantConfig):
        self.wcfg = wcfg

    def run(self, ctx: BlockContext) -> None:
        for lin in LlamaAdapter.linears(ctx.layer).values():
            rtn_quantize_(lin, self.wcfg)


class GPTQStage:
    """GPTQ on every linear of the block, group by group in :data:`SEQUENTIAL` order, on the quantized model's
    inputs (activation quantizers on). The linears of a group share one Hessian and are solved as one stacked
    matrix (GPTQ treats rows independently, so this equals solving them one by one, once instead of three times).

    ``asymmetric > 0``: GPTAQ-style asymmetric calibration (``quant/gptaq.py``): the FP block's inputs of each
    group are collected too, and GPTQ fits the FP block's output instead of its own (shift scaled by the value)."""

    name = "gptq"

    def __init__(self, wcfg: WeightQuantConfig, gcfg: GPTQConfig, asymmetric: float = 0.0):
        self.wcfg, self.gcfg, self.asymmetric = wcfg, gcfg, asymmetric

    def run(self, ctx: BlockContext) -> None:
        if not self.wcfg.enabled:  # 16-bit weights: nothing to quantize
            return
        linears = LlamaAdapter.linears(ctx.layer)
        fp_layer = None
        if self.asymmetric:
            fp_layer = copy.deepcopy(ctx.layer)  # the block before any weight is quantized, quantizers off
            set_quantize(fp_layer, False)
        for group in SEQUENTIAL:
            first = group[0]
            if fp_layer is None:
                stats = GPTQ(linears[first])
                for xq in group_inputs(ctx, ctx.layer, first, ctx.q_in):
                    stats.add_batch(xq)
            else:
                stats = AsymmetricStats(linears[first].in_features, linears[first].weight.device)
                fp_linears = LlamaAdapter.linears(fp_layer)
                for xq, xf in zip(group_inputs(ctx, ctx.layer, first, ctx.q_in),
                                  group_inputs(ctx, fp_layer, first, ctx.fp_in)):
                    stats.add_batch(xq, xf)
            members = [linears[n] for n in group]
            stacked = torch.nn.Linear(members[0].in_features, sum(m.out_features for m in members), bias=False,
                                      device=members[0].weight.device, dtype=torch.float32)
            with torch.no_grad():
                stacked.weight.copy_(torch.cat([m.weight.float() for m in members]))
                if fp_layer is not None:
                    w_fp = torch.cat([fp_linears[n].weight.float() for n in group])
                    stacked.weight.copy_(asymmetric_target(w_fp, stats.H, stats.C, self.asymmetric,
                                                           self.gcfg.percdamp))
            solver = GPTQ(stacked)
            solver.H, solver.nsamples = stats.H, stats.nsamples
            loss = solver.quantize(self.wcfg, blocksize=self.gcfg.blocksize, percdamp=self.gcfg.percdamp,
                                   act_order=self.gcfg.act_order, static_groups=self.gcfg.static_groups)
            sizes = [m.out_features for m in members]
            with torch.no_grad():
                for m, w, sc, z in zip(members, stacked.weight.split(sizes), stacked.weight_scale.split(sizes),
                                       stacked.weight_zero.split(sizes)):
                    m.weight.copy_(w.to(m.weight.dtype))
                    record_weight_qparams(m, sc, z)
            ctx.log[f"gptq_{'_'.join(n.removesuffix('_proj') for n in group)}"] = loss


def group_inputs(ctx: BlockContext, layer, name: str, x: torch.Tensor):
    """For each batch of ``x``: the input of linear ``name`` of ``layer`` after its activation point (what its
    weights multiply), the forward stopped right there."""
    lin = LlamaAdapter.linears(layer)[name]
    seen = {}

    def hook(module, args, output):
        seen["x"] = module.act(args[0]) if module.act is not None else args[0]
        raise _GroupDone  # nothing after the group's input is needed: stop the forward here

    handle = lin.register_forward_hook(hook)
    try:
        for batch in x.split(ctx.batch_size):
            try:
                with torch.no_grad():
                    layer(batch.to(ctx.device), **ctx.kwargs)
            except _GroupDone:
                pass
            yield seen.pop("x")
    finally:
        handle.remove()


class _GroupDone(Exception):
    pass


def training_set(ctx: BlockContext, samples: int, inputs: str = "fp") -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, FP targets) for training: the first ``samples`` calibration windows (0 = all)."""
    x = ctx.fp_in if inputs == "fp" else ctx.q_in
    k = samples or x.shape[0]
    return x[:k], ctx.fp_out[:k]


def block_loss(out: torch.Tensor, target: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """The training loss of a block's output [..., tokens, hidden] against its FP target.

    ``mse``: plain mean squared error, dominated by the few tokens whose residual stream is huge (e.g. the first
    token of a window, an attention sink). ``token``: each token's squared error relative to its target's mean
    square, averaged over tokens, so every token counts as much as it does after the next RMSNorm.
    """
    out, target = out.float(), target.float()
    if kind == "mse":
        return F.mse_loss(out, target)
    if kind == "token":
        err = (out - target).pow(2).mean(-1)
        return (err / target.pow(2).mean(-1).clamp_min(1e-12)).mean()
    raise ValueError(f"unknown block loss {kind!r}")


def block_points(layer) -> dict[str, ActPoint]:
    return {"qkv": layer.input_layernorm.act, "o": layer.self_attn.o_proj.act,
            "gate_up": layer.post_attention_layernorm.act, "down": layer.mlp.down_proj.act}


class BaseqTrainStage:
    """BASE-Q stage 3: learn per-channel biases, asymmetric scales and clipping against the FP block output.

    Weights stay frozen at their quantized values; all activation and KV quantizers are on. Afterwards the result
    is folded (:func:`fold_block`), so the block computes exactly what was trained with no extra parameters live.
    """

    name = "baseq"

    def __init__(self, cfg: TrainConfig, seed: int = 0):
        self.cfg, self.seed = cfg, seed

    def parameter_groups(self, layer) -> list[dict]:
        pts = block_points(layer).values()
        kv = layer.self_attn.kv_point
        groups = []
        if self.cfg.scale:
            groups.append({"name": "scale", "params": [p.scale for p in pts], "lr": self.cfg.lr_scale})
        if self.cfg.bias:
            groups.append({"name": "bias", "params": [p.shift for p in pts], "lr": self.cfg.lr_bias})
        if self.cfg.clip:
            betas = [q.beta for q in [p.quantizer for p in pts] + [kv.k, kv.v] if q.beta is not None]
            if betas:
                groups.append({"name": "clip", "params": betas, "lr": self.cfg.lr_clip})
        return groups

    @torch.no_grad()
    def init_bias_mean(self, ctx: BlockContext, x: torch.Tensor) -> None:
        """Set each point's bias to the channel mean of what it quantizes (over all calibration tokens)."""
        sums, hooks = {}, []
        for name, p in block_points(ctx.layer).items():
            def pre(module, args, name=name):
                y = args[0]
                if module.rotation is not None:
                    y = module.rotation(y)
                y = (y * module.scale).float().flatten(0, -2)
                s, n = sums.get(name, (0.0, 0))
                sums[name] = (s + y.sum(0), n + y.shape[0])
            hooks.append(p.register_forward_pre_hook(pre))
        try:
            ctx.run(x)
        finally:
            for h in hooks:
                h.remove()
        for name, p in block_points(ctx.layer).items():
            s, n = sums[name]
            p.shift.copy_(s / n)

    @staticmethod
    def loss(ctx: BlockContext, x: torch.Tensor, y: torch.Tensor, kind: str = "mse") -> float:
        with torch.no_grad():
            out = ctx.run(x)
        return block_loss(out, y, kind).item()

    def run(self, ctx: BlockContext) -> None:
        cfg = self.cfg
        x, y = training_set(ctx, cfg.samples, cfg.inputs)
        if cfg.bias and cfg.bias_init == "mean":
            self.init_bias_mean(ctx, x)
        groups = self.parameter_groups(ctx.layer)
        if cfg.weight_scale:  # per-row weight scales, trained with the corrections (calibrate/weight_scale.py)
            groups.append({"name": "weight_scale", "params": weight_scale.attach(ctx.layer),
                           "lr": cfg.lr_weight_scale})
        params = [p for g in groups for p in g["params"]]
        before = ctx.log["loss_before"] = self.loss(ctx, x, y, cfg.loss)
        if params and cfg.epochs > 0:
            start = [p.detach().clone() for p in params]
            self.train(ctx, x, y, groups, params)
            after = self.loss(ctx, x, y, cfg.loss)
            if cfg.revert_if_worse and after > before:  # training overshot on this block: keep where it started
                with torch.no_grad():
                    for p, p0 in zip(params, start):
                        p.copy_(p0)
                ctx.log["reverted"] = 1
                after = before
            ctx.log["loss_after"] = after
        else:
            ctx.log["loss_after"] = before
        weight_scale.fold(ctx.layer)
        fold_block(ctx.layer)

    def train(self, ctx: BlockContext, x: torch.Tensor, y: torch.Tensor, groups: list[dict], params: list) -> None:
        cfg = self.cfg
        n = x.shape[0]
        steps_per_epoch = math.ceil(n / cfg.batch_size)
        total = cfg.epochs * steps_per_epoch
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(groups, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        gen = torch.Generator().manual_seed(self.seed * 100003 + ctx.index)
        step = 0
        bar = tqdm(total=total, desc=f"block {ctx.index} baseq", disable=not ctx.progress, leave=False)
        try:
            for epoch in range(cfg.epochs):
                for idx in torch.randperm(n, generator=gen).split(cfg.batch_size):
                    out = ctx.forward(x[idx].to(ctx.device), grad=True)
                    loss = block_loss(out, y[idx].to(ctx.device), cfg.loss)
                    if not torch.isfinite(loss):
                        raise BaseqError(f"non-finite training loss in block {ctx.index} at epoch {epoch}, step "
                                         f"{step}: lower the learning rates (--lr-clip/--lr-bias/--lr-scale)")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    step += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.4g}", epoch=epoch)
        finally:
            bar.close()
            for p in params:
                p.requires_grad_(False)
                p.grad = None


@torch.no_grad()
def fold_block(layer) -> None:
    """Fold trained corrections for inference (exact up to float rounding):

    * the qkv- and gate/up-input scales into the RMSNorm weights;
    * every bias ``b``'s ``+ b`` into the following linears' biases (``bias += W b``); the ``− b`` stays before the
      quantizer.
    """
    pts = block_points(layer)
    for norm, point, linears in ((layer.input_layernorm, pts["qkv"], LlamaAdapter.qkv(layer)),
                                 (layer.post_attention_layernorm, pts["gate_up"], LlamaAdapter.gate_up(layer))):
        norm.weight.mul_(point.scale.to(norm.weight.dtype))
        point.scale.fill_(1.0)
        _fold_shift(point, linears)
    _fold_shift(pts["o"], [layer.self_attn.o_proj])
    _fold_shift(pts["down"], [layer.mlp.down_proj])


def _fold_shift(point: ActPoint, linears) -> None:
    if bool(point.shift_folded):
        return
    for lin in linears:
        lin.bias.add_((lin.weight.double() @ point.shift.double()).to(lin.bias.dtype))
    point.shift_folded.fill_(True)
