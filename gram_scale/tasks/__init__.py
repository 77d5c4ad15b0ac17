"""The CCF tasks of the paper, found by name in one registry: each has a CF model, batches, a
loss and metrics (the ``Task`` protocol)."""

from __future__ import annotations

from gram_scale.errors import InputError
from gram_scale.tasks.base import Task
from gram_scale.tasks.kt import KTTask
from gram_scale.tasks.news import NewsTask

TASKS: dict[str, type] = {"kt": KTTask, "news": NewsTask}


def make_task(opts, data, dim: int) -> Task:
    """The task object for ``opts.task``; an unknown name is an ``InputError``."""
    if opts.task not in TASKS:
        raise InputError("--task", None, f"unknown task {opts.task!r} (known: {', '.join(TASKS)})")
    return TASKS[opts.task](data, opts, dim)
