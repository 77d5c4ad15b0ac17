"""The per-step history of a run, streamed to ``OUTPUT/history.jsonl`` by the main process.

One JSON object a line, appended as the run goes, so memory, checkpoints and metrics.json stay
the same size however long the run is. A resume cuts the file back to the steps before the
checkpoint: the resumed run writes those after it again, so the file always reads as one run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from gram_scale.atomic import write_file

HISTORY_FILE = "history.jsonl"


def resident_bytes() -> int | None:
    """This process's resident memory now (Linux), or None where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class HistoryLog:
    """Appends step records to ``history.jsonl``; a no-op on every rank but the main one."""

    def __init__(self, output_dir: str | Path, active: bool, resume_step: int | None):
        self.path = Path(output_dir) / HISTORY_FILE
        self._file = None
        if not active:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            cut_to(self.path, resume_step)
        self._file = open(self.path, "a", encoding="utf-8", buffering=1)  # a line at a time

    def append(self, record: dict) -> None:
        """Write one step's record."""
        if self._file is not None:
            self._file.write(json.dumps(record, sort_keys=True) + "\n")

    def close(self) -> None:
        """Flush and close the file."""
        if self._file is not None:
            self._file.close()
            self._file = None


def cut_to(path: Path, step: int) -> None:
    """Keep only the records of steps before ``step`` (read and rewritten a line at a time; a
    torn last line from a crash is dropped)."""
    if not path.is_file():
        path.write_text("")
        return

    def keep(dst) -> None:
        with open(path, encoding="utf-8") as src:
            for line in src:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and record.get("step", step) < step:
                    dst.write(line if line.endswith("\n") else line + "\n")

    write_file(path, keep)


def read_history(output_dir: str | Path) -> list[dict]:
    """Every step record of a run, in order."""
    path = Path(output_dir) / HISTORY_FILE
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
