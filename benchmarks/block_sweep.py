"""Screen settings on one block of the default model: output MSE of the quantized block vs. the FP block.

The block's FP inputs come from running the rotated FP model up to it. With ``--q-inputs rtn`` the blocks before
it are quantized with round-to-nearest weights (activation/KV quantizers on) to produce realistic *quantized*
inputs, cheaply; the quantized block is then scored on those (``q MSE``) as well as on the FP inputs (``MSE``).
Each setting runs the method's stages (GPTQ/GPTAQ, optional smoothing or stage 1, BASE-Q training) on the same
block from the same starting state.

    python benchmarks/block_sweep.py 6 "epochs=5,lr_clip=0.1" "epochs=5,clip=false"
    python benchmarks/block_sweep.py 12 --q-inputs rtn "weights=gptq" "weights=gptaq,gptq.asym_alpha=1"

A setting is a comma list of ``key=value`` (YAML values): ``section.field`` sets a field of a config section
(``gptq.asym_alpha=1``, ``bits.a_clip=0.8``), a top-level ``QuantizeConfig`` field (``weights``, ``method``) is
set as is, anything else is a ``TrainConfig`` field. Prints the final MSE, the token loss (see
``calibrate.stages.block_loss``), the training log and the seconds per stage.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import re
import time
from types import SimpleNamespace

import torch
import yaml

import checkout  # noqa: F401,E402  (benchmarks/checkout.py: this checkout's baseq first)

from baseq.calibrate.engine import BlockContext, capture_inputs
from baseq.calibrate.pipeline import act_spec, build_stages, check_model, kv_shift_on
from baseq.calibrate.stages import BaseqTrainStage
from baseq.config import QuantizeConfig
from baseq.data import calib_windows
from baseq.models.loading import load_model
from baseq.quant.qmodel import quantize_structure, set_quantize
from baseq.rotation.fuse import rotate_model

TOP = {f.name for f in dataclasses.fields(QuantizeConfig)}


def parse_setting(setting: str) -> QuantizeConfig:
    data: dict = {"method": "baseq"}
    for key, value in (kv.split("=", 1) for kv in re.split(r",(?=[\w.]+=)", setting) if kv):  # a, b=x,y
        value = yaml.safe_load(value)
        if "." in key:
            section, field = key.split(".", 1)
            data.setdefault(section, {})[field] = value
        elif key in TOP:
            data[key] = value
        else:
            data.setdefault("train", {})[key] = value
    return QuantizeConfig.from_dict(data)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("block", type=int)
    p.add_argument("settings", nargs="+")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--q-inputs", choices=("fp", "rtn"), default="fp",
                   help="quantized inputs: the FP ones (default) or from RTN-quantized earlier blocks")
    args = p.parse_args()

    model, tok = load_model(args.model)
    for prm in model.parameters():
        prm.requires_grad_(False)
    base = QuantizeConfig()
    raw = SimpleNamespace(kv_bias=check_model(model, base).kv_bias)  # (as loaded: the structure adds biases)
    rtn_cfg = QuantizeConfig.from_dict({"method": "quarot", "weights": "rtn", "bits": {"kv_shift": "mean"}})
    earlier = build_stages(rtn_cfg, kv_shift_on(base, raw))  # (K/V means with RTN where the default method has them)
    rotate_model(model)
    ad = quantize_structure(model, act_spec(base))
    x, kwargs = capture_inputs(model, ad, calib_windows(tok, "wiki", args.seqlen, args.samples), "cpu", 4)
    q = x
    cpu = torch.device("cpu")
    for i in range(args.block):
        ctx = BlockContext(i, ad.layers[i], x, q, None, kwargs, cpu, 4, False)
        set_quantize(ad.layers[i], False)
        x_next = ctx.run(x)
        if args.q_inputs == "rtn":
            set_quantize(ad.layers[i], True)
            for stage in earlier:
                stage.run(ctx)
            q = ctx.run(q)
        x = x_next
    q = x if args.q_inputs == "fp" else q
    set_quantize(model, True)
    start = copy.deepcopy(ad.layers[args.block])
    for setting in args.settings:
        cfg = parse_setting(setting)
        layer = ad.layers[args.block] = copy.deepcopy(start)  # stages add buffers (recorded scales): a fresh copy
        ctx = BlockContext(args.block, layer, x, q, None, kwargs, cpu, 4, False)
        set_quantize(layer, False)
        ctx.fp_out = ctx.run(x)
        set_quantize(layer, True)
        times = []
        for stage in build_stages(cfg, kv_shift_on(cfg, raw)):
            t0 = time.perf_counter()
            stage.run(ctx)
            times.append(f"{stage.name} {time.perf_counter() - t0:.1f}s")
        final = BaseqTrainStage.loss(ctx, x, ctx.fp_out)
        rel = BaseqTrainStage.loss(ctx, x, ctx.fp_out, "token")
        q_final = f", q MSE {BaseqTrainStage.loss(ctx, q, ctx.fp_out):.4g}" if q is not x else ""
        logged = {k: round(v, 4) for k, v in ctx.log.items() if "loss" in k}
        print(f"{setting}: final MSE {final:.4g}{q_final}, token loss {rel:.4g} {logged} ({', '.join(times)})",
              flush=True)


if __name__ == "__main__":
    main()
