"""Synthetic KT and MIND-style data whose only learnable signal is in the item text.

KT: each item has a difficulty level spelled out by level-specific words in its text; each
student has a latent ability; P(correct) = sigmoid(ability - difficulty + noise).
News: each news item has a topic spelled out by topic words in its title and abstract; each
user prefers one or two topics and clicks candidates of those topics far more often.
Ids are random-looking and file order is random, so only the words carry the signal.

The ``*_finetune`` variants draw the level and topic words from ``HIDDEN_WORDS`` by a seeded
random mapping ("spoon" may be hard, "horse" easy), so a pretrained encoder knows nothing of the
signal: only fine-tuning the encoder on the data can make its vectors carry it.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import math
import os
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from gram_scale.atomic import write_file
from gram_scale.errors import EXIT_INPUT_ERROR

# Level 0 is the easiest. No word appears in two lists, so a word decides its level.
LEVEL_WORDS: tuple[tuple[str, ...], ...] = (
    ("count", "add", "one", "two", "three", "small", "apples", "coins", "total", "plus", "fingers"),
    ("difference", "multiplication", "ten", "hundred", "even", "odd", "double", "half", "times"),
    ("fraction", "decimal", "percent", "ratio", "divide", "average", "area", "perimeter", "angle"),
    ("equation", "variable", "slope", "graph", "square", "root", "power", "linear", "triangle"),
    ("derivative", "integral", "limit", "matrix", "vector", "calculus", "theorem", "proof"),
)
LEVEL_DIFFICULTY: tuple[float, ...] = (-2.0, -1.0, 0.0, 1.0, 2.0)
KT_TOPICS: tuple[str, ...] = (
    "shopping",
    "sports",
    "garden",
    "school",
    "travel",
    "cooking",
    "music",
    "weather",
    "farm",
    "city",
    "library",
    "bakery",
)
KT_FILLER: tuple[str, ...] = (
    "the",
    "a",
    "of",
    "what",
    "is",
    "find",
    "which",
    "value",
    "given",
    "question",
    "answer",
    "show",
    "how",
    "many",
    "there",
    "are",
    "in",
    "each",
    "if",
    "then",
    "and",
    "for",
    "with",
    "this",
    "that",
    "below",
    "write",
    "your",
    "work",
    "check",
)

NEWS_TOPICS: dict[str, tuple[str, ...]] = {
    "sports": (
        "team",
        "coach",
        "season",
        "playoff",
        "score",
        "league",
        "player",
        "stadium",
        "championship",
        "quarterback",
        "goal",
        "tournament",
    ),
    "politics": (
        "senate",
        "election",
        "vote",
        "president",
        "congress",
        "campaign",
        "governor",
        "policy",
        "democrats",
        "republicans",
        "bill",
        "court",
    ),
    "finance": (
        "stocks",
        "market",
        "investors",
        "bank",
        "interest",
        "rates",
        "economy",
        "shares",
        "profit",
        "trade",
        "dollar",
        "inflation",
    ),
    "weather": (
        "storm",
        "rain",
        "snow",
        "forecast",
        "hurricane",
        "temperatures",
        "winds",
        "flood",
        "cold",
        "heat",
        "tornado",
        "drought",
    ),
    "health": (
        "doctors",
        "hospital",
        "patients",
        "disease",
        "vaccine",
        "study",
        "cancer",
        "diet",
        "sleep",
        "heart",
        "virus",
        "medicine",
    ),
    "technology": (
        "phone",
        "software",
        "app",
        "computer",
        "internet",
        "robot",
        "startup",
        "chip",
        "data",
        "online",
        "google",
        "apple",
    ),
    "food": (
        "recipe",
        "restaurant",
        "chicken",
        "pizza",
        "dinner",
        "cheese",
        "chef",
        "dessert",
        "breakfast",
        "soup",
        "cake",
        "kitchen",
    ),
    "travel": (
        "flight",
        "airport",
        "hotel",
        "beach",
        "vacation",
        "island",
        "cruise",
        "tourists",
        "passport",
        "resort",
        "airline",
        "trip",
    ),
}
NEWS_FILLER: tuple[str, ...] = (
    "the",
    "a",
    "new",
    "after",
    "says",
    "over",
    "with",
    "from",
    "this",
    "week",
    "report",
    "first",
    "more",
    "than",
    "people",
    "how",
    "why",
    "what",
    "could",
    "may",
    "big",
    "latest",
    "today",
    "year",
    "here",
    "about",
    "into",
    "amid",
    "local",
    "national",
)
NEWS_CATEGORIES: tuple[str, ...] = ("news", "lifestyle", "video", "entertainment")

# Ordinary nouns, one word-piece each in BERT's vocabulary, disjoint from every list above; the
# finetune generators give them levels or topics at random.
HIDDEN_WORDS: tuple[str, ...] = tuple(
    """
    lantern bread chair river stone cloud horse lamp window pencil mirror candle bottle basket
    ladder blanket button carpet castle walnut clock coat cookie copper cotton desk door dragon
    drum eagle engine feather fence finger flower forest fork frog glass glove goat gold grape
    hammer hat honey penguin jacket jar jungle kettle key knife lemon letter lion marble meadow
    milk monkey moon mountain mouse needle nest ocean onion orange owl paint paper pepper piano
    pillow pipe planet plate pocket pond potato puppet rabbit ribbon ring rocket rope rose sail
    salt sand scarf shell ship shoe silver sink skirt snake soap sock spider spoon star sugar sun
    table tent thread tiger tomato tower train tree truck tunnel turtle umbrella valley wagon wall
    whale wheel wind wire wolf wool yard zebra anchor arrow badge barrel beard bell belt bench
    berry boat bone book boot bowl box brick bridge brush bucket cabin cable camel camera canoe
    card carrot cart cave chain chalk cherry circle coin corn crown cup curtain daisy deer diamond
    dish dog duck egg elbow fan fish flag flute fox frame gate ghost goose grass guitar helmet
    hill hook horn ink iron ivy jewel kite knot lake leaf lock mint nail net nut oak oven pan
    parrot peach pear pearl pig pin pine plum pumpkin quilt robe roof saddle seed sheep shield
    shirt ferry squirrel stamp stove straw swan sword tail thorn toast towel toy tray vase violin
    glacier cactus moth hive broom cord drawer barn
