"""Streaming readers for user data files: every problem becomes an InputError with file and line."""

from __future__ import annotations

import codecs
import csv
import io
import os
from array import array
from collections.abc import Iterator
from operator import itemgetter
from pathlib import Path

import torch

from gram_scale.errors import InputError

MAX_FIELD_CHARS = csv.field_size_limit()
"""Longest field accepted; the csv module's default, applied to TSV files too for the same rule."""

MAX_LINE_CHARS = 1 << 24
"""A longer physical line is damage, not data; the cap keeps a newline-free file from filling RAM."""


def _open(path: str | os.PathLike) -> io.BufferedReader:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise InputError(path, None, "file not found") from None
    except IsADirectoryError:
        raise InputError(path, None, "is a directory, not a file") from None
    except OSError as e:
        raise InputError(path, None, f"cannot open: {e.strerror or e}") from None


def _first_bad_utf8(path: str | os.PathLike) -> InputError:
    """Locate the first invalid UTF-8 byte: the text decoder works ahead in blocks, so rescan."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    number, column = 1, 0  # column: bytes of the current line before this piece
    with _open(path) as f:
        for piece in iter(lambda: f.readline(1 << 16), b""):
            try:
                decoder.decode(piece)
            except UnicodeDecodeError as e:
                held = len(e.object) - len(piece)  # start of a character cut off the last piece
                where = f"byte 0x{e.object[e.start]:02x} at column {column + e.start - held + 1}"
                return InputError(path, number, f"not valid UTF-8 ({where})")
            if piece.endswith(b"\n"):
                number, column = number + 1, 0
            else:
                column += len(piece)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return InputError(path, number, "not valid UTF-8 (file ends inside a character)")
    return InputError(path, None, "not valid UTF-8")


def iter_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, text)`` for each physical (newline-ended) line of a UTF-8 file."""
    with _open(path) as raw:
        # Block decoding in C is ~3x faster than decoding line by line; "utf-8-sig" drops a BOM
        # and newline="\n" keeps line numbers those of an editor (a bare \r ends no line).
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="strict", newline="\n")
        number = 0
        while True:
            try:
                line = text.readline(MAX_LINE_CHARS + 1)
            except UnicodeDecodeError:
                raise _first_bad_utf8(path) from None
            if not line:
                return
            number += 1
            if len(line) > MAX_LINE_CHARS:
                raise InputError(path, number, f"line longer than {MAX_LINE_CHARS} characters")
            if "\0" in line:
                raise InputError(path, number, f"NUL byte at column {line.index(chr(0)) + 1}")
            yield number, line


def _csv_problem(error: csv.Error) -> str:
    message = str(error)
    if "field larger than field limit" in message:
        return f"field longer than {MAX_FIELD_CHARS} characters"
    if "unexpected end of data" in message:
        return "unterminated quoted field"
    if "expected after" in message:
        return "text after a closing quote (quote the whole field)"
    if "new-line character seen" in message:
        return "carriage return inside an unquoted field"
    return f"bad CSV: {message}"


def iter_csv(path: str | os.PathLike) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(first_line_number, fields)`` for each non-blank CSV record, header included."""
    reader = csv.reader(map(itemgetter(1), iter_lines(path)), strict=True)
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            problem = _csv_problem(e)
            # An open quote runs to the end of the file, so its start is the useful line.
            line = start if problem == "unterminated quoted field" else max(reader.line_num, 1)
            raise InputError(path, line, problem) from None
        if len(row) > 1 or (row and row[0].strip()):  # skip blank lines
            yield start, row


def iter_tsv(path: str | os.PathLike, n_fields: int) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(line_number, fields)`` for each non-blank line, which must have ``n_fields`` fields."""
    for number, text in iter_lines(path):
        text = text.removesuffix("\n").removesuffix("\r")
        if not text.strip():
            continue
        fields = text.split("\t")
        if len(fields) != n_fields:
            raise InputError(
                path, number, f"expected {n_fields} tab-separated fields, got {len(fields)}"
            )
        for i, value in enumerate(fields):
            if len(value) > MAX_FIELD_CHARS:
                raise InputError(
                    path, number, f"field {i + 1} longer than {MAX_FIELD_CHARS} characters"
                )
        yield number, fields


class CsvTable:
    """A CSV file read by header names: required and optional columns, rows checked for width."""

    def __init__(
        self, path: str | os.PathLike, required: tuple[str, ...], optional: tuple[str, ...] = ()
    ) -> None:
        self.path = Path(path)
        self._rows = iter_csv(self.path)
        try:
            self.header_line, header = next(self._rows)
        except StopIteration:
            raise InputError(self.path, 1, "empty file (no header)") from None
        names = [name.strip() for name in header]
        self.width = len(names)
        self.columns: dict[str, int] = {}
        for name in [*required, *optional]:
            hits = [i for i, n in enumerate(names) if n == name]
            if len(hits) > 1:
                raise InputError(self.path, self.header_line, f"duplicate column '{name}'")
            if hits:
                self.columns[name] = hits[0]
            elif name in required:
                raise InputError(self.path, self.header_line, f"missing column '{name}'")

    def __iter__(self) -> Iterator[tuple[int, list[str]]]:
        """Yield ``(line_number, fields)`` for each data row; errors if the file has none."""
        empty = True
        for number, row in self._rows:
            if len(row) != self.width:
                raise InputError(self.path, number, f"expected {self.width} fields, got {len(row)}")
            empty = False
            yield number, row
        if empty:
            raise InputError(self.path, self.header_line, "no rows after the header")


def zero_one(path: Path, line: int, name: str, value: str) -> int:
    """Parse a 0/1 flag, or raise an InputError naming the column."""
    value = value.strip()
    if value == "0":
        return 0
    if value == "1":
        return 1
    raise InputError(path, line, f"{name} must be 0 or 1, got {quote(value)}")


def quote(value: str, limit: int = 40) -> str:
    """A value for an error message: repr-quoted, cut short so the message stays one short line."""
    if len(value) > limit:
        value = value[:limit] + "..."
    return repr(value)


def long_tensor(values: array) -> torch.Tensor:
    """An int64 tensor copied from a typed array in one C copy (torch.tensor loops in Python)."""
    if not values:
        return torch.zeros(0, dtype=torch.long)
    return torch.frombuffer(values, dtype=_DTYPES[values.typecode]).to(torch.long, copy=True)


_DTYPES = {"b": torch.int8, "q": torch.int64}
