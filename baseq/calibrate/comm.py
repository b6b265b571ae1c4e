"""How the calibration processes talk to each other: a communicator handed to the engine.

Stages never ask whether they run distributed; they call a handful of collectives on ``ctx.comm``:

* :meth:`Communicator.all_reduce_` — sum tensors in place over every rank (statistics, gradients);
* :meth:`Communicator.broadcast_` — copy tensors from one rank to all (quantized weights, initial parameters);
* :meth:`Communicator.sum` / :meth:`Communicator.mean` — scalars (counts, losses) over every rank;
* :attr:`Communicator.is_main` — the one rank that writes files and prints.

:class:`Communicator` itself is the single-process one: every collective is the identity, so one process computes
exactly what it did before distributed calibration existed. :class:`DistributedCommunicator` (``calibrate/dist.py``)
implements the same calls on ``torch.distributed``.

Calibration windows are split across ranks in contiguous :class:`Shard` s; a rank holds only its own windows'
activations, and every normalisation uses the global counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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

    def barrier(self) -> None:
        pass

    def shard(self, total: int) -> Shard:
        return Shard.of(total, self.rank, self.world_size)

    def close(self) -> None:
        pass
