"""Stages run by the engine on one block: weight quantization (RTN, GPTQ) and BASE-Q's correction training.

A stage is a small object with a ``name`` and ``run(ctx)`` that changes ``ctx.layer`` in place and may add entries
to ``ctx.log``. Methods are compositions of stages (see ``calibrate/pipeline.py``).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ..config import GPTQConfig, TrainConfig
from ..device import release_memory
from ..models.adapter import attn_norm, block_points, gate_up, linears as block_linears, mlp_norm, qkv
from ..quant.gptaq import AsymmetricStats, asymmetric_target
from ..quant.gptq import GPTQ, rtn_quantize_
from ..quant.qmodel import ActPoint, set_quantize, token_rms
from ..quant.quantizer import WeightQuantConfig, _group_count, record_weight_qparams
from . import weight_scale
from .engine import BlockContext
from .train import Tap, fit

# GPTQ's sequential order: each group sees inputs produced by the already-quantized groups before it.
SEQUENTIAL = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


class RTNStage:
    name = "rtn"
    needs_data = False  # round to nearest: the weights alone
    needs_fp = False

    def __init__(self, wcfg: WeightQuantConfig):
        self.wcfg = wcfg

    def run(self, ctx: BlockContext) -> None:
        for lin in block_linears(ctx.layer).values():
            rtn_quantize_(lin, self.wcfg)


class GPTQStage:
    """GPTQ on every linear of the block, group by group in :data:`SEQUENTIAL` order, on the quantized model's
    inputs (activation quantizers on). The linears of a group share one Hessian and are solved as one stacked
    matrix (GPTQ treats rows independently, so this equals solving them one by one, once instead of three times);
    on several ranks the Hessian is summed over all of them and each group is solved by one rank, round-robin.

    ``asymmetric > 0``: GPTAQ-style asymmetric calibration (``quant/gptaq.py``): the FP block's inputs of each
    group are collected too, and GPTQ fits the FP block's output instead of its own (shift scaled by the value)."""

    name = "gptq"
    needs_data = True

    def __init__(self, wcfg: WeightQuantConfig, gcfg: GPTQConfig, asymmetric: float = 0.0):
        self.wcfg, self.gcfg, self.asymmetric = wcfg, gcfg, asymmetric

    @property
    def needs_fp(self) -> bool:  # GPTQ fits the quantized inputs; GPTAQ also the FP block's
        return self.asymmetric > 0

    def run(self, ctx: BlockContext) -> None:
        if not self.wcfg.enabled:  # 16-bit weights: nothing to quantize
            return
        linears = block_linears(ctx.layer)
        fp_layer = None
        if self.asymmetric:
            fp_layer = copy.deepcopy(ctx.layer)  # the block before any weight is quantized, quantizers off
            set_quantize(fp_layer, False)
        comm = ctx.comm
        for k, group in enumerate(SEQUENTIAL):
            stats = self.statistics(ctx, group[0], fp_layer)
            comm.all_reduce_([stats.H] + ([stats.C] if fp_layer is not None else []))  # sums: exact, divided once
            stats.nsamples = int(comm.sum([stats.nsamples])[0])
            members = [linears[n] for n in group]
            owner = k % comm.world_size
            loss = 0.0
            if comm.rank == owner:
                release_memory()  # GPTQ's large temporaries come next: start from a trimmed heap
                target = None
                if fp_layer is not None:
                    fp = block_linears(fp_layer)
                    target = asymmetric_target(torch.cat([fp[n].weight.float() for n in group]), stats.H, stats.C,
                                               self.asymmetric, self.gcfg.percdamp)
                loss = self.solve(members, stats, target)
            for m in members:
                loss = share_quantized(m, self.wcfg, loss, owner, comm)
            ctx.log[f"gptq_{'_'.join(n.removesuffix('_proj') for n in group)}"] = loss

    @staticmethod
    def statistics(ctx: BlockContext, name: str, fp_layer=None):
        """This rank's Hessian sums of linear ``name``'s quantized inputs (a :class:`GPTQ`), or with ``fp_layer``
        also the cross term with the FP block's inputs (an :class:`AsymmetricStats`)."""
        first = block_linears(ctx.layer)[name]
        if fp_layer is None:
            stats = GPTQ(first)
            for xq in group_inputs(ctx, ctx.layer, name, ctx.q_in):
                stats.add_batch(xq)
            return stats
        stats = AsymmetricStats(first.in_features, first.weight.device)
        quant, fp = group_inputs(ctx, ctx.layer, name, ctx.q_in), group_inputs(ctx, fp_layer, name, ctx.fp_in)
        try:
            for xq, xf in zip(quant, fp):
                stats.add_batch(xq, xf)
        finally:  # both taps removed now, not whenever the generators are collected
            quant.close()
            fp.close()
        return stats

    def solve(self, members: list, stats, target: torch.Tensor | None = None) -> float:
        """GPTQ on the members' weights stacked (or on ``target``), written back with each member's scales."""
        first = members[0]
        stacked = torch.nn.Linear(first.in_features, sum(m.out_features for m in members), bias=False,
                                  device=first.weight.device, dtype=torch.float32)
        with torch.no_grad():
            stacked.weight.copy_(target if target is not None else torch.cat([m.weight.float() for m in members]))
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
        return loss


