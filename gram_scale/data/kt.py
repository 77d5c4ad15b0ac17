"""Knowledge tracing data: items.csv + interactions.csv -> per-user sequences, split by user."""

from __future__ import annotations

import math
import os
import random
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gram_scale.data._io import CsvTable, long_tensor, quote, zero_one
from gram_scale.data.items import Catalogue
from gram_scale.errors import InputError

Sequence = tuple[torch.Tensor, torch.Tensor]
_ZERO_ONE = {"0": 0, "1": 1}


@dataclass
class KTData:
    """A knowledge tracing data set: item catalogue and per-user (item rows, correct) sequences."""

    catalogue: Catalogue
    train: list[Sequence]  # per user: (item rows int64 [L], correct int64 0/1 [L]) in time order
    valid: list[Sequence]
    test: list[Sequence]
    cold_items: torch.Tensor  # bool [n_items]: True where the item has no interaction in `train`
    # load_kt(keep_ids=True): per evaluation split, each user's id and file lines (as sequences)
    users: dict[str, list[tuple[str, torch.Tensor]]] = field(default_factory=dict)


@dataclass
class InteractionLog:
    """An interactions file read for prediction: per user (first-appearance order) the id, the
    sequence in time order and the file line of each of its interactions."""

    users: list[str]
    sequences: list[Sequence]
    lines: list[torch.Tensor]


def read_items(path: str | os.PathLike) -> Catalogue:
    """Read ``items.csv`` (columns ``item_id,text``) into a catalogue in file order."""
    table = CsvTable(path, ("item_id", "text"))
    id_col, text_col = table.columns["item_id"], table.columns["text"]
    ids: list[str] = []
    texts: list[str] = []
    first_line: dict[str, int] = {}
    for line, row in table:
        item_id = row[id_col].strip()
        if not item_id:
            raise InputError(table.path, line, "empty item id")
        if item_id in first_line:
            raise InputError(
                table.path,
                line,
                f"duplicate item id {quote(item_id)} (first on line {first_line[item_id]})",
            )
        text = row[text_col].strip()
        if not text:
            raise InputError(table.path, line, f"empty text for item {quote(item_id)}")
        first_line[item_id] = line
        ids.append(item_id)
        texts.append(text)
    return Catalogue(ids, texts)


def _timestamp(path: Path, line: int, value: str) -> float:
    try:
        return int(value)
    except ValueError:
        pass
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise InputError(path, line, f"timestamp must be a number, got {quote(value.strip())}")
    return number


def read_interactions(path: str | os.PathLike, catalogue: Catalogue) -> InteractionLog:
    """Read an interactions file to score it, keeping user ids and file lines; an empty
    ``correct`` (or no such column) is an answer not known yet, read as -1."""
    users, sequences, lines = _read_sequences(path, catalogue, keep_lines=True, unknown_ok=True)
    return InteractionLog(users, sequences, lines)


def _read_sequences(
    path: str | os.PathLike,
    catalogue: Catalogue,
    keep_lines: bool = False,
    unknown_ok: bool = False,
) -> tuple[list[str], list[Sequence], list[torch.Tensor] | None]:
    """Per user (first-appearance order): user id, item rows and correctness sorted by time,
    and (``keep_lines``) the file line of each interaction in the same order. ``unknown_ok``:
    ``correct`` may be empty or absent, read as -1."""
    required, optional = ("user_id", "item_id", "correct"), ("timestamp",)
    if unknown_ok:
        required, optional = required[:2], (*optional, "correct")
    table = CsvTable(path, required, optional)
    user_col, item_col = table.columns["user_id"], table.columns["item_id"]
    correct_col = table.columns.get("correct")
    time_col = table.columns.get("timestamp")
    users: dict[str, int] = {}
    # Compact arrays, not lists of tuples: interaction logs can hold tens of millions of rows.
    items: list[array] = []
    correct: list[array] = []
    times: list[list[float]] = []
    lines: list[array] = []
    index = catalogue.index
    for line, row in table:
        user = row[user_col].strip()
        if not user:
            raise InputError(table.path, line, "empty user id")
        item_id = row[item_col].strip()
        item = index.get(item_id)
        if item is None:
            raise InputError(table.path, line, f"unknown item id {quote(item_id)}")
        raw = row[correct_col] if correct_col is not None else ""
        flag = _ZERO_ONE.get(raw)  # fast path; zero_one strips spaces and reports bad values
        if flag is None:
            if unknown_ok and not raw.strip():
                flag = -1
            else:
                flag = zero_one(table.path, line, "correct", raw)
        u = users.get(user)
        if u is None:
            u = users[user] = len(users)
            items.append(array("q"))
            correct.append(array("b"))
            times.append([])
            lines.append(array("q"))
        if keep_lines:
            lines[u].append(line)
        items[u].append(item)
        correct[u].append(flag)
        if time_col is not None:
            times[u].append(_timestamp(table.path, line, row[time_col]))
    sequences, user_lines = [], []
    for u in range(len(users)):
        item_rows, flags = long_tensor(items[u]), long_tensor(correct[u])
        at = long_tensor(lines[u]) if keep_lines else None
        if time_col is not None:
            # sorted() is stable, so equal timestamps keep their file order.
            order = torch.tensor(sorted(range(len(times[u])), key=times[u].__getitem__))
            item_rows, flags = item_rows[order], flags[order]
            at = at[order] if keep_lines else None
        sequences.append((item_rows, flags))
        if keep_lines:
            user_lines.append(at)
    return list(users), sequences, (user_lines if keep_lines else None)