""".split()
)

PREFERRED_CLICK = 0.6  # P(click) for a candidate of a preferred topic
OTHER_CLICK = 0.04
HISTORY_ON_TOPIC = 0.85  # share of history clicks from preferred topics
DEV_ONLY_SLOT = 0.4  # share of dev candidate slots filled with dev-only (fresh) news
NO_HISTORY_USERS = 0.05  # share of news users with an empty history, as in MIND


def _ids(rng: random.Random, prefix: str, n: int) -> list[str]:
    """``n`` distinct random ids like ``q0193``: 10x more numbers than ids, so gaps hide order."""
    width = max(4, len(str(10 * n)))
    return [f"{prefix}{k:0{width}d}" for k in rng.sample(range(10**width), n)]


def _zipf_cum_weights(n: int, zipf: float) -> list[float]:
    return list(itertools.accumulate(1.0 / (rank + 1) ** zipf for rank in range(n)))


def _text(rng: random.Random, signal: list[str], filler: tuple[str, ...], n_words: int) -> str:
    words = signal + [rng.choice(filler) for _ in range(n_words - len(signal))]
    rng.shuffle(words)
    return " ".join(words)


def hidden_groups(n_groups: int, seed: int) -> tuple[tuple[str, ...], ...]:
    """``HIDDEN_WORDS`` dealt at random (by ``seed``) into ``n_groups`` equal groups."""
    words = list(HIDDEN_WORDS)
    random.Random(f"hidden-{seed}").shuffle(words)
    size = len(words) // n_groups
    return tuple(tuple(words[k * size : (k + 1) * size]) for k in range(n_groups))


def _write_atomic(path: Path, write: Callable[[TextIO], None]) -> None:
    """Readers never see half a file (``atomic.write_file``); shared like any data file."""
    write_file(path, write, mode=0o644)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def write_kt(
    folder: str | os.PathLike,
    n_users: int = 200,
    n_items: int = 300,
    mean_len: float = 50,
    n_unused_items: int = 10,
    zipf: float = 1.0,
    seed: int = 0,
    level_words: Sequence[Sequence[str]] = LEVEL_WORDS,
) -> Path:
    """Write ``items.csv`` and ``interactions.csv`` (with timestamps) into ``folder``; return it.

    ``level_words``: one word list per difficulty level, easiest first (``LEVEL_WORDS``)."""
    _check(n_users >= 1, f"n_users must be at least 1, got {n_users}")
    _check(0 <= n_unused_items < n_items, "need 0 <= n_unused_items < n_items")
    _check(mean_len >= 1, f"mean_len must be at least 1, got {mean_len}")
    _check(zipf >= 0, f"zipf must be >= 0, got {zipf}")
    _check(len(level_words) == len(LEVEL_DIFFICULTY), f"need {len(LEVEL_DIFFICULTY)} level lists")
    folder = Path(folder)
    rng = random.Random(seed)

    ids = _ids(rng, "q", n_items)
    texts: list[str] = []
    difficulty: list[float] = []
    for _ in range(n_items):
        level = rng.randrange(len(level_words))
        n_level_words = rng.randint(2, 4)
        signal = [rng.choice(KT_TOPICS)] + [
            rng.choice(level_words[level]) for _ in range(n_level_words)
        ]
        texts.append(_text(rng, signal, KT_FILLER, rng.randint(8, 20)))
        difficulty.append(LEVEL_DIFFICULTY[level] + rng.gauss(0.0, 0.3))

    unused = set(rng.sample(range(n_items), n_unused_items))
    # Popularity rank is a random permutation, independent of difficulty and id.
    by_popularity = rng.sample(
        [i for i in range(n_items) if i not in unused], n_items - len(unused)
    )
    cum_weights = _zipf_cum_weights(len(by_popularity), zipf)

    rows: list[tuple[int, str, str, int]] = []  # (timestamp, user, item id, correct)
    start = 1_600_000_000
    for user in _ids(rng, "u", n_users):
        ability = rng.gauss(0.0, 1.0)
        length = max(1, round(rng.gammavariate(4.0, mean_len / 4.0)))
        t = start + rng.randrange(14 * 86400)
        for item in rng.choices(by_popularity, cum_weights=cum_weights, k=length):
            t += rng.randint(10, 600)
            p = 1.0 / (1.0 + math.exp(-(ability - difficulty[item] + rng.gauss(0.0, 0.3))))
            rows.append((t, user, ids[item], int(rng.random() < p)))
    rows.sort(key=lambda r: r[0])  # one log in time order, users interleaved like real data

    def items_csv(f: TextIO) -> None:
        f.write("item_id,text\n")
        f.writelines(f"{item_id},{text}\n" for item_id, text in zip(ids, texts, strict=True))

    def interactions_csv(f: TextIO) -> None:
        f.write("user_id,item_id,correct,timestamp\n")
        for t, user, item_id, correct in rows:
            f.write(f"{user},{item_id},{correct},{t}\n")

    _write_atomic(folder / "items.csv", items_csv)
    _write_atomic(folder / "interactions.csv", interactions_csv)
    return folder


def write_kt_finetune(folder: str | os.PathLike, seed: int = 0, **sizes) -> Path:
    """``write_kt`` whose level words are ``HIDDEN_WORDS`` dealt at random by ``seed``."""
    return write_kt(
        folder, seed=seed, level_words=hidden_groups(len(LEVEL_DIFFICULTY), seed), **sizes
    )


def _mind_time(seconds: int) -> str:
    """MIND's time format, e.g. ``11/15/2019 9:05:58 AM``."""
    t = datetime.datetime(2019, 11, 10) + datetime.timedelta(seconds=seconds)
    hour = t.hour % 12 or 12
    return f"{t.month}/{t.day}/{t.year} {hour}:{t.minute:02d}:{t.second:02d} {t:%p}"


