"""End-to-end learned rotations, their training: SpinQuant (Liu et al. 2024) and OSTQuant (Hu et al. 2025).

Both learn the *fusable* transforms of a QuaRot-structured model by backpropagating a whole-network loss through
the quantized model, then fuse them into the weights exactly (the FP function does not change) before GPTQ.

=========  ==========================================================  ======================  =================
method     learned (initialised at the seeded randomized Hadamards)    loss                    optimiser
=========  ==========================================================  ======================  =================
spinquant  R1 (hidden × hidden, global); R2 (head_dim², one per layer)  causal-LM cross-entropy  Cayley SGD
ostquant   R_res (global); R_ov (head_dim², per layer and KV head);     KL-Top vs the FP model  Cayley Adam (R),
           scales norm→qkv, norm→gate/up, q/k, v/o, up/down                                     Adam (log-scales)
=========  ==========================================================  ======================  =================

R3 (queries/keys after RoPE) and R4 (down_proj input) stay the fixed online Hadamards of ``quant/qmodel.py``.

**Training without fusing.** The model is trained as it is (full precision, its RMSNorm weights folded into the
linears first, so that rotations commute with the norms); the transforms are applied *online* at each quantization
point of the fused model and undone right after it, which is the same function as fusing them, with 16-bit weights:

* qkv / gate-up inputs: ``y ↦ (Q((y R1) ⊘ s) ⊙ s) R1ᵀ`` — the fused model quantizes ``norm(x R1) ⊘ s`` (norm weight
  ``1/s``) and its linear holds ``W R1 diag(s)``;
* V: ``v_g ↦ (v_g R2_g) ⊙ s_g`` per KV head g, then (attention) the o_proj input is quantized and mapped back,
  ``z_h ↦ (Q(z)_h ⊘ s_g) R2_gᵀ`` for the query heads h of group g;
* Q / K (OSTQuant): ``q_h ⊘ t_g``, ``k_g ⊙ t_g`` with ``t`` equal on the two halves of each RoPE pair (so it commutes
  with RoPE); then R3 and K/V quantization (:class:`~baseq.quant.qmodel.KVPoint`, the fused model's own);
* down_proj input: ``u ↦ R4ᵀ Q((u ⊙ s) R4) ⊘ s`` (``s`` also scales up_proj's rows in the fused model).

Activation and KV quantizers are the fused model's (per-token asymmetric, fixed clip ratios, straight-through
rounding), so the loss trained is the loss of the W16 quantized model. The residual stream itself is not quantized,
so the online R1 at the model's two ends needs no simulation; the fused model keeps the embedding tied to the LM head
and applies R1 / R1ᵀ online at the two ends (``rotation/fuse.py``): no untying is needed.

**Fusing** the result, a :class:`~baseq.rotation.learned.LearnedTransforms`, is
:func:`baseq.rotation.learned.fuse_transforms` (rotations only, no quantizers); :mod:`baseq.calibrate.rotations`
drives both.

**Resuming.** Given a :class:`TrainingCheckpoint`, the training state (the transforms, every optimiser's state, the
losses so far) is saved every few minutes and after the last step; a resumed run restores it and goes on from the
step it reached, to the same result, bit for bit, as a run that was never interrupted (nothing in the training is
random: step ``t`` uses fixed windows, the schedule is a function of ``t``). A finished state is not trained again.

**Several ranks** (a :class:`~baseq.calibrate.comm.Communicator`): each rank takes its contiguous share of every
step's windows, weights its loss by that share and the gradients are summed over the ranks, so every rank takes the
full batch's step; OSTQuant's FP targets are computed only for the windows a rank will see.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import BaseqError
from ..io import atomic_path, read_safetensors, safetensors_header
from ..models.adapter import ModelAdapter
from ..provenance import UNKNOWN, code_id, mixed_code
from ..quant.qmodel import ActSpec, KVPoint, quantize_shifted, use_quantized_attention
from ..quant.quantizer import ActQuantizer
from ..rotation.fuse import OnlineRotation, fold_layer_norms
from ..rotation.hadamard import hadamard_transform, orthogonal_matrix
from ..rotation.learned import LearnedTransforms
from ..rotation.stiefel import CayleyAdam, CayleySGD
from .comm import Communicator


def _scale_shapes(s) -> dict[str, tuple[int, ...]]:
    return {"attn": (s.layers, s.hidden), "mlp": (s.layers, s.hidden), "qk": (s.layers, s.kv_heads, s.head_dim // 2),
            "vo": (s.layers, s.kv_heads, s.head_dim), "ud": (s.layers, s.ffn)}


class BatchMeanKV(KVPoint):
    """The KV point of a model calibrated with ``--kv-shift``: K and V quantized around their channel means — during
    the training, each batch's own (detached), standing in for the calibration means the fused model gets later
    (Qwen2.5's k_proj biases put a constant into every key that a 4-bit per-token grid cannot afford: trained
    without the shift, the rotations would fit a broken model)."""

    def forward(self, query, key, value):
        query, key = self.rotate(query, key)
        if not self.quantize:
            return query, key, value
        with torch.no_grad():  # key / value [b, kv_heads, t, head_dim]
            self.k_shift.copy_(key.detach().float().mean(dim=(0, 2)))
            self.v_shift.copy_(value.detach().float().mean(dim=(0, 2)))
        return query, quantize_shifted(self.k, key, self.k_shift), quantize_shifted(self.v, value, self.v_shift)


class OnlineTransforms(nn.Module):
    """The learnable transforms, applied online (by hooks) to a norm-folded FP model, with the fused model's
    quantizers. ``r2_per_head``: one R2 per KV head (OSTQuant) or one per layer (SpinQuant). ``kv_shift``: the
    fused model will quantize K / V around channel means (:class:`BatchMeanKV`)."""

    def __init__(self, shape, spec: ActSpec, seed: int = 0, r2_per_head: bool = False, scales: bool = False,
                 kv_shift: bool = False):
        super().__init__()
        self.kv_shift = kv_shift
        s = self.shape = shape
        if scales and s.head_dim % 2:
            raise ValueError("q/k scales need an even head_dim (RoPE pairs)")
        self.spec = dataclasses.replace(spec, learnable_clip=False)
        self.r1 = nn.Parameter(orthogonal_matrix(s.hidden, seed=seed).float())
        r2 = orthogonal_matrix(s.head_dim, seed=seed + 1).float()
        self.r2 = nn.Parameter(r2.expand(s.layers, s.kv_heads if r2_per_head else 1, -1, -1).clone())
        self.log_s = nn.ParameterDict({k: nn.Parameter(torch.zeros(v)) for k, v in _scale_shapes(s).items()}) \
            if scales else None
        self.act = ActQuantizer(self.spec.a_bits, clip_ratio=min(self.spec.a_clip, 1.0))
        self.r4 = OnlineRotation(s.ffn, seed=self.spec.seed + 4)  # as quant.qmodel.quantize_layer builds it
        self.quantize = True
        self._handles: list = []
        self._attn: list = []

    # ------------------------------------------------------------------ the online transforms
    def scale(self, name: str, i: int, dtype: torch.dtype) -> torch.Tensor | None:
        """The learned scales (float32 parameters) in the activations' dtype: a half-precision model stays half."""
        return None if self.log_s is None else self.log_s[name][i].exp().to(dtype)

    def q(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x) if self.quantize else x

    def residual_input(self, y: torch.Tensor, i: int, which: str) -> torch.Tensor:
        r, s = self.r1.to(y.dtype), self.scale(which, i, y.dtype)
        z = y @ r
        if s is not None:
            z = self.q(z / s) * s
        else:
            z = self.q(z)
        return z @ r.T

    def _r2(self, i: int) -> torch.Tensor:
        return self.r2[i].expand(self.shape.kv_heads, -1, -1)

    def values(self, v: torch.Tensor, i: int) -> torch.Tensor:
        s = self.shape
        vh = torch.einsum("btgd,gde->btge", v.unflatten(-1, (s.kv_heads, s.head_dim)), self._r2(i).to(v.dtype))
        sc = self.scale("vo", i, v.dtype)
        return (vh * sc if sc is not None else vh).flatten(-2)

    def o_input(self, z: torch.Tensor, i: int) -> torch.Tensor:
        s = self.shape
        zh = self.q(z).unflatten(-1, (s.kv_heads, s.groups, s.head_dim))
        sc = self.scale("vo", i, z.dtype)
        if sc is not None:
            zh = zh / sc[:, None, :]
        return torch.einsum("btgqe,gde->btgqd", zh, self._r2(i).to(z.dtype)).flatten(-3)

    def qk_scale(self, i: int, dtype: torch.dtype) -> torch.Tensor:
        t = self.scale("qk", i, dtype)
        return torch.cat([t, t], dim=-1)  # RoPE pairs (j, j + hd/2) share a factor

    def queries(self, q: torch.Tensor, i: int) -> torch.Tensor:
        s = self.shape
        return (q.unflatten(-1, (s.kv_heads, s.groups, s.head_dim)) / self.qk_scale(i, q.dtype)[:, None, :]).flatten(-3)

    def keys(self, k: torch.Tensor, i: int) -> torch.Tensor:
        s = self.shape
        return (k.unflatten(-1, (s.kv_heads, s.head_dim)) * self.qk_scale(i, k.dtype)).flatten(-2)

    def down_input(self, u: torch.Tensor, i: int) -> torch.Tensor:
        sc = self.scale("ud", i, u.dtype)
        if sc is not None:
            u = u * sc
        z = self.q(self.r4(u))
        z = hadamard_transform(z, transpose=True) if self.r4.fast else z @ self.r4.matrix.to(z.dtype).T
        return z / sc if sc is not None else z

    # ------------------------------------------------------------------ hooks
    def install(self, model: nn.Module) -> None:
        """Fold the RMSNorm weights of every block (exact) and hook the transforms and quantizers in."""
        ad = ModelAdapter(model)
        hook = self._handles.append
        for i, layer in enumerate(ad.layers):
            fold_layer_norms(layer)
            a, m = layer.self_attn, layer.mlp
            hook(layer.input_layernorm.register_forward_hook(
                lambda mod, args, out, i=i: self.residual_input(out, i, "attn")))
            hook(layer.post_attention_layernorm.register_forward_hook(
                lambda mod, args, out, i=i: self.residual_input(out, i, "mlp")))
            hook(a.v_proj.register_forward_hook(lambda mod, args, out, i=i: self.values(out, i)))
            hook(a.o_proj.register_forward_pre_hook(lambda mod, args, i=i: (self.o_input(args[0], i),)))
            hook(m.down_proj.register_forward_pre_hook(lambda mod, args, i=i: (self.down_input(args[0], i),)))
            if self.log_s is not None:
                hook(a.q_proj.register_forward_hook(lambda mod, args, out, i=i: self.queries(out, i)))
                hook(a.k_proj.register_forward_hook(lambda mod, args, out, i=i: self.keys(out, i)))
            kv = BatchMeanKV if self.kv_shift else KVPoint
            a.kv_point = kv(self.shape.kv_heads, self.shape.head_dim, self.spec)
            self._attn.append(a)
        use_quantized_attention(model)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for a in self._attn:
            del a.kv_point
        self._handles, self._attn = [], []

    def set_quantize(self, on: bool) -> None:
        self.quantize = on
        for a in self._attn:
            a.kv_point.quantize = on

    def result(self, opt: torch.optim.Optimizer) -> LearnedTransforms:
        """The trained transforms in float64 (the optimiser's exactly orthogonal master copies)."""
        def master(p):
            return opt.state.get(p, {}).get("master", p.detach().double())

        s = self.shape
        r2 = master(self.r2).expand(s.layers, s.kv_heads, s.head_dim, s.head_dim).clone()
        scales = {k: v.detach().double().exp() for k, v in self.log_s.items()} if self.log_s is not None else None
        return LearnedTransforms(master(self.r1).clone(), r2, scales)


