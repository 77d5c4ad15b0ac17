"""The CCF tasks of the paper, found by name in one registry: each has a CF model, batches, a
loss, metrics and its own data reader (the ``Task`` protocol). A new task is its own module
plus one line here; the command line's ``--task`` choices come from this registry."""

from __future__ import annotations

import importlib

from gram_scale.errors import InputError

# name -> "module:class", imported on first use so that option parsing stays light
TASKS: dict[str, str] = {
    "kt": "gram_scale.tasks.kt:KTTask",
    "news": "gram_scale.tasks.news:NewsTask",
}


def task_class(name: str) -> type:
    """The task class registered under ``name``; an unknown name is an ``InputError``."""
    if name not in TASKS:
        raise InputError("--task", None, f"unknown task {name!r} (known: {', '.join(TASKS)})")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_task(opts, data, dim: int):
    """The task object for ``opts.task``."""
    return task_class(opts.task)(data, opts, dim)