def write_mind(
    folder: str | os.PathLike,
    n_users: int = 200,
    n_news: int = 400,
    impressions_per_user: int = 3,
    n_candidates: int = 5,
    history_len: int = 20,
    n_dev_only_news: int = 20,
    zipf: float = 1.0,
    seed: int = 0,
    days: int = 5,
    dev_days: int = 1,
    topic_words: Sequence[Sequence[str]] = tuple(NEWS_TOPICS.values()),
    title_topic_words: tuple[int, int] = (3, 5),
    topic_zipf: float = 0.0,
) -> Path:
    """Write MIND-style ``train/`` and ``dev/`` folders (news.tsv, behaviors.tsv); return folder.

    Impressions fall uniformly on ``days`` days; the last ``dev_days`` of them are dev (MIND holds
    out its last day). More dev days give a larger, less noisy valid/test split for the same
    training set size per day. ``topic_words``: one word list per topic; a title holds between
    ``title_topic_words`` of its topic's words (drawn with replacement). ``topic_zipf`` > 0 makes
    some topics popular: users pick their preferred topics with Zipf weights over the topic list
    (0: uniformly), so a news item's topic also tells how likely anyone clicks it.
    """
    n_topics = len(topic_words)
    _check(n_users >= 1, f"n_users must be at least 1, got {n_users}")
    _check(impressions_per_user >= 1, "impressions_per_user must be at least 1")
    _check(n_users * impressions_per_user >= 2, "need at least 2 impressions (train and dev)")
    _check(n_candidates >= 1, "n_candidates must be at least 1")
    _check(history_len >= 0, "history_len must be >= 0")
    _check(0 <= n_dev_only_news, "n_dev_only_news must be >= 0")
    _check(
        n_news - n_dev_only_news >= max(2 * n_topics, n_candidates),
        f"need at least {max(2 * n_topics, n_candidates)} news besides the dev-only ones",
    )
    _check(zipf >= 0, f"zipf must be >= 0, got {zipf}")
    _check(topic_zipf >= 0, f"topic_zipf must be >= 0, got {topic_zipf}")
    lo, hi = title_topic_words
    _check(1 <= lo <= hi, f"title_topic_words must be (lo, hi), 1 <= lo <= hi: {title_topic_words}")
    _check(1 <= dev_days < days, f"need 1 <= dev_days < days, got dev_days={dev_days}, days={days}")
    folder = Path(folder)
    rng = random.Random(seed)

    ids = _ids(rng, "N", n_news)
    order = rng.sample(range(n_news), n_news)  # file order
    dev_only = order[:n_dev_only_news]
    regular = order[n_dev_only_news:]
    # Topics round-robin within each group, so every topic has regular news even in tiny data.
    topic = [0] * n_news
    for group in (dev_only, regular):
        for j, i in enumerate(group):
            topic[i] = j % n_topics
    lines: list[list[str]] = []
    for i in range(n_news):
        words = topic_words[topic[i]]
        title = _text(
            rng, rng.choices(words, k=rng.randint(lo, hi)), NEWS_FILLER, rng.randint(8, 14)
        )
        abstract = _text(
            rng, rng.choices(words, k=rng.randint(3, 6)), NEWS_FILLER, rng.randint(10, 20)
        )
        category = rng.choice(NEWS_CATEGORIES)
        url = f"https://example.com/{ids[i]}"
        lines.append([ids[i], category, category, title, abstract, url, "[]", "[]"])

    by_popularity = rng.sample(regular, len(regular))
    cum_weights = _zipf_cum_weights(len(by_popularity), zipf)
    popular = _zipf_cum_weights(n_topics, topic_zipf)
    per_topic: list[tuple[list[int], list[float]]] = []
    for k in range(n_topics):
        ranked = [(r, i) for r, i in enumerate(by_popularity) if topic[i] == k]
        news = [i for _, i in ranked]
        per_topic.append(
            (news, list(itertools.accumulate(1.0 / (r + 1) ** zipf for r, _ in ranked)))
        )

    def draw_regular() -> int:
        return rng.choices(by_popularity, cum_weights=cum_weights)[0]

    def draw_topic(k: int) -> int:
        news, weights = per_topic[k]
        return rng.choices(news, cum_weights=weights)[0]

    def distinct(draw: Callable[[], int], n: int) -> list[int]:
        chosen: list[int] = []
        for _ in range(50 * n):  # bounded: a Zipf head can make repeats common
            if len(chosen) == n:
                break
            i = draw()
            if i not in chosen:
                chosen.append(i)
        return chosen

    # First who sees an impression when, so the train/dev cut is known before candidates are
    # drawn: dev-only news must never reach a train impression, even in tiny data sets.
    shown: list[tuple[int, str, str, list[int]]] = []  # (time, user, history, preferred topics)
    for user in _ids(rng, "U", n_users):
        n_preferred = rng.choice((1, 2))
        if topic_zipf:
            preferred = distinct(
                lambda: rng.choices(range(n_topics), cum_weights=popular)[0], n_preferred
            )
        else:
            preferred = rng.sample(range(n_topics), n_preferred)
        others = [k for k in range(n_topics) if k not in preferred]

        def draw_history(preferred: list[int] = preferred, others: list[int] = others) -> int:
            on_topic = rng.random() < HISTORY_ON_TOPIC
            return draw_topic(rng.choice(preferred if on_topic else others))

        n_history = 0 if rng.random() < NO_HISTORY_USERS else history_len
        history = " ".join(ids[i] for i in distinct(draw_history, n_history))
        for _ in range(impressions_per_user):
            shown.append((rng.randrange(days * 86400), user, history, preferred))
    shown.sort(key=lambda s: s[0])
    n_train = sum(t < (days - dev_days) * 86400 for t, *_ in shown)
    n_train = min(max(n_train, 1), len(shown) - 1)  # both files need a row

    behaviors: dict[bool, list[str]] = {False: [], True: []}  # is_dev -> behaviors.tsv lines
    for n, (t, user, history, preferred) in enumerate(shown):
        is_dev = n >= n_train

        def draw_candidate(is_dev: bool = is_dev) -> int:
            if is_dev and dev_only and rng.random() < DEV_ONLY_SLOT:
                return rng.choice(dev_only)
            return draw_regular()

        candidates = distinct(draw_candidate, n_candidates)
        labels = [
            int(rng.random() < (PREFERRED_CLICK if topic[i] in preferred else OTHER_CLICK))
            for i in candidates
        ]
        if not any(labels):
            # MIND impressions always hold a click: show one preferred-topic news, clicked.
            pick = draw_topic(rng.choice(preferred))
            if pick not in candidates:
                candidates[rng.randrange(len(candidates))] = pick
            labels = [int(i == pick) for i in candidates]
        imps = " ".join(f"{ids[i]}-{y}" for i, y in zip(candidates, labels, strict=True))
        number = len(behaviors[is_dev]) + 1
        behaviors[is_dev].append(f"{number}\t{user}\t{_mind_time(t)}\t{history}\t{imps}\n")

    for split, is_dev in (("train", False), ("dev", True)):
        if is_dev:
            used = set()
            for line in behaviors[True]:
                fields = line.rstrip("\n").split("\t")
                used.update(fields[3].split())
                used.update(token.rpartition("-")[0] for token in fields[4].split())
            news_rows = [lines[i] for i in order if ids[i] in used]
        else:
            news_rows = [lines[i] for i in regular]

        def news_tsv(f: TextIO, news_rows: list[list[str]] = news_rows) -> None:
            f.writelines("\t".join(fields) + "\n" for fields in news_rows)

        _write_atomic(folder / split / "news.tsv", news_tsv)
        _write_atomic(
            folder / split / "behaviors.tsv", lambda f, d=is_dev: f.writelines(behaviors[d])
        )
    return folder


