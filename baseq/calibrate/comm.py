"""How the calibration processes talk to each other: a communicator handed to the engine.

Stages never ask whether they run distributed; they call a handful of collectives on ``ctx.comm``:

* :meth:`Communicator.all_reduce_` — sum tensors in place over every rank (statistics, gradients);
* :meth:`Communicator.broadcast_` — copy tensors from one rank to all (quantized weights, initial parameters);
* :meth:`Communicator.sum` / :meth:`Communicator.mean` — scalars (counts, losses) over every rank;
* :attr:`Communicator.is_main` — the one rank that writes files and prints.

:class:`Communicator` itself is the single-process one: every collective is the identity, so one process computes
exactly what it did before distributed calibration existed. :class:`DistributedCommunicator` implements the same calls
on ``torch.distributed`` (gloo on the CPU, nccl on CUDA), each with a timeout: a rank that died or hangs makes the
others fail with one clear line instead of waiting forever. :func:`from_env` picks one of the two from the
environment ``torchrun`` sets.

Calibration windows are split across ranks in contiguous :class:`Shard` s; a rank holds only its own windows'
activations, and every normalisation uses the global counts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from ..errors import BaseqError


@dataclass(frozen=True)
class Shard:
    """The windows ``[start, stop)`` of ``total`` that one rank holds (contiguous, sizes differ by at most one)."""

    start: int
    stop: int
    total: int

    @classmethod
    def of(cls, total: int, rank: int = 0, world_size: int = 1) -> "Shard":
        base, extra = divmod(total, world_size)
        start = rank * base + min(rank, extra)
        return cls(start, start + base + (rank < extra), total)

    @property
    def size(self) -> int:
        return self.stop - self.start

    def first(self, k: int) -> "Shard":
        """The part of this shard among the first ``k`` windows (``k`` = 0: all of them)."""
        k = k or self.total
        k = min(k, self.total)
        return Shard(min(self.start, k), min(self.stop, k), k)

    def local(self, idx: torch.Tensor) -> torch.Tensor:
        """Positions, in this rank's tensors, of the global window indices ``idx`` it holds (order kept)."""
        return idx[(idx >= self.start) & (idx < self.stop)] - self.start


class Communicator:
    """One process: every collective is the identity (and exact)."""

    rank = 0
    world_size = 1
    local_size = 1  # the ranks on this machine, which share its memory
    device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Sum each tensor over every rank, in place."""
        return tensors

    def broadcast_(self, tensors: list[torch.Tensor], src: int = 0) -> list[torch.Tensor]:
        """Overwrite each tensor with rank ``src``'s, in place."""
        return tensors

    def sum(self, values: list[float]) -> list[float]:
        """Each scalar summed over every rank (float64: counts stay exact)."""
        return [float(v) for v in values]

    def mean(self, value: float, count: int | float) -> float:
        """The mean over every rank of a per-rank mean ``value`` of ``count`` items."""
        return float(value)

    def sizes(self, n: int) -> list[int]:
        """Every rank's ``n``, in rank order."""
        t = torch.zeros(self.world_size, dtype=torch.float64)
        t[self.rank] = n
        return [int(v) for v in self.all_reduce_([t])[0].tolist()]

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` (``[n, ...]``, ``n`` may differ), concatenated along dim 0 in rank order: the same
        tensor on every rank. Exact (each value travels in a zero-padded slot of a summed buffer)."""
        if self.world_size == 1:
            return t
        sizes = self.sizes(t.shape[0])
        buf = torch.zeros(self.world_size, max(sizes), *t.shape[1:], dtype=t.dtype)
        buf[self.rank, :t.shape[0]] = t.detach().cpu()
        self.all_reduce_([buf])
        return torch.cat([buf[r, :n] for r, n in enumerate(sizes)])

    def barrier(self) -> None:
        pass

    def shard(self, total: int) -> Shard:
        return Shard.of(total, self.rank, self.world_size)

    def close(self) -> None:
        pass


class DistributedCommunicator(Communicator):
    """The collectives over ``torch.distributed``; tensors travel on :attr:`device` (the CPU for gloo, this rank's
    GPU for nccl) and come back where they were. Every failure of a collective (a peer gone, a timeout) becomes
    one :class:`BaseqError` naming the rank and the operation."""

    def __init__(self, device: torch.device | str = "cpu", timeout: float = 1800.0):
        import torch.distributed as dist

        self.dist, self.timeout = dist, timeout
        device = torch.device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if not dist.is_available() or (backend == "gloo" and not dist.is_gloo_available()) or (
                backend == "nccl" and not dist.is_nccl_available()):
            raise BaseqError(f"distributed calibration needs torch.distributed with the {backend} backend, "
                             f"which this torch build lacks")
        self._call("joining the process group", lambda: dist.init_process_group(
            backend, timeout=timedelta(seconds=timeout), **({"device_id": device} if backend == "nccl" else {})))
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.local_size = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))  # torchrun's, per machine
        self.device = device if backend == "nccl" else torch.device("cpu")

    def _call(self, what: str, fn):
        try:
            return fn()
        except BaseqError:
            raise
        except (RuntimeError, ValueError, self.dist.DistError) as e:  # gloo / nccl / the store report failures so
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            rank = self.__dict__.get("rank", os.environ.get("RANK", "?"))  # (not the class's 0 before joining)
            raise BaseqError(f"rank {rank}: {what} failed: another rank stopped or did not answer within "
                             f"{self.timeout:g} s ({first})") from None

    def _collective(self, what: str, tensors: list[torch.Tensor], op) -> list[torch.Tensor]:
        """Run ``op`` on one flat buffer per dtype holding all ``tensors``, then copy the result back."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            flat = torch.cat([t.detach().reshape(-1).to(self.device) for t in group])
            self._call(what, lambda: op(flat))
            offset = 0
            for t in group:
                t.data.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()
        return tensors

    def all_reduce_(self, tensors):
        return self._collective("all-reduce", tensors, lambda f: self.dist.all_reduce(f))

    def broadcast_(self, tensors, src=0):
        return self._collective("broadcast", tensors, lambda f: self.dist.broadcast(f, src=src))

    def sum(self, values):
        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        self.all_reduce_([t])
        return t.tolist()

    def mean(self, value, count):
        total, n = self.sum([float(value) * count, count])
        return total / n

    def barrier(self):
        self._call("barrier", lambda: self.dist.barrier())

    def close(self):
        if self.dist.is_initialized():
            self.dist.destroy_process_group()


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or {"RANK", "WORLD_SIZE", "MASTER_ADDR"} <= os.environ.keys()


def from_env(device: torch.device | str = "cpu", timeout: float = 1800.0) -> Communicator:
    """A :class:`DistributedCommunicator` when started by ``torchrun`` (or with its environment variables), else the
    single-process :class:`Communicator`."""
    return DistributedCommunicator(device, timeout) if launched_by_torchrun() else Communicator()


def local_device(device: str) -> str:
    """``--device`` for this rank: a bare ``cuda`` becomes this rank's GPU (``cuda:LOCAL_RANK``) under torchrun."""
    if device == "cuda" and launched_by_torchrun():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device