class KeepGateStage:
    """``--keep-massive RATIO``: the threshold of the block's :class:`~baseq.quant.qmodel.TokenGate`, ``RATIO`` times
    the median RMS of the tokens entering the block on the quantized path (over every rank's tokens: the same
    threshold as one process). Runs first by default, so the weights and BASE-Q's corrections are fitted to the
    model that keeps those tokens; last with ``--keep-massive-fit without`` (the block is fitted as without the option; the blocks after it
    see its output with those tokens kept, as at inference)."""

    name = "keep"
    needs_data = True  # the threshold is a multiple of the calibration tokens' median RMS
    needs_fp = False

    def __init__(self, ratio: float):
        self.ratio = ratio

    @torch.no_grad()
    def run(self, ctx: BlockContext) -> None:
        gate = ctx.layer.keep_gate
        rms = torch.cat([token_rms(batch).flatten() for batch in ctx.q_in.split(ctx.batch_size)])
        gate.threshold.fill_(self.ratio * float(ctx.comm.gather(rms).median()))  # every rank's tokens
        kept = ctx.comm.sum([int((rms >= gate.threshold.cpu()).sum()), len(rms)])
        ctx.log["keep_threshold"] = round(float(gate.threshold), 4)
        ctx.log["kept_tokens"] = int(kept[0])
        ctx.log["kept_share"] = round(kept[0] / max(kept[1], 1), 6)


class KVShiftStage:
    """The per-channel means of the block's (rotated) keys and values over every calibration token, as the centres
    the KV cache is quantized around (:class:`~baseq.quant.qmodel.KVPoint`). Runs before the weights are quantized,
    so GPTQ of o_proj already sees the shifted cache; BASE-Q's training then refines the shifts with its biases."""

    name = "kv_shift"
    needs_data = True  # the channel means of K and V
    needs_fp = False  # the quantized inputs' K/V

    @torch.no_grad()
    def run(self, ctx: BlockContext) -> None:
        kv = ctx.layer.self_attn.kv_point
        sums = [torch.zeros_like(kv.k_shift, dtype=torch.float64), torch.zeros_like(kv.v_shift, dtype=torch.float64)]
        count = [0]

        def add(_, args, kwargs):
            _, key = kv.rotate(args[0], args[1])
            mask = kv.gate.mask if kv.gate is not None else None  # float K/V of kept tokens: not quantized, not counted
            use = None if mask is None else (~mask)[:, None, :, None].double()
            for acc, x in zip(sums, (key, args[2])):  # [b, kv_heads, t, head_dim]
                acc += (x.double() if use is None else x.double() * use).sum(dim=(0, 2))
            count[0] += key.shape[0] * key.shape[2] - (0 if mask is None else int(mask.sum()))

        with Tap(kv, add, stop=True) as tap:  # each forward stops at the KV point
            for batch in ctx.q_in.split(ctx.batch_size):
                tap(ctx.forward, batch.to(ctx.device))
        sums = ctx.comm.all_reduce_(sums)
        n = max(int(ctx.comm.sum([count[0]])[0]), 1)
        kv.k_shift.copy_(sums[0] / n)
        kv.v_shift.copy_(sums[1] / n)
        ctx.log["kv_shift_k"] = round(kv.k_shift.norm().item(), 4)