def _fraction(name: str, value: float) -> float:
    if not (0.0 <= value < 1.0):
        raise InputError(None, None, f"{name} must be in [0, 1), got {value}")
    return value


def split_sizes(n_users: int, valid_frac: float, test_frac: float) -> tuple[int, int]:
    """Valid and test user counts (rounded), shrunk so at least one user stays in train."""
    if valid_frac + test_frac >= 1.0:
        raise InputError(None, None, "valid_frac + test_frac must be below 1")
    n_valid = int(valid_frac * n_users + 0.5)
    n_test = int(test_frac * n_users + 0.5)
    while n_valid + n_test > n_users - 1:
        if n_test >= n_valid:
            n_test -= 1
        else:
            n_valid -= 1
    return n_valid, n_test


def load_kt(
    folder: str | os.PathLike,
    seed: int = 0,
    valid_frac: float = 0.1,
    test_frac: float = 0.1,
    cold_frac: float = 0.1,
    keep_ids: bool = False,
) -> KTData:
    """Load ``folder/items.csv`` and ``folder/interactions.csv``, split users, hold out cold items.
    ``keep_ids``: also keep the valid and test users' ids and file lines (``users``)."""
    _fraction("valid_frac", valid_frac)
    _fraction("test_frac", test_frac)
    _fraction("cold_frac", cold_frac)
    folder = Path(folder)
    catalogue = read_items(folder / "items.csv")
    interactions = folder / "interactions.csv"
    user_ids, sequences, lines = _read_sequences(interactions, catalogue, keep_lines=keep_ids)

    rng = random.Random(seed)
    order = list(range(len(sequences)))
    rng.shuffle(order)
    n_valid, n_test = split_sizes(len(sequences), valid_frac, test_frac)
    split_users = {
        "valid": sorted(order[:n_valid]),
        "test": sorted(order[n_valid : n_valid + n_test]),
    }
    valid = [sequences[u] for u in split_users["valid"]]
    test = [sequences[u] for u in split_users["test"]]
    train_users = sorted(order[n_valid + n_test :])
    users = {}
    if keep_ids:
        users = {
            split: [(user_ids[u], lines[u]) for u in rows] for split, rows in split_users.items()
        }

    n_items = len(catalogue)
    seen = torch.zeros(n_items, dtype=torch.bool)
    for item_rows, _ in sequences:
        seen[item_rows] = True
    occurring = seen.nonzero().flatten().tolist()
    # Sampled after the user shuffle, so changing cold_frac never changes the user split.
    n_cold = int(cold_frac * len(occurring) + 0.5)
    is_cold = torch.zeros(n_items, dtype=torch.bool)
    is_cold[sorted(rng.sample(occurring, n_cold))] = True

    train: list[Sequence] = []
    for u in train_users:
        item_rows, flags = sequences[u]
        keep = ~is_cold[item_rows]
        if keep.any():
            train.append((item_rows[keep], flags[keep]))
    if not train:
        raise InputError(
            interactions, None, "no training interactions left after removing cold-start items"
        )
    cold_items = torch.ones(n_items, dtype=torch.bool)
    cold_items[torch.cat([item_rows for item_rows, _ in train])] = False
    return KTData(catalogue, train, valid, test, cold_items, users)
