"""Learning-rate schedules, counted in each optimizer's own steps.

One formula serves the CF optimizer, the plain-torch encoder optimizer and the DeepSpeed engine
(which steps and checkpoints the scheduler it is given), so a run's learning rates do not depend
on the back end. Optimizer step ``k`` (0-based) of ``total`` uses ``lr x factor(k)``:

- warmup (``k < warmup``): ``(k + 1) / warmup``, so the first step already moves and step
  ``warmup - 1`` reaches the full rate;
- then ``constant``: 1; ``linear``: ``(total - k) / (total - warmup)``; ``cosine``:
  ``(1 + cos(pi (k - warmup) / (total - warmup))) / 2``. Both decays start at 1 and stay above 0
  on the last step. A step past ``total`` (Multi-step's count is an estimate and may fall short)
  keeps the last step's rate instead of reaching 0 or turning back up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Schedule:
    """The LR multiplier of optimizer step ``k``."""

    kind: str
    warmup: int
    total: int

    def __call__(self, k: int) -> float:
        if k < self.warmup:
            return (k + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        span = max(1, self.total - self.warmup)
        done = min(k - self.warmup, span - 1) / span
        if self.kind == "linear":
            return max(0.0, 1.0 - done)
        return 0.5 * (1.0 + math.cos(math.pi * done))


def run_steps(opts, steps_per_epoch: int) -> int:
    """Training steps the run takes: every epoch, capped by ``--max-steps``."""
    total = steps_per_epoch * opts.epochs
    return min(total, opts.max_steps) if opts.max_steps else total


def make_scheduler(optimizer, opts, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR of ``--lr-schedule`` / ``--warmup-steps`` over ``total`` optimizer steps."""
    schedule = Schedule(opts.lr_schedule, opts.warmup_steps, total)
    # A plain function: LambdaLR checkpoints only its position then, and the shape comes from
    # the options of the run that resumes (a longer --epochs on resume stretches the decay).
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: schedule(k))
