"""Where the engine takes blocks from and puts them back: the model in memory, or a lazily loaded model.

A :class:`Blocks` source hands out block ``i`` ready for the stages (rotated, with the quantized structure, on the
CPU) and takes it back when its stages are done. :class:`ModelBlocks` is a model held in memory (rotated and
structured up front). :class:`LazyBlocks` reads each block from the model's files when it is due, rotates and
structures it then, and drops it when done: a finished block lives only in its checkpoint file
(``work_dir/block{i}.safetensors``), so calibration holds one block in memory whatever the model's depth.

:func:`finished_layers` is how writers read the result back, one block at a time.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Callable, Iterator, Protocol

from torch import nn

from ..device import release_memory
from ..errors import BaseqError
from ..io import read_safetensors
from ..models.adapter import ModelAdapter
from ..models.lazy import LazyModel
from ..quant.qmodel import ActSpec, quantize_layer


class Blocks(Protocol):
    def __len__(self) -> int: ...

    def load(self, i: int) -> nn.Module: ...

    def finish(self, i: int, layer: nn.Module) -> None: ...

    def restore(self, i: int, path: Path) -> None:
        """Block ``i`` was finished by an interrupted run; its state is in ``path``."""

    def ends_away(self) -> AbstractContextManager:
        """Around the block loop, which needs only the blocks: a source may keep the model's ends out of memory."""


class ModelBlocks:
    """The blocks of a model held in memory."""

    def __init__(self, ad: ModelAdapter):
        self.layers = ad.layers

    def __len__(self) -> int:
        return len(self.layers)

    def load(self, i: int) -> nn.Module:
        return self.layers[i]

    def finish(self, i: int, layer: nn.Module) -> None:
        pass

    def restore(self, i: int, path: Path) -> None:
        self.layers[i].load_state_dict(read_safetensors(path), strict=True)

    def ends_away(self) -> AbstractContextManager:
        return nullcontext()  # the whole model is in memory anyway


class LazyBlocks:
    """Blocks read from a :class:`LazyModel`'s files one at a time, made ready by ``prepare`` (rotate, quantized
    structure), dropped when finished (their state is in the engine's checkpoint files by then). While they are
    calibrated, the model's ends wait in a file under ``park_dir`` (:meth:`LazyModel.ends_parked`)."""

    def __init__(self, lazy: LazyModel, prepare: Callable[[nn.Module], None], park_dir: Path | None = None):
        self.lazy, self.prepare, self.park_dir = lazy, prepare, park_dir

    def __len__(self) -> int:
        return len(self.lazy)

    def load(self, i: int) -> nn.Module:
        layer = self.lazy.load_block(i)
        self.prepare(layer)
        return layer

    def finish(self, i: int, layer: nn.Module) -> None:
        layer.to("meta")  # frees the weights now, whoever still holds the module

    def restore(self, i: int, path: Path) -> None:
        if not Path(path).is_file():
            raise BaseqError(f"cannot resume: '{path}' is missing")

    def ends_away(self) -> AbstractContextManager:
        return self.lazy.ends_parked(self.park_dir)


def finished_layers(lazy: LazyModel, spec: ActSpec, block_file: Callable[[int], Path]
                    ) -> Iterator[tuple[int, nn.Module]]:
    """Each quantized block of a lazy run, rebuilt from its file (CPU; one block in memory at a time: a block is
    dropped when the consumer asks for the next)."""
    shape = ModelAdapter(lazy.model).shape
    for i in range(len(lazy)):
        layer = lazy.template(i)
        quantize_layer(layer, spec, shape, fuse_online=False)  # R4 is fused in the saved weights already
        # owned memory, not a map of the file: any small tensor the consumer keeps (a bias in a packed shard waiting
        # to be written) would keep the whole block's pages resident
        state = read_safetensors(block_file(i))
        layer.load_state_dict(state, strict=True, assign=True)
        for p in layer.parameters():
            p.requires_grad_(False)
        yield i, layer.eval()
        layer.to("meta")
        release_memory()
