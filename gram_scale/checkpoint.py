"""Checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is ``<output>/checkpoints/step-<N>/``, written by ``accelerator.save_state`` (the
DeepSpeed engine with its ZeRO shards, or the plain encoder and optimizer; the CF model and
optimizer; every rank's RNG states) plus ``TrainState`` (step, data position, counters,
and the strategy's own state: Multi-step's item table and window position), and with
``--save-best`` the best-so-far export as hard links (``best/``). It is written into a
hidden ``.tmp-`` folder, where each rank adds a manifest of the sizes and SHA-256 sums of the
files it wrote itself, and only then renamed into place, so a crash mid-save leaves the previous
checkpoint as the latest complete one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from gram_scale.atomic import replace_folder, restore_old
from gram_scale.errors import InputError

MANIFEST = "manifest.json"
RUN_RECORD = "run.json"  # what the run was: compared before a resume loads anything
_STEP_DIR = re.compile(r"^step-(\d+)$")
_OLD_DIR = re.compile(r"^\.old-step-(\d+)$")


class TrainState:
    """Loop position and run records, saved with every checkpoint."""

    # the plain-data fields saved and restored (the strategy's state travels beside them)
    FIELDS = (
        "step",
        "epoch",
        "batch_in_epoch",
        "train_seconds",
        "counters",
        "epochs",
        "skipped_steps",
        "bad_in_a_row",
        "evals",
        "best",
        "encoder_seconds",
    )

    def __init__(self, strategy):
        self.strategy = strategy
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0  # batches of ``epoch`` already trained
        self.train_seconds = 0.0
        # of which the encoder's training calls, forward and backward (mean over ranks)
        self.encoder_seconds = 0.0
        self.counters = {
            "occurrences": 0,
            "unique": 0,
            "item_forwards": 0,
            "item_backwards": 0,
            "tokens_forward": 0,
            "padded_forward": 0,
            "tokens_backward": 0,
            "padded_backward": 0,
            "attention_pairs_forward": 0,
            "attention_pairs_backward": 0,
        }
        self.epochs: list[dict] = []
        self.skipped_steps = 0
        self.bad_in_a_row = 0
        self.evals: list[dict] = []  # --eval-every's valid evaluations
        self.best: dict | None = None  # --save-best: step, epoch, valid and test of the best

    def state_dict(self) -> dict:
        """Plain data (tensors only inside the strategy state)."""
        state = {key: copy.copy(getattr(self, key)) for key in self.FIELDS}
        return state | {"strategy": self.strategy.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""
        for key in self.FIELDS:
            if key in state:  # checkpoints from before a field existed keep its default
                setattr(self, key, state[key])
        # and counters added since (the token counters) start from 0
        self.counters = {**dict.fromkeys(TrainState(None).counters, 0), **self.counters}
        self.strategy.load_state_dict(state["strategy"])


def checkpoint_root(output_dir: str | Path) -> Path:
    """Folder that holds a run's checkpoints."""
    return Path(output_dir) / "checkpoints"


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read 1 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# Files a rank writes itself carry its number (accelerate's RNG states, DeepSpeed's ZeRO
# shards); everything else is written by the main process.
_RANK_FILE = re.compile(r"(?:^|/)(?:random_states_|zero_pp_rank_)(\d+)[._]")


def file_rank(name: str) -> int:
    """The rank that writes a checkpoint file (relative path)."""
    m = _RANK_FILE.search(name)
    return int(m.group(1)) if m else 0


def manifest_name(rank: int) -> str:
    """The manifest of the files one rank wrote."""
    return f"manifest-rank{rank}.json"


