"""Pick the data set of a run: the user's folder, or a built-in synthetic one in the cache."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

# Built-in default sizes: large enough that the text signal is learnable and the batch
# repetition (R_batch) is real, small enough that the default job runs in minutes on 2 cores.
DEFAULT_KT = {"n_users": 300, "n_items": 300, "mean_len": 50, "n_unused_items": 10, "zipf": 1.0}
DEFAULT_NEWS = {"n_users": 300, "n_news": 400, "impressions_per_user": 3, "n_candidates": 5}


def default_data_dir(opts) -> Path:
    """Where the built-in synthetic set of ``opts.task`` lives; generated on first use."""
    from gram_scale.data import synth

    sizes = DEFAULT_KT if opts.task == "kt" else DEFAULT_NEWS
    tag = "-".join(f"{v}" for v in sizes.values())
    folder = opts.resolved_cache_dir() / f"synthetic-{opts.task}-{tag}-seed0"
    write = synth.write_kt if opts.task == "kt" else synth.write_mind
    return generate_once(folder, lambda tmp: write(tmp, seed=0, **sizes))


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
    """KTData or NewsData for the run."""
    folder = Path(opts.data) if opts.data else default_data_dir(opts)
    if opts.task == "kt":
        from gram_scale.data.kt import load_kt

        return load_kt(folder, seed=opts.seed, valid_frac=opts.valid_frac, test_frac=opts.test_frac,
                       cold_frac=opts.cold_frac)  # fmt: skip
    from gram_scale.data.mind import load_mind

    return load_mind(folder, use_abstract=opts.use_abstract, seed=opts.seed)
