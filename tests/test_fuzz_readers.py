"""Damaged files: every load either succeeds or raises InputError as ``path:line: problem``.

A seeded mutator damages one good generated file at a time (the other files stay intact) and
the reader must never raise anything else, print a traceback, or hang.
"""

from __future__ import annotations

import random
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from gram_scale.data import synth
from gram_scale.data.kt import load_kt
from gram_scale.data.mind import load_mind
from gram_scale.errors import InputError

VARIANTS = 520
HUGE = b"x" * 1_000_000  # past the csv module's 131072-character field limit
JUNK_BYTES = [b"\x00", b"\xff", b"\xc3\x28", b"\xe2\x82", b"\xed\xa0\x80", b"\x80", b"\xef\xbb\xbf"]
JUNK_VALUES = [b"", b" ", b"2", b"-1", b"abc", b"1.5", b"nan", b'"', b"q", b"x-y", b"N1-", b"\r"]


def lines_of(data: bytes) -> list[bytes]:
    return data.splitlines(keepends=True) or [b""]


def mutate_once(data: bytes, rng: random.Random, sep: bytes) -> tuple[str, bytes]:
    """One random damage: (its name, the damaged bytes)."""
    lines = lines_of(data)
    i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
    kind = rng.choice(
        [
            "truncate",
            "delete_line",
            "duplicate_line",
            "swap_lines",
            "random_bytes",
            "junk_byte",
            "huge_field",
            "empty",
            "duplicate_id",
            "delimiter",
            "field_value",
            "quote",
            "crlf",
        ]
    )
    if kind == "truncate":
        return kind, data[: rng.randrange(len(data) + 1)]
    if kind == "delete_line":
        del lines[i]
    elif kind == "duplicate_line":
        lines.insert(j, lines[i])
    elif kind == "swap_lines":
        lines[i], lines[j] = lines[j], lines[i]
    elif kind in ("random_bytes", "junk_byte"):
        pos = rng.randrange(len(data) + 1)
        junk = (
            rng.randbytes(rng.randint(1, 8)) if kind == "random_bytes" else rng.choice(JUNK_BYTES)
        )
        return kind, data[:pos] + junk + data[pos:]
    elif kind == "empty":
        return kind, b""
    elif kind in ("huge_field", "duplicate_id", "field_value"):
        fields = lines[i].rstrip(b"\r\n").split(sep)
        k = rng.randrange(len(fields))
        if kind == "huge_field":
            fields[k] = HUGE
        elif kind == "duplicate_id":
            fields[0] = lines[j].split(sep)[0].rstrip(b"\r\n")
        else:
            fields[k] = rng.choice(JUNK_VALUES)
        lines[i] = sep.join(fields) + b"\n"
    elif kind == "delimiter":
        other = rng.choice([b",", b";", b"\t", b"|", b" "])
        if rng.random() < 0.5:
            lines[i] = lines[i].replace(sep, other)
        else:
            lines = [line.replace(sep, other) for line in lines]
    elif kind == "quote":
        pos = rng.randrange(len(lines[i]) + 1)
        lines[i] = lines[i][:pos] + b'"' + lines[i][pos:]
    elif kind == "crlf":
        lines = [line.replace(b"\n", b"\r\n") if rng.random() < 0.5 else line for line in lines]
    return kind, b"".join(lines)


def mutate(data: bytes, rng: random.Random, sep: bytes) -> tuple[list[str], bytes]:
    """One to three damages in a row."""
    kinds = []
    for _ in range(rng.choice([1, 1, 2, 3])):
        kind, data = mutate_once(data, rng, sep)
        kinds.append(kind)
    return kinds, data


def is_undecodable(data: bytes) -> bool:
    if b"\x00" in data:
        return True
    try:
        data.removeprefix(b"\xef\xbb\xbf").decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def check_kt(data) -> None:
    n = len(data.catalogue)
    for items, correct in data.train + data.valid + data.test:
        assert items.dtype == torch.long and len(items) == len(correct) > 0
        assert 0 <= items.min() and items.max() < n and set(correct.tolist()) <= {0, 1}
    assert data.cold_items.shape == (n,)


