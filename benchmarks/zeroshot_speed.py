"""Zero-shot scoring speed: options packed into one sequence (baseq's path) vs lm-eval's own per-request path, in one
process, same threads, alternating, median of repeats; the accuracies of both must be equal.

    python benchmarks/zeroshot_speed.py --tasks hellaswag,arc_easy --limit 50 --repeats 3

Prints one JSON line per repeat and a summary (wall seconds, median ratio). Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import checkout  # noqa: F401,E402  (benchmarks/checkout.py: this checkout's baseq first)

from baseq.eval import scoring
from baseq.eval import zeroshot as zs
from baseq.models.loading import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default="hellaswag,arc_easy")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    model, tok = load_model(args.model)
    make = scoring.scoring_lm

    def scoring_lm(pack: bool):
        def build(*a, **k):
            lm = make(*a, **k)
            lm.pack = pack
            return lm
        return build

    zs.zero_shot(model, tok, args.tasks.split(",")[0], limit=2, batch_size=args.batch_size, progress=False)  # warm-up
    times: dict[bool, list[float]] = {True: [], False: []}
    accs: dict[bool, dict] = {}
    for r in range(args.repeats):
        for pack in (True, False):
            scoring.scoring_lm = scoring_lm(pack)
            t0 = time.perf_counter()
            res = zs.zero_shot(model, tok, args.tasks, limit=args.limit, batch_size=args.batch_size, progress=False)
            times[pack].append(time.perf_counter() - t0)
            accs[pack] = {t: (v["acc"], v["acc_norm"]) for t, v in res.items()}
            print(json.dumps({"repeat": r, "packed": pack, "wall": round(times[pack][-1], 1)}), flush=True)
    scoring.scoring_lm = make
    same = accs[True] == accs[False]
    print(json.dumps({"model": args.model, "tasks": args.tasks, "limit": args.limit, "threads": torch.get_num_threads(),
                      "packed_wall": round(statistics.median(times[True]), 1),
                      "lm_eval_wall": round(statistics.median(times[False]), 1),
                      "speedup": round(statistics.median(f / t for f, t in zip(times[False], times[True])), 2),
                      "same_accuracy": same, "acc": accs[True]}))
    if not same:
        raise SystemExit(f"accuracies differ: {accs}")


if __name__ == "__main__":
    main()