# ---------------------------------------------------------------------------------------------- losses

def kl_top_targets(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The FP model's top-``k`` log-probabilities (of the full-vocabulary softmax) and their token ids."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    vals, idx = lp.topk(min(k, lp.shape[-1]), dim=-1)
    return vals, idx.int()


def kl_top(logits: torch.Tensor, fp_logp: torch.Tensor, fp_idx: torch.Tensor) -> torch.Tensor:
    """KL-Top: ``Σ_{i ∈ top-k(FP)} p_i (log p_i − log q_i)`` per token (q the quantized model's full-vocabulary
    softmax), averaged over tokens."""
    lq = torch.log_softmax(logits.float(), dim=-1).gather(-1, fp_idx.long())
    return (fp_logp.exp() * (fp_logp - lq)).sum(-1).mean()


def _cosine(steps: int):
    return lambda t: 0.5 * (1 + math.cos(math.pi * t / max(steps, 1)))


# ---------------------------------------------------------------------------------------------- training

@dataclass
class TrainSettings:
    steps: int = 100
    lr: float = 1.5  # rotations: Cayley SGD step cap (SpinQuant) / Cayley Adam step (OSTQuant)
    lr_scale: float = 1e-2  # OSTQuant's log-scales (Adam)
    batch: int = 8  # sequences per step
    topk: int = 1000  # KL-Top
    autocast: bool = False  # forward passes under bfloat16 autocast (CPU)


def _params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


@dataclass
class TrainingCheckpoint:
    """Where the training state is kept (one safetensors file), which run it belongs to (``fingerprint``: a state
    of another model or config is ignored), how often it is saved (seconds; 0 = after every step) and whether this
    process writes it (one rank of a distributed run does)."""

    path: Path
    fingerprint: str
    every: float = 300.0
    write: bool = True
    say: Callable[[str], None] | None = None  # where a resume across code changes is reported

    def save(self, step: int, sim: nn.Module, opts: list[torch.optim.Optimizer], losses: list[float],
             seconds: float) -> None:
        if not self.write:
            return
        tensors, scalars = {}, {}
        for name, p in sim.named_parameters():
            tensors[f"param.{name}"] = p.detach().cpu().contiguous()
        for j, o in enumerate(opts):
            for k, p in enumerate(_params(o)):
                for key, v in o.state.get(p, {}).items():
                    if isinstance(v, torch.Tensor):
                        tensors[f"opt{j}.{k}.{key}"] = v.detach().cpu().contiguous()
                    else:
                        scalars[f"opt{j}.{k}.{key}"] = v
        meta = {"fingerprint": self.fingerprint, "code": code_id(), "step": str(step), "losses": json.dumps(losses),
                "seconds": repr(seconds), "scalars": json.dumps(scalars)}
        with atomic_path(self.path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    def _meta(self, mine: bool = True) -> dict | None:
        if not self.path.is_file():
            return None
        safetensors_header(self.path)  # a damaged file is one clear error
        with safe_open(str(self.path), framework="pt") as f:
            meta = f.metadata() or {}
        return meta if not mine or meta.get("fingerprint") == self.fingerprint else None

    def of_another_run(self) -> bool:
        """A training state is saved here, but by another run (model, dtype, config or calibration text)."""
        meta = self._meta(mine=False)
        return meta is not None and meta.get("fingerprint") != self.fingerprint

    def saved_step(self) -> int:
        """How many steps the saved state of this run has done (0: none saved, or another run's)."""
        meta = self._meta()
        return 0 if meta is None else int(meta["step"])

    def load(self, sim: nn.Module, opts: list[torch.optim.Optimizer]) -> tuple[list[float], float, str]:
        """Restore the saved state of this run into ``sim`` and ``opts``; returns its losses and seconds so far and
        the code that made it."""
        meta = self._meta()
        if meta is None:
            raise BaseqError(f"'{self.path}' holds no saved training state of this run")
        code = meta.get("code", UNKNOWN)
        if self.say is not None and (warning := mixed_code(code, f"training steps 1–{meta['step']}")):
            self.say(warning)
        saved = read_safetensors(self.path)
        scalars = json.loads(meta["scalars"])
        device = next(sim.parameters()).device
        with torch.no_grad():
            for name, p in sim.named_parameters():
                p.copy_(saved[f"param.{name}"])
        for j, o in enumerate(opts):
            for k, p in enumerate(_params(o)):
                prefix = f"opt{j}.{k}."
                state = {key[len(prefix):]: v.to(device) for key, v in saved.items() if key.startswith(prefix)}
                state.update({key[len(prefix):]: v for key, v in scalars.items() if key.startswith(prefix)})
                if state:
                    o.state[p] = state
        return json.loads(meta["losses"]), float(meta["seconds"]), code


def _agreed_start(checkpoint: TrainingCheckpoint, comm: Communicator) -> int:
    """Rank 0's saved step, once every rank has checked that it can read the same state."""
    if comm.is_main and checkpoint.say is not None and checkpoint.of_another_run():
        checkpoint.say(f"the rotation training saved in {checkpoint.path} belongs to another run (its model files, "
                       f"dtype, options or calibration text differ): starting over")
    mine = checkpoint.saved_step()
    step = int(comm.broadcast_([torch.tensor([float(mine)], dtype=torch.float64)])[0].item())
    if step and comm.sum([mine != step])[0]:
        raise BaseqError(f"cannot resume the rotation training at step {step}: some rank does not see "
                         f"'{checkpoint.path}' (every rank must see the folder beside --out)")
    return step


def train_transforms(model: nn.Module, windows: torch.Tensor, spec: ActSpec, kind: str, settings: TrainSettings,
                     seed: int = 0, log: dict | None = None, progress: bool = False,
                     checkpoint: TrainingCheckpoint | None = None, resume: bool = False,
                     comm: Communicator | None = None, kv_shift: bool = False) -> LearnedTransforms:
    """Learn SpinQuant (``kind="spinquant"``) or OSTQuant (``"ostquant"``) transforms on ``windows``
    [n, seqlen] (step t uses windows ``t·batch … t·batch + batch − 1``, cycling). Folds the model's block norms
    (exact) and leaves it otherwise unchanged; returns the transforms for :func:`fuse_transforms`.
    ``checkpoint``: save the training state there as it goes; with ``resume``, start from the state saved there.
    ``comm``: data parallel — each rank takes its share of every step's windows and the gradients are summed, so
    every rank takes the same steps (a rank with no share that step contributes zero). ``kv_shift``: K / V are
    quantized around channel means in the fused model (``--kv-shift``), so in the training too."""
    if kind not in ("spinquant", "ostquant"):
        raise ValueError(f"unknown learned rotation kind {kind!r}")
    ost = kind == "ostquant"
    comm = comm or Communicator()
    ad = ModelAdapter(model)
    device = ad.embed.weight.device
    sim = OnlineTransforms(ad.shape, spec, seed=seed, r2_per_head=ost, scales=ost, kv_shift=kv_shift).to(device)
    log = log if log is not None else {}
    rot_params = [sim.r1, sim.r2]
    opt = CayleyAdam(rot_params, lr=settings.lr) if ost else CayleySGD(rot_params, lr=settings.lr)
    opts = [opt] + ([torch.optim.Adam(sim.log_s.parameters(), lr=settings.lr_scale)] if ost else [])
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, _cosine(settings.steps)) for o in opts]
    n, mine = windows.shape[0], comm.shard(settings.batch)  # this rank's part of every step's batch
    batches = [(torch.arange(t * settings.batch, (t + 1) * settings.batch) % n)[mine.start:mine.stop]
               for t in range(settings.steps)]
    share = mine.size / settings.batch  # (windows are equally long: the full batch's mean is the sum of shares)
    start = _agreed_start(checkpoint, comm) if checkpoint is not None and resume else 0
    targets = {}
    if ost:  # the FP model's top-k, once per window this rank still needs: from the model as it came, before the
        with torch.no_grad():  # transforms go in (with them and no quantizers it computes the same function, at
            for j in sorted({j for b in batches[start:] for j in b.tolist()}):  # ~2.7x the time at 1.5B)
                logits = model(windows[j][None].to(device), use_cache=False).logits[0]
                targets[j] = kl_top_targets(logits, settings.topk)
                del logits
    sim.install(model)  # (folds the block norms: needed by the fusing, also when nothing is left to train)
    try:
        losses, before = [], 0.0
        if start:
            losses, before, log["resumed_code"] = checkpoint.load(sim, opts)
            with warnings.catch_warnings():  # the schedule is a function of the step: replay it
                warnings.simplefilter("ignore", UserWarning)  # ("scheduler stepped before the optimiser")
                for sc in scheds:
                    for _ in range(start):
                        sc.step()
            log["resumed_at"] = start
        params = list(sim.parameters())
        t0 = saved_at = time.perf_counter()
        bar = range(start, settings.steps)
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(bar, desc=f"{kind} rotations", leave=False, initial=start, total=settings.steps)
        with torch.enable_grad():
            for t in bar:
                for o in opts:
                    o.zero_grad(set_to_none=True)
                loss = torch.zeros(())
                if mine.size:
                    ids = windows[batches[t]].to(device)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.autocast):
                        logits = model(ids, use_cache=False).logits
                    if ost:
                        lp = torch.stack([targets[j][0] for j in batches[t].tolist()]).to(device)
                        ix = torch.stack([targets[j][1] for j in batches[t].tolist()]).to(device)
                        loss = kl_top(logits, lp, ix)
                    else:
                        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
                    del logits
                    if comm.world_size > 1:
                        loss = loss * share
                    loss.backward()
                if comm.world_size > 1:  # the full batch's gradient: every rank's share, summed
                    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                    comm.all_reduce_(grads)
                    for p, g in zip(params, grads):
                        p.grad = g
                for o in opts:
                    o.step()
                for sc in scheds:
                    sc.step()
                losses.append(comm.sum([loss.item()])[0])
                if not math.isfinite(losses[-1]) or not all(bool(torch.isfinite(p).all()) for p in params):
                    raise BaseqError(f"{kind}: the training loss or the learned parameters are not finite (NaN/inf) "
                                     f"at step {t + 1}: lower --rotation-lr")
                if progress:
                    bar.set_postfix(loss=f"{losses[-1]:.4f}")
                now = time.perf_counter()
                if checkpoint is not None and (now - saved_at >= checkpoint.every or t + 1 == settings.steps):
                    checkpoint.save(t + 1, sim, opts, losses, before + now - t0)
                    saved_at = time.perf_counter()
        seconds = before + (time.perf_counter() - t0 if start < settings.steps else 0.0)
        log.update(kind=kind, steps=settings.steps, seconds=round(seconds, 2), loss_first=losses[0] if losses else None,
                   loss_last=losses[-1] if losses else None, losses=[round(v, 5) for v in losses])
        return sim.result(opt)
    finally:
        sim.remove()
