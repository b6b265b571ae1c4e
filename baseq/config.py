"""Typed configuration behind ``baseq quantize`` (dataclasses; loadable from YAML/JSON, unknown keys rejected)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BaseqError
from .methods import METHOD_REGISTRY, METHODS, ROTATION_SOURCES, ROTATIONS, Method

WEIGHTS = ("rtn", "gptq", "gptaq")  # gptaq: GPTQ fitted to the FP model's output (asymmetric calibration)
LOSSES = ("auto", "mse", "token", "both")  # BASE-Q block loss: plain MSE, per-token relative MSE, or their sum as
# relative errors (calibrate/stages.block_loss); auto: by the model's family (calibrate/stages.settled_loss)
BIAS_INITS = ("zero", "mean")  # BASE-Q bias start: zero, or the channel mean over calibration tokens
TRAIN_INPUTS = ("fp", "quant")  # BASE-Q trains on the full-precision block inputs or the quantized model's
EMBED_BITS = (16, 8)  # embedding table and LM head: fp16, or int8 per row
PRESETS: dict[str, dict[str, int]] = {
    "W4A4KV4": dict(w_bits=4, a_bits=4, kv_bits=4),
    "W4A8KV8": dict(w_bits=4, a_bits=8, kv_bits=8),
    "W4A16": dict(w_bits=4, a_bits=16, kv_bits=16),
    "W8A8": dict(w_bits=8, a_bits=8, kv_bits=16),
}

#: Calibration budgets (``--preset``): overrides of the defaults, which fit ~10 minutes on 2 CPU cores for a 135M model.
BUDGETS: dict[str, dict[str, dict]] = {
    "default": {},
    "large": {"calib": {"samples": 64, "seqlen": 1024}, "train": {"epochs": 5}},  # ~4× the tokens, 5 epochs
}


KV_SHIFTS = ("auto", "mean", "off")
KEEP_FITS = ("with", "without")  # --keep-massive: the block is fitted with the kept tokens float, or as without them
KEEP_KVS = ("quantized", "float")  # --keep-massive: the kept tokens' K/V in the cache's bits, or float


def positive_seconds(text: str) -> float:
    """argparse type of a duration: a finite number of seconds above 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got '{text}'") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds above 0 (got {text})")
    return v


