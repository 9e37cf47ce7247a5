"""Checking a source CSV before anything in the database is emptied.

The check streams the file in chunks, so a million-row source costs little memory, and a
refusal names the file, the row and the column. It refuses what is a wrong *file*: missing or
unexpected columns, no rows, an unknown species, a value too long to store, or a measurement
column that is mostly not numbers (a shifted column or a wrong delimiter). A few dirty values
in otherwise good columns are a *row* problem: they are loaded as they are and ``preprocess``
drops and counts those rows.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
from pandas.api.types import is_numeric_dtype

from penguins.contract import COLUMNS, LABEL, NA_MARKERS, NUMERIC_FEATURES, SPECIES

CHUNK_ROWS = 100_000
TEXT_COLUMNS = tuple(c for c in COLUMNS if c not in NUMERIC_FEATURES)
MAX_VALUE_LENGTH = 64
"""The raw table's VARCHAR width: a longer value could not be stored as it is."""
MAX_NOT_A_NUMBER_SHARE = 0.05
"""Above this share of non-numbers among its present values, a measurement column is wrong."""


class SourceError(ValueError):
    """The source file cannot be loaded; the message names the file and the problem."""


@dataclass(frozen=True)
class Source:
    """A checked source file and what the loader needs to know about its layout."""

    path: Path
    columns: tuple[str, ...]
    """The header, in the file's own order."""
    rows: int
    line_terminator: str


def check_source(path: str | Path) -> Source:
    """Check that ``path`` is a penguins CSV the loader can take as it is, or raise SourceError."""
    layout = read_layout(path, rows=0)
    # A value is never longer than its line. Only a file with a long line needs its measurement
    # columns kept as text: a value the C parser turns into a number has no length left to check.
    text_columns = TEXT_COLUMNS if _longest_line(layout.path) <= MAX_VALUE_LENGTH else COLUMNS
    rows = 0
    not_numbers = NotNumbers()
    try:
        # Measurement columns are left to the C parser: a chunk whose column parses as numbers
        # needs no further look, and only a column with a dirty value stays text.
        chunks = pd.read_csv(
            layout.path, dtype=dict.fromkeys(text_columns, str), na_values=list(NA_MARKERS),
            keep_default_na=False, chunksize=CHUNK_ROWS,
        )
        for chunk in chunks:
            _check_chunk(layout.path, chunk, first_row=rows + 1, not_numbers=not_numbers)
            rows += len(chunk)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise SourceError(f"source {layout.path}: not a well-formed CSV ({exc})") from exc
    if rows == 0:
        raise SourceError(f"source {layout.path}: the header has no data rows under it")
    not_numbers.check(layout.path)
    return replace(layout, rows=rows)


def read_layout(path: str | Path, rows: int) -> Source:
    """The layout of a source already checked to hold ``rows`` rows, from its header alone.

    The loader needs only the column order and line ending; reading those does not repeat the
    full check, which ran before the tables were emptied.
    """
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"source {path}: no such file")
    with path.open("rb") as f:
        head = f.read(64 * 1024)
    if not head.strip():
        raise SourceError(f"source {path}: the file is empty")
    header_line = head.splitlines()[0].decode("utf-8", errors="replace")
    columns = tuple(name.strip().strip('"') for name in header_line.split(","))
    missing = [c for c in COLUMNS if c not in columns]
    unexpected = [c for c in columns if c not in COLUMNS]
    if missing or unexpected or len(set(columns)) != len(columns):
        raise SourceError(
            f"source {path}: expected the columns {', '.join(COLUMNS)}; "
            f"missing {missing or 'none'}, unexpected {unexpected or 'none'}"
        )
    line_terminator = "\r\n" if b"\r\n" in head else "\n"
    return Source(path=path, columns=columns, rows=rows, line_terminator=line_terminator)


def _longest_line(path: Path) -> int:
    """The length in bytes of the longest data line (not the header), read 1 MiB at a time."""
    longest, tail = 0, b""
    with path.open("rb") as f:
        f.readline()
        while block := f.read(1 << 20):
            lines = (tail + block).split(b"\n")
            tail = lines.pop()  # the start of a line that the next block ends
            longest = max(longest, max(map(len, lines), default=0))
    return max(longest, len(tail))


class NotNumbers:
    """Counts, per measurement column, the present values that are not numbers."""

    def __init__(self) -> None:
        self.present = dict.fromkeys(NUMERIC_FEATURES, 0)
        self.bad = dict.fromkeys(NUMERIC_FEATURES, 0)
        self.first: dict[str, tuple[int, str]] = {}

    def count(self, column: str, present: pd.Series, bad: pd.Series, values: pd.Series,
              first_row: int) -> None:
        self.present[column] += int(present.sum())
        self.bad[column] += int(bad.sum())
        if bad.any() and column not in self.first:
            position = int(bad.to_numpy().argmax())
            self.first[column] = (first_row + position, values.iloc[position])

    def check(self, path: Path) -> None:
        for column in NUMERIC_FEATURES:
            if self.bad[column] > MAX_NOT_A_NUMBER_SHARE * max(self.present[column], 1):
                row, value = self.first[column]
                raise SourceError(
                    f"source {path}: column {column!r} is not numbers: {self.bad[column]} of "
                    f"{self.present[column]} values are not (the first, data row {row}: "
                    f"{value!r})"
                )


def _check_chunk(path: Path, chunk: pd.DataFrame, first_row: int, not_numbers: NotNumbers) -> None:
    dirty_numbers = [c for c in NUMERIC_FEATURES if not is_numeric_dtype(chunk[c])]
    for column in (*TEXT_COLUMNS, *dirty_numbers):
        too_long = chunk[column].str.len() > MAX_VALUE_LENGTH
        _raise_at_first(path, chunk, too_long, column, first_row,
                        f"is longer than {MAX_VALUE_LENGTH} characters")
    for column in NUMERIC_FEATURES:
        present = chunk[column].notna()
        if column in dirty_numbers:
            text = chunk[column].str.strip()
            unparseable = present & ~text.isin(NA_MARKERS) & pd.to_numeric(
                text, errors="coerce").isna()
        else:
            unparseable = pd.Series(False, index=chunk.index)
        not_numbers.count(column, present, unparseable, chunk[column], first_row)
    species = chunk[LABEL].str.strip()
    unknown = species.notna() & ~species.isin(NA_MARKERS) & ~species.str.title().isin(SPECIES)
    _raise_at_first(path, chunk, unknown, LABEL, first_row, f"is not one of {', '.join(SPECIES)}")


def _raise_at_first(
    path: Path, chunk: pd.DataFrame, bad: pd.Series, column: str, first_row: int, problem: str
) -> None:
    if bad.any():
        position = int(bad.to_numpy().argmax())
        value = chunk[column].iloc[position]
        raise SourceError(
            f"source {path}, data row {first_row + position}: column {column!r} "
            f"value {value!r} {problem}"
        )
