"""How a source CSV is read, and checking it before anything is emptied.

**How.** One reader (Python's ``csv`` module, strict, UTF-8 with or without a byte-order mark,
any line ending) parses the file for the check and again for the load, which streams the
parsed rows to the server in a fixed, unambiguous form: the two cannot read the file
differently. The load also hashes the bytes it parses and refuses a file that is no longer
the one the check read. Where a file may be read from is ``source_location``'s business.

**What is refused.** A wrong *file*: missing or unexpected columns, no rows, a row with the
wrong number of fields, text that is not UTF-8 or not well-formed CSV, an unknown species, a
value too long to store, or a measurement column that is mostly not numbers (a shifted column
or a wrong delimiter). A few dirty values in otherwise good columns are a *row* problem: they
are loaded as they are and ``preprocess`` drops and counts those rows. A refusal names the file,
the data row (the row's ``source_row``) or line, and the column; it never quotes what the file
holds, only header names that look like column names, cut short, so no secret can leak through
an error message or a log.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import BinaryIO, NamedTuple

import pandas as pd

from penguins.contract import COLUMNS, LABEL, NA_MARKERS, NUMERIC_FEATURES, SPECIES
from penguins.source_location import Location, SourceError, open_beneath, shown

BATCH_ROWS = 1_000
"""Rows held at once: small batches keep the rows out of the garbage collector's older
generations, which made 10,000-row batches a third slower to read."""
MAX_VALUE_LENGTH = 64
"""The raw table's VARCHAR width: a longer value could not be stored as it is."""
MAX_RECORD_CHARS = 4096
"""A row of eight values of at most 64 characters, every one quoted with every character a
doubled quote, is about 1,050 characters: anything longer is refused before it is read further,
so a file of one huge line costs no more than a short one."""
MAX_NOT_A_NUMBER_SHARE = 0.05
"""Above this share of non-numbers among its present values, a measurement column is wrong."""
_NAME_LIKE = re.compile(r"[A-Za-z_][A-Za-z0-9_ ]*")
_SHOWN_NAME_CHARS = 32
_SHOWN_NAMES = 5


@dataclass(frozen=True)
class Source:
    """A checked source file, and what the load must find again to load exactly what was checked."""

    location: Location
    columns: tuple[str, ...]
    """The header, trimmed, in the file's own order."""
    rows: int
    sha256: str
    """Of the file's bytes as the check read them."""

    @property
    def path(self) -> Path:
        return self.location.path


def check_source(source: str | Path | Location) -> Source:
    """Check that ``source`` is a penguins CSV the loader can take as it is, or raise SourceError.

    A plain path is read from its own folder; the DAG passes ``locate(source_path)``.
    """
    location = source if isinstance(source, Location) else Location.of(source)
    where = shown(location.path)
    with open_rows(location) as reader:
        _check_header(where, reader.header)
        not_numbers = NotNumbers()
        for batch in reader.batches():
            if batch.may_hold_long:
                _refuse_too_long(where, reader.header, batch)
            _check_batch(where, reader.header, batch, not_numbers)
        if reader.rows == 0:
            raise SourceError(f"source {where}: the header has no data rows under it")
        not_numbers.check(where)
        return Source(location, reader.header, reader.rows, reader.sha256())


@contextmanager
def open_rows(location: Location) -> Iterator[SourceRows]:
    """The file at ``location``, opened without leaving its folder, as a SourceRows reader."""
    with os.fdopen(open_beneath(location), "rb", buffering=0) as binary:
        yield SourceRows(shown(location.path), binary)


class Batch(NamedTuple):
    """Consecutive rows of a source, as lists of field texts in the header's order."""

    first_row: int
    """The data row number (the ``source_row``) of the first."""
    rows: list[list[str]]
    may_hold_long: bool
    """False when no value in it can be longer than MAX_VALUE_LENGTH."""


