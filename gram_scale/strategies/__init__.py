"""GRAM strategies behind one interface: ``step(batch, step) -> StepResult`` and ``finish``."""

from __future__ import annotations

from gram_scale.strategies.e2e import EndToEnd
from gram_scale.strategies.multi import MultiStep
from gram_scale.strategies.single import SingleStep


def make_strategy(opts, runner, cf, steps_per_epoch: int):
    """The strategy named by ``opts.strategy``."""
    if opts.strategy == "e2e":
        return EndToEnd(runner, cf, opts)
    if opts.strategy == "single":
        return SingleStep(runner, cf, opts)
    return MultiStep(runner, cf, opts, steps_per_epoch)
