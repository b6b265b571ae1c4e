"""Methods and rotation sources as data: adding a method is one entry here.

A **method** says whether the model gets the QuaRot structure (R1–R4 and the quantization points behind them),
which offline rotations it may start from (the first is its default), which weight quantizers it accepts (the
first is its default when the configured one is not among them) and whether BASE-Q's per-block stages run.

A **rotation source** says where R1 / R2 (and, for OSTQuant, channel scales) come from: the seeded randomized
Hadamard, DartQuant-style calibration on cached activations, or end-to-end training through the quantized model
(SpinQuant, OSTQuant). Sources that need a forward (and backward) pass through the whole model cannot run with
``--lazy``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RotationSource:
    name: str
    summary: str
    whole_model: bool = False  # needs every block in memory (refused with --lazy)
    lr: float = 0.0  # default learning rate of its training (RotationConfig.lr < 0 means this)
    # trained end to end on --rotation-batch × --rotation-seqlen windows a step (those windows must fit the model's
    # context; with several ranks, each step's windows are split among them)
    end_to_end: bool = False
    fitted: bool = True  # fitted to the calibration text (so it reads it, and its training options apply)


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    rotate: bool  # QuaRot structure: R1/R2 fused, online R3/R4
    weights: tuple[str, ...]  # accepted weight quantizers; the first is used when the configured one is not accepted
    rotations: tuple[str, ...] = ("hadamard",)  # accepted rotation sources; the first is the default
    baseq_stages: bool = False  # BASE-Q's compensated transforms (optional) and bias / scale / clip training
    learnable_clip: bool = False  # activation/KV clip ratios are parameters (trained by the BASE-Q stage)
    label_weights: bool = False  # the label names the weight quantizer (quarot-gptq, quarot-rtn, ...)


ROTATION_SOURCES: dict[str, RotationSource] = {r.name: r for r in (
    RotationSource("hadamard", "seeded randomized Hadamard R1 / R2 (QuaRot)", fitted=False),
    RotationSource("calibrated", "R1 and per-layer, per-KV-head R2 fitted to cached FP activations with a "
                                 "distribution loss (DartQuant-style)", whole_model=True, lr=10.0),
    RotationSource("spinquant", "R1 and per-layer R2 trained end to end by Cayley SGD on the causal-LM loss of the "
                                "A/KV-quantized model (SpinQuant)", whole_model=True, lr=1.5,
                   end_to_end=True),
    RotationSource("ostquant", "R_res, per-layer per-KV-head R_ov and five channel scales trained end to end with "
                               "the KL-Top loss against the FP model (OSTQuant)", whole_model=True, lr=1e-3,
                   end_to_end=True),
)}

_ANY_WEIGHTS = ("gptq", "rtn", "gptaq")

METHOD_REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("rtn", "round-to-nearest weights, no rotation", rotate=False, weights=("rtn",)),
    Method("gptq", "GPTQ weights, no rotation", rotate=False, weights=("gptq", "gptaq")),
    Method("quarot", "QuaRot: rotations R1–R4, then RTN / GPTQ / GPTAQ weights", rotate=True,
           weights=("rtn", "gptq", "gptaq"), rotations=("hadamard", "calibrated", "spinquant", "ostquant"),
           label_weights=True),
    Method("baseq", "BASE-Q: QuaRot rotations, GPTQ, then per-block bias / asymmetric scale / clip training",
           rotate=True, weights=("gptq", "gptaq"), rotations=("hadamard", "calibrated", "spinquant"),
           baseq_stages=True, learnable_clip=True),
    Method("spinquant", "SpinQuant: R1 / R2 learned end to end (Cayley SGD), then GPTQ", rotate=True,
           weights=_ANY_WEIGHTS, rotations=("spinquant",)),
    Method("ostquant", "OSTQuant: orthogonal + scaling transforms learned end to end (KL-Top), then GPTQ",
           rotate=True, weights=_ANY_WEIGHTS, rotations=("ostquant",)),
)}

METHODS: tuple[str, ...] = tuple(METHOD_REGISTRY)
ROTATIONS: tuple[str, ...] = tuple(ROTATION_SOURCES)