class SourceRows:
    """The rows of a source file as the one CSV reader parses them, for the check and the load.

    Blank lines (empty, or only spaces) are skipped; every other row must have as many fields
    as the header.
    """

    def __init__(self, where: str, binary: BinaryIO) -> None:
        self._where = where
        self._digest = hashlib.sha256()
        # newline="": the csv module itself tells a line ending from one quoted inside a value.
        self._text = io.TextIOWrapper(io.BufferedReader(_Hashing(binary, self._digest)),
                                      encoding="utf-8-sig", newline="")
        self._budget = MAX_RECORD_CHARS
        self._long_line = False
        self._reader = csv.reader(self._lines(), strict=True)
        with self._reading():
            first = next((record for record in self._reader if not _blank(record)), None)
        if first is None:
            raise SourceError(f"source {where}: the file is empty")
        self.header: tuple[str, ...] = tuple(name.strip() for name in first)
        self.rows = 0

    def batches(self) -> Iterator[Batch]:
        while True:
            self._budget = BATCH_ROWS * MAX_RECORD_CHARS
            self._long_line = False
            lines_before = self._reader.line_num
            with self._reading():
                records = list(islice(self._reader, BATCH_ROWS))
            if not records:
                return
            # A value longer than MAX_VALUE_LENGTH needs a line that long, or one that spans
            # lines (more lines than records); only such a batch needs its lengths measured.
            may_hold_long = self._long_line or self._reader.line_num - lines_before > len(records)
            if set(map(len, records)) != {len(self.header)}:
                records = self._well_shaped(records)
                if not records:  # only blank lines
                    continue
            self.rows += len(records)
            yield Batch(self.rows - len(records) + 1, records, may_hold_long)

    def sha256(self) -> str:
        """The digest of every byte read; the whole file's once ``batches()`` is exhausted."""
        return self._digest.hexdigest()

    def _well_shaped(self, batch: list[list[str]]) -> list[list[str]]:
        """The batch without its blank lines, or a refusal naming the first ragged row."""
        batch = [record for record in batch if not _blank(record)]
        for position, record in enumerate(batch):
            if len(record) != len(self.header):
                fields = f"{len(record)} field{'' if len(record) == 1 else 's'}"
                raise SourceError(f"source {self._where}, data row {self.rows + position + 1}: "
                                  f"{fields}, but the header has {len(self.header)}")
        return batch

    @contextmanager
    def _reading(self) -> Iterator[None]:
        # ``from None``: a decoding error's own text quotes the file's bytes.
        try:
            yield
        except csv.Error:
            raise SourceError(f"source {self._where}, line {self._reader.line_num}: not "
                              "well-formed CSV (a quoted value is not closed, or text follows "
                              "its closing quote)") from None
        except UnicodeDecodeError:
            # Text is decoded ahead of the line being read, so the line is only roughly known.
            raise SourceError(f"source {self._where}, near line {self._reader.line_num + 1}: "
                              "not UTF-8 text") from None

    def _lines(self) -> Iterator[str]:
        # However long a line, or however many lines a quoted value spans, no more than
        # MAX_RECORD_CHARS of a line, nor a batch's worth of them, is ever read into memory.
        readline = self._text.readline
        while line := readline(MAX_RECORD_CHARS + 1):
            self._budget -= len(line)
            if len(line) > MAX_VALUE_LENGTH or self._budget < 0:
                self._long_line = True
                if len(line) > MAX_RECORD_CHARS or self._budget < 0:
                    raise SourceError(f"source {self._where}, line {self._reader.line_num + 1}"
                                      f": a row longer than {MAX_RECORD_CHARS} characters")
            yield line


def _blank(record: list[str]) -> bool:
    """An empty line, or one of only spaces: no row, for the check and the load alike."""
    return not record or (len(record) == 1 and not record[0].strip())


class _Hashing(io.RawIOBase):
    """Feeds every byte read from ``raw`` to ``digest``: the hash is of exactly what was parsed."""

    def __init__(self, raw: BinaryIO, digest) -> None:
        self._raw, self._digest = raw, digest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = self._raw.readinto(buffer)
        if count:
            self._digest.update(memoryview(buffer)[:count])
        return count


def _check_header(where: str, header: tuple[str, ...]) -> None:
    missing = [c for c in COLUMNS if c not in header]
    repeated = [c for c in COLUMNS if header.count(c) > 1]
    unexpected = [name for name in header if name not in COLUMNS]
    if not (missing or repeated or unexpected):
        return
    expected = f"source {where}: expected the columns {', '.join(COLUMNS)} (in any order)"
    found = len(COLUMNS) - len(missing)
    if found < len(COLUMNS) / 2:
        # Not a penguins file at all (a password file, /etc/passwd, ...): its first line may be
        # a secret, so none of it is repeated.
        raise SourceError(f"{expected}; its first line is not a penguins header "
                          f"({found} of the {len(COLUMNS)} columns found)")
    raise SourceError(f"{expected}; missing {missing or 'none'}, unexpected "
                      f"{_shown_names(unexpected)}, repeated {repeated or 'none'}")


