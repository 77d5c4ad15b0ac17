"""GRAM strategies, found by name in one registry; each implements the ``Strategy`` protocol
(``gram_scale.strategies.base``): ``step(batch, step) -> StepResult``, ``finish``,
``state_dict``, ``load_state_dict``, and the class's ``encoder_steps``. The command line's ``--strategy`` choices come from here."""

from __future__ import annotations

import importlib

from gram_scale.errors import InputError

# name -> "module:class", imported on first use so that option parsing stays light
STRATEGIES: dict[str, str] = {
    "e2e": "gram_scale.strategies.e2e:EndToEnd",
    "single": "gram_scale.strategies.single:SingleStep",
    "multi": "gram_scale.strategies.multi:MultiStep",
}


def strategy_class(name: str):
    """The class of the strategy ``name``; an unknown name is an ``InputError``."""
    if name not in STRATEGIES:
        known = ", ".join(STRATEGIES)
        raise InputError("--strategy", None, f"unknown strategy {name!r} (known: {known})")
    module, cls = STRATEGIES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_strategy(opts, runner, cf, steps_per_epoch: int):
    """The strategy named by ``opts.strategy``; an unknown name is an ``InputError``."""
    return strategy_class(opts.strategy)(runner, cf, opts, steps_per_epoch)
