"""End-to-end baseline: every item occurrence of the batch is encoded and back-propagated."""

from __future__ import annotations

import torch

from gram_scale.data.batches import Batch, occurrence_index
from gram_scale.strategies.base import CFUpdate, StepResult


class EndToEnd:
    """No deduplication: each rank encodes each of its occurrences with its own graph."""

    name = "e2e"

    def __init__(self, runner, cf: CFUpdate, opts):
        self.runner, self.cf, self.comm = runner, cf, runner.comm

    def step(self, batch: Batch, step: int) -> StepResult:
        """One optimizer step of encoder and CF model."""
        f0, b0 = self.runner.item_forwards, self.runner.item_backwards
        rows, index = occurrence_index(batch.items)
        real = len(rows)
        h = self.runner.encode(
            rows if real else torch.zeros(1, dtype=torch.long), salt=step, grad=True
        )
        loss, g = self.cf.loss_and_item_grads(batch, h[:real].detach(), index)
        if not self.cf.all_finite(loss, g):  # skip: no optimizer moves, the graph is dropped
            self.cf.discard()
            return StepResult(loss, self.comm.sum_int(real), len(self.comm.union(torch.unique(rows))),
                              self.runner.item_forwards - f0, 0, False, skipped=True)  # fmt: skip
        if real:
            self.runner.backward(h, g)
        else:
            self.runner.backward(h, torch.zeros_like(h), count=0)
        applied = self.cf.step_with(self.runner)
        occurrences = self.comm.sum_int(real)
        return StepResult(
            loss=loss,
            occurrences=occurrences,
            unique=len(self.comm.union(torch.unique(rows))),
            item_forwards=self.runner.item_forwards - f0,
            item_backwards=self.runner.item_backwards - b0,
            encoder_updated=applied and self.runner.trainable,
            skipped=not applied,
            encoder_skipped=not applied,
        )

    def finish(self, step: int) -> StepResult | None:
        """Nothing is pending between steps."""
        return None

    def state_dict(self) -> dict:
        """No state beyond the models and optimizers."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore."""
