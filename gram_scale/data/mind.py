"""MIND news recommendation data: news.tsv + behaviors.tsv -> catalogue and impressions."""

from __future__ import annotations

import os
import random
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gram_scale.data._io import iter_tsv, long_tensor, quote, zero_one
from gram_scale.data.items import Catalogue
from gram_scale.errors import InputError

NEWS_FIELDS = (
    8  # id, category, subcategory, title, abstract, url, title entities, abstract entities
)
BEHAVIOR_FIELDS = 5  # impression id, user id, time, history, impressions
_LABELS = frozenset(("0", "1"))


@dataclass
class Impression:
    """One impression: the user's click history and the shown candidates with click labels.

    The tensors are views into storage shared by all impressions of a file (a user's history
    tensor is even shared by their impressions): treat them as read-only.
    """

    history: torch.Tensor  # int64 item rows of the clicked history, oldest first (may be empty)
    candidates: torch.Tensor  # int64 item rows
    labels: torch.Tensor  # int64 0/1, same length as candidates


@dataclass
class NewsData:
    """A news data set: catalogue plus train / valid / test impressions."""

    catalogue: Catalogue
    train: list[Impression]
    valid: list[Impression]
    test: list[Impression]
    cold_items: torch.Tensor  # bool [n_items]: item appears nowhere in train behaviors
    # load_mind(keep_ids=True): per evaluation split, each impression's (impression id, user id)
    keys: dict[str, list[tuple[str, str]]] = field(default_factory=dict)


@dataclass
class NewsSplit:
    """One MIND split folder read for prediction: its news, impressions and their ids."""

    catalogue: Catalogue
    impressions: list[Impression]
    keys: list[tuple[str, str]]  # each impression's (impression id, user id)
    labeled: bool  # False: the test layout, candidates without -0/-1 click labels


def _read_news(
    path: Path, use_abstract: bool, ids: list[str], texts: list[str], index: dict[str, int]
) -> None:
    """Append the news of one news.tsv not seen in an earlier file (MIND repeats them per split)."""
    first_line: dict[str, int] = {}
    for line, fields in iter_tsv(path, NEWS_FIELDS):
        news_id = fields[0].strip()
        if len(news_id.split()) != 1:
            problem = "empty news id" if not news_id else f"news id {quote(news_id)} has spaces"
            raise InputError(path, line, problem)
        if news_id in first_line:
            raise InputError(
                path,
                line,
                f"duplicate news id {quote(news_id)} (first on line {first_line[news_id]})",
            )
        first_line[news_id] = line
        title = fields[3].strip()
        if not title:
            raise InputError(path, line, f"empty title for news {quote(news_id)}")
        if news_id in index:
            continue
        abstract = fields[4].strip()
        index[news_id] = len(ids)
        ids.append(news_id)
        texts.append(title + ". " + abstract if use_abstract and abstract else title)
    if not first_line:
        raise InputError(path, 1, "empty file (no news rows)")


def read_news(path: str | os.PathLike, use_abstract: bool = False) -> Catalogue:
    """Read one ``news.tsv`` into a catalogue in file order (title, or title + abstract)."""
    ids: list[str] = []
    texts: list[str] = []
    index: dict[str, int] = {}
    _read_news(Path(path), use_abstract, ids, texts, index)
    return Catalogue(ids, texts, index)


def _impression_problem(path: Path, line: int, tokens: list[str], index: dict[str, int]) -> None:
    """Raise for the first bad ``newsid-label`` token (the fast path only knows one is bad)."""
    for token in tokens:
        news_id, dash, label = token.rpartition("-")
        if not dash or not news_id:
            raise InputError(path, line, f"bad impression {quote(token)} (expected newsid-label)")
        if news_id not in index:
            raise InputError(path, line, f"unknown news id {quote(news_id)} in impressions")
        zero_one(path, line, "label", label)


def _contradiction_problem(path: Path, line: int, parts: list[tuple[str, str, str]]) -> None:
    """Raise for a news listed in one impression as both clicked and not clicked (a repeat with
    the same label is harmless)."""
    seen: dict[str, str] = {}
    for news_id, _, label in parts:
        if seen.setdefault(news_id, label) != label:
            raise InputError(
                path,
                line,
                f"news {quote(news_id)} is both clicked and not clicked in this impression",
            )