def write_mind_finetune(
    folder: str | os.PathLike, seed: int = 0, n_topics: int = 8, **sizes
) -> Path:
    """``write_mind`` whose ``n_topics`` topics are ``HIDDEN_WORDS`` dealt at random by ``seed``."""
    return write_mind(folder, seed=seed, topic_words=hidden_groups(n_topics, seed), **sizes)


class _Parser(argparse.ArgumentParser):
    """Bad flags end in one line on stderr and exit code 2, never a usage dump or traceback."""

    def error(self, message: str) -> None:  # type: ignore[override]
        message = " ".join(message.split())
        self.exit(EXIT_INPUT_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def _count(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value

    return parse


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def _add_out(parser: argparse.ArgumentParser) -> None:
    help_ = "folder to write (created)"
    parser.add_argument(
        "--out", type=Path, required=True, default=argparse.SUPPRESS, metavar="DIR", help=help_
    )


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m gram_scale.data.synth",
        description="Write a synthetic data set whose only learnable signal is in the item text.",
    )
    sub = parser.add_subparsers(dest="kind", required=True, parser_class=_Parser)
    defaults = argparse.ArgumentDefaultsHelpFormatter

    kt = sub.add_parser(
        "kt", help="knowledge tracing: items.csv + interactions.csv", formatter_class=defaults
    )
    _add_out(kt)
    kt.add_argument("--users", type=_count(1), default=200, help="students")
    kt.add_argument("--items", type=_count(1), default=300, help="catalogue items")
    kt.add_argument("--mean-len", type=_count(1), default=50, help="mean answers per student")
    kt.add_argument("--unused-items", type=_count(0), default=10, help="items never answered")
    kt.add_argument("--zipf", type=_non_negative_float, default=1.0, help="popularity exponent")
    kt.add_argument("--seed", type=int, default=0, help="random seed")

    news = sub.add_parser(
        "news", help="MIND-style news: train/ and dev/ folders", formatter_class=defaults
    )
    _add_out(news)
    news.add_argument("--users", type=_count(1), default=200, help="users")
    news.add_argument("--news", type=_count(1), default=400, help="news items in all")
    news.add_argument(
        "--impressions-per-user", type=_count(1), default=3, help="impressions per user"
    )
    news.add_argument("--candidates", type=_count(1), default=5, help="candidates per impression")
    news.add_argument("--history-len", type=_count(0), default=20, help="clicked history per user")
    news.add_argument("--dev-only-news", type=_count(0), default=20, help="news only in dev")
    news.add_argument("--zipf", type=_non_negative_float, default=1.0, help="popularity exponent")
    news.add_argument("--seed", type=int, default=0, help="random seed")
    news.add_argument("--days", type=_count(2), default=5, help="days the impressions span")
    news.add_argument("--dev-days", type=_count(1), default=1, help="last days held out as dev")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command line entry: ``python -m gram_scale.data.synth {kt,news} --out DIR [...]``."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.kind == "kt":
            write_kt(
                args.out,
                n_users=args.users,
                n_items=args.items,
                mean_len=args.mean_len,
                n_unused_items=args.unused_items,
                zipf=args.zipf,
                seed=args.seed,
            )
        else:
            write_mind(
                args.out,
                n_users=args.users,
                n_news=args.news,
                impressions_per_user=args.impressions_per_user,
                n_candidates=args.candidates,
                history_len=args.history_len,
                n_dev_only_news=args.dev_only_news,
                zipf=args.zipf,
                seed=args.seed,
                days=args.days,
                dev_days=args.dev_days,
            )
    except ValueError as e:
        parser.error(str(e))
    except OSError as e:
        parser.exit(
            EXIT_INPUT_ERROR, f"{parser.prog}: error: cannot write {args.out}: {e.strerror or e}\n"
        )
    print(f"wrote {args.kind} data to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
