"""What the trainer and the strategies ask of a task."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import torch
from torch import nn

from gram_scale.data.batches import Batch

# Vectors of the given unique catalogue rows; a collective: every rank calls it together.
Lookup = Callable[[torch.Tensor], torch.Tensor]


class Task(Protocol):
    """A CF task: its model, its global training batches, its loss and its metrics."""

    name: str
    main_metric: str
    model: nn.Module
    data: object
    default_sizes: dict  # keyword arguments of ``write_default`` for the built-in set

    def __init__(self, data, opts, dim: int) -> None: ...

    @staticmethod
    def write_default(folder, seed: int, **sizes) -> None:
        """Generate the built-in synthetic set into ``folder``."""
        ...

    @staticmethod
    def load(folder, opts):
        """Read a data folder into the task's splits (catalogue, train, valid, test)."""
        ...

    @staticmethod
    def data_files(folder) -> list:
        """The files of a data folder that ``load`` reads (relative paths)."""
        ...

    @staticmethod
    def cf_summary(opts) -> str:
        """The CF model in words."""
        ...

    @staticmethod
    def split_summary(opts) -> str:
        """How the data is split, in words (the options that move users between splits)."""
        ...

    @staticmethod
    def size_stats(data) -> dict:
        """Training-set size figures for ``gram_scale.stats``."""
        ...

    def num_train_batches(self) -> int:
        """Global batches per epoch."""
        ...

    def train_batches(self, epoch: int) -> Iterator[Batch]:
        """The epoch's global batches, the same on every rank."""
        ...

    def loss(self, batch: Batch, vecs: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(summed loss over the batch's terms, number of terms); the batch is never empty."""
        ...

    def unscorable(self, split: str) -> str | None:
        """Why a split has nothing to score, or None."""
        ...

    def evaluate(self, split: str, lookup: Lookup, comm) -> dict[str, float]:
        """Metrics of a split, scored by every rank on its share, equal to one process's."""
        ...
