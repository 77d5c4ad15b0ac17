"""GRAM strategies, found by name in one registry; each implements the ``Strategy`` protocol:
``step(batch, step, stop) -> StepResult``, ``finish``, ``state_dict``, ``load_state_dict``."""

from __future__ import annotations

from gram_scale.errors import InputError
from gram_scale.strategies.base import Strategy
from gram_scale.strategies.e2e import EndToEnd
from gram_scale.strategies.multi import MultiStep
from gram_scale.strategies.single import SingleStep

STRATEGIES: dict[str, type] = {"e2e": EndToEnd, "single": SingleStep, "multi": MultiStep}


def make_strategy(opts, runner, cf, steps_per_epoch: int) -> Strategy:
    """The strategy named by ``opts.strategy``; an unknown name is an ``InputError``."""
    if opts.strategy not in STRATEGIES:
        known = ", ".join(STRATEGIES)
        raise InputError("--strategy", None, f"unknown strategy {opts.strategy!r} (known: {known})")
    return STRATEGIES[opts.strategy](runner, cf, opts, steps_per_epoch)
