"""Checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is ``<output>/checkpoints/step-<N>/``, written by ``accelerator.save_state`` (the
DeepSpeed engine with its ZeRO shards, or the plain encoder and optimizer; the CF model and
optimizer; every rank's RNG states) plus ``TrainState`` (step, data position, counters, history,
and the strategy's own state: Multi-step's item table and window position). It is written into a
hidden ``.tmp-`` folder, given a manifest of file sizes and SHA-256 sums, and only then renamed
into place, so a crash mid-save leaves the previous checkpoint as the latest complete one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from gram_scale.errors import InputError

MANIFEST = "manifest.json"
RUN_RECORD = "run.json"  # what the run was: compared before a resume loads anything
_STEP_DIR = re.compile(r"^step-(\d+)$")


class TrainState:
    """Loop position and run records, saved with every checkpoint."""

    # the plain-data fields saved and restored (the strategy's state travels beside them)
    FIELDS = ("step", "epoch", "batch_in_epoch", "train_seconds", "counters", "history", "epochs",
              "skipped_steps", "bad_in_a_row")  # fmt: skip

    def __init__(self, strategy):
        self.strategy = strategy
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0  # batches of ``epoch`` already trained
        self.train_seconds = 0.0
        self.counters = {"occurrences": 0, "unique": 0, "item_forwards": 0, "item_backwards": 0}
        self.history: list[dict] = []
        self.epochs: list[dict] = []
        self.skipped_steps = 0
        self.bad_in_a_row = 0

    def state_dict(self) -> dict:
        """Plain data (tensors only inside the strategy state)."""
        state = {key: copy.copy(getattr(self, key)) for key in self.FIELDS}
        return state | {"strategy": self.strategy.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""
        for key in self.FIELDS:
            setattr(self, key, state[key])
        self.strategy.load_state_dict(state["strategy"])


def checkpoint_root(output_dir: str | Path) -> Path:
    """Folder that holds a run's checkpoints."""
    return Path(output_dir) / "checkpoints"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    """Record size and checksum of every file of a checkpoint folder."""
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[str(p.relative_to(folder))] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def verify(folder: Path) -> str | None:
    """None if the checkpoint is complete and intact, else what is wrong (one line)."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return "no manifest (incomplete save)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "unreadable manifest"
    if not isinstance(files, dict) or not all(
        isinstance(meta, dict)
        and isinstance(meta.get("bytes"), int)
        and isinstance(meta.get("sha256"), str)
        for meta in files.values()
    ):
        return f"{MANIFEST} has the wrong shape (expected files: name -> bytes, sha256)"
    for name, meta in files.items():
        p = folder / name
        if not p.is_file():
            return f"missing file {name}"
        if p.stat().st_size != meta["bytes"]:
            return f"{name} has {p.stat().st_size} bytes, expected {meta['bytes']}"
        if _sha256(p) != meta["sha256"]:
            return f"{name} checksum mismatch"
    return None


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete-looking checkpoint folders, newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def find_resume(output_dir: str | Path, resume: str, say=print) -> Path | None:
    """The checkpoint to resume from: ``latest`` = newest intact one (corrupt ones reported and
    skipped), or an explicit folder that must be intact."""
    if not resume:
        return None
    if resume != "latest":
        folder = Path(resume)
        if folder.is_file():
            raise InputError(folder, None, "cannot resume: is a file, not a checkpoint folder")
        if not folder.is_dir():
            raise InputError(folder, None, "cannot resume: not found")
        if not (folder / MANIFEST).is_file():
            hint = ""
            if checkpoint_root(folder).is_dir():
                hint = f" (it holds checkpoints/: use --resume latest --output-dir {folder})"
            elif folder.name.startswith(".tmp-"):
                hint = " (an incomplete save)"
            raise InputError(folder, None, f"cannot resume: not a checkpoint folder{hint}")
        problem = verify(folder)
        if problem:
            raise InputError(folder, None, f"cannot resume: {problem}")
        return folder
    for _, folder in list_checkpoints(checkpoint_root(output_dir)):
        problem = verify(folder)
        if problem is None:
            return folder
        say(f"checkpoint {folder} is corrupt ({problem}); trying the previous one")
    say(f"no intact checkpoint under {checkpoint_root(output_dir)}; starting from scratch")
    return None


def check_compatible(folder: Path, record: dict) -> None:
    """Refuse a checkpoint made by a run that differs from this one in anything its saved state
    depends on (strategy, encoder, CF shape, DeepSpeed stage, world size), naming each."""
    path = folder / RUN_RECORD
    if not path.is_file():
        return  # written before run records existed: the load itself is the only check
    try:
        saved = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        saved = None
    if not isinstance(saved, dict):
        raise InputError(path, None, "cannot resume: unreadable run record")
    diffs = [f"{name}: checkpoint {_show(saved.get(name))}, this run {_show(value)}"
             for name, value in record.items()
             if name not in _NOT_COMPARED and saved.get(name) != value]  # fmt: skip
    if diffs:
        raise InputError(
            folder, None, "cannot resume, made by a different run: " + "; ".join(diffs)
        )


# A copied encoder folder is the same encoder: the config hash, not the path, identifies it.
_NOT_COMPARED = {"encoder_folder"}


def _show(value) -> str:
    return "none" if value is None else str(value)


def save(accelerator, state: TrainState, output_dir: str | Path, keep: int,
         record: dict | None = None) -> Path:  # fmt: skip
    """Write a checkpoint of the current step on every rank; atomic by rename. ``record``
    (what the run is) goes into ``run.json`` for resume checks."""
    root = checkpoint_root(output_dir)
    final = root / f"step-{state.step:08d}"
    tmp = root / f".tmp-step-{state.step:08d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):  # left by a crash during an earlier save
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every rank writes its shards and RNG state
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if record is not None:
            (tmp / RUN_RECORD).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        write_manifest(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in list_checkpoints(root)[keep:]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load(accelerator, folder: Path) -> None:
    """Restore every registered object and RNG state from a checkpoint folder."""
    accelerator.load_state(str(folder))
