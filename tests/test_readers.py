"""KT and MIND readers on small hand-written files: good data, then each kind of bad input."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from gram_scale.data import _io
from gram_scale.data.kt import load_kt, split_sizes
from gram_scale.data.mind import load_mind
from gram_scale.errors import InputError

ITEMS = """item_id,text
q1,add two and three
q2,"divide, then round"
q3,find the slope
q4,solve the integral
q5,never answered
"""


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def kt_folder(tmp_path: Path, interactions: str, items: str = ITEMS) -> Path:
    write(tmp_path / "items.csv", items)
    write(tmp_path / "interactions.csv", interactions)
    return tmp_path


def as_lists(seq: tuple[torch.Tensor, torch.Tensor]) -> tuple[list[int], list[int]]:
    assert seq[0].dtype == torch.long and seq[1].dtype == torch.long
    return seq[0].tolist(), seq[1].tolist()


# ---------------------------------------------------------------- KT, good files


def test_kt_orders_each_user_by_timestamp_with_stable_ties(tmp_path):
    folder = kt_folder(
        tmp_path,
        "user_id,item_id,correct,timestamp\n"
        "a,q1,1,30\n"
        "b,q2,0,5\n"
        "a,q2,0,10\n"
        "a,q3,1,30\n"  # ties with the first row: file order must win
        "b,q1,1,1.5\n"
        "a,q4,0,20\n",
    )
    data = load_kt(folder, valid_frac=0, test_frac=0, cold_frac=0)
    assert data.catalogue.ids == ["q1", "q2", "q3", "q4", "q5"]
    assert data.catalogue.texts[1] == "divide, then round"
    assert [as_lists(s) for s in data.train] == [
        ([1, 3, 0, 2], [0, 0, 1, 1]),  # a: t=10, 20, 30, 30
        ([0, 1], [1, 0]),  # b: t=1.5, 5
    ]
    assert data.valid == [] and data.test == []
    assert data.cold_items.tolist() == [False, False, False, False, True]


def test_kt_without_timestamp_keeps_file_order_and_reads_columns_by_header(tmp_path):
    items = '\ufeffextra,text,item_id\nx,"two\nlines",q1\ny,  spaced text ,q2\n'
    folder = kt_folder(
        tmp_path,
        "correct,item_id,note,user_id\n1,q2,hi,u\n0,q1,,u\n1,q2,,v\n",
        items=items,
    )
    data = load_kt(folder, valid_frac=0, test_frac=0, cold_frac=0)
    assert data.catalogue.ids == ["q1", "q2"]
    assert data.catalogue.texts == ["two\nlines", "spaced text"]
    assert [as_lists(s) for s in data.train] == [([1, 0], [1, 0]), ([1], [1])]


TWENTY_USERS_ITEMS = [0, 1, 2, 3, 0]  # rows of q1 q2 q3 q4 q1


def twenty_users(tmp_path: Path) -> Path:
    # User i answers q1 q2 q3 q4 q1, correct by the bits of i, so each sequence names its user.
    rows = ["user_id,item_id,correct,timestamp"]
    for user in range(20):
        for step, item in enumerate(TWENTY_USERS_ITEMS):
            rows.append(f"u{user},q{item + 1},{(user >> step) & 1},{step}")
    return kt_folder(tmp_path, "\n".join(rows) + "\n")


def user_of(seq: tuple[torch.Tensor, torch.Tensor]) -> int:
    return sum(bit << step for step, bit in enumerate(seq[1].tolist()))


def test_kt_split_is_a_seeded_partition_of_users(tmp_path):
    folder = twenty_users(tmp_path)
    data = load_kt(folder, seed=3, valid_frac=0.2, test_frac=0.1, cold_frac=0)
    train, valid, test = (
        {user_of(s) for s in part} for part in (data.train, data.valid, data.test)
    )
    assert (len(train), len(valid), len(test)) == (14, 4, 2)
    assert train | valid | test == set(range(20))
    assert len(data.train) + len(data.valid) + len(data.test) == 20

    again = load_kt(folder, seed=3, valid_frac=0.2, test_frac=0.1, cold_frac=0)
    assert [user_of(s) for s in again.valid] == [user_of(s) for s in data.valid]
    other = load_kt(folder, seed=4, valid_frac=0.2, test_frac=0.1, cold_frac=0)
    assert {user_of(s) for s in other.valid} != valid


def test_kt_cold_items_leave_train_only(tmp_path):
    folder = twenty_users(tmp_path)
    data = load_kt(folder, seed=1, valid_frac=0.2, test_frac=0.2, cold_frac=0.5)
    # 4 of the 5 items occur, so round(0.5 * 4) = 2 are cold, plus q5 which nobody answered.
    cold = data.cold_items
    assert cold.dtype == torch.bool and cold.sum() == 3 and cold[4]
    for items, flags in data.train:
        assert items.tolist() == [i for i in TWENTY_USERS_ITEMS if not cold[i]]
        assert len(flags) == len(items)
    in_train = torch.cat([items for items, _ in data.train]).unique()
    assert sorted(in_train.tolist()) == (~cold).nonzero().flatten().tolist()
    # Held-out users keep every interaction, cold items included.
    for items, _ in data.valid + data.test:
        assert items.tolist() == TWENTY_USERS_ITEMS
    # The same cold items for every split fraction: drawn after the user shuffle.
    other = load_kt(folder, seed=1, valid_frac=0.2, test_frac=0.2, cold_frac=0.25)
    assert {user_of(s) for s in other.valid} == {user_of(s) for s in data.valid}


def test_kt_drops_train_users_left_empty_by_cold_start(tmp_path):
    rows = "user_id,item_id,correct\n" + "".join(f"u{i},q{1 + i % 4},1\n" for i in range(8))
    folder = kt_folder(tmp_path, rows)
    data = load_kt(folder, seed=0, valid_frac=0, test_frac=0, cold_frac=0.25)
    cold_item = [i for i in range(4) if data.cold_items[i]]
    assert len(cold_item) == 1 and data.cold_items[4]
    assert len(data.train) == 6  # the two users who only answered the cold item are gone


@pytest.mark.parametrize("n_users", [1, 2, 3])
def test_kt_tiny_data_keeps_a_train_user(tmp_path, n_users):
    rows = "user_id,item_id,correct\n" + "".join(f"u{i},q1,1\n" for i in range(n_users))
    data = load_kt(kt_folder(tmp_path, rows), valid_frac=0.45, test_frac=0.45, cold_frac=0)
    assert len(data.train) >= 1
    assert len(data.train) + len(data.valid) + len(data.test) == n_users


def test_split_sizes_rounding():
    assert split_sizes(10, 0.1, 0.1) == (1, 1)
    assert split_sizes(1, 0.1, 0.1) == (0, 0)
    assert split_sizes(2, 0.4, 0.4) == (1, 0)
    assert split_sizes(1000, 0.1, 0.05) == (100, 50)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"valid_frac": 1.0}, "valid_frac must be in [0, 1)"),
        ({"test_frac": -0.1}, "test_frac must be in [0, 1)"),
        ({"valid_frac": 0.5, "test_frac": 0.5}, "valid_frac + test_frac must be below 1"),
        ({"cold_frac": 1.0}, "cold_frac must be in [0, 1)"),
    ],
)
def test_kt_bad_fractions(tmp_path, kwargs, message):
    folder = kt_folder(tmp_path, "user_id,item_id,correct\nu,q1,1\n")
    with pytest.raises(InputError, match=re.escape(message)):
        load_kt(folder, **kwargs)


# ---------------------------------------------------------------- KT, bad files

GOOD_INTERACTIONS = "user_id,item_id,correct,timestamp\nu1,q1,1,1\nu1,q2,0,2\nu2,q1,1,3\n"

KT_BAD = [
    # (file, content, expected location, expected problem)
    ("items.csv", "", "items.csv:1:", "empty file"),
    ("items.csv", "item_id,text\n", "items.csv:1:", "no rows"),
    ("items.csv", "item_id,body\nq1,x\n", "items.csv:1:", "missing column 'text'"),
    ("items.csv", "item_id,text,text\nq1,a,b\n", "items.csv:1:", "duplicate column 'text'"),
    ("items.csv", "item_id,text\nq1,a\nq2,b,c\n", "items.csv:3:", "expected 2 fields, got 3"),
    ("items.csv", "item_id,text\nq1,a\nq2, \n", "items.csv:3:", "empty text for item 'q2'"),
    ("items.csv", "item_id,text\nq1,a\n,b\n", "items.csv:3:", "empty item id"),
    ("items.csv", "item_id,text\nq1,a\nq2,b\nq1,c\n", "items.csv:4:", "duplicate item id 'q1'"),
    ("items.csv", b"item_id,text\nq1,a\nq2,caf\xe9\n", "items.csv:3:", "not valid UTF-8"),
    ("items.csv", b"item_id,text\nq1,a\x00b\n", "items.csv:2:", "NUL byte"),
    ("items.csv", "item_id,text\nq1,a\nq2," + "x" * 200_000 + "\n", "items.csv:3:", "field longer"),
    ("items.csv", 'item_id,text\nq1,a\nq2,"open\nq3,c\n', "items.csv:3:", "unterminated quoted"),
    ("items.csv", 'item_id,text\nq1,"a"b\n', "items.csv:2:", "text after a closing quote"),
    ("interactions.csv", "", "interactions.csv:1:", "empty file"),
    ("interactions.csv", "user_id,item_id,correct\n\n", "interactions.csv:1:", "no rows"),
    (
        "interactions.csv",
        "user_id,item_id,timestamp\nu1,q1,1\n",
        "interactions.csv:1:",
        "missing column 'correct'",
    ),
    (
        "interactions.csv",
        "user_id,item_id,correct\nu1,q1,1\nu1,q2\n",
        "interactions.csv:3:",
        "expected 3 fields, got 2",
    ),
    (
        "interactions.csv",
        "user_id,item_id,correct\nu1,q1,1\nu1,q2,0\nu2,q17,1\n",
        "interactions.csv:4:",
        "unknown item id 'q17'",
    ),
    (
        "interactions.csv",
        "user_id,item_id,correct\nu1,q1,1\nu1,q2,0\nu2,q1,2\n",
        "interactions.csv:4:",
        "correct must be 0 or 1, got '2'",
    ),
    (
        "interactions.csv",
        "user_id,item_id,correct,timestamp\nu1,q1,1,5\nu1,q2,0,soon\n",
        "interactions.csv:3:",
        "timestamp must be a number, got 'soon'",
    ),
    (
        "interactions.csv",
        "user_id,item_id,correct,timestamp\nu1,q1,1,nan\n",
        "interactions.csv:2:",
        "timestamp must be a number",
    ),
    (
        "interactions.csv",
        "user_id,item_id,correct\n,q1,1\n",
        "interactions.csv:2:",
        "empty user id",
    ),
    (
        "interactions.csv",
        b"user_id,item_id,correct\nu1,q1,1\n\xff\xfe,q1,1\n",
        "interactions.csv:3:",
        "not valid UTF-8 (byte 0xff at column 1)",
    ),
    (
        "interactions.csv",
        b"user_id,item_id,correct\nu1,q1\x00,1\n",
        "interactions.csv:2:",
        "NUL byte at column 6",
    ),
    (
        "interactions.csv",
        "user_id,item_id,correct\nu1,q1,1\nu1,q2,1\n" + "u" * 1_000_000 + ",q1,1\n",
        "interactions.csv:4:",
        "field longer than 131072 characters",
    ),
]


@pytest.mark.parametrize(("name", "content", "where", "problem"), KT_BAD)
def test_kt_bad_input(tmp_path, name, content, where, problem):
    kt_folder(tmp_path, GOOD_INTERACTIONS)
    write(tmp_path / name, content)
    with pytest.raises(InputError) as caught:
        load_kt(tmp_path)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / name}:")
    assert where in message and problem in message
    assert "\n" not in message and len(message) < len(str(tmp_path)) + 120


@pytest.mark.parametrize("name", ["items.csv", "interactions.csv"])
def test_kt_missing_file(tmp_path, name):
    kt_folder(tmp_path, GOOD_INTERACTIONS)
    (tmp_path / name).unlink()
    with pytest.raises(InputError) as caught:
        load_kt(tmp_path)
    assert caught.value.line is None
    assert str(caught.value) == f"{tmp_path / name}: file not found"


def test_kt_messages_stay_on_one_line(tmp_path):
    kt_folder(tmp_path, 'user_id,item_id,correct\nu1,"q1\nq2",1\n')
    with pytest.raises(InputError, match=r"interactions.csv:2: unknown item id 'q1\\nq2'$"):
        load_kt(tmp_path)


def test_overlong_line_is_refused_without_reading_it_all(tmp_path, monkeypatch):
    monkeypatch.setattr(_io, "MAX_LINE_CHARS", 1000)
    kt_folder(tmp_path, "user_id,item_id,correct\nu1,q1,1\n" + "u" * 5000)
    with pytest.raises(InputError, match=r"interactions.csv:3: line longer than 1000 characters"):
        load_kt(tmp_path)


# ---------------------------------------------------------------- MIND, good files


def news_line(news_id: str, title: str, abstract: str = "") -> str:
    return f"{news_id}\tsports\tsoccer\t{title}\t{abstract}\thttps://x/{news_id}\t[]\t[]\n"


TRAIN_NEWS = news_line("N1", "team wins", "a late goal") + news_line("N2", "storm nears")
DEV_NEWS = news_line("N3", "rates rise", "banks react") + news_line("N1", "team wins", "other")
TRAIN_BEHAVIORS = (
    "1\tU1\t11/11/2019 9:05:58 AM\tN2 N1\tN1-1 N2-0\n2\tU2\t11/11/2019 9:06:00 AM\t\tN2-1\n"
)
# Dev impression i shows N3 N1 N2 clicked by the low 3 bits of i (a news is never both clicked
# and not), and its history repeats one news 1 + i // 8 times, so labels and history name it.
DEV_BEHAVIORS = "".join(
    f"{i}\tU{i}\t11/15/2019 9:00:00 AM\t"
    + " ".join([f"N{1 + i % 2}"] * (1 + i // 8))
    + "\t"
    + " ".join(f"{n}-{(i >> b) & 1}" for b, n in enumerate(["N3", "N1", "N2"]))
    + "\n"
    for i in range(1, 11)
)


def dev_number(impression) -> int:
    bits = sum(bit << b for b, bit in enumerate(impression.labels.tolist()))
    return bits + 8 * (len(impression.history) - 1)


def mind_folder(tmp_path: Path, files: dict[str, str | bytes] | None = None) -> Path:
    contents = {
        "train/news.tsv": TRAIN_NEWS,
        "dev/news.tsv": DEV_NEWS,
        "train/behaviors.tsv": TRAIN_BEHAVIORS,
        "dev/behaviors.tsv": DEV_BEHAVIORS,
    }
    contents.update(files or {})
    for name, content in contents.items():
        write(tmp_path / name, content)
    return tmp_path


def test_mind_catalogue_impressions_and_cold_items(tmp_path):
    data = load_mind(mind_folder(tmp_path))
    assert data.catalogue.ids == ["N1", "N2", "N3"]  # union, first occurrence order
    assert data.catalogue.texts == ["team wins", "storm nears", "rates rise"]
    first, second = data.train
    assert first.history.tolist() == [1, 0]  # oldest first, as in the file
    assert first.candidates.tolist() == [0, 1] and first.labels.tolist() == [1, 0]
    assert second.history.dtype == torch.long and second.history.numel() == 0
    assert second.candidates.tolist() == [1] and second.labels.tolist() == [1]
    assert data.cold_items.tolist() == [False, False, True]  # N3 only in dev


def test_mind_use_abstract(tmp_path):
    data = load_mind(mind_folder(tmp_path), use_abstract=True)
    # N1 keeps its train-file text; N2 has no abstract, so just the title.
    assert data.catalogue.texts == [
        "team wins. a late goal",
        "storm nears",
        "rates rise. banks react",
    ]


def test_mind_dev_split_in_seeded_halves(tmp_path):
    folder = mind_folder(tmp_path)
    data = load_mind(folder, seed=5)
    valid = [dev_number(imp) for imp in data.valid]
    test = [dev_number(imp) for imp in data.test]
    assert len(valid) == 5 and len(test) == 5
    assert sorted(valid + test) == list(range(1, 11))
    assert valid == sorted(valid) and test == sorted(test)  # file order kept within a split
    assert [dev_number(imp) for imp in load_mind(folder, seed=5).valid] == valid
    splits = {tuple(dev_number(imp) for imp in load_mind(folder, seed=s).valid) for s in range(6)}
    assert len(splits) > 1


def test_mind_test_folder_gives_valid_dev_and_test_test(tmp_path):
    folder = mind_folder(
        tmp_path,
        {
            "test/news.tsv": news_line("N9", "new phone"),
            "test/behaviors.tsv": "1\tU1\t11/16/2019 1:00:00 PM\tN1\tN9-1 N3-0\n",
        },
    )
    data = load_mind(folder)
    assert data.catalogue.ids == ["N1", "N2", "N3", "N9"]
    assert len(data.valid) == 10 and len(data.test) == 1
    assert data.test[0].candidates.tolist() == [3, 2]
    assert data.cold_items.tolist() == [False, False, True, True]


MIND_BAD = [
    # (file, content, expected location, expected problem)
    ("train/news.tsv", "", "train/news.tsv:1:", "empty file"),
    ("train/news.tsv", "N1\tsports\tteam\n", "train/news.tsv:1:", "expected 8 tab-separated"),
    (
        "train/news.tsv",
        news_line("N1", "a") + news_line("N2", " "),
        "train/news.tsv:2:",
        "empty title for news 'N2'",
    ),
    (
        "dev/news.tsv",
        news_line("N3", "a") + news_line("N4", "b") + news_line("N3", "c"),
        "dev/news.tsv:3:",
        "duplicate news id 'N3' (first on line 1)",
    ),
    ("dev/news.tsv", news_line("", "a"), "dev/news.tsv:1:", "empty news id"),
    (
        "train/news.tsv",
        news_line("N1", "a").encode() + b"N2\tx\tx\t\xc3\x28\t\t\t\t\n",
        "train/news.tsv:2:",
        "not valid UTF-8",
    ),
    (
        "train/news.tsv",
        news_line("N1", "a") + news_line("N2", "t" * 200_000),
        "train/news.tsv:2:",
        "field 4 longer than 131072 characters",
    ),
    ("train/behaviors.tsv", "", "train/behaviors.tsv:1:", "empty file"),
    ("train/behaviors.tsv", "1\tU1\tt\tN1\n", "train/behaviors.tsv:1:", "expected 5 tab-separated"),
    (
        "train/behaviors.tsv",
        "1\tU1\tt\tN1\tN1-1\n2\tU2\tt\tN1\tN2\n",
        "train/behaviors.tsv:2:",
        "bad impression 'N2' (expected newsid-label)",
    ),
    (
        "train/behaviors.tsv",
        "1\tU1\tt\tN1\tN1-1 -1\n",
        "train/behaviors.tsv:1:",
        "bad impression '-1'",
    ),
    (
        "dev/behaviors.tsv",
        "1\tU1\tt\tN1\tN1-1\n2\tU2\tt\tN1\tN1-0 N2-2\n",
        "dev/behaviors.tsv:2:",
        "label must be 0 or 1, got '2'",
    ),
    (
        "dev/behaviors.tsv",
        "1\tU1\tt\tN1 N7\tN1-1\n",
        "dev/behaviors.tsv:1:",
        "unknown news id 'N7' in history",
    ),
    (
        "train/behaviors.tsv",
        "1\tU1\tt\t\tN1-1\n\n3\tU1\tt\t\tN8-1\n",
        "train/behaviors.tsv:3:",
        "unknown news id 'N8' in impressions",
    ),
    ("train/behaviors.tsv", "1\tU1\tt\tN1\t \n", "train/behaviors.tsv:1:", "no impressions"),
    (
        "dev/behaviors.tsv",
        "1\tU1\tt\tN1\tN1-1 N2-0 N1-1\n2\tU2\tt\t\tN2-1 N1-0 N2-0\n",
        "dev/behaviors.tsv:2:",
        "news 'N2' is both clicked and not clicked in this impression",
    ),
    (
        "dev/behaviors.tsv",
        b"1\tU1\tt\tN1\tN1-1\n2\tU1\tt\tN1\x00\tN1-1\n",
        "dev/behaviors.tsv:2:",
        "NUL byte",
    ),
    (
        "dev/behaviors.tsv",
        "1\tU1\tt\t" + "N1 " * 100_000 + "\tN1-1\n",
        "dev/behaviors.tsv:1:",
        "field 4 longer than",
    ),
]


@pytest.mark.parametrize(("name", "content", "where", "problem"), MIND_BAD)
def test_mind_bad_input(tmp_path, name, content, where, problem):
    mind_folder(tmp_path)
    write(tmp_path / name, content)
    with pytest.raises(InputError) as caught:
        load_mind(tmp_path)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / name}:")
    assert where in message and problem in message
    assert "\n" not in message and len(message) < len(str(tmp_path)) + 120


@pytest.mark.parametrize(
    "name", ["train/news.tsv", "dev/news.tsv", "train/behaviors.tsv", "dev/behaviors.tsv"]
)
def test_mind_missing_file(tmp_path, name):
    mind_folder(tmp_path)
    (tmp_path / name).unlink()
    with pytest.raises(InputError) as caught:
        load_mind(tmp_path)
    assert str(caught.value) == f"{tmp_path / name}: file not found"


def test_mind_crlf_and_bom_are_fine(tmp_path):
    folder = mind_folder(
        tmp_path,
        {
            "train/news.tsv": ("\ufeff" + TRAIN_NEWS).replace("\n", "\r\n"),
            "train/behaviors.tsv": TRAIN_BEHAVIORS.replace("\n", "\r\n"),
        },
    )
    data = load_mind(folder)
    assert data.catalogue.ids == ["N1", "N2", "N3"]
    assert data.train[0].labels.tolist() == [1, 0]


def test_bad_utf8_far_into_the_file_is_located_exactly(tmp_path):
    # The decoder reads ahead in blocks, so the reported line comes from a rescan that must
    # count lines and columns right, also across a multi-byte character cut between pieces.
    rows = "".join(f"u{i},q1,1\n" for i in range(3000))
    long_user = "x" + "é" * 40_000  # 80 kB, read in pieces that cut a 2-byte character
    data = ("user_id,item_id,correct\n" + rows).encode() + long_user.encode() + b"\xff,q1,1\n"
    kt_folder(tmp_path, "")
    write(tmp_path / "interactions.csv", data)
    with pytest.raises(InputError) as caught:
        load_kt(tmp_path)
    assert str(caught.value).endswith(
        "interactions.csv:3002: not valid UTF-8 (byte 0xff at column 80002)"
    )


def test_file_ending_inside_a_character(tmp_path):
    kt_folder(tmp_path, "")
    write(tmp_path / "interactions.csv", b"user_id,item_id,correct\nu1,q1,1\nu\xc3")
    with pytest.raises(InputError, match=r"interactions.csv:3: not valid UTF-8"):
        load_kt(tmp_path)


def test_directory_instead_of_file(tmp_path):
    kt_folder(tmp_path, GOOD_INTERACTIONS)
    (tmp_path / "items.csv").unlink()
    (tmp_path / "items.csv").mkdir()
    with pytest.raises(InputError, match=r"items.csv: is a directory, not a file$"):
        load_kt(tmp_path)
