"""The pipeline's SQL: creating, emptying, loading and reading the penguins tables.

Every function takes an open DB-API connection (MySQLdb), so the DAG passes one from the
Airflow hook and the tests pass one to their own server, and the names of the tables it works on,
which the DAG's tasks pass on through XCom. A table name cannot be bound, so it is checked to be
a plain identifier and quoted before it reaches SQL; values are always bound, never pasted in.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterator
from itertools import count
from typing import TextIO

import MySQLdb
import pandas as pd

from penguins.contract import (
    CATEGORICAL_FEATURES,
    CLEAN_TABLE,
    COLUMNS,
    FEATURES,
    LABEL,
    NA_MARKERS,
    NUMERIC_FEATURES,
    RAW_TABLE,
    SPECIES,
)
from penguins.source import Batch, Source, open_rows
from penguins.source_location import SourceError

# ``source_row`` is the row's position in the source file, the "data row" the check's messages
# name; the load sets it, so a failed load that used up AUTO_INCREMENT values cannot shift it.
# It keeps reads in file order, so the same data and seed give the same train/test split on
# every run. The raw table keeps every value as the text the source ships (types are the clean
# table's business), so a dirty value is stored as it came and counted by preprocess, not lost
# or turned into 0 by the load. utf8mb4: any text the check accepts can be stored as it is.
_RAW_DDL = f"""
    CREATE TABLE IF NOT EXISTS {{table}} (
        source_row INT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
        {", ".join(f"{column} VARCHAR(64) NULL" for column in COLUMNS)}
    ) DEFAULT CHARSET=utf8mb4"""
_CLEAN_DDL = """
    CREATE TABLE IF NOT EXISTS {table} (
        source_row INT UNSIGNED NOT NULL PRIMARY KEY,
        species VARCHAR(16) NOT NULL,
        island VARCHAR(16) NOT NULL,
        bill_length_mm DOUBLE NOT NULL,
        bill_depth_mm DOUBLE NOT NULL,
        flipper_length_mm DOUBLE NOT NULL,
        body_mass_g DOUBLE NOT NULL,
        sex VARCHAR(8) NOT NULL,
        year SMALLINT NOT NULL
    )"""

# A plain MySQL identifier: nothing in it can end the quoting or mean anything but the name.
_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")

# Server answers that no retry can fix: wrong user or password, no such database, no rights.
_CONFIGURATION_ERRORS = {1044, 1045, 1049, 1698}


class ConnectionProblem(RuntimeError):
    """The database could not be reached; ``retryable`` says whether trying again may help."""

    def __init__(self, message: str, *, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


def open_connection(connect: Callable[[], MySQLdb.Connection], conn_id: str, address: str):
    """Call ``connect``; turn a failure into a ConnectionProblem naming the connection."""
    try:
        return connect()
    except MySQLdb.OperationalError as exc:
        code = exc.args[0] if exc.args else None
        reason = exc.args[1] if len(exc.args) > 1 else str(exc)
        if code in _CONFIGURATION_ERRORS:
            raise ConnectionProblem(
                f"MySQL at {address} refused connection {conn_id!r}: {reason}. Check the user, "
                "password and database in its AIRFLOW_CONN_... variable.",
                retryable=False,
            ) from exc
        raise ConnectionProblem(
            f"cannot reach MySQL at {address} through connection {conn_id!r}: {reason}",
            retryable=True,
        ) from exc


def _quoted(table: str) -> str:
    """``table`` in backticks, for SQL; a ValueError, before any SQL runs, unless it is a plain
    identifier (a letter or ``_``, then letters, digits or ``_``, 64 at most)."""
    # fullmatch: with match and "$", a name ending in a line break would pass.
    if not isinstance(table, str) or not _TABLE_NAME.fullmatch(table):
        raise ValueError(f"{table!r} is not a plain table name (letters, digits and _, "
                         "not starting with a digit, at most 64)")
    return f"`{table}`"


def create_and_empty_tables(conn, raw_table: str = RAW_TABLE,
                            clean_table: str = CLEAN_TABLE) -> None:
    """Create the raw and the clean table if they are missing, then empty them. Safe to run
    any number of times."""
    if raw_table == clean_table:
        raise ValueError(f"the raw and the clean table cannot both be {raw_table!r}")
    tables = ((_RAW_DDL, _quoted(raw_table)), (_CLEAN_DDL, _quoted(clean_table)))
    with conn.cursor() as cursor:
        for ddl, table in tables:
            cursor.execute(ddl.format(table=table))
            # TRUNCATE also resets AUTO_INCREMENT, so source_row starts at 1 again.
            cursor.execute(f"TRUNCATE TABLE {table}")
    conn.commit()


def load_raw(conn, source: Source, table: str = RAW_TABLE) -> int:
    """Bulk-load a checked source into the raw table ``table``, exactly as the check read it;
    return the row count.

    The file is parsed again by the check's own reader (``penguins.source.open_rows``), and the
    parsed rows stream through a pipe to ``LOAD DATA LOCAL INFILE`` in one fixed form that the
    server cannot read two ways: every value quoted, no escape character, ``\\n`` between rows,
    a missing value (exactly ``NA`` or empty) as a bare ``NULL``, the row's number as
    ``source_row``. So memory stays flat, and the table holds the values the check saw,
    each other value stored as its text. If the file is no longer the one checked (another
    SHA-256 or row count), or the server warns, nothing is kept.
    """
    sql = (
        f"LOAD DATA LOCAL INFILE %s INTO TABLE {_quoted(table)} CHARACTER SET utf8mb4 "
        "FIELDS TERMINATED BY ',' ENCLOSED BY '\"' ESCAPED BY '' LINES TERMINATED BY '\\n' "
        f"(source_row, {', '.join(_checked_columns(source.columns))})"
    )
    with conn.cursor() as cursor:
        # Explicit, so that a refused load is undone on an autocommit connection too.
        cursor.execute("START TRANSACTION")
        try:
            loaded, warnings = _stream(conn, cursor, sql, source)
            if warnings:
                # LOAD DATA LOCAL turns bad values into warnings and goes on: never keep those.
                # Warnings' texts can quote values, so only their number is told.
                raise RuntimeError(f"the server warned ({warnings} times) while loading "
                                   f"{source.path}; nothing was loaded")
            if loaded != source.rows:
                raise RuntimeError(f"loaded {loaded} rows from {source.path}, expected "
                                   f"{source.rows}; nothing was loaded")
        except BaseException:
            conn.rollback()
            raise
    conn.commit()
    return loaded


def _stream(conn, cursor, sql: str, source: Source) -> tuple[int, int]:
    """Run the LOAD DATA statement on a pipe the feeder fills; return rows loaded and warnings."""
    read_end, write_end = os.pipe()
    feeder = _Feeder(source, write_end)
    feeder.start()
    try:
        # The client opens the pipe's read end by name; /dev/fd gives it one.
        cursor.execute(sql, (f"/dev/fd/{read_end}",))
        result = cursor.rowcount, conn.warning_count()
    finally:
        os.close(read_end)  # a feeder still writing to a failed load stops now
        feeder.join()
    if feeder.error is not None:
        raise feeder.error
    return result


class _Feeder(threading.Thread):
    """Writes the source's rows, as the check's reader parses them, into the load's pipe."""

    def __init__(self, source: Source, write_end: int) -> None:
        super().__init__(name="penguins-load-feeder", daemon=True)
        self.source, self.write_end = source, write_end
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            # Closing the write end, however the writing ends, is what ends the load's input.
            with open(self.write_end, "w", encoding="utf-8", newline="") as pipe:
                _write_rows(self.source, pipe)
        except BaseException as exc:  # handed to the loading thread, which raises it
            self.error = exc