def check_mind(data) -> None:
    n = len(data.catalogue)
    for imp in data.train + data.valid + data.test:
        assert len(imp.candidates) == len(imp.labels) > 0
        assert imp.candidates.max() < n and set(imp.labels.tolist()) <= {0, 1}
        assert len(imp.history) == 0 or imp.history.max() < n
    assert all(text.strip() for text in data.catalogue.texts)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("good")
    return {
        "kt": synth.write_kt(root / "kt", n_users=5, n_items=30, mean_len=6, n_unused_items=3),
        "mind": synth.write_mind(
            root / "mind",
            n_users=10,
            n_news=30,
            impressions_per_user=3,
            n_candidates=4,
            history_len=5,
            n_dev_only_news=4,
        ),
    }


# (data set, damaged file(s): variants alternate between them, separator, loader, checker)
CASES = {
    "kt-items": ("kt", ["items.csv"], b",", load_kt, check_kt),
    "kt-interactions": ("kt", ["interactions.csv"], b",", load_kt, check_kt),
    "mind-news": ("mind", ["train/news.tsv", "dev/news.tsv"], b"\t", load_mind, check_mind),
    "mind-behaviors": (
        "mind",
        ["train/behaviors.tsv", "dev/behaviors.tsv"],
        b"\t",
        load_mind,
        check_mind,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_files_load_or_raise_input_error(tmp_path, good, case):
    dataset, targets, sep, load, check = CASES[case]
    work = tmp_path / dataset
    shutil.copytree(good[dataset], work)
    all_files = {str(p): p.read_bytes() for p in work.rglob("*") if p.is_file()}
    rng = random.Random(f"fuzz-{case}")
    outcomes: Counter[str] = Counter()
    slowest = 0.0
    for variant in range(VARIANTS):
        target = work / targets[variant % len(targets)]
        original = all_files[str(target)]
        kinds, damaged = mutate(original, rng, sep)
        target.write_bytes(damaged)
        start = time.perf_counter()
        try:
            check(load(work))
            outcomes["loaded"] += 1
        except InputError as e:
            outcomes["input_error"] += 1
            message = str(e)
            context = f"variant {variant} {kinds}: {message[:200]}"
            assert e.where in all_files, context
            assert re.match(rf"{re.escape(e.where)}(:\d+)?: \S", message), context
            assert "\n" not in message and len(e.problem) < 120, context
            n_lines = len(lines_of(target.read_bytes() if e.where == str(target) else b""))
            if e.line is not None and e.where == str(target):
                assert 1 <= e.line <= max(n_lines, 1), context
            if is_undecodable(damaged):
                assert e.where == str(target), context
        finally:
            target.write_bytes(original)
        slowest = max(slowest, time.perf_counter() - start)
    # Both outcomes happen, or the mutator is too gentle / the reader too strict to mean much.
    assert outcomes["input_error"] > VARIANTS // 2 and outcomes["loaded"] > 0, outcomes
    assert slowest < 2.0


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gram_scale.data.synth", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=Path(__file__).resolve().parents[1],
    )


def test_cli_writes_data_and_rejects_bad_flags_in_one_line(tmp_path):
    out = tmp_path / "kt"
    done = run_cli("kt", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert len(load_kt(out).catalogue) == 300

    bad = run_cli("kt", "--out", str(tmp_path / "bad"), "--users", "-3")
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    assert "--users" in bad.stderr and "'-3'" in bad.stderr
    assert not (tmp_path / "bad").exists()

    helped = run_cli("news", "--help")
    assert helped.returncode == 0 and "(default: 400)" in helped.stdout

    clash = run_cli("news", "--out", str(tmp_path / "clash"), "--days", "3", "--dev-days", "3")
    assert clash.returncode == 2 and clash.stderr.count("\n") == 1, clash.stderr
    assert "dev_days < days" in clash.stderr and "Traceback" not in clash.stderr
    assert not (tmp_path / "clash").exists()
