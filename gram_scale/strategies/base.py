"""What every strategy shares: the CF half of a step, and the per-step counters."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gram_scale.data.batches import Batch, gather


@dataclass
class StepResult:
    """One training step, as seen by this rank (counts of encoder rows are this rank's)."""

    loss: float
    occurrences: int  # global item occurrences in the batch
    unique: int  # global unique items in the batch
    item_forwards: int  # encoder rows encoded by this rank in this step (incl. window end)
    item_backwards: int  # encoder rows back-propagated by this rank in this step
    encoder_updated: bool
    skipped: bool = False  # non-finite loss or gradient: nothing was updated
    encoder_skipped: bool = False  # non-finite encoder gradient: the encoder update was dropped


class CFUpdate:
    """CF forward/backward on detached item rows; returns the loss and the rows' gradients."""

    def __init__(self, task, optimizer: torch.optim.Optimizer, comm, scheduler=None,
                 max_grad_norm: float = 0.0):  # fmt: skip
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
        """Back-propagate the global-mean CF loss; ``(loss, d loss / d rows)``.

        Every rank divides its summed loss by the *global* count, so rank gradients add up to
        the gradient of the global batch mean (what one process would compute)."""
        leaf = rows.detach().requires_grad_(True)
        loss_sum, count = self.task.loss(batch, gather(leaf, index))
        total = self.comm.sum_int(count)
        (loss_sum / max(total, 1)).backward()
        loss = loss_sum.detach().reshape(1).double()
        self.comm.all_reduce_([loss])
        return float(loss) / max(total, 1), leaf.grad

    def all_finite(self, loss: float, item_grads: torch.Tensor) -> bool:
        """Loss, item gradients and CF gradients finite on every rank (all ranks agree)."""
        bad = not math.isfinite(loss) or not bool(torch.isfinite(item_grads).all())
        for p in self.model.parameters():
            if bad:
                break
            bad = p.grad is not None and not bool(torch.isfinite(p.grad).all())
        return self.comm.sum_int(int(bad)) == 0

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

    def step(self) -> None:
        """Sum CF gradients over ranks, clip, step (identical replicas on every rank)."""
        params = list(self.model.parameters())
        for p in params:
            if p.grad is None:  # same collective sequence on every rank
                p.grad = torch.zeros_like(p)
        self.comm.all_reduce_([p.grad for p in params])
        if self.max_grad_norm > 0:  # after the sum: the norm of the global batch's gradient
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


def local_to_global_index(local_unique: torch.Tensor, index: torch.Tensor, union: torch.Tensor):
    """Re-point a batch index from this rank's unique rows to rows of the global union."""
    pos = torch.searchsorted(union, local_unique)
    pos = torch.cat([pos, torch.tensor([len(union)])])  # padding stays one past the end
    return pos[index]
