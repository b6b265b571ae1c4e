"""The offline rotations of a method, by rotation source (:mod:`baseq.methods`): learn them if the source learns,
and return how to fuse them into the model.

* ``hadamard``   — nothing to learn: :func:`~baseq.rotation.fuse.rotate_model` with the seeded randomized Hadamards;
* ``calibrated`` — DartQuant-style R1 / R2 on cached FP activations (:mod:`baseq.rotation.calibrated`);
* ``spinquant`` / ``ostquant`` — trained end to end through the quantized model (:mod:`baseq.calibrate.learned_rotations`,
  fused by :mod:`baseq.rotation.learned`) on ``rotation.steps × rotation.batch`` windows of ``rotation.seqlen`` tokens of the calibration text.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..config import QuantizeConfig
from ..data import calib_tokens, calib_windows
from ..errors import BaseqError
from ..methods import ROTATION_SOURCES
from ..quant.qmodel import ActSpec
from ..rotation.calibrated import apply_value_rotations, calibrate_rotations
from ..rotation.fuse import rotate_model
from ..rotation.learned import LearnedTransforms, fuse_transforms
from .comm import Communicator
from .learned_rotations import TrainingCheckpoint, TrainSettings, train_transforms

Rotate = Callable[[nn.Module], None]


def check_lazy(cfg: QuantizeConfig) -> None:
    """One error line when the rotation source needs the whole model in memory and ``--lazy`` was asked for."""
    src = cfg.rotation_source
    if cfg.rotate and ROTATION_SOURCES[src].whole_model:
        what = f"--method {cfg.method}" + (f" --rotations {src}" if src != cfg.spec.rotations[0] or
                                           len(cfg.spec.rotations) > 1 else "")
        how = ("a forward over every block before rotating" if src == "calibrated"
               else "end-to-end backpropagation through the whole model")
        raise BaseqError(f"{what} needs the whole model in memory ({how}): not available with --lazy")


def training_windows(tokenizer, cfg: QuantizeConfig) -> torch.Tensor:
    """``steps × batch`` windows of ``rotation.seqlen`` tokens of the calibration text (fewer, cycled, when the text
    is short), seeded by the calibration seed."""
    r = cfg.rotation
    available = calib_tokens(tokenizer, cfg.calib.data) // r.seqlen
    if available < r.batch:
        raise BaseqError(f"'{cfg.calib.data}' calibration text is too short for {r.batch} rotation-training windows "
                         f"of {r.seqlen} tokens")
    return calib_windows(tokenizer, cfg.calib.data, r.seqlen, min(max(r.steps, 1) * r.batch, available),
                         cfg.calib.seed)


def learn_rotations(model: nn.Module, tokenizer, cfg: QuantizeConfig, spec: ActSpec, *,
                    windows: torch.Tensor | None = None, log: dict | None = None, comm: Communicator | None = None,
                    progress: bool = False, checkpoint: TrainingCheckpoint | None = None,
                    resume: bool = False, kv_shift: bool = False) -> Rotate:
    """Learn what ``cfg``'s rotation source learns (on the CPU model, in place only by folding its block norms, an
    exact change) and return the function fusing the rotations into the model. ``windows``: the calibration
    windows (the calibrated source fits on their first ``rotation.windows``); drawn from ``cfg`` when None.
    ``checkpoint`` / ``resume``: where end-to-end training keeps its state, and whether to go on from it.
    ``kv_shift``: the model's K / V will be quantized around channel means (the training simulates it)."""
    src, seed, r = cfg.rotation_source, cfg.seed, cfg.rotation
    comm = comm or Communicator()
    log = log if log is not None else {}
    if src == "hadamard":
        return lambda m: rotate_model(m, seed=seed)
    if src == "calibrated":
        if windows is None:
            windows = calib_windows(tokenizer, cfg.calib.data, cfg.calib.seqlen, cfg.calib.samples, cfg.calib.seed)
        r1, r2 = calibrate_rotations(model, windows[: r.windows], seed=seed, steps=r.steps,
                                     lr=r.learning_rate(src), log=log)
        comm.broadcast_([r1, r2], src=0)  # every rank fuses rank 0's rotations, bit for bit

        def fuse_calibrated(m: nn.Module) -> None:
            rotate_model(m, seed=seed, r1=r1)
            apply_value_rotations(m, r2, seed=seed)

        return fuse_calibrated
    settings = TrainSettings(steps=r.steps, lr=r.learning_rate(src), lr_scale=r.lr_scale, batch=r.batch, topk=r.topk,
                             autocast=r.autocast)
    train = training_windows(tokenizer, cfg)
    log.update(tokens_per_step=r.batch * r.seqlen, windows=int(train.shape[0]), autocast=r.autocast)
    learned: LearnedTransforms = train_transforms(model, train, spec, src, settings, seed=seed, log=log,
                                                  progress=progress, checkpoint=checkpoint, resume=resume,
                                                  comm=comm, kv_shift=kv_shift)
    comm.broadcast_(learned.tensors(), src=0)
    return lambda m: fuse_transforms(m, learned, seed=seed)
