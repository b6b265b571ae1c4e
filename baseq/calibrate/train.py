"""The one training loop of the calibration stages (BASE-Q corrections, compensated transforms), and the hook helper.

:func:`fit` owns everything a per-block training needs to be reproducible and correct on one process or many: the
optimizer (AdamW, no weight decay), the cosine schedule over all steps, the seeded shuffling of the training windows,
the finite-loss check and the gradient all-reduce. A step draws a batch of *global* window indices; each rank runs
the windows of the batch it holds, weights its loss by its share of the batch, and the summed gradients are those
of the whole batch — on one process, exactly today's arithmetic.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import BaseqError
from .comm import Communicator, Shard


def fit(groups: list[dict], step_loss: Callable[[torch.Tensor], torch.Tensor], shard: Shard, *, epochs: int,
        batch_size: int, seed: int, comm: Communicator | None = None, what: str = "training", index: int = 0,
        hint: str = "", progress: bool = True) -> float:
    """Train the parameters of ``groups`` (optimizer param groups, each with its ``lr``) for ``epochs`` over the
    ``shard.total`` training windows; returns the last step's loss (the whole batch's, over every rank).

    ``step_loss(local)`` is the mean loss over this rank's windows at positions ``local`` (never empty). A step's
    loss is the mean over its whole batch, so rank ``r`` scales its mean by its share of the batch."""
    comm = comm or Communicator()
    params = [p for g in groups for p in g["params"]]
    n = shard.total
    total = epochs * math.ceil(n / batch_size)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    gen = torch.Generator().manual_seed(seed)
    step, last = 0, float("nan")
    bar = tqdm(total=total, desc=f"block {index} {what}", disable=not progress, leave=False)
    try:
        for epoch in range(epochs):
            for idx in torch.randperm(n, generator=gen).split(batch_size):
                local = shard.local(idx)
                opt.zero_grad(set_to_none=True)
                if len(local):
                    loss = step_loss(local)
                    if len(local) != len(idx):
                        loss = loss * (len(local) / len(idx))
                    loss.backward()
                    value = loss.detach()
                else:  # this rank holds none of the batch: it contributes zero gradients
                    value = torch.zeros(())
                last = reduce_gradients(params, value, comm)
                if not math.isfinite(last):
                    raise BaseqError(f"non-finite {what} loss in block {index} at epoch {epoch}, step {step}{hint}")
                opt.step()
                sched.step()
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{last:.4g}", epoch=epoch)
    finally:
        bar.close()
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    return last


def reduce_gradients(params: list[nn.Parameter], loss: torch.Tensor, comm: Communicator) -> float:
    """Sum the gradients and the step loss over every rank (one all-reduce); returns the summed loss."""
    if comm.world_size == 1:
        return loss.item()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1).float() for p in params] + [loss.reshape(1).float().to(params[0].device)])
    comm.all_reduce_([flat])
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
        offset += p.numel()
    return flat[-1].item()


class Stop(Exception):
    """Raised by a :class:`Tap` to end a forward pass once the inputs it wanted are seen."""


class Tap:
    """Watch the inputs of some modules during forward passes::

        with Tap(modules, fn, stop=True) as tap:
            for batch in batches:
                tap(forward, batch)   # fn(name, args, kwargs) on each watched module's input; the forward stops there

    ``modules``: a module or a ``{name: module}`` dict. With ``stop``, the forward is cut right after the first
    watched input (nothing after it is computed) and :meth:`__call__` returns None."""

    def __init__(self, modules: nn.Module | dict[str, nn.Module], fn: Callable, stop: bool = False):
        self.modules = modules if isinstance(modules, dict) else {"": modules}
        self.fn, self.stop = fn, stop
        self.handles: list = []

    def __enter__(self) -> "Tap":
        for name, module in self.modules.items():
            def pre(module, args, kwargs, name=name):
                self.fn(name, args, kwargs)
                if self.stop:
                    raise Stop
            self.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def __call__(self, forward: Callable, *args, **kwargs):
        try:
            return forward(*args, **kwargs)
        except Stop:
            return None
