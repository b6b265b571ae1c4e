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
        for row, ids in zip(logits, batch):  # row by row: no batch-sized fp32 copies of the logits
            total += F.cross_entropy(row[:-1].float(), ids[1:], reduction="sum").item()
            count += ids.numel() - 1
        del logits
    return total, count


def perplexity(model, windows: torch.Tensor, batch_size: int = 4, device=None, progress: bool = True) -> float:
    total, count = nll_sum(model, windows, batch_size, device, progress)
    return math.exp(total / count)
