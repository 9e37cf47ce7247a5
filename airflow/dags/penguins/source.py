"""Checking a source CSV before anything in the database is emptied.

The check streams the file in chunks, so a million-row source costs little memory, and it stops
at the first problem with a message that names the file, the row and the column.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from penguins.contract import COLUMNS, LABEL, NA_MARKERS, NUMERIC_FEATURES, SPECIES

CHUNK_ROWS = 100_000


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

    rows = 0
    try:
        chunks = pd.read_csv(path, dtype=str, keep_default_na=False, chunksize=CHUNK_ROWS)
        for chunk in chunks:
            _check_chunk(path, chunk, first_row=rows + 1)
            rows += len(chunk)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise SourceError(f"source {path}: not a well-formed CSV ({exc})") from exc
    if rows == 0:
        raise SourceError(f"source {path}: the header has no data rows under it")
    line_terminator = "\r\n" if b"\r\n" in head else "\n"
    return Source(path=path, columns=columns, rows=rows, line_terminator=line_terminator)


def _check_chunk(path: Path, chunk: pd.DataFrame, first_row: int) -> None:
    for column in NUMERIC_FEATURES:
        text = chunk[column].str.strip()
        present = ~text.isin(NA_MARKERS)
        unparseable = present & pd.to_numeric(text, errors="coerce").isna()
        _raise_at_first(path, chunk, unparseable, column, first_row, "is not a number")
    species = chunk[LABEL].str.strip()
    unknown = ~species.isin(NA_MARKERS) & ~species.isin(SPECIES)
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