def positive_int(text: str) -> int:
    """argparse type of whole-number flags that must be at least 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {v})")
    return v


def flag(name: str, help: str, choices: tuple | None = None, *, type=None, metavar: str | None = None,
         negatable: bool = True) -> dict:
    """Field metadata making a config field a ``baseq quantize`` flag: the CLI adds ``name`` with this help (and
    ``choices``) and the field's default, and writes the value back into the field (one source for both; see
    :func:`flag_fields`). ``type`` parses the value (default: the type of the field's default); ``metavar`` names
    it in the help; a bool field gets ``--name`` / ``--no-name``, or ``--name`` alone when not ``negatable``."""
    return {"flag": name, "help": help, "choices": choices, "type": type, "metavar": metavar, "negatable": negatable}


def _bits(name: str, v: int) -> None:
    if not (v == 16 or 2 <= v <= 8):
        raise BaseqError(f"{name} must be between 2 and 8, or 16 for off (got {v})")


@dataclass
class BitsConfig:
    w_bits: int = field(default=4, metadata=flag("--w-bits", "weight bits: 2–8, or 16 = off"))
    a_bits: int = field(default=4, metadata=flag("--a-bits", "activation bits: 2–8, or 16 = off"))
    kv_bits: int = field(default=4, metadata=flag("--kv-bits", "KV-cache bits: 2–8, or 16 = off"))
    w_group: int = field(default=0, metadata=flag(  # 0 = per output channel
        "--w-group", "weight group size (0 = per output channel, default)"))
    w_sym: bool = field(default=False, metadata=flag("--w-sym", "symmetric weights"))
    w_clip_search: bool = True
    # fixed activation clip ratio (QuaRot); BASE-Q starts its learnable clip here
    a_clip: float = field(default=0.9, metadata=flag("--a-clip", "activation clip ratio"))
    kv_clip: float = field(default=0.95, metadata=flag("--kv-clip", "KV clip ratio"))
    embed_bits: int = field(default=16, metadata=flag(  # int8: per row, symmetric
        "--embed-bits", "embedding table and LM head: 16 = float16 (default), 8 = int8 per row", choices=EMBED_BITS))
    kv_shift: str = field(default="auto", metadata=flag(
        "--kv-shift", "quantize K and V around their per-channel calibration means (Q(k − μ) + μ; exact and free at "
                      "inference): mean, off, or auto = mean where k_proj / v_proj have biases (Qwen2) and the method calibrates "
                      "anyway (not the data-free RTN ones), else off",
        choices=KV_SHIFTS))
    keep_massive: float = field(default=0.0, metadata=flag(
        "--keep-massive", "tokens whose residual stream entering a block has an RMS of at least RATIO times the "
                          "calibration median there (Qwen2.5's attention-sink token: 100–180×) keep float activations "
                          "in that block, multiplied against the weights' integer codes (their K/V: "
                          "--keep-massive-kv). 0 = off (default)", metavar="RATIO"))
    keep_massive_fit: str = field(default="with", metadata=flag(
        "--keep-massive-fit", "with --keep-massive: 'with' (default) sets each block's threshold first, so GPTQ and "
                              "BASE-Q's training fit the block with those tokens float; 'without' sets it after the "
                              "block is fitted as it would be without the option (the tokens stay float from there "
                              "on: in the blocks after it and at inference)", choices=KEEP_FITS))
    keep_massive_kv: str = field(default="quantized", metadata=flag(
        "--keep-massive-kv", "with --keep-massive: the kept tokens' keys and values in the KV cache's bits like every "
                             "other token's ('quantized', default) or float ('float': a side store of a few float "
                             "rows per sequence; every later query attends to them exactly)", choices=KEEP_KVS))

    def validate(self) -> None:
        for name in ("w_bits", "a_bits", "kv_bits"):
            _bits(name.replace("_", "-"), getattr(self, name))
        if self.keep_massive and not 1 < self.keep_massive < float("inf"):
            raise BaseqError(f"keep-massive must be 0 (off) or a finite ratio above 1 (got {self.keep_massive})")
        if self.keep_massive_fit not in KEEP_FITS:
            raise BaseqError(f"keep-massive-fit must be one of {', '.join(KEEP_FITS)} (got {self.keep_massive_fit})")
        if self.keep_massive_fit != "with" and not self.keep_massive:
            raise BaseqError("keep-massive-fit only applies with --keep-massive RATIO")
        if self.keep_massive_kv not in KEEP_KVS:
            raise BaseqError(f"keep-massive-kv must be one of {', '.join(KEEP_KVS)} (got {self.keep_massive_kv})")
        if self.keep_massive_kv != "quantized" and not self.keep_massive:
            raise BaseqError("keep-massive-kv only applies with --keep-massive RATIO")
        if self.keep_massive_kv != "quantized" and self.kv_bits >= 16:
            raise BaseqError("keep-massive-kv float needs a quantized KV cache (--kv-bits below 16)")
        if self.keep_massive and self.a_bits >= 16:
            raise BaseqError("keep-massive keeps some tokens' activations in float: it needs --a-bits below 16")
        if self.kv_shift not in KV_SHIFTS:
            raise BaseqError(f"kv-shift must be one of {', '.join(KV_SHIFTS)} (got {self.kv_shift})")
        if self.kv_shift == "mean" and self.kv_bits >= 16:
            raise BaseqError("kv-shift mean centres a quantized KV cache: it needs --kv-bits below 16")
        if self.embed_bits not in EMBED_BITS:
            raise BaseqError(f"embed-bits must be 16 (fp16) or 8 (int8 per row) (got {self.embed_bits})")
        if self.w_group < 0:
            raise BaseqError(f"w-group must be ≥ 0 (got {self.w_group})")
        for name in ("a_clip", "kv_clip"):
            if not 0 < getattr(self, name) <= 1:
                raise BaseqError(f"{name.replace('_', '-')} must be in (0, 1] (got {getattr(self, name)})")

    @property
    def label(self) -> str:
        s = f"W{self.w_bits}A{self.a_bits}"
        return s + (f"KV{self.kv_bits}" if self.kv_bits < 16 else "")


@dataclass
class CalibConfig:
    data: str = field(default="wiki", metadata=flag(
        "--calib-data", "calibration text: wiki (default), books, wikitext2, c4 or a .txt/.jsonl path; A+B (e.g. "
                        "wiki+books) mixes texts in equal shares"))
    samples: int = field(default=32, metadata=flag("--calib-samples", "calibration windows", type=positive_int))
    seqlen: int = field(default=512, metadata=flag("--calib-seqlen", "tokens per calibration window"))
    seed: int = 0  # set by --seed (QuantizeConfig.seed): one seed for the whole run
    batch_size: int = field(default=4, metadata=flag(
        "--calib-batch-size", "windows per block forward", type=positive_int))
    # keep propagated activations in memory-mapped files instead of RAM (large runs)
    offload: bool = field(default=False, metadata=flag(
        "--offload-activations", "keep block activations in memory-mapped files beside --out instead of RAM",
        negatable=False))

    def validate(self) -> None:
        if self.samples < 1 or self.seqlen < 2 or self.batch_size < 1:
            raise BaseqError("calibration needs samples ≥ 1, seqlen ≥ 2 and batch size ≥ 1")


@dataclass
class GPTQConfig:
    percdamp: float = field(default=0.01, metadata=flag("--percdamp", "GPTQ damping, a fraction of the mean diagonal of H"))
    blocksize: int = 128
    act_order: bool = field(default=True, metadata=flag("--act-order", "GPTQ act-order"))
    static_groups: bool = True  # keeps groups aligned with the original columns under act_order
    # weights gptaq: scale of the shift towards the FP-output target (quant/gptaq.py)
    asym_alpha: float = field(default=0.25, metadata=flag(
        "--gptaq-alpha", "--weights gptaq: how far towards the FP-output target"))

    def validate(self) -> None:
        if self.percdamp < 0:
            raise BaseqError(f"GPTQ damping (--percdamp) must be ≥ 0 (got {self.percdamp})")
        if self.blocksize < 1:
            raise BaseqError(f"gptq.blocksize must be at least 1 (got {self.blocksize})")
        if self.asym_alpha < 0:
            raise BaseqError(f"gptaq alpha must be ≥ 0 (got {self.asym_alpha})")


@dataclass
class RotationConfig:
    """The offline rotations R1 / R2: seeded randomized Hadamards, calibrated on FP activations (DartQuant), or
    trained end to end through the quantized model (SpinQuant, OSTQuant); see :mod:`baseq.methods`."""

    # a baseq.methods.ROTATION_SOURCES name (the method's default when it allows one only)
    kind: str = field(default="hadamard", metadata=flag(
        "--rotations", "where R1/R2 come from (quarot, baseq): " + "; ".join(
            f"{r.name}: {r.summary}" for r in ROTATION_SOURCES.values()) + " (default: hadamard)",
        choices=ROTATIONS, metavar="SOURCE"))
    steps: int = field(default=100, metadata=flag(
        "--rotation-steps", "training steps of learned rotations (calibrated, spinquant, ostquant)"))
    # < 0: the rotation source's default (calibrated 10: screened on held-out tokens, 0.1 / 1 / 10 → 4-bit error of
    # R1's input −10 / −18 / −25 %; spinquant 1.5, the paper's; ostquant 1e-3: Cayley Adam step, our choice)
    lr: float = field(default=-1.0, metadata=flag(
        "--rotation-lr", "learning rate of learned rotations; default: the source's (calibrated 10, spinquant 1.5, "
                         "ostquant 0.001)"))
    windows: int = 8  # calibrated: calibration windows whose activations they are fitted on
    # spinquant / ostquant: sequences × tokens per step. The papers use 8 × 2048 (WikiText-2); 1 × 512 is our CPU
    # budget (a 512-token step of the 135M model measured 17–21 s on one thread of a shared machine): a stated
    # deviation (README)
    batch: int = field(default=1, metadata=flag("--rotation-batch", "spinquant / ostquant: sequences per step"))
    seqlen: int = field(default=512, metadata=flag("--rotation-seqlen", "spinquant / ostquant: tokens per sequence"))
    lr_scale: float = 1e-2  # ostquant: Adam on the log channel scales
    topk: int = 1000  # ostquant: KL-Top's k
    autocast: bool = False  # spinquant / ostquant: train under bfloat16 autocast (faster on CPUs with bf16 units)

    def validate(self) -> None:
        if self.kind not in ROTATIONS:
            raise BaseqError(f"rotations must be one of {', '.join(ROTATIONS)} (got {self.kind})")
        if self.steps < 0 or self.windows < 1 or self.batch < 1 or self.seqlen < 2 or self.topk < 1:
            raise BaseqError("learned rotations need steps ≥ 0, windows ≥ 1, batch ≥ 1, seqlen ≥ 2 and topk ≥ 1")
        if self.lr_scale < 0:
            raise BaseqError("learning rates must be ≥ 0")

    def learning_rate(self, source: str) -> float:
        return self.lr if self.lr >= 0 else ROTATION_SOURCES[source].lr


@dataclass
class SmoothConfig:
    """Channel smoothing before the rotations at a block's quantization points (SmoothRot; rotation/smooth.py)."""

    points: str = field(default="", metadata=flag(  # comma list of down, qkv, gate_up ("" = off)
        "--smooth", "channel smoothing before the rotations (SmoothRot) at these quantization points: a comma "
                    "list of down, qkv, gate_up (quarot and baseq; default: off)", metavar="POINTS"))
    # < 0: chosen per block and point from a small grid by the quantized output error
    alpha: float = field(default=-1.0, metadata=flag(
        "--smooth-alpha", "smoothing strength α in [0, 1] (default: chosen per block and point from 0.3–0.7 or none)"))

    @property
    def pairs(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in self.points.split(",") if p.strip())

    def validate(self) -> None:
        from .rotation.smooth import PAIRS

        bad = [p for p in self.pairs if p not in PAIRS]
        if bad:
            raise BaseqError(f"unknown smoothing point(s) {', '.join(bad)} (choose from {', '.join(PAIRS)})")
        if self.alpha > 1:
            raise BaseqError(f"smoothing alpha must be ≤ 1, or < 0 to search (got {self.alpha})")


@dataclass
class TrainConfig:
    """BASE-Q's per-block training of biases, asymmetric scales and clipping (stage 3)."""

    bias: bool = field(default=True, metadata=flag("--bias", "bias correction"))
    scale: bool = field(default=True, metadata=flag("--scale", "asymmetric scaling"))
    clip: bool = field(default=True, metadata=flag("--clip", "learnable clipping"))
    # see BIAS_INITS; "mean": the channel mean over calibration tokens
    bias_init: str = field(default="mean", metadata=flag("--bias-init", "bias init", choices=BIAS_INITS))
    epochs: int = field(default=3, metadata=flag("--epochs", "epochs per block"))
    # calibration windows used for training (0 = all); GPTQ always uses all
    samples: int = field(default=0, metadata=flag("--train-samples", "calibration windows used for training, 0 = all"))
    batch_size: int = field(default=4, metadata=flag(
        "--train-batch-size", "windows per training step", type=positive_int))
    # tuned for our budget (3 epochs × 8 steps per block): higher than the reference recipe's
    # clip 3e-2 / scale 3e-3, which trains far longer; see README "Training budget"
    lr_clip: float = field(default=1e-1, metadata=flag("--lr-clip", "learning rate of the clipping parameters"))
    lr_bias: float = field(default=1e-1, metadata=flag("--lr-bias", "learning rate of the biases"))
    lr_scale: float = field(default=1e-2, metadata=flag("--lr-scale", "learning rate of the asymmetric scales"))
    loss: str = field(default="auto", metadata=flag(  # see calibrate/stages.block_loss
        "--train-loss", "block loss: mse; token (MSE per token relative to the target token's energy); both "
        "(the relative total error plus token); auto (default): token for families with post-norms (Gemma 2/3, "
        "OLMo 2), mse otherwise",
        choices=LOSSES))
    # train on the full-precision block inputs ("fp") or the quantized model's ("quant")
    inputs: str = field(default="fp", metadata=flag(
        "--train-inputs", "train on FP or quantized inputs", choices=TRAIN_INPUTS))
    # learn a factor per output row of every quantized weight (calibrate/weight_scale.py)
    weight_scale: bool = field(default=False, metadata=flag(
        "--weight-scale", "learn a scale factor per output row of every quantized weight, after GPTQ"))
    lr_weight_scale: float = field(default=2e-3, metadata=flag(
        "--lr-weight-scale", "learning rate of the weight scale factors"))
    # measured at 135M: lower block loss, no better end-to-end perplexity, so off by default (docs/RESULTS.md)
    revert_if_worse: bool = field(default=False, metadata=flag(
        "--revert-if-worse", "keep a block's starting corrections when its training raised the block loss"))
    # stage 1: compensated transforms (V scale, o/down input scales, per-KV-head V/O rotation), fused before GPTQ
    # off by default: ~1 % lower block loss for ~50 % more calibration time (README)
    transforms: bool = field(default=False, metadata=flag(
        "--transforms", "stage 1: compensated V/o/down scales and V/O rotation, fused before GPTQ"))
    vo_rotation: bool = field(default=True, metadata=flag(
        "--vo-rotation", "learnable per-KV-head V/O rotation in stage 1"))
    transform_epochs: int = field(default=3, metadata=flag("--transform-epochs", "stage 1 epochs per block"))
    lr_transform: float = field(default=5e-3, metadata=flag("--lr-transform", "stage 1 learning rate"))

    def validate(self) -> None:
        if self.bias_init not in BIAS_INITS:
            raise BaseqError(f"bias-init must be 'zero' or 'mean' (got {self.bias_init})")
        if self.loss not in LOSSES:
            raise BaseqError(f"train loss must be one of {', '.join(LOSSES)} (got {self.loss})")
        if self.inputs not in TRAIN_INPUTS:
            raise BaseqError(f"train inputs must be 'fp' or 'quant' (got {self.inputs})")
        if self.epochs < 0 or self.transform_epochs < 0 or self.batch_size < 1 or self.samples < 0:
            raise BaseqError("epochs and train samples must be ≥ 0 and batch size ≥ 1")
        if min(self.lr_clip, self.lr_bias, self.lr_scale, self.lr_transform, self.lr_weight_scale) < 0:
            raise BaseqError("learning rates must be ≥ 0")


@dataclass
class QuantizeConfig:
    method: str = "baseq"
    weights: str = "gptq"  # rtn | gptq | gptaq, as the method takes (baseq/methods.py); the rtn method: rtn
    seed: int = field(default=0, metadata=flag(  # the CLI sets calib.seed to it too
        "--seed", "seed of the rotations, the training and the calibration windows"))
    bits: BitsConfig = field(default_factory=BitsConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    rotation: RotationConfig = field(default_factory=RotationConfig)
    smooth: SmoothConfig = field(default_factory=SmoothConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def spec(self) -> Method:
        """The method's registry entry (:mod:`baseq.methods`)."""
        if self.method not in METHOD_REGISTRY:
            raise BaseqError(f"unknown method '{self.method}' (choose from {', '.join(METHODS)})")
        return METHOD_REGISTRY[self.method]

    @property
    def rotate(self) -> bool:
        return self.spec.rotate

    @property
    def rotation_source(self) -> str:
        """Where R1 / R2 come from: the configured kind, or the method's own when it accepts only one."""
        m = self.spec
        return m.rotations[0] if len(m.rotations) == 1 else self.rotation.kind

    @property
    def fitted_rotations(self) -> bool:
        """Whether R1 / R2 are fitted to the calibration text (learned or calibrated), not seeded Hadamards."""
        return self.spec.rotate and ROTATION_SOURCES[self.rotation_source].fitted

    @property
    def weight_method(self) -> str:
        w = self.spec.weights
        return self.weights if self.weights in w else w[0]

    @property
    def label(self) -> str:
        m = self.spec
        name = f"{m.name}-{self.weight_method}" if m.label_weights else m.name
        src = self.rotation_source
        if m.rotate and len(m.rotations) > 1 and src not in ("hadamard", "calibrated"):
            name += f"-{src}"  # e.g. baseq-spinquant: BASE-Q started from SpinQuant's rotations
        return name

    def validate(self) -> "QuantizeConfig":
        m = self.spec
        kind = self.rotation.kind
        if m.rotate and kind not in m.rotations and not (len(m.rotations) == 1 and kind == "hadamard"):
            raise BaseqError(f"method {m.name} takes rotations {', '.join(m.rotations)} (got {kind})")
        # a switch the method would ignore is refused, never dropped silently
        rotating = ", ".join(n for n, s in METHOD_REGISTRY.items() if s.rotate)
        if not m.rotate and kind != "hadamard":
            raise BaseqError(f"method {m.name} has no rotations, so no rotation source ({kind}): use one of "
                             f"{rotating}")
        if not m.rotate and self.smooth.points:
            raise BaseqError(f"smoothing runs before the rotations and method {m.name} has none: use one of "
                             f"{rotating}")
        if not m.baseq_stages and self.train.transforms:
            raise BaseqError(f"the compensated transforms (--transforms) are a BASE-Q stage; method {m.name} does "
                             f"not run them: use --method baseq")
        if self.weights not in WEIGHTS:
            raise BaseqError(f"weights must be one of {', '.join(WEIGHTS)} (got {self.weights})")
        if self.weights not in m.weights:
            if self.weights != QuantizeConfig.weights:
                self.check_weights()
            self.weights = m.weights[0]  # the default gives way to the method's own: the config says what runs
        for name, seed in (("seed", self.seed), ("calib.seed", self.calib.seed)):
            if not 0 <= seed < 2**31:  # per-block seeds are derived from it (seed · 100003 + block) within 2⁶³
                raise BaseqError(f"{name} must be in 0 … 2³¹ − 1 (got {seed})")
        if self.train.samples > self.calib.samples:  # (was capped silently at the calibration windows)
            raise BaseqError(f"--train-samples {self.train.samples} is more than the {self.calib.samples} calibration "
                             f"windows (--calib-samples); 0 trains on all of them")
        self.gptq.validate()
        self.bits.validate()
        self.calib.validate()
        self.rotation.validate()
        self.smooth.validate()
        self.train.validate()
        check_finite(self)  # (after the sections' own checks, which say more where they have something to say)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check_weights(self) -> "QuantizeConfig":
        """Refuse a weight quantizer the method does not take — for one the user named: :meth:`validate` alone lets
        the default (gptq) give way to the method's own (the rtn method's rtn)."""
        m = self.spec
        if self.weights in WEIGHTS and self.weights not in m.weights:
            others = [n for n, s in METHOD_REGISTRY.items() if self.weights in s.weights]
            raise BaseqError(f"method {m.name} takes weights {', '.join(m.weights)} (got {self.weights}; "
                             f"methods that take {self.weights}: {', '.join(others)})")
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantizeConfig":
        cfg = _build(cls, data, "config")
        if "seed" in data and "seed" not in (data.get("calib") or {}):  # as --seed: the windows are drawn with it
            cfg.calib.seed = cfg.seed
        return (cfg.check_weights() if "weights" in data else cfg).validate()

    @classmethod
    def from_file(cls, path: str | Path) -> "QuantizeConfig":
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise BaseqError(f"cannot read config '{path}': {e.strerror or e}") from None
        try:
            if p.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as e:  # noqa: BLE001 - yaml and json raise different types
            raise BaseqError(f"config '{path}' is not valid {p.suffix.lstrip('.') or 'JSON'}: "
                             f"{str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise BaseqError(f"config '{path}' must hold a mapping at the top level")
        return cls.from_dict(data)


def check_finite(cfg, where: str = "config") -> None:
    """Every float option of ``cfg`` (and its sections) is a finite number: nan / inf from a file or a flag would
    otherwise fall back to a default, turn a search on, or surface as a traceback deep in the run."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_finite(value, f"{where}.{f.name}")
        elif isinstance(value, float) and not math.isfinite(value):
            raise BaseqError(f"{f.metadata.get('flag') or where + '.' + f.name} must be a finite number (got {value})")


def flag_fields():
    """``(section, field)`` for every QuantizeConfig field that is a CLI flag (field metadata from :func:`flag`);
    ``section`` is the attribute of QuantizeConfig holding it ("" for QuantizeConfig's own fields)."""
    for top in dataclasses.fields(QuantizeConfig):
        if top.metadata.get("flag"):
            yield "", top
        default = top.default_factory() if top.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            for f in dataclasses.fields(default):
                if f.metadata.get("flag"):
                    yield top.name, f


def _build(cls, data: dict[str, Any], where: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise BaseqError(f"unknown key(s) in {where}: {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(fields)})")
    kwargs = {}
    for name, value in data.items():
        default = fields[name].default_factory() if fields[name].default_factory is not dataclasses.MISSING \
            else fields[name].default
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise BaseqError(f"{where}.{name} must be a mapping")
            kwargs[name] = _build(type(default), value, f"{where}.{name}")
        else:
            if isinstance(default, float) and isinstance(value, str):  # YAML reads 1e-3 as a string
                try:
                    value = float(value)
                except ValueError:
                    pass
            wrong_bool = isinstance(value, bool) and not isinstance(default, bool)
            if wrong_bool or default is not None and not isinstance(value, type(default)) and not (
                    isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool)):
                raise BaseqError(f"{where}.{name} must be a {type(default).__name__} (got {value!r})")
            kwargs[name] = float(value) if isinstance(default, float) else value
    return cls(**kwargs)
