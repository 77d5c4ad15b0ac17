"""Batches that carry item rows (never text), and the unique-item index GRAM works on.

A batch's ``items`` tensor holds catalogue rows with -1 for padding; everything else a task
needs travels in ``fields``. Batches are *global*: every rank builds the same sequence of
global batches from the seed and takes its own slice, so a run on N processes sees exactly the
samples a 1-process run sees.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Batch:
    """Item rows (any shape, -1 = padding) plus the task's other tensors."""

    items: torch.Tensor
    fields: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.items.shape[0])

    def slice(self, rank: int, world: int) -> Batch:
        """This rank's contiguous share of the global batch."""
        n = len(self)
        lo, hi = rank * n // world, (rank + 1) * n // world
        return Batch(self.items[lo:hi], {k: v[lo:hi] for k, v in self.fields.items()})

    def occurrences(self) -> int:
        """Non-padding item positions."""
        return int((self.items >= 0).sum())


def merge_batches(batches: list[Batch]) -> Batch:
    """One batch of the rows of several, in order: each tensor padded at the end of its second
    dimension to the widest (items with -1, the task's other tensors with 0, what both tasks
    pad with), so every loss term of the batches is a loss term of the merged batch."""
    if len(batches) == 1:
        return batches[0]
    width = max(b.items.shape[1] for b in batches)

    def padded(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    items = torch.cat([padded(b.items, -1) for b in batches])
    fields = {k: torch.cat([padded(b.fields[k], 0) for b in batches]) for k in batches[0].fields}
    return Batch(items, fields)


def unique_index(items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(unique rows, index)``: index has items' shape and points into unique rows; padding
    points one past the end (a zero row is appended there)."""
    valid = items >= 0
    unique, inverse = torch.unique(items[valid], sorted=True, return_inverse=True)
    index = torch.full_like(items, len(unique))
    index[valid] = inverse
    return unique, index


def occurrence_index(items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Like ``unique_index`` but one row per occurrence (E2E: no deduplication)."""
    valid = items >= 0
    rows = items[valid]
    index = torch.full_like(items, len(rows))
    index[valid] = torch.arange(len(rows))
    return rows, index


def gather(vectors: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of ``vectors`` by ``index`` (shape ``index.shape + (dim,)``), padding -> zeros.

    Autograd sums the gradients of repeated rows: the summed item gradient of GRAM."""
    padded = torch.cat([vectors, vectors.new_zeros(1, vectors.shape[1])])
    return padded[index.to(vectors.device)]


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """A permutation of ``range(n)`` that depends only on (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)
