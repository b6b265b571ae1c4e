"""The block-by-block calibration engine.

Captures the inputs of block 0 for the calibration windows, then for each block in order:

1. takes the block from its :class:`Blocks` source (the model in memory, or a lazily loaded file) onto ``device``;
2. computes the full-precision targets: the block with every quantizer off, on its FP inputs;
3. runs the method's stages on it (GPTQ, BASE-Q training, ...), each a small object with ``run(ctx)``;
4. advances: the quantized block's outputs on the quantized inputs become the next quantized inputs, the FP
   outputs the next FP inputs; the block goes back to the CPU (or to disk) before the next one comes.

The FP path is only propagated for every window when a stage needs it (``needs_fp``: BASE-Q's training, GPTAQ,
smoothing; a stage that does not say is assumed to): QuaRot-GPTQ's stages read the quantized inputs only, so there
the FP path covers just the windows the log's per-block error is measured on — the first :data:`LOG_WINDOWS`
calibration windows, for every method and any number of ranks, so logs compare across methods. The quantized
model is the same either way; one block forward over the rest of the windows is saved.

Only one block and one block's activations are live at a time: the model stays on the CPU, only the block being
calibrated and the current batch are on ``device`` (the embedding only while block 0's inputs are captured).
Activations stay on the CPU in the model dtype (or in memory-mapped files) and move to ``device`` batch by batch.

Data-parallel: with a :class:`~baseq.calibrate.comm.Communicator` of several ranks, each rank holds a contiguous
:class:`~baseq.calibrate.comm.Shard` of the windows; stages reduce what they accumulate through ``ctx.comm``.
With a ``work_dir``, each finished block's state (rank 0) and every rank's propagated activations are saved
there, so an interrupted run resumes from the last finished block.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ..device import release_memory
from ..errors import BaseqError
from ..io import atomic_path, read_json, read_safetensors, write_json
from ..models.adapter import ModelAdapter
from ..provenance import UNKNOWN, code_id, mixed_code
from ..quant.qmodel import set_quantize
from .blocks import Blocks, ModelBlocks
from .comm import Communicator, Shard
from .train import Tap


@dataclass
class BlockContext:
    index: int
    layer: nn.Module
    fp_in: torch.Tensor  # [n, seq, hidden], CPU
    q_in: torch.Tensor
    fp_out: torch.Tensor
    kwargs: dict[str, Any]  # attention mask, position embeddings, ... (batch dim 1, broadcast)
    device: torch.device
    batch_size: int
    progress: bool = True
    log: dict[str, Any] = field(default_factory=dict)
    comm: Communicator = field(default_factory=Communicator)
    shard: Shard | None = None  # which of the calibration windows this rank holds (default: all of fp_in)

    def __post_init__(self):
        if self.shard is None and self.fp_in is not None:
            self.shard = Shard.of(self.fp_in.shape[0])

    def forward(self, x: torch.Tensor, grad: bool = False) -> torch.Tensor:
        """The block on ``x`` [b, seq, hidden] (already on the device)."""
        with torch.set_grad_enabled(grad):
            out = self.layer(x, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def run(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The block over all windows of ``x`` (CPU), batched; result on the CPU in ``x``'s dtype
        (written into ``out`` when given, e.g. a memory-mapped buffer)."""
        out = torch.empty_like(x) if out is None else out
        for start in range(0, x.shape[0], self.batch_size):
            sl = slice(start, start + self.batch_size)
            out[sl] = self.forward(x[sl].to(self.device)).to("cpu", out.dtype)
        return out


