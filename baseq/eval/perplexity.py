"""Perplexity: exp(mean NLL over every predicted token of the windows), loss computed in fp32.

The same protocol is used everywhere in baseq (CLI, quantize --eval, benchmarks, tests). For decoder models with a
plain linear LM head (``model.model`` + ``model.lm_head``, the Llama family) the head is applied to ``head_chunk``
positions at a time, so the fp32 logits of a whole batch (4 × 512 × 49152 × 4 B = 400 MB for the default model)
never exist at once; other models fall back to their full ``logits`` output.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm


def _chunkable(model) -> bool:
    """Logits are ``lm_head(model.model(...).last_hidden_state)``: a plain linear head, or the runtime's table."""
    cfg = getattr(model, "config", None)
    return (isinstance(getattr(model, "lm_head", None), nn.Module) and hasattr(model, "model")
            and not getattr(cfg, "final_logit_softcapping", None) and getattr(cfg, "logit_scale", None) is None)


@torch.inference_mode()
def nll_sum(model, windows: torch.Tensor, batch_size: int = 4, device=None, progress: bool = True,
            desc: str = "perplexity", head_chunk: int = 128) -> tuple[float, int]:
    """(sum of token NLLs, number of predicted tokens) over ``windows`` [n, seqlen]."""
    device = device or next(iter(model.state_dict().values())).device
    chunked = _chunkable(model)
    total, count = 0.0, 0
    batches = windows.split(max(1, batch_size))
    for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
        batch = batch.to(device)
        if chunked:  # final hidden states, turned into logits a chunk at a time below
            feats, head, step = model.model(batch, use_cache=False).last_hidden_state, model.lm_head, head_chunk
        else:
            feats, head, step = model(batch, use_cache=False).logits, nn.Identity(), batch.shape[1]
        for row, ids in zip(feats, batch):  # row by row, chunk by chunk: no batch-sized fp32 copies of the logits
            for i in range(0, len(ids) - 1, step):
                j = min(i + step, len(ids) - 1)
                total += F.cross_entropy(head(row[i:j]).float(), ids[i + 1:j + 1], reduction="sum").item()
            count += ids.numel() - 1
        del feats
    return total, count


def perplexity(model, windows: torch.Tensor, batch_size: int = 4, device=None, progress: bool = True) -> float:
    total, count = nll_sum(model, windows, batch_size, device, progress)
    return math.exp(total / count)
