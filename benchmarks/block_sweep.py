"""Tune BASE-Q's per-block training on one block of the default model: output MSE vs. the FP block per setting.

The block's FP inputs are computed by running the rotated FP model up to it; each setting then runs the method's
stages (GPTQ, optionally stage 1, stage 3) on the same block from the same starting state.

    python benchmarks/block_sweep.py 6 "epochs=5,lr_clip=0.1,lr_bias=0.1,lr_scale=0.01" "epochs=5,clip=false"

Each setting is a comma list of ``TrainConfig`` fields (YAML values). Prints the final MSE and token loss (see
``calibrate.stages.block_loss``), the training log and the seconds per stage.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import yaml

from baseq.calibrate.engine import BlockContext, capture_inputs
from baseq.calibrate.pipeline import act_spec, build_stages
from baseq.calibrate.stages import BaseqTrainStage
from baseq.config import QuantizeConfig
from baseq.data import calib_windows
from baseq.models.loading import load_model
from baseq.quant.qmodel import quantize_structure, set_quantize
from baseq.rotation.fuse import rotate_model, untie_embeddings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("block", type=int)
    p.add_argument("settings", nargs="+")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    args = p.parse_args()

    model, tok = load_model(args.model)
    for prm in model.parameters():
        prm.requires_grad_(False)
    untie_embeddings(model)
    rotate_model(model)
    ad = quantize_structure(model, act_spec(QuantizeConfig()))
    x, kwargs = capture_inputs(model, ad, calib_windows(tok, "wiki", args.seqlen, args.samples), "cpu", 4)
    set_quantize(model, False)
    for i in range(args.block):
        x = BlockContext(i, ad.layers[i], x, x, None, kwargs, torch.device("cpu"), 4, False).run(x)
    set_quantize(model, True)
    layer = ad.layers[args.block]
    start = copy.deepcopy(layer.state_dict())
    for setting in args.settings:
        train = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in setting.split(",") if kv)}
        cfg = QuantizeConfig.from_dict({"method": "baseq", "train": train})
        layer.load_state_dict(start)
        ctx = BlockContext(args.block, layer, x, x, None, kwargs, torch.device("cpu"), 4, False)
        set_quantize(layer, False)
        ctx.fp_out = ctx.run(x)
        set_quantize(layer, True)
        times = []
        for stage in build_stages(cfg):
            t0 = time.perf_counter()
            stage.run(ctx)
            times.append(f"{stage.name} {time.perf_counter() - t0:.0f}s")
        final = BaseqTrainStage.loss(ctx, x, ctx.fp_out)
        rel = BaseqTrainStage.loss(ctx, x, ctx.fp_out, "token")
        logged = {k: round(v, 4) for k, v in ctx.log.items() if "loss" in k}
        print(f"{setting}: final MSE {final:.4g}, token loss {rel:.4g} {logged} ({', '.join(times)})", flush=True)


if __name__ == "__main__":
    main()