def _read_behaviors(
    path: Path,
    index: dict[str, int],
    keys: list[tuple[str, str]] | None = None,
    unlabeled_ok: bool = False,
) -> tuple[list[Impression], torch.Tensor, bool]:
    """Read one behaviors.tsv; also return every item row it mentions (for cold-start marks) and
    whether its candidates carry click labels. ``keys``: filled with each impression's
    (impression id, user id). ``unlabeled_ok``: a file whose candidates are bare news ids (the
    MIND test layout) is read with every label 0; the first row decides for the whole file."""
    # Rows go to flat arrays, made into one tensor per kind at the end and split into views:
    # two torch.tensor calls per impression cost more than all the parsing.
    candidates, labels, sizes = array("q"), array("q"), []
    history_rows, history_sizes, history_of = array("q"), [], []
    # A user's history repeats verbatim on each of their impressions in MIND: store it once per
    # (user, history), keyed by hash and length rather than by the text to keep memory low.
    histories: dict[tuple[str, int, int], int] = {}
    get = index.get
    labeled, first = None, 0
    for line, fields in iter_tsv(path, BEHAVIOR_FIELDS):
        raw_history = fields[3]
        key = (fields[1], hash(raw_history), len(raw_history))
        slot = histories.get(key)
        if slot is None:
            names = raw_history.split()
            rows = [get(news_id) for news_id in names]
            if None in rows:
                unknown = names[rows.index(None)]
                raise InputError(path, line, f"unknown news id {quote(unknown)} in history")
            slot = histories[key] = len(history_sizes)
            history_rows.extend(rows)
            history_sizes.append(len(rows))
        history_of.append(slot)

        tokens = fields[4].split()
        if not tokens:
            raise InputError(path, line, "no impressions (expected newsid-label tokens)")
        if labeled is None:
            labeled = not unlabeled_ok or _has_label(tokens[0], index)
            first = line
        if labeled:
            parts = [token.rpartition("-") for token in tokens]
            rows = [get(news_id) for news_id, _, _ in parts]
            flags = [label for _, _, label in parts]
            if None in rows or not _LABELS.issuperset(flags):
                _impression_problem(path, line, tokens, index)
            if len(set(rows)) < len(rows):
                _contradiction_problem(path, line, parts)
            labels.extend(flag == "1" for flag in flags)
        else:
            rows = [get(token) for token in tokens]
            if None in rows:
                _unlabeled_problem(path, line, tokens[rows.index(None)], index, first)
            labels.extend(0 for _ in rows)
        candidates.extend(rows)
        sizes.append(len(rows))
        if keys is not None:
            keys.append((fields[0].strip(), fields[1].strip()))
    if not sizes:
        raise InputError(path, 1, "empty file (no behavior rows)")

    all_candidates, all_histories = long_tensor(candidates), long_tensor(history_rows)
    unique_histories = all_histories.split(history_sizes)
    impressions = [
        Impression(unique_histories[h], c, y)
        for h, c, y in zip(
            history_of, all_candidates.split(sizes), long_tensor(labels).split(sizes), strict=True
        )
    ]
    return impressions, torch.cat([all_candidates, all_histories]), bool(labeled)


def _has_label(token: str, index: dict[str, int]) -> bool:
    """Whether an impression token is ``newsid-0``/``newsid-1`` rather than a bare news id."""
    news_id, dash, label = token.rpartition("-")
    return token not in index and bool(dash) and bool(news_id) and label in _LABELS


def _unlabeled_problem(path: Path, line: int, token: str, index: dict, first: int) -> None:
    """Raise for a candidate of an unlabeled file that is no known news id."""
    if _has_label(token, index):
        raise InputError(
            path,
            line,
            f"impression {quote(token)} has a click label but those on "
            f"line {first} have none (label every candidate or none)",
        )
    raise InputError(path, line, f"unknown news id {quote(token)} in impressions")


def load_mind(
    folder: str | os.PathLike, use_abstract: bool = False, seed: int = 0, keep_ids: bool = False
) -> NewsData:
    """Load a MIND folder (train/, dev/, optional test/); without test/, dev is split in half.
    ``keep_ids``: also keep the valid and test impressions' ids and user ids (``keys``)."""
    folder = Path(folder)
    ids: list[str] = []
    texts: list[str] = []
    index: dict[str, int] = {}
    _read_news(folder / "train" / "news.tsv", use_abstract, ids, texts, index)
    _read_news(folder / "dev" / "news.tsv", use_abstract, ids, texts, index)
    test_behaviors = folder / "test" / "behaviors.tsv"
    has_test = test_behaviors.is_file()
    if has_test and (folder / "test" / "news.tsv").is_file():
        _read_news(folder / "test" / "news.tsv", use_abstract, ids, texts, index)
    catalogue = Catalogue(ids, texts, index)

    train, train_rows, _ = _read_behaviors(folder / "train" / "behaviors.tsv", index)
    dev_keys = [] if keep_ids else None
    dev, _, _ = _read_behaviors(folder / "dev" / "behaviors.tsv", index, dev_keys)
    keys = {}
    if has_test:
        test_keys = [] if keep_ids else None
        valid, test = dev, _read_behaviors(test_behaviors, index, test_keys)[0]
        if keep_ids:
            keys = {"valid": dev_keys, "test": test_keys}
    else:
        order = list(range(len(dev)))
        random.Random(seed).shuffle(order)
        n_valid = (len(dev) + 1) // 2
        halves = {"valid": sorted(order[:n_valid]), "test": sorted(order[n_valid:])}
        valid = [dev[i] for i in halves["valid"]]
        test = [dev[i] for i in halves["test"]]
        if keep_ids:
            keys = {split: [dev_keys[i] for i in rows] for split, rows in halves.items()}
    cold_items = torch.ones(len(catalogue), dtype=torch.bool)
    cold_items[train_rows] = False
    return NewsData(catalogue, train, valid, test, cold_items, keys)


def read_split(folder: str | os.PathLike, use_abstract: bool = False) -> NewsSplit:
    """Read one MIND split folder (``news.tsv``, ``behaviors.tsv``) to score it: every news its
    behaviors mention must be in its news.tsv; candidates may lack labels (the test layout)."""
    folder = Path(folder)
    catalogue = read_news(folder / "news.tsv", use_abstract)
    keys: list[tuple[str, str]] = []
    impressions, _, labeled = _read_behaviors(
        folder / "behaviors.tsv", catalogue.index, keys, unlabeled_ok=True
    )
    return NewsSplit(catalogue, impressions, keys, labeled)
