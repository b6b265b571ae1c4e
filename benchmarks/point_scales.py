"""The scale of what each activation quantization point quantizes, block by block: the median token RMS (after the
point's rotation and scale, the first token of each window left out: it is the attention sink in many models) and
the mean |channel mean| — to compare models (are learning rates in absolute units on the same scale?).

    python benchmarks/point_scales.py <packed folder> --data wiki --windows 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import checkout  # noqa: F401,E402  (benchmarks/checkout.py: this checkout's baseq first)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a packed folder written by 'baseq quantize'")
    p.add_argument("--data", default="wiki")
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=512)
    args = p.parse_args()
    from baseq.data import eval_windows
    from baseq.runtime import modules
    from baseq.runtime.load import load_saved

    model, tok = load_saved(Path(args.model))
    where = {m: (i, n) for i, layer in enumerate(model.model.layers) for n, m in layer.named_modules()
             if isinstance(m, modules.ActPoint)}
    seen: dict[str, dict[int, list[tuple[float, float]]]] = {}
    prepare = modules.ActPoint.prepare

    def recorded(self, x):
        y = prepare(self, x)
        i, name = where[self]
        body = y.float()[1:]  # one window a forward: [tokens, channels]
        seen.setdefault(name, {}).setdefault(i, []).append(
            (float(body.pow(2).mean(-1).sqrt().median()), float(body.mean(0).abs().mean())))
        return y

    modules.ActPoint.prepare = recorded
    with torch.inference_mode():
        for w in eval_windows(tok, args.data, args.seqlen, args.windows):
            model(w[None])
    modules.ActPoint.prepare = prepare
    for name, blocks in seen.items():
        rms = [sum(a for a, _ in v) / len(v) for _, v in sorted(blocks.items())]
        mean = [sum(b for _, b in v) / len(v) for _, v in sorted(blocks.items())]
        print(f"{name}: median token RMS {min(rms):.3f}–{max(rms):.3f} ({', '.join(f'{r:.2f}' for r in rms)})")
        print(f"{' ' * len(name)}  mean |channel mean| {min(mean):.3f}–{max(mean):.3f}")


if __name__ == "__main__":
    main()
