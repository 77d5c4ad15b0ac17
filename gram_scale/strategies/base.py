"""What every strategy shares: the CF half of a step, and the per-step counters."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Protocol

import torch

from gram_scale.data.batches import Batch, gather
from gram_scale.nonfinite import cf_step_is_bad


@dataclass
class Totals:
    """One step's scalars summed over ranks, agreed in a single collective."""

    ok: bool  # loss and every gradient finite on every rank
    count: int  # loss terms of the global batch
    loss: float  # global mean loss
    item_forwards: int  # encoder rows encoded, all ranks
    item_backwards: int  # encoder rows back-propagated, all ranks
    bytes_sent: list[int]  # per rank: item bytes of the step, to other ranks
    bytes_received: list[int]  # per rank: item bytes of the step, from other ranks


@dataclass
class StepSums:
    """What a rank adds into the step's one scalar collective, by name: every field is summed
    over ranks. The list fields hold one slot per rank (``Comm.per_rank``: a rank fills its
    own), so the sum holds every rank's value."""

    loss_sum: float  # this rank's summed loss terms
    count: int  # its loss terms
    bad: int  # 1 when its loss or a gradient is not finite
    forwards_ok: int  # encoder rows it encodes if the step goes ahead ...
    backwards_ok: int  # ... and back-propagates
    forwards_skipped: int  # encoder rows it encodes if the step is skipped ...
    backwards_skipped: int  # ... and back-propagates
    sent: list[int]  # item bytes it sent to other ranks so far in the step, per rank
    received: list[int]  # item bytes it received, per rank
    sent_if_ok: list[int]  # item bytes still to send if the step goes ahead, per rank
    received_if_ok: list[int]  # item bytes still to receive, per rank

    def summed(self, comm) -> StepSums:
        """Every rank's record added up, field by field, in one collective."""
        values = [getattr(self, f.name) for f in fields(self)]
        flat = [x for v in values for x in (v if isinstance(v, list) else [v])]
        out, at, total = comm.sum_floats(flat), 0, {}
        for f, v in zip(fields(self), values):
            n = len(v) if isinstance(v, list) else 1
            total[f.name] = out[at : at + n] if isinstance(v, list) else out[at]
            at += n
        return StepSums(**total)


@dataclass
class StepResult:
    """One training step, as seen by this rank (counts of encoder rows are this rank's)."""

    loss: float
    occurrences: int  # item occurrences in this rank's batch
    unique: int  # unique items in this rank's batch
    item_forwards: int  # encoder rows encoded by this rank in this step (incl. window end)
    item_backwards: int  # encoder rows back-propagated by this rank in this step
    encoder_updated: bool
    skipped: bool = False  # non-finite loss or gradient: nothing was updated
    encoder_skipped: bool = False  # non-finite encoder gradient: the encoder update was dropped
    totals: Totals | None = None  # the step's agreed sums (None after ``finish``)
    window_stats: dict | None = None  # Multi-step: figures of a window end in this step


@dataclass
class Plan:
    """Encoder rows this rank counts for the step if it goes ahead and if it is skipped; both
    travel in the step's one collective, then the runner's own counters are checked against
    the one that happened."""

    forwards_ok: int
    backwards_ok: int
    forwards_skipped: int
    backwards_skipped: int = 0
    traffic_ok: tuple[int, int] = (
        0,
        0,
    )  # item bytes (sent, received) still to move if it goes ahead


