"""GRAM Single-step: each globally unique item of the step is encoded and back-propagated once,
by the one rank that owns it, with the sum of its occurrences' gradients. Exactly E2E."""

from __future__ import annotations

import torch

from gram_scale.data.batches import Batch, unique_index
from gram_scale.distributed import owner_slices
from gram_scale.strategies.base import CFUpdate, StepResult, local_to_global_index


class SingleStep:
    """Encode the step's unique items once, CF on their gathered rows, back-propagate once each."""

    name = "single"

    def __init__(self, runner, cf: CFUpdate, opts):
        self.runner, self.cf, self.comm = runner, cf, runner.comm

    def step(self, batch: Batch, step: int) -> StepResult:
        """One optimizer step of encoder and CF model."""
        f0, b0 = self.runner.item_forwards, self.runner.item_backwards
        local, index = unique_index(batch.items)
        union = self.comm.union(local)
        mine = union[owner_slices(len(union), self.comm.world)[self.comm.rank]]
        real = len(mine)
        # A rank that owns nothing still runs one call (ZeRO-3 gathers parameters collectively).
        h_mine = self.runner.encode(mine if real else union[:1], salt=step, grad=True)
        rows = self.comm.gather_rows(h_mine[:real].detach())  # union order
        loss, g = self.cf.loss_and_item_grads(
            batch, rows, local_to_global_index(local, index, union)
        )
        if not self.cf.all_finite(loss, g):  # skip: no optimizer moves, the graph is dropped
            self.cf.discard()
            return StepResult(loss, self.comm.sum_int(batch.occurrences()), len(union),
                              self.runner.item_forwards - f0, 0, False, skipped=True)  # fmt: skip
        self.comm.all_reduce_([g])  # every occurrence on every rank, summed per item
        own_g = g[owner_slices(len(union), self.comm.world)[self.comm.rank]]
        if real:
            self.runner.backward(h_mine, own_g)
        else:
            self.runner.backward(h_mine, torch.zeros_like(h_mine), count=0)
        applied = self.cf.step_with(self.runner)
        return StepResult(
            loss=loss,
            occurrences=self.comm.sum_int(batch.occurrences()),
            unique=len(union),
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
