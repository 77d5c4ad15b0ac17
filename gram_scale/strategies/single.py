"""GRAM Single-step: each globally unique item of the step is encoded and back-propagated once,
by the one rank that owns it, with the sum of its occurrences' gradients. Exactly E2E.

Encoder memory is bounded by ``--encoder-batch-size``, not by the CF batch: when a rank's items
for the step fill more than one chunk, they are first encoded without gradient, chunk by chunk;
after the CF step each chunk is encoded again with gradient (keyed dropout draws the same masks)
and back-propagated with its items' summed gradients, so only one chunk's graph is alive at a
time. The optimizer steps once, after the last chunk. That costs one more forward per item;
a step whose items fit one chunk keeps the single forward's graph instead.
"""

from __future__ import annotations

import torch

from gram_scale.data.batches import Batch, unique_index
from gram_scale.exchange import ItemExchange, pieces
from gram_scale.strategies.base import CFUpdate, Plan, StepResult, check_counts


class SingleStep:
    """Owners encode what they are asked for once; askers get their rows, owners the summed
    gradients back; each owner back-propagates once per item."""

    name = "single"

    def __init__(self, runner, cf: CFUpdate, opts, steps_per_epoch: int):
        self.runner, self.cf, self.comm = runner, cf, runner.comm
        self.chunk = opts.encoder_batch_size

    def step(self, batch: Batch, step: int) -> StepResult:
        """One optimizer step of encoder and CF model."""
        f0, b0 = self.runner.item_forwards, self.runner.item_backwards
        local, index = unique_index(batch.items)
        ex = ItemExchange(self.comm, local)
        calls = pieces(self.comm, ex.served, self.chunk)
        one = len(calls) == 1  # keep the graph: no second forward
        hs, states = [], []
        for c in calls:
            states.append(None if one else self.runner.rng_state())
            hs.append(self.runner.encode(c.items, salt=step, grad=one, count=c.real))
        served = torch.cat([h[: c.real] for h, c in zip(hs, calls)])
        rows = ex.fetch(served.detach())
        loss_sum, count, g = self.cf.loss_and_item_grads(batch, rows, index)
        trains = len(ex.served) if self.runner.trainable else 0
        plan = Plan(len(ex.served), trains, len(ex.served), traffic_ok=ex.grad_traffic())
        totals, g = self.cf.agree(loss_sum, count, g, plan)
        applied = False  # the encoder's step: its gradient may still be non-finite
        if not totals.ok:  # skip: no optimizer moves, the graph is dropped
            self.cf.discard()
        else:
            own_g = ex.return_grads(g)  # every occurrence on every rank, summed per item
            parts = torch.split(own_g, [c.real for c in calls])  # each call's items, in order
            for i, c in enumerate(calls if self.runner.trainable else []):
                h = hs[i] if one else self.runner.recompute(c.items, step, states[i], c.real)
                self.runner.backward(h, c.pad(parts[i]), last=i == len(calls) - 1, count=c.real)
            applied = self.cf.step_with(self.runner)
        check_counts(self.runner, plan, totals, f0, b0)
        return StepResult(
            loss=totals.loss,
            occurrences=batch.occurrences(),
            unique=len(local),
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