class Strategy(Protocol):
    """What the trainer asks of a training strategy."""

    name: str
    updates: str  # what its encoder steps are called, e.g. in plots

    @staticmethod
    def encoder_steps(opts, steps_per_epoch: int, task) -> int:
        """Encoder optimizer steps the run will take (its learning-rate schedule's length),
        asked before the strategy is built."""
        ...

    def step(self, batch: Batch, step: int) -> StepResult:
        """One training step on this rank's slice of the global batch."""
        ...

    def finish(self, step: int) -> StepResult | None:
        """Flush work pending at the end of training."""
        ...

    def state_dict(self) -> dict:
        """Strategy state for checkpoints."""
        ...

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict``."""
        ...


class CFUpdate:
    """CF forward/backward on detached item rows; returns the loss and the rows' gradients."""

    def __init__(
        self,
        task,
        optimizer: torch.optim.Optimizer,
        comm,
        scheduler=None,
        max_grad_norm: float = 0.0,
    ):
        self.task = task
        self.model = task.model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.max_grad_norm = max_grad_norm
        self.comm = comm

    def lr(self) -> float:
        """The learning rate the next CF step uses."""
        return float(self.optimizer.param_groups[0]["lr"])

    def loss_and_item_grads(self, batch: Batch, rows: torch.Tensor, index: torch.Tensor):
        """Back-propagate this rank's summed CF loss; ``(loss sum, loss terms, d sum / d rows)``.

        The division by the *global* count waits for ``agree`` (one collective per step), so
        rank gradients then add up to the gradient of the global batch mean. A rank whose slice
        of the last batch is empty contributes nothing (the models are not run on 0 rows)."""
        leaf = rows.detach().requires_grad_(True)
        if len(batch) == 0:
            loss_sum, count = leaf.sum() * 0, 0
        else:
            loss_sum, count = self.task.loss(batch, gather(leaf, index))
        loss_sum.backward()
        return float(loss_sum.detach()), count, leaf.grad

    def agree(
        self, loss_sum: float, count: int, grads: torch.Tensor, plan: Plan
    ) -> tuple[Totals, torch.Tensor]:
        """The step's one scalar collective: loss, loss terms, the finite check, encoder row
        counts and per-rank traffic. Scales the CF and item gradients by the global
        count when the step goes ahead; returns the totals and the scaled item gradients."""
        cf_grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        bad = cf_step_is_bad(loss_sum, grads, cf_grads)
        sent, received = self.comm.take_train_traffic()
        per_rank = self.comm.per_rank
        v = StepSums(
            loss_sum=loss_sum,
            count=count,
            bad=int(bad),
            forwards_ok=plan.forwards_ok,
            backwards_ok=plan.backwards_ok,
            forwards_skipped=plan.forwards_skipped,
            backwards_skipped=plan.backwards_skipped,
            sent=per_rank(sent),
            received=per_rank(received),
            sent_if_ok=per_rank(plan.traffic_ok[0]),
            received_if_ok=per_rank(plan.traffic_ok[1]),
        ).summed(self.comm)
        ok = v.bad == 0
        total = max(int(v.count), 1)
        totals = Totals(
            ok=ok,
            count=int(v.count),
            loss=v.loss_sum / total,
            item_forwards=int(v.forwards_ok if ok else v.forwards_skipped),
            item_backwards=int(v.backwards_ok if ok else v.backwards_skipped),
            bytes_sent=[int(a + ok * b) for a, b in zip(v.sent, v.sent_if_ok)],
            bytes_received=[int(a + ok * b) for a, b in zip(v.received, v.received_if_ok)],
        )
        if ok:
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.div_(total)
            grads = grads / total
        return totals, grads

    def discard(self) -> None:
        """Drop this step's CF gradients (a skipped step)."""
        self.optimizer.zero_grad(set_to_none=True)

    def step_with(self, runner) -> bool:
        """Step the encoder, then the CF model; when the encoder's gradient is not finite on
        some rank, neither moves (the step is skipped like a non-finite loss) and False."""
        if not runner.step():
            self.discard()
            return False
        self.step()
        return True

    def step(self, schedule: bool = True) -> None:
        """Sum CF gradients over ranks, clip, step (identical replicas on every rank); the
        rate's schedule advances unless ``schedule`` is False (steps outside the run's count)."""
        params = list(self.model.parameters())
        for p in params:
            if p.grad is None:  # same collective sequence on every rank
                p.grad = torch.zeros_like(p)
        self.comm.all_reduce_([p.grad for p in params])
        if self.max_grad_norm > 0:  # after the sum: the norm of the global batch's gradient
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.optimizer.step()
        if schedule and self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


def check_counts(runner, plan: Plan, totals: Totals, f0: int, b0: int) -> None:
    """The rows the runner really encoded and back-propagated are the ones announced."""
    want = (
        (plan.forwards_ok, plan.backwards_ok)
        if totals.ok
        else (plan.forwards_skipped, plan.backwards_skipped)
    )
    got = (runner.item_forwards - f0, runner.item_backwards - b0)
    if got != want:
        raise RuntimeError(f"encoder rows (forwards, backwards) {got}, announced {want}")
