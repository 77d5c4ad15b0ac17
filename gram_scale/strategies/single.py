"""GRAM Single-step: each globally unique item of the step is encoded and back-propagated once,
by the one rank that owns it, with the sum of its occurrences' gradients. Exactly E2E.

Chunking serves memory only. An owner's items for the step are cut into encoder calls by the
chunk rule (sorted by token length, at most ``--encoder-batch-size`` rows and
``--encoder-tokens`` padded tokens a call). When the calls' padded tokens fit the
``--encoder-tokens`` budget in all, each is encoded once with gradient and its graph kept; after
the CF step the kept graphs are back-propagated with their items' summed gradients in one
backward (one forward and one backward per item). When they do not, memory is bounded by one call instead: the calls are first
encoded without gradient; after the CF step each is encoded again with gradient (keyed dropout
draws the same masks) and back-propagated before the next, so only one call's graph is alive at
a time, for one more forward per item. The optimizer steps once, after the last call. A frozen
encoder's vectors come from the run's cache (``EncoderRunner.vectors``).
"""

from __future__ import annotations

import torch

from gram_scale.data.batches import Batch, unique_index
from gram_scale.exchange import ItemExchange, by_call, in_order, padded_calls
from gram_scale.schedule import run_steps
from gram_scale.strategies.base import CFUpdate, Plan, StepResult, check_counts


class SingleStep:
    """Owners encode what they are asked for once; askers get their rows, owners the summed
    gradients back; each owner back-propagates once per item."""

    name = "single"
    updates = "encoder updates"  # what its encoder steps are called (plots)

    @staticmethod
    def encoder_steps(opts, steps_per_epoch: int, task) -> int:
        """One encoder step per training step."""
        return run_steps(opts, steps_per_epoch)

    def __init__(self, runner, cf: CFUpdate, opts, steps_per_epoch: int):
        self.runner, self.cf, self.comm = runner, cf, runner.comm
        self.budget = opts.encoder_tokens

    def fits(self, cuts: list[torch.Tensor], items: torch.Tensor) -> bool:
        """Whether this rank may keep the graphs of all its calls at once: their padded tokens
        fit ``--encoder-tokens`` (without a budget: the items fit one call)."""
        if not self.budget:
            return len(cuts) <= 1
        return self.runner.graph_tokens(cuts, items) <= self.budget

    def step(self, batch: Batch, step: int) -> StepResult:
        """One optimizer step of encoder and CF model."""
        f0, b0 = self.runner.item_forwards, self.runner.item_backwards
        local, index = unique_index(batch.items)
        ex = ItemExchange(self.comm, local)
        served_n = len(ex.served)
        calls, hs, states, keep = [], [], [], False
        if self.runner.trainable:
            cuts = self.runner.cut(ex.served)
            # one collective: the calls every rank makes, and whether any rank must re-encode
            n, over = self.comm.max_ints([len(cuts), int(not self.fits(cuts, ex.served))])
            keep = not over  # one pass with gradient, graphs kept
            calls = padded_calls(ex.served, cuts, n)
            for c in calls:
                states.append(None if keep else self.runner.rng_state())
                hs.append(self.runner.encode(c.items, salt=step, grad=keep, count=c.real))
            served = in_order(calls, hs, served_n) if calls else self.runner.empty()
        else:
            served = self.runner.vectors(ex.served, step)
        encoded = self.runner.item_forwards - f0
        rows = ex.fetch(served.detach())
        loss_sum, count, g = self.cf.loss_and_item_grads(batch, rows, index)
        trains = served_n if self.runner.trainable else 0
        again = 0 if keep or not self.runner.trainable else served_n  # the second pass
        plan = Plan(encoded + again, trains, encoded, traffic_ok=ex.grad_traffic())
        totals, g = self.cf.agree(loss_sum, count, g, plan)
        applied = False  # the encoder's step: its gradient may still be non-finite
        if not totals.ok:  # skip: no optimizer moves, the graph is dropped
            self.cf.discard()
            self.runner.drop_graphs()
        else:
            own_g = by_call(calls, ex.return_grads(g))  # each call's items' summed gradients
            if keep:  # the kept graphs, in one backward
                self.runner.backward_kept(calls, hs, own_g)
            for i, (c, grads) in enumerate(zip(calls, own_g) if not keep else []):
                h = self.runner.recompute(c.items, step, states[i], c.real)
                self.runner.backward(
                    h, grads, last=i == len(calls) - 1, count=c.real, items=c.items
                )
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