def _shown_names(names: list[str]) -> str:
    """At most a few header names, only those that look like column names, each cut short."""
    if not names:
        return "none"
    shown = [_cut(name) for name in names if _NAME_LIKE.fullmatch(name)][:_SHOWN_NAMES]
    others = len(names) - len(shown)
    if others:
        shown.append(f"{others} other{'s' if others > 1 else ''}")
    return "[" + ", ".join(shown) + "]"


def _cut(name: str) -> str:
    if len(name) > _SHOWN_NAME_CHARS:
        return repr(name[:_SHOWN_NAME_CHARS] + "...")
    return repr(name)


class NotNumbers:
    """Counts, per measurement column, the present values that are not numbers."""

    def __init__(self) -> None:
        self.present = dict.fromkeys(NUMERIC_FEATURES, 0)
        self.bad = dict.fromkeys(NUMERIC_FEATURES, 0)
        self.first_row: dict[str, int] = {}
        self._verdicts: dict[str, bool] = {}
        """Whether a value is not a number, for each distinct value met so far: a file holds a
        few hundred distinct measurements, so pandas is asked about each only once."""

    def count(self, column: str, values: tuple[str, ...], first_row: int) -> None:
        """Add a batch's ``values`` of ``column``, the first of them from data row ``first_row``."""
        distinct = set(values)
        missing = sum(values.count(marker) for marker in NA_MARKERS if marker in distinct)
        self.present[column] += len(values) - missing
        bad = self._not_numbers(distinct)
        if bad:
            self.bad[column] += sum(value in bad for value in values)
            self.first_row.setdefault(column, _first_row(values, bad, first_row))

    def check(self, where: str) -> None:
        for column in NUMERIC_FEATURES:
            if self.bad[column] > MAX_NOT_A_NUMBER_SHARE * max(self.present[column], 1):
                raise SourceError(
                    f"source {where}: column {column!r} is not numbers: {self.bad[column]} of "
                    f"{self.present[column]} values are not (the first at data row "
                    f"{self.first_row[column]})"
                )

    def _not_numbers(self, distinct: set[str]) -> set[str]:
        new = [v for v in distinct if v not in self._verdicts]
        if new:
            if len(self._verdicts) > 100_000:  # all distinct (a text column): memory stays flat
                self._verdicts.clear()
            self._verdicts.update(zip(new, _are_not_numbers(new), strict=True))
        return {v for v in distinct if self._verdicts[v]}


def _are_not_numbers(values: list[str]) -> list[bool]:
    """For each value, whether it is present and not a number, as cleaning reads numbers
    (stripped, then pd.to_numeric)."""
    stripped = [v.strip() for v in values]
    numbers = pd.to_numeric(pd.Series(stripped, dtype=object), errors="coerce")
    return [bool(missing) and text not in NA_MARKERS
            for text, missing in zip(stripped, numbers.isna(), strict=True)]


def _check_batch(where: str, header: tuple[str, ...], batch: Batch,
                 not_numbers: NotNumbers) -> None:
    # Whole columns at a time, in C (zip, set, count): what is looked at value by value in
    # Python is each distinct value, or a column that holds a bad one.
    for column, values in zip(header, zip(*batch.rows, strict=True), strict=True):
        if column == LABEL:
            unknown = {v for v in set(values)
                       if v.strip() not in NA_MARKERS and v.strip().title() not in SPECIES}
            if unknown:
                raise SourceError(f"source {where}, data row "
                                  f"{_first_row(values, unknown, batch.first_row)}: column "
                                  f"{column!r} is not one of {', '.join(SPECIES)}")
        elif column in NUMERIC_FEATURES:
            not_numbers.count(column, values, batch.first_row)


def _refuse_too_long(where: str, header: tuple[str, ...], batch: Batch) -> None:
    """Refuse the batch at its first value longer than the table stores, if it has one."""
    for offset, record in enumerate(batch.rows):
        for column, value in zip(header, record, strict=True):
            if len(value) > MAX_VALUE_LENGTH:
                raise SourceError(f"source {where}, data row {batch.first_row + offset}: "
                                  f"column {column!r} holds a value longer than "
                                  f"{MAX_VALUE_LENGTH} characters")


def _first_row(values: tuple[str, ...], wanted: set[str], first_row: int) -> int:
    return first_row + next(i for i, value in enumerate(values) if value in wanted)
