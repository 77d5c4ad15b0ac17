"""End-to-end baseline: every item occurrence of the batch is encoded and back-propagated.

The occurrences are encoded by the chunk rule of every encode (sorted by token length, at most
``--encoder-batch-size`` rows and ``--encoder-tokens`` padded tokens a call), each call's graph
kept, and the kept graphs back-propagated together in one backward: one forward and one
backward per occurrence, in calls the encoder runs efficiently. E2E keeps every call's graph
until the CF step is done, as end-to-end training must; it does not re-encode to save memory."""

from __future__ import annotations

from gram_scale.data.batches import Batch, occurrence_index
from gram_scale.exchange import by_call, in_order
from gram_scale.schedule import run_steps
from gram_scale.strategies.base import CFUpdate, Plan, StepResult, check_counts


class EndToEnd:
    """No deduplication: each rank encodes each of its occurrences with its own graph."""

    name = "e2e"
    updates = "encoder updates"  # what its encoder steps are called (plots)

    @staticmethod
    def encoder_steps(opts, steps_per_epoch: int, task) -> int:
        """One encoder step per training step."""
        return run_steps(opts, steps_per_epoch)

    def __init__(self, runner, cf: CFUpdate, opts, steps_per_epoch: int):
        self.runner, self.cf, self.comm = runner, cf, runner.comm

    def step(self, batch: Batch, step: int) -> StepResult:
        """One optimizer step of encoder and CF model."""
        f0, b0 = self.runner.item_forwards, self.runner.item_backwards
        rows, index = occurrence_index(batch.items)
        calls, hs = [], []
        if self.runner.trainable:
            calls = self.runner.calls(rows)
            hs = [self.runner.encode(c.items, salt=step, grad=True, count=c.real) for c in calls]
            vectors = in_order(calls, hs, len(rows)) if calls else self.runner.empty()
        else:  # a frozen encoder's vectors, each item encoded once per run
            vectors = self.runner.vectors(rows, step)
        encoded = self.runner.item_forwards - f0
        loss_sum, count, g = self.cf.loss_and_item_grads(batch, vectors.detach(), index)
        trains = len(rows) if self.runner.trainable else 0
        plan = Plan(encoded, trains, encoded)
        totals, g = self.cf.agree(loss_sum, count, g, plan)
        applied = False  # the encoder's step: its gradient may still be non-finite
        if not totals.ok:  # skip: no optimizer moves, the graph is dropped
            self.cf.discard()
            self.runner.drop_graphs()
        else:
            self.runner.backward_kept(calls, hs, by_call(calls, g))
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
