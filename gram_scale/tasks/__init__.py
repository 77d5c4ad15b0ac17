"""The two CCF tasks of the paper: each has a CF model, batches, a loss and metrics."""

from __future__ import annotations


def make_task(opts, data, dim: int):
    """The task object for ``opts.task``."""
    if opts.task == "kt":
        from gram_scale.tasks.kt import KTTask

        return KTTask(data, opts, dim)
    from gram_scale.tasks.news import NewsTask

    return NewsTask(data, opts, dim)
