"""End-to-end baseline: every item occurrence of the batch is encoded and back-propagated."""

from __future__ import annotations

from gram_scale.data.batches import Batch, occurrence_index
from gram_scale.exchange import pieces
from gram_scale.strategies.base import CFUpdate, Plan, StepResult, check_counts


class EndToEnd:
    """No deduplication: each rank encodes each of its occurrences with its own graph."""

    name = "e2e"

    def __init__(self, runner, cf: CFUpdate, opts, steps_per_epoch: int):
        self.runner, self.cf, self.comm = runner, cf, runner.comm

    def step(self, batch: Batch, step: int) -> StepResult:
        """One optimizer step of encoder and CF model."""
        f0, b0 = self.runner.item_forwards, self.runner.item_backwards
        rows, index = occurrence_index(batch.items)
        (piece,) = pieces(self.comm, rows)
        h = self.runner.encode(piece.items, salt=step, grad=True, count=piece.real)
        loss_sum, count, g = self.cf.loss_and_item_grads(batch, h[: piece.real].detach(), index)
        trains = piece.real if self.runner.trainable else 0
        plan = Plan(piece.real, trains, piece.real)
        totals, g = self.cf.agree(loss_sum, count, g, plan)
        applied = False  # the encoder's step: its gradient may still be non-finite
        if not totals.ok:  # skip: no optimizer moves, the graph is dropped
            self.cf.discard()
        else:
            self.runner.backward(h, piece.pad(g), count=piece.real)
            applied = self.cf.step_with(self.runner)
        check_counts(self.runner, plan, totals, f0, b0)
        return StepResult(
            loss=totals.loss,
            occurrences=batch.occurrences(),
            unique=len(rows.unique()),
            item_forwards=self.runner.item_forwards - f0,
            item_backwards=self.runner.item_backwards - b0,
            encoder_updated=self.runner.trainable and totals.ok and applied,
            skipped=not (totals.ok and applied),
            encoder_skipped=totals.ok and not applied,
            totals=totals,
        )

    def finish(self, step: int) -> StepResult | None:
        """Nothing is pending between steps."""
        return None

    def state_dict(self) -> dict:
        """No state beyond the models and optimizers."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore."""
