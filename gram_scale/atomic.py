"""Write files and folders so that a reader, or the next start after a crash, never meets half
of one: write beside the target, then rename it into place. Checkpoints, exports, the staged
best model, generated data and the history file all go through here."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

OLD = ".old-"  # a folder renamed away while its replacement takes its place


def temp_folder(parent: Path, prefix: str) -> Path:
    """A new empty folder in ``parent`` (the target's own file system, so a rename is atomic)."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


def replace_folder(tmp: Path, final: Path) -> None:
    """Make the written folder ``tmp`` the folder ``final``. An existing ``final`` is renamed
    away to ``.old-NAME`` first and deleted only once the new one is in place, so at every
    moment one intact copy exists (``restore_old`` finishes what a crash in between left)."""
    old = final.with_name(OLD + final.name)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def move_entries(src: Path, dest_dir: Path) -> None:
    """Move each entry of the written folder ``src`` into ``dest_dir`` by rename, replacing what
    is there under its name (a folder by a folder through ``replace_folder``)."""
    for entry in sorted(src.iterdir()):
        dest = dest_dir / entry.name
        if dest.is_dir() and not dest.is_symlink():
            if entry.is_dir():
                replace_folder(entry, dest)
                continue
            shutil.rmtree(dest)
        os.replace(entry, dest)


def restore_old(parent: Path, pattern: str = "*") -> None:
    """After a crash inside ``replace_folder``: put back an ``.old-NAME`` whose replacement
    never arrived, drop one whose replacement did."""
    for old in parent.glob(OLD + pattern):
        current = old.with_name(old.name.removeprefix(OLD))
        if current.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, current)


def create_folder_once(final: Path, write: Callable[[Path], None]) -> Path:
    """``final``, written by ``write(tmp)`` unless it already exists; of several processes
    racing, one rename wins and the others' identical copies go."""
    if final.is_dir():
        return final
    tmp = temp_folder(final.parent, final.name + ".tmp-")
    try:
        write(tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another process's copy is in place
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def write_file(path: Path, write: Callable[[TextIO], None], mode: int | None = 0o644) -> None:
    """Write the text file ``path`` through ``write(file)`` into a temporary file beside it,
    then rename it into place. ``mode``: the file's permissions (None: what ``mkstemp`` gives,
    owner only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            write(f)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