def group_inputs(ctx: BlockContext, layer, name: str, x: torch.Tensor):
    """For each batch of ``x``: the input of linear ``name`` of ``layer`` after its activation point (what its
    weights multiply); each forward stops right there."""
    lin = block_linears(layer)[name]
    seen: list = []

    def keep(_, args, kwargs):
        seen.append(lin.act(args[0]) if lin.act is not None else args[0])

    with Tap(lin, keep, stop=True) as tap:  # (no grad mode held across the yield: the caller's stays its own)
        for batch in x.split(ctx.batch_size):
            with torch.no_grad():
                tap(lambda b: layer(b, **ctx.kwargs), batch.to(ctx.device))
            yield seen.pop()


def share_quantized(lin, wcfg: WeightQuantConfig, loss: float, owner: int, comm) -> float:
    """Send a linear quantized on rank ``owner`` (its weight, the scale / zero buffers, its GPTQ loss) to every
    rank; returns the loss."""
    if comm.world_size == 1 or not wcfg.enabled:
        return loss
    if comm.rank != owner:
        groups = _group_count(lin.weight, wcfg)
        for buf in ("weight_scale", "weight_zero"):
            lin.register_buffer(buf, torch.empty(lin.out_features, groups, device=lin.weight.device))
    value = torch.tensor([loss], dtype=torch.float64)
    comm.broadcast_([lin.weight.data, lin.weight_scale, lin.weight_zero, value], src=owner)
    return value.item()


def training_set(ctx: BlockContext, samples: int, inputs: str = "fp") -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, FP targets) for training: this rank's part of the first ``samples`` calibration windows (0 = all)."""
    x = ctx.fp_in if inputs == "fp" else ctx.q_in
    k = ctx.shard.first(samples).size
    return x[:k], ctx.fp_out[:k]


def settled_loss(kind: str, post_norms: bool = False) -> str:
    """``--train-loss``'s ``auto`` for a model family: the per-token relative MSE where the sublayers end in a
    post-norm — on Gemma 3 270M plain MSE lost to it on both texts at two seeds and in zero-shot (docs/RESULTS.md)
    — and plain MSE elsewhere (it won at 135M and 1.5B); any other kind as it is."""
    return kind if kind != "auto" else "token" if post_norms else "mse"