def _write_rows(source: Source, pipe: TextIO) -> None:
    try:
        with open_rows(source.location) as rows:
            if rows.header != source.columns:
                raise SourceError(f"source {source.path}: its header is not the one checked")
            for batch in rows.batches():
                pipe.write(_load_lines(batch))
            if (rows.rows, rows.sha256()) != (source.rows, source.sha256):
                raise SourceError(f"source {source.path}: its SHA-256 is not the one checked")
    except SourceError as exc:
        # The check accepted this file, so whatever the reader refuses now is a change.
        raise SourceError(f"{exc}; it changed after check_source read it, so nothing was "
                          "loaded: trigger the run again") from None


def _load_lines(batch: Batch) -> str:
    """The batch as the load's input: ``N,"value",...,NULL`` and ``\\n`` per row.

    ``N`` is the row's ``source_row``; a missing value (exactly ``NA`` or empty) is the bare
    word ``NULL``, which LOAD DATA reads as SQL NULL; every other value is quoted, with a quote
    in it doubled. With no escape character, nothing in a value (a backslash, a line end, the
    text "NULL") can mean anything but itself.
    """
    if '"' in "".join(map("".join, batch.rows)):
        return "".join(f"{number},{','.join(map(_field, record))}\n"
                       for number, record in enumerate(batch.rows, batch.first_row))
    # The same text, built in C, for the usual batch: with no quote in any value, a quoted
    # marker such as "NA" can only be a whole field, so replacing it is exact.
    text = "".join(map('{},"{}"\n'.format, count(batch.first_row),
                       map('","'.join, batch.rows)))
    for marker in NA_MARKERS:
        text = text.replace(f'"{marker}"', "NULL")
    return text


def _field(value: str) -> str:
    if value in NA_MARKERS:
        return "NULL"
    return '"' + value.replace('"', '""') + '"'


def _checked_columns(columns: tuple[str, ...]) -> tuple[str, ...]:
    # The check allows only these names, but they reach SQL: check them where SQL is written.
    if sorted(columns) != sorted(COLUMNS):
        raise ValueError(f"a source's columns must be {COLUMNS} in any order")
    return columns