def write_manifest(folder: Path, rank: int = 0) -> None:
    """Record size and checksum of the files of a checkpoint folder that ``rank`` wrote: each
    rank hashes only its own shards, never the whole checkpoint."""
    files = {}
    for p in sorted(folder.rglob("*")):
        name = str(p.relative_to(folder))
        if p.is_file() and not _is_manifest(p.name) and file_rank(name) == rank:
            files[name] = {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
    (folder / manifest_name(rank)).write_text(json.dumps({"files": files}, indent=1))


def _is_manifest(name: str) -> bool:
    return name == MANIFEST or re.fullmatch(r"manifest-rank\d+\.json", name) is not None


def _has_manifest(folder: Path) -> bool:
    return (folder / MANIFEST).is_file() or (folder / manifest_name(0)).is_file()


def verify(folder: Path, rank: int | None = None) -> str | None:
    """None if the files of ``rank`` (every rank's with None) in a checkpoint are complete and
    intact, else what is wrong (one line)."""
    if (folder / MANIFEST).is_file():  # written before per-rank manifests: one for all files
        names = [MANIFEST]
    elif rank is not None:
        names = [manifest_name(rank)]
    else:
        names = sorted(p.name for p in folder.glob("manifest-rank*.json")) or [manifest_name(0)]
    for name in names:
        problem = _verify_manifest(folder, name)
        if problem:
            return problem
    return None


def _verify_manifest(folder: Path, name: str) -> str | None:
    manifest = folder / name
    if not manifest.is_file():
        return f"no {name} (incomplete save)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return f"unreadable {name}"
    if not isinstance(files, dict) or not all(
        isinstance(meta, dict)
        and isinstance(meta.get("bytes"), int)
        and isinstance(meta.get("sha256"), str)
        for meta in files.values()
    ):
        return f"{name} has the wrong shape (expected files: name -> bytes, sha256)"
    for file, meta in files.items():
        p = folder / file
        if not p.is_file():
            return f"missing file {file}"
        if p.stat().st_size != meta["bytes"]:
            return f"{file} has {p.stat().st_size} bytes, expected {meta['bytes']}"
        if file_sha256(p) != meta["sha256"]:
            return f"{file} checksum mismatch"
    return None


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Checkpoint folders, newest first. A step whose folder was renamed away to be replaced
    (``.old-step-N`` left by a crash before the new one took its place) still counts."""
    if not root.is_dir():
        return []
    found: dict[int, Path] = {}
    for p in sorted(root.iterdir(), key=lambda p: p.name.startswith(".")):  # step-N first
        m = _STEP_DIR.match(p.name) or _OLD_DIR.match(p.name)
        if m and int(m.group(1)) not in found:
            found[int(m.group(1))] = p
    return sorted(found.items(), reverse=True)


def resume_candidates(output_dir: str | Path, resume: str) -> list[Path]:
    """The checkpoints a resume may use, newest first, from names alone (nothing is read yet):
    ``latest`` = every checkpoint of the output folder, or the one explicit folder."""
    if not resume:
        return []
    if resume == "latest":
        return [folder for _, folder in list_checkpoints(checkpoint_root(output_dir))]
    folder = Path(resume)
    if folder.is_file():
        raise InputError(folder, None, "cannot resume: is a file, not a checkpoint folder")
    if not folder.is_dir():
        raise InputError(folder, None, "cannot resume: not found")
    if not _has_manifest(folder):
        hint = ""
        if checkpoint_root(folder).is_dir():
            hint = f" (it holds checkpoints/: use --resume latest --output-dir {folder})"
        elif folder.name.startswith(".tmp-"):
            hint = " (an incomplete save)"
        raise InputError(folder, None, f"cannot resume: not a checkpoint folder{hint}")
    return [folder]


def choose_resume(
    candidates: list[Path], explicit: bool, say=print, rank: int = 0, world: int = 1
) -> Path | None:
    """The newest candidate that every rank finds intact. Each rank checks only the files it
    wrote; one collective gathers the verdicts, so every rank picks the same checkpoint even
    when one of them cannot read its shard (a transient error, a disk that is not shared).
    ``say`` (the main process's) reports each corrupt one and the choice."""
    verdicts = [verify(folder, rank) for folder in candidates]
    if world > 1:
        import torch.distributed as dist

        gathered: list = [None] * world
        dist.all_gather_object(gathered, verdicts)
    else:
        gathered = [verdicts]
    for i, folder in enumerate(candidates):
        bad = [(r, v[i]) for r, v in enumerate(gathered) if v[i] is not None]
        if not bad:
            return folder
        r, problem = bad[0]
        where = f" on rank {r}" if world > 1 else ""
        if explicit:
            raise InputError(folder, None, f"cannot resume: {problem}{where}")
        say(f"checkpoint {folder} is corrupt{where} ({problem}); trying the previous one")
    say("no intact checkpoint to resume from; starting from scratch")
    return None


def find_resume(output_dir: str | Path, resume: str, say=print) -> Path | None:
    """One process: the checkpoint to resume from (``latest`` = the newest intact one, corrupt
    ones reported and skipped; an explicit folder must be intact)."""
    candidates = resume_candidates(output_dir, resume)
    if not resume:
        return None
    return choose_resume(candidates, resume != "latest", say)


def check_compatible(folder: Path, record: dict) -> None:
    """Refuse a checkpoint made by a run that differs from this one in anything its saved state
    depends on (strategy, encoder, CF shape, DeepSpeed stage, world size, the data files, seed,
    batch size and split), naming each."""
    path = folder / RUN_RECORD
    if not path.is_file():
        return  # written before run records existed: the load itself is the only check
    try:
        saved = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        saved = None
    if not isinstance(saved, dict):
        raise InputError(path, None, "cannot resume: unreadable run record")
    diffs = []
    for name, value in record.items():
        if name in _NOT_COMPARED or (name in _ADDED_LATER and name not in saved):
            continue
        theirs = saved.get(name)
        if isinstance(value, dict) and isinstance(theirs, dict):  # named part by part (files)
            diffs += [
                f"{name} {key}: checkpoint {_show(theirs.get(key))}, this run "
                f"{_show(value.get(key))}"
                for key in sorted(value.keys() | theirs.keys())
                if theirs.get(key) != value.get(key)
            ]
        elif theirs != value:
            diffs.append(f"{name}: checkpoint {_show(theirs)}, this run {_show(value)}")
    if diffs:
        raise InputError(
            folder, None, "cannot resume, made by a different run: " + "; ".join(diffs)
        )


# A copied encoder folder is the same encoder: the config hash, not the path, identifies it.
_NOT_COMPARED = {"encoder_folder"}
# Recorded since a later version: a checkpoint written before lacks them, and is not refused
# for that.
_ADDED_LATER = {"data", "seed", "batch_size", "split"}


def _show(value) -> str:
    return "none" if value is None else str(value)


BEST_DIR = ".best"  # --save-best's best-so-far export: in the output folder until the run
# ends, and inside each checkpoint (the best as of its step)


def link_or_copy(src: str | Path, dest: str | Path) -> None:
    """A hard link (no disk space, no time: exported files are never rewritten in place), or a
    plain copy where no link can be made (another file system)."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def link_tree(src: Path, dest: Path) -> None:
    """Copy a folder as hard links (``link_or_copy``)."""
    shutil.copytree(src, dest, copy_function=link_or_copy)


def save(
    accelerator,
    state: TrainState,
    output_dir: str | Path,
    keep: int,
    record: dict | None = None,
    best: Path | None = None,
) -> Path:
    """Write a checkpoint of the current step on every rank; atomic by rename. ``record``
    (what the run is) goes into ``run.json`` for resume checks; ``best`` (a staged best-so-far
    export, when there is one) is kept beside the state, so a resume restores the best that
    belongs to its step.

    Replacing a checkpoint of the same step renames the old one away first and deletes it
    only once the new one is in place, so at every moment one intact copy exists."""
    root = checkpoint_root(output_dir)
    final = root / f"step-{state.step:08d}"
    tmp = root / f".tmp-step-{state.step:08d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        _tidy(root)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every rank writes its shards and RNG state
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and record is not None:  # before rank 0's manifest lists it
        (tmp / RUN_RECORD).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    if accelerator.is_main_process and best is not None and best.is_dir():
        link_tree(best, tmp / BEST_DIR)
    write_manifest(tmp, accelerator.process_index)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        replace_folder(tmp, final)
        for _, stale in list_checkpoints(root)[keep:]:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _tidy(root: Path) -> None:
    """Finish what a crash during an earlier save left: drop half-written ``.tmp-`` folders,
    put back a checkpoint that was renamed away and not replaced, drop one that was."""
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    restore_old(root, "step-*")


def load(accelerator, folder: Path) -> None:
    """Restore every registered object and RNG state from a checkpoint folder."""
    accelerator.load_state(str(folder))
