"""MIND news recommendation data: news.tsv + behaviors.tsv -> catalogue and impressions."""

from __future__ import annotations

import os
import random
from array import array
from dataclasses import dataclass
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


def _impression_problem(path: Path, line: int, tokens: list[str], index: dict[str, int]) -> None:
    """Raise for the first bad ``newsid-label`` token (the fast path only knows one is bad)."""
    for token in tokens:
        news_id, dash, label = token.rpartition("-")
        if not dash or not news_id:
            raise InputError(path, line, f"bad impression {quote(token)} (expected newsid-label)")
        if news_id not in index:
            raise InputError(path, line, f"unknown news id {quote(news_id)} in impressions")
        zero_one(path, line, "label", label)


def _read_behaviors(path: Path, index: dict[str, int]) -> tuple[list[Impression], torch.Tensor]:
    """Read one behaviors.tsv; also return every item row it mentions (for cold-start marks)."""
    # Rows go to flat arrays, made into one tensor per kind at the end and split into views:
    # two torch.tensor calls per impression cost more than all the parsing.
    candidates, labels, sizes = array("q"), array("q"), []
    history_rows, history_sizes, history_of = array("q"), [], []
    # A user's history repeats verbatim on each of their impressions in MIND: store it once per
    # (user, history), keyed by hash and length rather than by the text to keep memory low.
    histories: dict[tuple[str, int, int], int] = {}
    get = index.get
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
        parts = [token.rpartition("-") for token in tokens]
        rows = [get(news_id) for news_id, _, _ in parts]
        flags = [label for _, _, label in parts]
        if None in rows or not _LABELS.issuperset(flags):
            _impression_problem(path, line, tokens, index)
        candidates.extend(rows)
        labels.extend(flag == "1" for flag in flags)
        sizes.append(len(rows))
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
    return impressions, torch.cat([all_candidates, all_histories])


def load_mind(folder: str | os.PathLike, use_abstract: bool = False, seed: int = 0) -> NewsData:
    """Load a MIND folder (train/, dev/, optional test/); without test/, dev is split in half."""
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

    train, train_rows = _read_behaviors(folder / "train" / "behaviors.tsv", index)
    dev, _ = _read_behaviors(folder / "dev" / "behaviors.tsv", index)
    if has_test:
        valid, test = dev, _read_behaviors(test_behaviors, index)[0]
    else:
        order = list(range(len(dev)))
        random.Random(seed).shuffle(order)
        n_valid = (len(dev) + 1) // 2
        valid = [dev[i] for i in sorted(order[:n_valid])]
        test = [dev[i] for i in sorted(order[n_valid:])]
    cold_items = torch.ones(len(catalogue), dtype=torch.bool)
    cold_items[train_rows] = False
    return NewsData(catalogue, train, valid, test, cold_items)
