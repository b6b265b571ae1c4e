"""Methods as compositions: rotation (or not), the quantized structure, then per-block stages.

=========  ========  ==================================================================
method     rotation  stages per block
=========  ========  ==================================================================
rtn        no        RTN
gptq       no        GPTQ
quarot     R1–R4     RTN or GPTQ (``weights``)
baseq      R1–R4     compensated transforms (stage 1), GPTQ, BASE-Q bias / scale / clip training
=========  ========  ==================================================================
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
import time
from pathlib import Path

import torch

from ..config import QuantizeConfig
from ..data import calib_windows
from ..errors import BaseqError
from ..models.adapter import LlamaAdapter
from ..quant.qmodel import ActSpec, quantize_structure
from ..quant.quantizer import WeightQuantConfig, quantize_embedding_
from ..rotation.calibrated import apply_value_rotations, calibrate_rotations
from ..rotation.fuse import rotate_model
from .engine import BlockContext, calibrate_blocks
from .smooth import SmoothStage
from .stages import BaseqTrainStage, GPTQStage, RTNStage
from .transforms import CompensatedTransformStage


def act_spec(cfg: QuantizeConfig) -> ActSpec:
    b = cfg.bits
    return ActSpec(a_bits=b.a_bits, kv_bits=b.kv_bits, a_clip=b.a_clip, kv_clip=b.kv_clip,
                   learnable_clip=cfg.method == "baseq" and cfg.train.clip, online_rotations=cfg.rotate,
                   seed=cfg.seed)


def weight_config(cfg: QuantizeConfig) -> WeightQuantConfig:
    b = cfg.bits
    return WeightQuantConfig(bits=b.w_bits, group_size=b.w_group, sym=b.w_sym, clip_search=b.w_clip_search)


def build_stages(cfg: QuantizeConfig) -> list:
    wcfg = weight_config(cfg)
    w = cfg.weight_method
    stages = [RTNStage(wcfg) if w == "rtn" else
              GPTQStage(wcfg, cfg.gptq, asymmetric=cfg.gptq.asym_alpha if w == "gptaq" else 0.0)]
    if cfg.rotate and cfg.smooth.pairs:
        a = cfg.smooth.alpha
        stages.insert(0, SmoothStage(cfg.smooth.pairs, wcfg, alpha=a if a >= 0 else None, seed=cfg.seed))
    if cfg.method == "baseq":
        t = cfg.train
        if t.transforms:
            stages.insert(0, CompensatedTransformStage(wcfg, epochs=t.transform_epochs, lr=t.lr_transform,
                                                       batch_size=t.batch_size, rotation=t.vo_rotation,
                                                       seed=cfg.seed, samples=t.samples, loss=t.loss))
        stages.append(BaseqTrainStage(t, seed=cfg.seed))
    return stages


def fingerprint(cfg: QuantizeConfig, model_spec: str) -> str:
    blob = json.dumps({"model": model_spec, "config": cfg.to_dict()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_model(model, cfg: QuantizeConfig) -> LlamaAdapter:
    """Fail early, with a clear message, on a model ``cfg`` cannot quantize (unsupported architecture, a weight
    group size that does not divide some linear's in_features); cheap, so callers run it before any evaluation."""
    ad = LlamaAdapter(model)
    g = cfg.bits.w_group
    if g and cfg.bits.w_bits < 16:
        s = ad.shape
        bad = sorted({n for n in (s.hidden, s.heads * s.head_dim, s.ffn) if n % g})
        if bad:
            raise BaseqError(f"w-group {g} does not divide the in_features of every linear "
                             f"(the model has linears with in_features {', '.join(map(str, bad))})")
    return ad


def quantize_ends(ad: LlamaAdapter, bits: int) -> None:
    """Round the embedding table and the LM head (once when tied) to what the packed format stores (``bits``)."""
    quantize_embedding_(ad.embed.weight.data, bits)
    if ad.lm_head.weight.data_ptr() != ad.embed.weight.data_ptr():
        quantize_embedding_(ad.lm_head.weight.data, bits)


def needs_calibration(cfg: QuantizeConfig) -> bool:
    return not (cfg.weight_method == "rtn" and cfg.method != "baseq")


def quantize_model(model, tokenizer, cfg: QuantizeConfig, *, model_spec: str = "", device="cpu",
                   work_dir: Path | None = None, resume: bool = False, progress: bool = True, log_fn=print,
                   windows: torch.Tensor | None = None) -> dict:
    """Quantize ``model`` in place following ``cfg``; returns a small report (timings, per-block log).

    ``windows`` are the calibration token windows (default: drawn from ``cfg.calib``)."""
    cfg.validate()
    t0 = time.perf_counter()
    for p in model.parameters():
        p.requires_grad_(False)
    report = {"method": cfg.label, "bits": cfg.bits.label}
    ad = check_model(model, cfg)  # fail early, with a clear message, on unsupported architectures / group sizes
    quantize_ends(ad, cfg.bits.embed_bits)
    if cfg.rotate:
        r1 = r2 = None
        if cfg.rotation.kind == "calibrated":  # DartQuant-style: fitted to the FP activations (rotation/calibrated.py)
            if windows is None:
                windows = calib_windows(tokenizer, cfg.calib.data, cfg.calib.seqlen, cfg.calib.samples,
                                        cfg.calib.seed)
            rot = cfg.rotation
            r1, r2 = calibrate_rotations(model, windows[: rot.windows], seed=cfg.seed, steps=rot.steps, lr=rot.lr,
                                         log=report.setdefault("rotation", {}))
        rotate_model(model, seed=cfg.seed, r1=r1)
        if r2 is not None:
            apply_value_rotations(model, r2, seed=cfg.seed)
    ad = quantize_structure(model, act_spec(cfg))
    model.to(device)
    stages = build_stages(cfg)
    if not needs_calibration(cfg):
        for i, layer in enumerate(ad.layers):  # RTN needs no data
            stages[0].run(BlockContext(i, layer, None, None, None, {}, torch.device(device), 1))
        report["blocks"] = []
    else:
        if windows is None:
            windows = calib_windows(tokenizer, cfg.calib.data, cfg.calib.seqlen, cfg.calib.samples, cfg.calib.seed)
        offload = (tempfile.TemporaryDirectory(prefix="baseq-acts-", dir=work_dir.parent if work_dir else None)
                   if cfg.calib.offload else contextlib.nullcontext())
        with offload as tmp:
            report["blocks"] = calibrate_blocks(
                model, ad, windows, stages, device=device, batch_size=cfg.calib.batch_size, work_dir=work_dir,
                fingerprint=fingerprint(cfg, model_spec), resume=resume, progress=progress, log_fn=log_fn,
                offload_dir=Path(tmp) if tmp else None)
    report["calib_seconds"] = round(time.perf_counter() - t0, 2)
    model.baseq_config = {"method": cfg.label, "bits": cfg.bits.label}
    return report