class Activations:
    """Where a block's inputs/outputs live: RAM (default) or memory-mapped files in ``folder`` for runs whose
    activations should not occupy memory. Buffers are recycled, so at most four exist at once."""

    def __init__(self, like: torch.Tensor, folder: Path | None = None):
        self.shape, self.dtype, self.folder = like.shape, like.dtype, folder
        self.free: list[torch.Tensor] = []
        self.count = 0
        if folder is not None:
            Path(folder).mkdir(parents=True, exist_ok=True)

    def new(self) -> torch.Tensor:
        if self.folder is None:
            return torch.empty(self.shape, dtype=self.dtype)
        if self.free:
            return self.free.pop()
        self.count += 1
        path = Path(self.folder) / f"activations{self.count}.bin"
        return torch.from_file(str(path), shared=True, size=self.shape.numel(), dtype=self.dtype).view(self.shape)

    def keep(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` moved into a buffer of this store."""
        if self.folder is None:
            return x
        buf = self.new()
        buf.copy_(x)
        return buf

    def release(self, *xs: torch.Tensor) -> None:
        if self.folder is not None:
            for x in xs:
                if not any(x is f for f in self.free):
                    self.free.append(x)


# the per-block error in the log (out_mse, out_err_token) is measured on the first calibration windows
LOG_WINDOWS = 8


class Stage(Protocol):
    name: str
    needs_data: bool  # reads calibration activations (ctx.q_in ...); a method none of whose stages does runs data-free
    needs_fp: bool  # reads ctx.fp_in / ctx.fp_out for every window (engine assumes True when absent)

    def run(self, ctx: BlockContext) -> None: ...


def _move(obj, device, memo: dict | None = None):
    """``obj`` (tensors, tuples of them) on ``device``; ``memo`` shares one copy of what several layers share."""
    memo = {} if memo is None else memo
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, torch.Tensor):
        out = obj.to(device)
    elif isinstance(obj, tuple):
        out = tuple(_move(o, device, memo) for o in obj)
    else:
        return obj
    memo[id(obj)] = out
    return out


class _Recorder(nn.Module):
    """Stands in for a decoder layer: records the keyword arguments the model calls it with, passes x through."""

    def __init__(self, store: list, i: int):
        super().__init__()
        self.store, self.i = store, i

    def forward(self, hidden_states, *args, **kwargs):
        self.store[self.i] = kwargs
        return hidden_states


class on_device:
    """``with on_device(modules, device):`` the modules on ``device`` inside, back on the CPU after."""

    def __init__(self, modules: list[nn.Module], device):
        self.modules, self.device = modules, torch.device(device)

    def __enter__(self):
        for m in self.modules:
            m.to(self.device)

    def __exit__(self, *exc):
        for m in self.modules:
            m.to("cpu")


def ends(model: nn.Module, ad: ModelAdapter) -> list[nn.Module]:
    """Everything of the decoder but its blocks: what a forward needs before block 0 (embedding, rotary, ...)."""
    return [m for name, m in model.model.named_children() if m is not ad.layers]


@torch.no_grad()
def layer_kwargs(model: nn.Module, ad: ModelAdapter, window: torch.Tensor, device) -> list[dict[str, Any]]:
    """The keyword arguments (mask, position embeddings, ...) the model passes to each block for a batch-1 call on
    ``window`` [1, seq]: they differ between layer types (sliding-window / global layers, Gemma 3's local and global
    RoPE). The blocks are stood in for by recorders, so none of their weights is needed (lazy models)."""
    layers = ad.layers
    store: list = [None] * len(layers)
    saved = dict(layers._modules)
    try:
        for i in range(len(layers)):
            layers._modules[str(i)] = _Recorder(store, i)
        model(window.to(device), use_cache=False)
    finally:
        layers._modules.clear()
        layers._modules.update(saved)
    memo: dict = {}
    out = []
    for kw in store:
        kw = {k: _move(v, device, memo) for k, v in kw.items()
              if k not in ("past_key_values", "cache", "use_cache", "hidden_states")}
        kw["use_cache"] = False
        out.append(kw)
    return out


def capture_inputs(model: nn.Module, ad: ModelAdapter, windows: torch.Tensor, device, batch_size: int,
                   per_layer: bool = False):
    """Inputs of block 0 for every window (CPU, model dtype) and the block kwargs of a batch-1 call (so they
    broadcast over any batch size): block 0's, or with ``per_layer`` a list with every block's."""
    seen: dict[str, Any] = {}

    def grab(name, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]

    kwargs = layer_kwargs(model, ad, windows[:1], device)
    xs = []
    with Tap(ad.layers[0], grab, stop=True) as tap:
        for batch in windows.split(batch_size):
            tap(model, batch.to(device), use_cache=False)
            xs.append(seen["x"].to("cpu"))
    return torch.cat(xs), (kwargs if per_layer else kwargs[0])


class Checkpoint:
    """Finished blocks (written by rank 0) and every rank's propagated activations under ``work_dir``.

    Written in an order that is safe to interrupt anywhere: block ``i``'s files first (each renamed into place when
    complete), then, once every rank has its activations on disk, ``progress.json`` saying ``i`` is done. Two
    generations of activations are kept, so the ones ``progress.json`` points to always exist."""

    def __init__(self, work_dir: Path, fingerprint: str, comm: Communicator | None = None):
        self.dir = Path(work_dir)
        self.fingerprint = fingerprint
        self.comm = comm or Communicator()

    def block_file(self, i: int) -> Path:
        return self.dir / f"block{i}.safetensors"

    def acts_file(self, i: int, rank: int | None = None) -> Path:
        return self.dir / f"acts{i}.rank{self.comm.rank if rank is None else rank}.safetensors"

    @functools.cached_property
    def found(self) -> dict | None:
        """The progress file of the partial run found here before this run saved anything (read once)."""
        meta = self.dir / "progress.json"
        return read_json(meta, "the partial run's progress file") if meta.is_file() else None

    def last_done(self) -> int:
        data = self.found
        return data["done"] if data is not None and data.get("fingerprint") == self.fingerprint else -1

    def of_another_run(self) -> bool:
        """A partial run is saved here, but by another run (model, dtype, config, calibration text or ranks)."""
        data = self.found
        return data is not None and data.get("fingerprint") != self.fingerprint

    def agreed_done(self) -> int:
        """Rank 0's last finished block, once every rank has checked that it holds what resuming there needs."""
        done = int(self.comm.broadcast_([torch.tensor([float(self.last_done())], dtype=torch.float64)])[0].item())
        if done < 0:
            return done
        missing = [str(p) for p in (self.acts_file(done), self.dir / "progress.json") if not p.is_file()]
        lacking = self.comm.sum([bool(missing)])[0]
        if lacking:
            raise BaseqError(f"cannot resume after block {done}: {int(lacking)} rank(s) lack their saved state "
                             f"(e.g. {missing[0] if missing else 'on another node'}); every rank must see the "
                             f"folder beside --out")
        return done

    def save(self, index: int, layer: nn.Module, fp_in: torch.Tensor, q_in: torch.Tensor, log: list) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.comm.is_main:
            state = {k: v.detach().contiguous().cpu() for k, v in layer.state_dict().items()}
            with atomic_path(self.block_file(index)) as tmp:
                save_file(state, tmp)
        with atomic_path(self.acts_file(index)) as tmp:
            save_file({"fp": fp_in.contiguous(), "q": q_in.contiguous()}, tmp)
        self.comm.barrier()  # every rank's activations of block `index` exist; progress.json may point at them
        if self.comm.is_main:
            write_json(self.dir / "progress.json", {"done": index, "fingerprint": self.fingerprint,
                                                    "code": code_id(), "log": log})
        self.acts_file(index - 2).unlink(missing_ok=True)  # progress.json says ≥ index - 1 by now

    def restore(self, blocks: Blocks, upto: int):
        for i in range(upto + 1):
            blocks.restore(i, self.block_file(i))
        acts = read_safetensors(self.acts_file(upto))
        log = [{"code": self.found.get("code", UNKNOWN), **e} for e in self.found["log"]]  # (older logs lack it)
        return acts["fp"], acts["q"], log


def block_spans(blocks: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` → ``"blocks 0–2, 5, 7–8"`` (``"block 5"`` for one)."""
    spans, blocks = [], sorted(blocks)
    for b in blocks:
        if spans and b == spans[-1][1] + 1:
            spans[-1][1] = b
        else:
            spans.append([b, b])
    text = ", ".join(f"{a}–{z}" if z > a else f"{a}" for a, z in spans)
    return f"block {text}" if len(blocks) == 1 else f"blocks {text}"


def calibrate_blocks(model: nn.Module, ad: ModelAdapter, windows: torch.Tensor, stages: list[Stage], *,
                     device="cpu", batch_size: int = 4, work_dir: Path | None = None, fingerprint: str = "",
                     resume: bool = False, progress: bool = True, log_fn=print, offload_dir: Path | None = None,
                     comm: Communicator | None = None, blocks: Blocks | None = None):
    """Run ``stages`` on every block in order; returns one log dict per block (the same on every rank).

    ``windows``: every calibration window (each rank keeps its shard). ``offload_dir``: keep the propagated
    activations in memory-mapped files there instead of RAM. ``blocks``: where blocks come from and go to
    (default: ``ad.layers``, in memory)."""
    device = torch.device(device)
    comm = comm or Communicator()
    blocks = blocks if blocks is not None else ModelBlocks(ad)
    if comm.world_size > len(windows):
        raise BaseqError(f"{comm.world_size} ranks for {len(windows)} calibration windows: every rank needs at "
                         f"least one (raise --calib-samples or start fewer ranks)")
    shard = comm.shard(len(windows))
    full_fp = any(getattr(s, "needs_fp", True) for s in stages)
    logged = max(0, min(shard.stop, LOG_WINDOWS) - shard.start)  # this rank's part of the logged windows
    progress = progress and comm.is_main
    say = log_fn if comm.is_main else (lambda msg: None)
    ckpt = Checkpoint(work_dir, fingerprint, comm) if work_dir is not None else None
    start, log = 0, []
    with on_device(ends(model, ad), device):
        fp_in, kwargs = capture_inputs(model, ad, windows[shard.start:shard.stop], device, batch_size,
                                       per_layer=True)
    if ckpt is not None and resume and ckpt.of_another_run():
        say(f"the partial run in {work_dir} was made by another run (its model files, dtype, options, calibration "
            f"text or ranks differ): starting over")
    if ckpt is not None and resume and (done := ckpt.agreed_done()) >= 0:
        fp_in, q_in, log = ckpt.restore(blocks, done)
        start = done + 1
        say(f"resuming after block {done}")
        for code in sorted({e["code"] for e in log}):
            if warning := mixed_code(code, block_spans([e["block"] for e in log if e["code"] == code])):
                say(warning)
    else:
        q_in = fp_in
        if not full_fp:
            fp_in = fp_in[:logged].clone()
    acts = Activations(q_in, offload_dir)
    same = q_in is fp_in
    q_in = acts.keep(q_in)
    if same:
        fp_in = q_in
    elif full_fp:  # (the logged windows alone stay in RAM)
        fp_in = acts.keep(fp_in)
    bar = tqdm(range(start, len(blocks)), desc="blocks", disable=not progress, initial=start, total=len(blocks))
    with blocks.ends_away():  # the loop needs only the blocks (lazy runs keep the ends on disk meanwhile)
        for i in bar:
            t0 = time.perf_counter()
            times = Stopwatch()  # where the block's time goes: reading it, the FP path, each stage, the quantized path
            layer = blocks.load(i)
            release_memory()  # the temporaries of reading / rotating the block
            layer = layer.to(device)
            set_quantize(layer, False)
            times.lap("load")
            ctx = BlockContext(i, layer, fp_in, q_in, fp_out=None, kwargs=kwargs[i], device=device,
                               batch_size=batch_size, progress=progress, comm=comm, shard=shard)
            ctx.fp_out = ctx.run(fp_in, out=acts.new() if full_fp else None)
            times.lap("fp")
            set_quantize(layer, True)
            for stage in stages:
                stage.run(ctx)
                times.lap(stage.name)
            q_out = ctx.run(q_in, out=acts.new())
            err, err_token = block_error(q_out[:logged], ctx.fp_out[:logged], comm)
            check_finite(i, ctx.fp_out, q_out, comm)
            times.lap("quant")
            acts.release(*((fp_in, q_in) if full_fp else (q_in,)))
            fp_in, q_in = ctx.fp_out, q_out
            layer.to("cpu")
            entry = {"block": i, "code": code_id(), "out_mse": err, "out_err_token": err_token,
                     "seconds": round(time.perf_counter() - t0, 2), **ctx.log, "times": times.laps}
            log.append(entry)
            bar.set_postfix(out_mse=f"{err:.4g}")
            say(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else
                         f"{k}={','.join(f'{n}:{t:.1f}' for n, t in v.items())}" if isinstance(v, dict) else
                         f"{k}={v}" for k, v in entry.items()
                         if not k.startswith("gptq_") and k != "code"))  # all is in the report
            if ckpt is not None:
                ckpt.save(i, layer, fp_in, q_in, log)
            blocks.finish(i, layer)
            release_memory()
        # the last block's activations are not needed past the loop: freed before the ends come back (a lazy 1.5B
        # run peaked right there, 4.04 GB, with them beside the 1.9 GB of embedding and head)
        ctx = q_out = fp_in = q_in = acts = None
        release_memory()
    return log


def check_finite(index: int, fp_out: torch.Tensor, q_out: torch.Tensor, comm: Communicator) -> None:
    """Stop — on every rank, before the block is saved — when a block's output holds NaN or inf: never a model
    with NaNs written with exit code 0, nor a later block blaming its calibration data."""
    bad = [not bool(torch.isfinite(fp_out).all()), not bool(torch.isfinite(q_out).all())]
    fp_bad, q_bad = comm.sum(bad)
    if fp_bad:
        raise BaseqError(f"block {index}: the full-precision block's output is not finite (NaN/inf): the model "
                         f"overflows in this dtype (try --dtype float32)")
    if q_bad:
        raise BaseqError(f"block {index}: the quantized block's output is not finite (NaN/inf) after calibration: a "
                         f"learning rate too high (--lr-bias / --lr-scale / --lr-clip / --lr-transform?) or half "
                         f"precision overflowing; nothing of this block was saved")


class Stopwatch:
    """Seconds between successive ``lap(name)`` calls, by name (a name seen twice adds up)."""

    def __init__(self):
        self.laps: dict[str, float] = {}
        self.t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(self.laps.get(name, 0.0) + now - self.t, 2)
        self.t = now


@torch.no_grad()
def block_error(q_out: torch.Tensor, fp_out: torch.Tensor, comm: Communicator) -> tuple[float, float]:
    """(MSE, mean per-token relative squared error) of quantized block outputs against FP ones, over every rank's
    windows: the second is each token's error relative to its FP output's mean square, what survives the next
    RMSNorm (plain MSE is ruled by the few tokens whose residual stream is huge, e.g. attention sinks)."""
    n = q_out.shape[0]
    if n == 0:  # a rank holding none of the logged windows
        return comm.mean(0.0, 0), comm.mean(0.0, 0)
    sq = (q_out.float() - fp_out.float()).pow(2)
    err = sq.mean().item()
    err_token = (sq.mean(-1) / fp_out.float().pow(2).mean(-1).clamp_min(1e-12)).mean().item()
    return comm.mean(err, n), comm.mean(err_token, n)


@torch.no_grad()
def streamed_nll_sum(model: nn.Module, ad: ModelAdapter, layers, windows: torch.Tensor, *, batch_size: int = 4,
                     device="cpu", head_chunk: int = 128) -> tuple[float, int]:
    """(sum of token NLLs, predicted tokens) over ``windows`` computed block by block, as calibration runs: for a
    model whose blocks are not all in memory. ``layers``: ``(i, block)`` pairs in order (e.g. read from disk one at
    a time); each visits ``device`` while every window passes through it."""
    device = torch.device(device)
    with on_device(ends(model, ad), device):
        x, kwargs = capture_inputs(model, ad, windows, device, batch_size, per_layer=True)
    for i, layer in layers:
        with on_device([layer], device):
            BlockContext(i, layer, x, x, None, kwargs[i], device, batch_size).run(x, out=x)
    total, count = 0.0, 0
    cap = getattr(model.config, "final_logit_softcapping", None)  # Gemma 2: c·tanh(logits / c)
    with on_device([model.model.norm, model.lm_head], device):
        for xs, ids in zip(x.split(batch_size), windows.split(batch_size)):
            feats, ids = model.model.norm(xs.to(device)), ids.to(device)
            for row, seq in zip(feats, ids):
                for a in range(0, len(seq) - 1, head_chunk):
                    b = min(a + head_chunk, len(seq) - 1)
                    logits = model.lm_head(row[a:b]).float()
                    if cap is not None:
                        logits = torch.tanh(logits / cap) * cap
                    total += torch.nn.functional.cross_entropy(logits, seq[a + 1:b + 1], reduction="sum").item()
                count += seq.numel() - 1
    return total, count
