"""Does end-to-end rotation training help at a CPU budget? Held-out loss of the W16 A/KV-quantized model (the loss
SpinQuant / OSTQuant train) before and after training, for a few budgets / learning rates.

    OMP_NUM_THREADS=1 python benchmarks/learned_rotation_curve.py --kind spinquant --steps 20 --lrs 1.5,0.2 \\
        --json results/curve.json

Each run starts from the model as loaded and from the seeded Hadamards (the step-0 value is QuaRot's rotations).
Held-out: the first ``--eval-windows`` windows of the ``wiki`` eval split; metric: causal-LM cross-entropy (nats).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
import torch.nn.functional as F

import checkout  # noqa: F401,E402  (benchmarks/checkout.py: this checkout's baseq first)


def held_out_ce(model, sim, windows) -> float:
    sim.set_quantize(True)
    total = 0.0
    with torch.no_grad():
        for w in windows:
            logits = model(w[None], use_cache=False).logits[0]
            total += F.cross_entropy(logits[:-1].float(), w[1:]).item()
    return total / len(windows)


def main() -> None:
    from baseq.calibrate.pipeline import act_spec
    from baseq.calibrate.rotations import training_windows
    from baseq.config import QuantizeConfig
    from baseq.data import eval_windows
    from baseq.load import load
    from baseq.models.adapter import LlamaAdapter
    from baseq.calibrate.learned_rotations import OnlineTransforms, TrainSettings, train_transforms

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--kind", default="spinquant", choices=("spinquant", "ostquant"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--lrs", default="1.5")
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--json")
    args = p.parse_args()
    base, tok = load(args.model, dtype="float32", device="cpu")
    for prm in base.parameters():
        prm.requires_grad_(False)
    cfg = QuantizeConfig(method=args.kind)
    cfg.rotation.steps, cfg.rotation.batch, cfg.rotation.seqlen = args.steps, args.batch, args.seqlen
    spec = act_spec(cfg)
    train = training_windows(tok, cfg)
    held = eval_windows(tok, "wiki", args.seqlen, args.eval_windows)
    rows = []
    for lr in [float(v) for v in args.lrs.split(",")]:
        model = copy.deepcopy(base)
        ost = args.kind == "ostquant"
        start = OnlineTransforms(LlamaAdapter(model).shape, spec, r2_per_head=ost, scales=ost)
        start.install(model)
        before = held_out_ce(model, start, held)
        start.remove()
        t0 = time.perf_counter()
        log = {}
        t = train_transforms(model, train, spec, args.kind, TrainSettings(steps=args.steps, lr=lr, batch=args.batch),
                             log=log)
        seconds = time.perf_counter() - t0
        after_sim = OnlineTransforms(LlamaAdapter(model).shape, spec, r2_per_head=ost, scales=ost)
        with torch.no_grad():
            after_sim.r1.copy_(t.r1.float())
            after_sim.r2.copy_(t.r2[:, : after_sim.r2.shape[1]].float())
            if t.scales is not None:
                for k, v in t.scales.items():
                    after_sim.log_s[k].copy_(v.log().float())
        after_sim.install(model)
        after = held_out_ce(model, after_sim, held)
        after_sim.remove()
        row = {"kind": args.kind, "lr": lr, "steps": args.steps, "tokens_per_step": args.batch * args.seqlen,
               "held_out_ce_before": round(before, 5), "held_out_ce_after": round(after, 5),
               "train_seconds": round(seconds, 1), "train_losses": log["losses"]}
        print(json.dumps({k: v for k, v in row.items() if k != "train_losses"}), flush=True)
        rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
