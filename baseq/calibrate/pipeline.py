"""Methods as compositions: rotation (or not, and from which source), the quantized structure, then per-block
stages. The methods and rotation sources are entries of :mod:`baseq.methods`; this module only composes them.

==========  ========================  ==================================================================
method      rotation (R1/R2 source)   stages per block
==========  ========================  ==================================================================
rtn         no                        RTN
gptq        no                        GPTQ
quarot      R1–R4 (any source)        RTN or GPTQ (``weights``)
baseq       R1–R4 (hadamard, ...)     compensated transforms (stage 1), GPTQ, BASE-Q bias / scale / clip training
spinquant   R1–R4 (spinquant)         GPTQ (``weights``)
ostquant    R1–R4 + scales (ostquant) GPTQ (``weights``)
==========  ========================  ==================================================================
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import QuantizeConfig
from ..data import calib_windows, text_digest
from ..errors import BaseqError
from ..io import atomic_path
from ..models.adapter import ModelAdapter
from ..models.arch import FAMILIES
from ..models.lazy import LazyModel, park_folder
from ..models.loading import source_digest
from ..quant.qmodel import ActSpec, quantize_layer, quantize_structure, use_quantized_attention
from ..methods import ROTATION_SOURCES
from ..quant.quantizer import WeightQuantConfig, quantize_embedding_
from ..rotation.fuse import block_rotations, install_end_rotations, rotate_layer, rotate_model
from .blocks import LazyBlocks, ModelBlocks, finished_layers
from .comm import Communicator
from .engine import BlockContext, Checkpoint, calibrate_blocks, on_device
from .learned_rotations import TrainingCheckpoint
from .rotations import Rotate, check_lazy, learn_rotations
from .smooth import SmoothStage
from .stages import BaseqTrainStage, GPTQStage, KeepGateStage, KVShiftStage, RTNStage, settled_loss
from .transforms import CompensatedTransformStage


def act_spec(cfg: QuantizeConfig) -> ActSpec:
    b = cfg.bits
    return ActSpec(a_bits=b.a_bits, kv_bits=b.kv_bits, a_clip=b.a_clip, kv_clip=b.kv_clip,
                   learnable_clip=cfg.spec.learnable_clip and cfg.train.clip, online_rotations=cfg.rotate,
                   seed=cfg.seed, keep_massive=b.keep_massive, keep_kv=b.keep_massive_kv)


def weight_config(cfg: QuantizeConfig) -> WeightQuantConfig:
    b = cfg.bits
    return WeightQuantConfig(bits=b.w_bits, group_size=b.w_group, sym=b.w_sym, clip_search=b.w_clip_search)


def kv_shift_on(cfg: QuantizeConfig, ad: ModelAdapter) -> bool:
    """Whether K and V are quantized around calibrated channel means (``--kv-shift``): ``auto`` turns it on for
    models whose k_proj / v_proj carry biases — a constant in every key that a per-token grid cannot afford
    (Qwen2.5-1.5B, W16A16KV4: perplexity 3,421 without, 8.65 with; FP 8.67) — in the methods that calibrate
    anyway (the data-free RTN ones stay data-free unless ``mean`` is asked for)."""
    mode = cfg.bits.kv_shift
    return cfg.bits.kv_bits < 16 and (mode == "mean" or mode == "auto" and ad.kv_bias and needs_calibration(cfg))


def build_stages(cfg: QuantizeConfig, kv_shift: bool = False) -> list:
    wcfg = weight_config(cfg)
    w = cfg.weight_method
    stages = [RTNStage(wcfg) if w == "rtn" else
              GPTQStage(wcfg, cfg.gptq, asymmetric=cfg.gptq.asym_alpha if w == "gptaq" else 0.0)]
    if cfg.rotate and cfg.smooth.pairs:
        a = cfg.smooth.alpha
        stages.insert(0, SmoothStage(cfg.smooth.pairs, wcfg, alpha=a if a >= 0 else None, seed=cfg.seed))
    if cfg.spec.baseq_stages:
        t = cfg.train
        if t.transforms:
            stages.insert(0, CompensatedTransformStage(wcfg, epochs=t.transform_epochs, lr=t.lr_transform,
                                                       batch_size=t.batch_size, rotation=t.vo_rotation,
                                                       seed=cfg.seed, samples=t.samples, loss=t.loss))
        stages.append(BaseqTrainStage(t, seed=cfg.seed, kv_shift=kv_shift))
    if kv_shift:  # centres of the KV cache first, so that the weight stage already sees them
        weights_at = len(stages) - (2 if cfg.spec.baseq_stages else 1)
        stages.insert(weights_at, KVShiftStage())
    if cfg.bits.keep_massive:  # which tokens stay float: settled before the block is fitted, or after it
        gate = KeepGateStage(cfg.bits.keep_massive)
        if cfg.bits.keep_massive_fit == "with":
            stages.insert(0, gate)
        else:
            stages.append(gate)
    return stages


def fingerprint(cfg: QuantizeConfig, model_spec: str, world_size: int = 1, dtype: torch.dtype | None = None,
                kv_shift: bool = False) -> str:
    """What a resumable partial run must match: the model (its files, not its name: :func:`source_digest`), the
    dtype it runs in, the config, the calibration text's contents (when the run reads it) and the number of ranks
    (each rank's saved activations are its shard of the windows)."""
    reads = needs_calibration(cfg, kv_shift) or cfg.fitted_rotations
    blob = json.dumps({"model": source_digest(model_spec) if model_spec else "", "dtype": str(dtype),
                       "config": cfg.to_dict(), "world_size": world_size,
                       "text": text_digest(cfg.calib.data) if reads else None}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def idle_ranks(cfg: QuantizeConfig, world_size: int) -> str | None:
    """A warning line when a learned rotation's training steps have fewer windows than there are ranks (each rank
    takes its share of a step's windows; the rest wait), else None."""
    b = cfg.rotation.batch
    if not ROTATION_SOURCES[cfg.rotation_source].end_to_end or world_size <= b:
        return None
    return (f"warning: {world_size} ranks share training steps of --rotation-batch {b} window(s): "
            f"{world_size - b} rank(s) sit idle in the rotation training (raise --rotation-batch to use them)")


def check_model(model, cfg: QuantizeConfig) -> ModelAdapter:
    """Fail early, with a clear message, on a model ``cfg`` cannot quantize (unsupported architecture, a weight
    group size that does not divide some linear's in_features); cheap, so callers run it before any evaluation."""
    ad = ModelAdapter(model)
    src = cfg.rotation_source
    if cfg.fitted_rotations and not ad.spec.learned_rotations:
        ok = ", ".join(s.family for s in FAMILIES if s.learned_rotations)
        raise BaseqError(f"{src} rotations are learned and fused on plain Llama-like blocks ({ok}); "
                         f"{ad.spec.family} is not one: use --method quarot or baseq with the default rotations")
    g = cfg.bits.w_group
    if g and cfg.bits.w_bits < 16:
        s = ad.shape
        bad = sorted({n for n in (s.hidden, s.heads * s.head_dim, s.ffn) if n % g})
        if bad:
            raise BaseqError(f"w-group {g} does not divide the in_features of every linear "
                             f"(the model has linears with in_features {', '.join(map(str, bad))})")
    return ad


def quantize_ends(ad: ModelAdapter, bits: int) -> None:
    """Round the embedding table and the LM head (once when tied) to what the packed format stores (``bits``)."""
    quantize_embedding_(ad.embed.weight.data, bits)
    if ad.lm_head.weight.data_ptr() != ad.embed.weight.data_ptr():
        quantize_embedding_(ad.lm_head.weight.data, bits)


def needs_calibration(cfg: QuantizeConfig, kv_shift: bool = False) -> bool:
    """Whether some stage of the method reads calibration data (each stage says so: ``needs_data``); when none does
    (RTN alone), the blocks are quantized without a forward. Learned rotations draw their own windows."""
    return reads_data(build_stages(cfg, kv_shift))


def reads_data(stages) -> bool:
    return any(getattr(s, "needs_data", True) for s in stages)  # (a stage that does not say reads data)


def quantize_model(model, tokenizer, cfg: QuantizeConfig, *, model_spec: str = "", device="cpu",
                   work_dir: Path | None = None, resume: bool = False, progress: bool = True, log_fn=print,
                   windows: torch.Tensor | None = None, comm: Communicator | None = None,
                   lazy: LazyModel | None = None) -> dict:
    """Quantize ``model`` in place following ``cfg``; returns a small report (timings, per-block log).

    The model stays on (or is moved to) the CPU; each block visits ``device`` while it is calibrated.
    ``windows`` are the calibration token windows (default: drawn from ``cfg.calib``); ``comm`` splits them across
    the ranks of a distributed run (default: one process). With ``lazy`` (``model`` is then ``lazy.model``), blocks
    are read from the files one at a time and the finished ones kept in ``work_dir`` (required): read them back
    with :func:`quantized_layers`."""
    cfg.validate()
    comm = comm or Communicator()
    t0 = time.perf_counter()
    if lazy is None:
        model.to("cpu")
    elif work_dir is None:
        raise BaseqError("lazy loading keeps the finished blocks in a work folder: pass work_dir")
    for p in model.parameters():
        p.requires_grad_(False)
    report = {"method": cfg.label, "bits": cfg.bits.label}
    ad = check_model(model, cfg)  # fail early, with a clear message, on unsupported architectures / group sizes
    kv_shift = report["kv_shift"] = kv_shift_on(cfg, ad)  # (the model as loaded: every linear gets a bias later)
    loss = settled_loss(cfg.train.loss, bool(ad.spec.post_norms))
    if cfg.spec.baseq_stages and loss != cfg.train.loss:  # "auto", settled for this model
        cfg = copy.deepcopy(cfg)
        cfg.train.loss = loss
        if comm.is_main and loss == "token":
            log_fn(f"block loss: token (--train-loss auto: {ad.spec.family}'s sublayers end in post-norms)")
    report["config"] = cfg.to_dict()  # as run
    key = (fingerprint(cfg, model_spec, comm.world_size, next(model.parameters()).dtype, kv_shift)
           if work_dir is not None else "")  # what a resumed run must match
    quantize_ends(ad, cfg.bits.embed_bits)
    rotate = None
    if cfg.rotate and ROTATION_SOURCES[cfg.rotation_source].whole_model:  # learned from the whole model first
        if lazy is not None:
            check_lazy(cfg)
        if comm.is_main and (warning := idle_ranks(cfg, comm.world_size)):
            log_fn(warning)
        saved = (TrainingCheckpoint(work_dir / "rotations.safetensors", key,
                                    write=comm.is_main, say=log_fn if comm.is_main else None)
                 if work_dir is not None else None)
        with on_device([model], device):
            rotate = learn_rotations(model, tokenizer, cfg, act_spec(cfg), windows=windows,
                                     log=report.setdefault("rotation", {}), comm=comm, progress=progress,
                                     checkpoint=saved, resume=resume, kv_shift=kv_shift)
    park = park_folder(work_dir, comm.rank) if work_dir else None  # where a lazy run's ends wait meanwhile
    blocks = prepare_blocks(model, ad, cfg, lazy, rotate, park_dir=park)
    stages = build_stages(cfg, kv_shift)
    if not reads_data(stages):
        from tqdm.auto import tqdm

        with blocks.ends_away():
            for i in tqdm(range(len(blocks)), desc="blocks (RTN)", disable=not progress, leave=False):  # no data needed
                layer = blocks.load(i)
                with on_device([layer], device):
                    for stage in stages:
                        stage.run(BlockContext(i, layer, None, None, None, {}, torch.device(device), 1))
                if lazy is not None and comm.is_main:
                    work_dir.mkdir(parents=True, exist_ok=True)
                    with atomic_path(block_file(work_dir, i)) as tmp:
                        save_file({k: v.contiguous() for k, v in layer.state_dict().items()}, tmp)
                blocks.finish(i, layer)
        comm.barrier()  # rank 0's block files are complete before any rank reads them back (its evaluation shard)
        report["blocks"] = []
    else:
        if windows is None:
            windows = calib_windows(tokenizer, cfg.calib.data, cfg.calib.seqlen, cfg.calib.samples, cfg.calib.seed)
        offload = (tempfile.TemporaryDirectory(prefix="baseq-acts-", dir=work_dir.parent if work_dir else None)
                   if cfg.calib.offload else contextlib.nullcontext())
        with offload as tmp:
            report["blocks"] = calibrate_blocks(
                model, ad, windows, stages, device=device, batch_size=cfg.calib.batch_size, work_dir=work_dir,
                fingerprint=key, resume=resume, progress=progress,
                log_fn=log_fn, offload_dir=Path(tmp) if tmp else None, comm=comm, blocks=blocks)
    report["calib_seconds"] = round(time.perf_counter() - t0, 2)
    model.baseq_config = {"method": cfg.label, "bits": cfg.bits.label}
    return report


def prepare_blocks(model, ad: ModelAdapter, cfg: QuantizeConfig, lazy: LazyModel | None,
                   rotate: Rotate | None = None, park_dir: Path | None = None):
    """Rotate (QuaRot methods) and give every block the quantized structure: the whole model now, or each block of
    a lazy model as it is read. ``rotate``: fuses learned rotations (:func:`.rotations.learn_rotations`) instead of
    the seeded ones."""
    spec = act_spec(cfg)
    if lazy is None:
        if cfg.rotate:
            (rotate or (lambda m: rotate_model(m, seed=cfg.seed)))(model)
        return ModelBlocks(quantize_structure(model, spec))
    s = ad.shape
    if cfg.rotate:
        rotation, r1, r2 = block_rotations(s, cfg.seed)
        install_end_rotations(model, rotation)
    use_quantized_attention(model)

    def prepare(layer):
        if cfg.rotate:
            rotate_layer(layer, r1, r2, s.heads, s.kv_heads, online=rotation)
        quantize_layer(layer, spec, s)

    return LazyBlocks(lazy, prepare, park_dir)


def block_file(work_dir: Path, i: int) -> Path:
    return Checkpoint(work_dir, "").block_file(i)


def quantized_layers(model, cfg: QuantizeConfig, work_dir: Path | None = None, lazy: LazyModel | None = None):
    """A callable giving, each time it is called, an iterator over ``(i, block)`` of the quantized model: the
    blocks in memory, or (lazy runs) each block rebuilt from ``work_dir``, one at a time."""
    if lazy is None:
        return lambda: enumerate(ModelAdapter(model).layers)
    return lambda: finished_layers(lazy, act_spec(cfg), lambda i: block_file(work_dir, i))
