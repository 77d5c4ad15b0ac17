"""Pick the data set of a run: the user's folder, or a built-in synthetic one in the cache."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from gram_scale.atomic import create_folder_once


def default_data_dir(opts) -> Path:
    """Where the built-in synthetic set of ``opts.task`` lives; generated on first use."""
    from gram_scale.tasks import task_class

    task = task_class(opts.task)
    folder = opts.resolved_cache_dir() / _default_name(opts.task)
    return generate_once(folder, lambda tmp: task.write_default(tmp, seed=0, **task.default_sizes))


def _default_name(task_name: str) -> str:
    """The built-in set's folder name: task, generator sizes and seed fix its content."""
    from gram_scale.tasks import task_class

    tag = "-".join(f"{v}" for v in task_class(task_name).default_sizes.values())
    return f"synthetic-{task_name}-{tag}-seed0"


def generate_once(folder: Path, write: Callable[[Path], None]) -> Path:
    """``folder``, written by ``write(tmp)`` unless it already exists.

    Written beside the target and renamed: a crash never leaves a half-written data set, and
    of several processes racing, one rename wins and the others' identical copies go."""
    return create_folder_once(folder, write)


def load_data(opts):
    """The data of the run, read by its task's reader."""
    from gram_scale.tasks import task_class

    folder = Path(opts.data) if opts.data else default_data_dir(opts)
    return task_class(opts.task).load(folder, opts)


def data_fingerprint(opts) -> dict[str, str]:
    """What the run's data is, file by file (``name: sha256 <12 hex>, <bytes> bytes``), for the
    run record a resume compares: the same files moved elsewhere match, an edited one does not.
    The built-in set is named instead: its generator and seed fix it. Files missing here are
    left to the reader to report."""
    from gram_scale.checkpoint import file_sha256
    from gram_scale.tasks import task_class

    if not opts.data:
        return {"built-in": _default_name(opts.task)}
    folder = Path(opts.data)
    found = {}
    for name in task_class(opts.task).data_files(folder):
        path = folder / name
        if path.is_file():
            found[name] = f"sha256 {file_sha256(path)[:12]}, {path.stat().st_size} bytes"
    return found
