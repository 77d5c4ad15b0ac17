"""Pick the data set of a run: the user's folder, or a built-in synthetic one in the cache."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def default_data_dir(opts) -> Path:
    """Where the built-in synthetic set of ``opts.task`` lives; generated on first use."""
    from gram_scale.tasks import task_class

    task = task_class(opts.task)
    sizes = task.default_sizes
    tag = "-".join(f"{v}" for v in sizes.values())
    folder = opts.resolved_cache_dir() / f"synthetic-{opts.task}-{tag}-seed0"
    return generate_once(folder, lambda tmp: task.write_default(tmp, seed=0, **sizes))


def generate_once(folder: Path, write: Callable[[Path], None]) -> Path:
    """``folder``, written by ``write(tmp)`` unless it already exists.

    Written beside the target and renamed: a crash never leaves a half-written data set, and
    of several processes racing, one rename wins and the others' identical copies go."""
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        write(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def load_data(opts):
    """The data of the run, read by its task's reader."""
    from gram_scale.tasks import task_class

    folder = Path(opts.data) if opts.data else default_data_dir(opts)
    return task_class(opts.task).load(folder, opts)
