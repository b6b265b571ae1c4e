"""Perplexity: exp(mean NLL over every predicted token of the windows), loss computed in fp32.

The same protocol is used everywhere in baseq (CLI, quantize --eval, benchmarks, tests).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def nll_sum(model, windows: torch.Tensor, batch_size: int = 4, device=None, progress: bool = True,
            desc: str = "perplexity") -> tuple[float, int]:
    """(sum of token NLLs, number of predicted tokens) over ``windows`` [n, seqlen]."""
    device = device or next(model.parameters()).device
    total, count = 0.0, 0
    batches = windows.split(max(1, batch_size))
    for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
        batch = batch.to(device)
        logits = model(batch, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum")
        total += loss.item()
        count += batch[:, 1:].numel()
    return total, count


def perplexity(model, windows: torch.Tensor, batch_size: int = 4, device=None, progress: bool = True) -> float:
    total, count = nll_sum(model, windows, batch_size, device, progress)
    return math.exp(total / count)