def block_loss(out: torch.Tensor, target: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """The training loss of a block's output [..., tokens, hidden] against its FP target.

    ``mse``: plain mean squared error, dominated by the few tokens whose residual stream is huge (e.g. the first
    token of a window, an attention sink). ``token``: each token's squared error relative to its target's mean
    square, averaged over tokens, so every token counts as much as it does after the next RMSNorm. ``both``: the
    sum of the two as relative errors — the total squared error over the total energy (``mse`` up to a constant,
    the huge tokens' share) plus ``token`` (everyone else's), so neither kind of token is ignored.
    """
    out, target = out.float(), target.float()
    if kind == "mse":
        return F.mse_loss(out, target)
    if kind not in ("token", "both"):
        raise ValueError(f"unknown block loss {kind!r}")
    err, energy = (out - target).pow(2).mean(-1), target.pow(2).mean(-1)
    loss = (err / energy.clamp_min(1e-12)).mean()
    return loss if kind == "token" else loss + err.mean() / energy.mean().clamp_min(1e-12)


class BaseqTrainStage:
    """BASE-Q stage 3: learn per-channel biases, asymmetric scales and clipping against the FP block output.

    Weights stay frozen at their quantized values; all activation and KV quantizers are on. Afterwards the result
    is folded (:func:`fold_block`), so the block computes exactly what was trained with no extra parameters live.
    """

    name = "baseq"
    needs_data = True
    needs_fp = True  # trains against the FP block output

    def __init__(self, cfg: TrainConfig, seed: int = 0, kv_shift: bool = False):
        self.cfg, self.seed, self.kv_shift = cfg, seed, kv_shift

    def parameter_groups(self, layer) -> list[dict]:
        pts = block_points(layer).values()
        kv = layer.self_attn.kv_point
        groups = []
        if self.cfg.scale:
            groups.append({"name": "scale", "params": [p.scale for p in pts], "lr": self.cfg.lr_scale})
        if self.cfg.bias:
            shifts = [kv.k_shift, kv.v_shift] if self.kv_shift else []  # the KV cache's centres train with the biases
            groups.append({"name": "bias", "params": [p.shift for p in pts] + shifts, "lr": self.cfg.lr_bias})
        if self.cfg.clip:
            betas = [q.beta for q in [p.quantizer for p in pts] + [kv.k, kv.v] if q.beta is not None]
            if betas:
                groups.append({"name": "clip", "params": betas, "lr": self.cfg.lr_clip})
        return groups

    @torch.no_grad()
    def init_bias_mean(self, ctx: BlockContext, x: torch.Tensor) -> None:
        """Set each point's bias to the channel mean of what it quantizes (over all calibration tokens)."""
        pts = block_points(ctx.layer)
        sums: dict[str, list] = {}

        def add(name, args, kwargs):
            module, y = pts[name], args[0]
            if module.rotation is not None:
                y = module.rotation(y)
            y = (y * module.scale).float().flatten(0, -2)
            s, n = sums.get(name, (0.0, 0))
            sums[name] = (s + y.sum(0), n + y.shape[0])

        with Tap(pts, add) as tap:
            if len(x):
                tap(ctx.run, x)
        names = list(pts)
        totals = ctx.comm.all_reduce_([sums[n][0] if n in sums else torch.zeros_like(pts[n].shift) for n in names])
        counts = ctx.comm.sum([sums[n][1] if n in sums else 0 for n in names])
        for name, s, n in zip(names, totals, counts):
            pts[name].shift.copy_(s / n)

    @staticmethod
    def loss(ctx: BlockContext, x: torch.Tensor, y: torch.Tensor, kind: str = "mse") -> float:
        """The block's loss on every rank's windows (``x``, ``y``: this rank's)."""
        value = 0.0
        if len(x):
            with torch.no_grad():
                value = block_loss(ctx.run(x), y, kind).item()
        return ctx.comm.mean(value, len(x))

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
        ctx.comm.broadcast_(params)  # every rank starts from rank 0's values
        kind = settled_loss(cfg.loss)  # (the pipeline settles "auto" by the model's family first)
        before = ctx.log["loss_before"] = self.loss(ctx, x, y, kind)
        if params and cfg.epochs > 0:
            start = [p.detach().clone() for p in params]
            self.train(ctx, x, y, groups, kind)
            after = self.loss(ctx, x, y, kind)
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

    def train(self, ctx: BlockContext, x: torch.Tensor, y: torch.Tensor, groups: list[dict], kind: str) -> None:
        cfg = self.cfg

        def step_loss(local: torch.Tensor) -> torch.Tensor:
            return block_loss(ctx.forward(x[local].to(ctx.device), grad=True), y[local].to(ctx.device), kind)

        fit(groups, step_loss, ctx.shard.first(cfg.samples), epochs=cfg.epochs, batch_size=cfg.batch_size,
            seed=self.seed * 100003 + ctx.index, comm=ctx.comm, index=ctx.index, progress=ctx.progress,
            hint=": lower the learning rates (--lr-clip/--lr-bias/--lr-scale)")
        ctx.comm.broadcast_([p for g in groups for p in g["params"]])  # identical on every rank, whatever the reductions did


@torch.no_grad()
def fold_block(layer) -> None:
    """Fold trained corrections for inference (exact up to float rounding):

    * the qkv- and gate/up-input scales into the RMSNorm weights (where the point directly follows its pre-norm;
      after an online R1, or without a pre-norm, the scale stays in the point);
    * every bias ``b``'s ``+ b`` into the following linears' biases (``bias += W b``); the ``− b`` stays before the
      quantizer.
    """
    pts = block_points(layer)
    lin = block_linears(layer)
    for norm, point, consumers in ((attn_norm(layer), pts["qkv"], qkv(layer)),
                                   (mlp_norm(layer), pts["gate_up"], gate_up(layer))):
        if norm is not None and getattr(norm, "act", None) is point:
            norm.weight.mul_(point.scale.to(norm.weight.dtype))
            point.scale.fill_(1.0)
        _fold_shift(point, consumers)
    _fold_shift(pts["o"], [lin["o_proj"]])
    _fold_shift(pts["down"], [lin["down_proj"]])


def _fold_shift(point: ActPoint, linears) -> None:
    if bool(point.shift_folded):
        return
    for lin in linears:
        lin.bias.add_((lin.weight.double() @ point.shift.double()).to(lin.bias.dtype))
    point.shift_folded.fill_(True)