def _checked_names(columns: tuple[str, ...]) -> tuple[str, ...]:
    if unknown := set(columns) - set(COLUMNS):
        raise ValueError(f"{sorted(unknown)} are not columns of the penguins tables")
    return columns


def read_table(conn, table: str) -> pd.DataFrame:
    """Read a whole table in source order, as a DataFrame with SQL NULL as missing values."""
    with conn.cursor() as cursor:
        cursor.execute(f"SELECT * FROM {_quoted(table)} ORDER BY source_row")
        names = [d[0] for d in cursor.description]
        rows = cursor.fetchall()
    return pd.DataFrame.from_records(rows, columns=names)


def read_chunks(conn, table: str, chunk_rows: int,
                columns: tuple[str, ...] | None = None) -> Iterator[pd.DataFrame]:
    """Read ``table`` in source order, ``chunk_rows`` rows at a time, as DataFrames (SQL NULL as
    missing values) with ``source_row`` and ``columns`` (default: every column).

    Each chunk is one query that starts after the last ``source_row`` read (keyset pagination
    on the primary key), so each costs its own rows only, however far into the table, and the
    connection stays free for writing between chunks.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, not {chunk_rows}")
    selected = "*" if columns is None else ", ".join(("source_row", *_checked_names(columns)))
    sql = (f"SELECT {selected} FROM {_quoted(table)} WHERE source_row > %s "
           "ORDER BY source_row LIMIT %s")
    last = 0
    with conn.cursor() as cursor:
        while True:
            cursor.execute(sql, (last, chunk_rows))
            names = [d[0] for d in cursor.description]
            rows = cursor.fetchall()
            if not rows:
                return
            chunk = pd.DataFrame.from_records(rows, columns=names)
            last = int(chunk["source_row"].iloc[-1])
            yield chunk
            if len(rows) < chunk_rows:
                return


def read_training_rows(conn, table: str = CLEAN_TABLE, *,
                       chunk_rows: int = 100_000) -> pd.DataFrame:
    """The clean table's label and features, in source order, in compact types: the categories
    as pandas categoricals of their known values, the measurements as float64, the year as
    int16: 37 bytes a row (a million rows: 37 MB), read a chunk at a time.

    The models see the same values as from ``read_table``, so they learn the same.
    """
    columns = (LABEL, *FEATURES)
    types = {column: pd.CategoricalDtype(list(values))
             for column, values in ((LABEL, SPECIES), *CATEGORICAL_FEATURES.items())}
    types |= {column: "float64" for column in NUMERIC_FEATURES} | {"year": "int16"}
    chunks = [chunk[list(columns)].astype(types)
              for chunk in read_chunks(conn, table, chunk_rows, columns)]
    if not chunks:
        return pd.DataFrame({column: pd.Series(dtype=types[column]) for column in columns})
    frame = pd.concat(chunks, ignore_index=True)
    for column, dtype in types.items():
        if isinstance(dtype, pd.CategoricalDtype) and frame[column].isna().any():
            raise ValueError(f"{table}.{column} holds a value outside {list(dtype.categories)}")
    return frame


def empty_table(conn, table: str) -> None:
    """Empty ``table`` (TRUNCATE: at once, whatever its size, and committed)."""
    with conn.cursor() as cursor:
        cursor.execute(f"TRUNCATE TABLE {_quoted(table)}")


def write_clean(conn, frame: pd.DataFrame, table: str = CLEAN_TABLE) -> int:
    """Bulk-load the cleaned rows into the clean table ``table``; return the row count. The
    caller commits (``cleaning.preprocess`` writes every chunk, then commits once).

    Through a temporary CSV and ``LOAD DATA LOCAL INFILE``, like the raw load: about twice as
    fast as batched INSERTs, whose cost is binding every value in Python. A missing value is
    refused first, since LOAD DATA LOCAL would store it as 0 with only a warning.
    """
    target = _quoted(table)
    columns = ["source_row", *COLUMNS]
    if frame[columns].isna().any().any():
        raise ValueError("clean rows must have no missing values")
    with tempfile.NamedTemporaryFile("w", suffix=".csv", newline="") as f:
        frame[columns].to_csv(f, index=False, header=False, lineterminator="\n")
        f.flush()
        with conn.cursor() as cursor:
            cursor.execute(
                f"LOAD DATA LOCAL INFILE %s INTO TABLE {target} CHARACTER SET utf8mb4 "
                f"FIELDS TERMINATED BY ',' OPTIONALLY ENCLOSED BY '\"' ESCAPED BY '' "
                f"LINES TERMINATED BY '\\n' ({', '.join(columns)})",
                (f.name,),
            )
            loaded = cursor.rowcount
    if loaded != len(frame):
        raise RuntimeError(f"loaded {loaded} clean rows, expected {len(frame)}")
    return loaded


def count_rows(conn, table: str) -> int:
    with conn.cursor() as cursor:
        cursor.execute(f"SELECT COUNT(*) FROM {_quoted(table)}")
        (count,) = cursor.fetchone()
    return int(count)
