"""The pipeline's SQL: creating, emptying, loading and reading the penguins tables.

Every function takes an open DB-API connection (MySQLdb), so the DAG passes one from the
Airflow hook and the tests pass one to their own server. Table names only ever come from the
fixed set in ``contract.TABLES``; values are always bound, never pasted into SQL.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable

import MySQLdb
import pandas as pd

from penguins.contract import CLEAN_TABLE, COLUMNS, NA_MARKERS, RAW_TABLE, TABLES
from penguins.source import Source

# ``source_row`` is the row's position in the source file: it keeps reads in file order, so the
# same data and seed give the same train/test split on every run. The raw table keeps every
# value as the text the source ships (types are the clean table's business), so a dirty value
# is stored as it came and counted by preprocess, not lost or turned into 0 by the load.
_DDL = {
    RAW_TABLE: f"""
        CREATE TABLE IF NOT EXISTS {RAW_TABLE} (
            source_row INT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
            {", ".join(f"{column} VARCHAR(64) NULL" for column in COLUMNS)}
        )""",
    CLEAN_TABLE: f"""
        CREATE TABLE IF NOT EXISTS {CLEAN_TABLE} (
            source_row INT UNSIGNED NOT NULL PRIMARY KEY,
            species VARCHAR(16) NOT NULL,
            island VARCHAR(16) NOT NULL,
            bill_length_mm DOUBLE NOT NULL,
            bill_depth_mm DOUBLE NOT NULL,
            flipper_length_mm DOUBLE NOT NULL,
            body_mass_g DOUBLE NOT NULL,
            sex VARCHAR(8) NOT NULL,
            year SMALLINT NOT NULL
        )""",
}

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


def _checked(table: str) -> str:
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; the pipeline's tables are {TABLES}")
    return table


def create_and_empty_tables(conn) -> None:
    """Create both tables if they are missing, then empty them. Safe to run any number of times."""
    with conn.cursor() as cursor:
        for table in TABLES:
            cursor.execute(_DDL[table])
            # TRUNCATE also resets AUTO_INCREMENT, so source_row starts at 1 again.
            cursor.execute(f"TRUNCATE TABLE {table}")
    conn.commit()


def load_raw(conn, source: Source) -> int:
    """Bulk-load a checked source file into the raw table as it ships; return the row count.

    ``LOAD DATA LOCAL INFILE`` streams the file from the client, so memory stays flat however
    large the file is. ``NA`` and empty fields become SQL NULL; every other value is stored as
    the text it is in the file.
    """
    variables = ", ".join(f"@{column}" for column in source.columns)
    assignments = ", ".join(f"{column} = {_null_if_missing(column)}" for column in COLUMNS)
    sql = (
        f"LOAD DATA LOCAL INFILE %s INTO TABLE {RAW_TABLE} CHARACTER SET utf8mb4 "
        f"FIELDS TERMINATED BY ',' OPTIONALLY ENCLOSED BY '\"' "
        f"LINES TERMINATED BY %s IGNORE 1 LINES ({variables}) SET {assignments}"
    )
    with conn.cursor() as cursor:
        cursor.execute(sql, (str(source.path), source.line_terminator))
        cursor.execute(f"SELECT COUNT(*) FROM {RAW_TABLE}")
        (loaded,) = cursor.fetchone()
    conn.commit()
    if loaded != source.rows:
        raise RuntimeError(f"loaded {loaded} rows from {source.path}, expected {source.rows}")
    return loaded


def _null_if_missing(column: str) -> str:
    expression = f"@{column}"
    for marker in NA_MARKERS:
        expression = f"NULLIF({expression}, '{marker}')"
    return expression


def read_table(conn, table: str) -> pd.DataFrame:
    """Read a whole table in source order, as a DataFrame with SQL NULL as missing values."""
    with conn.cursor() as cursor:
        cursor.execute(f"SELECT * FROM {_checked(table)} ORDER BY source_row")
        names = [d[0] for d in cursor.description]
        rows = cursor.fetchall()
    return pd.DataFrame.from_records(rows, columns=names)


def write_clean(conn, frame: pd.DataFrame) -> int:
    """Bulk-load the cleaned rows into the clean table; return the row count.

    Through a temporary CSV and ``LOAD DATA LOCAL INFILE``, like the raw load: about twice as
    fast as batched INSERTs, whose cost is binding every value in Python. A missing value is
    refused first, since LOAD DATA LOCAL would store it as 0 with only a warning.
    """
    columns = ["source_row", *COLUMNS]
    if frame[columns].isna().any().any():
        raise ValueError("clean rows must have no missing values")
    with tempfile.NamedTemporaryFile("w", suffix=".csv", newline="") as f:
        frame[columns].to_csv(f, index=False, header=False, lineterminator="\n")
        f.flush()
        with conn.cursor() as cursor:
            cursor.execute(
                f"LOAD DATA LOCAL INFILE %s INTO TABLE {CLEAN_TABLE} CHARACTER SET utf8mb4 "
                f"FIELDS TERMINATED BY ',' OPTIONALLY ENCLOSED BY '\"' ESCAPED BY '' "
                f"LINES TERMINATED BY '\\n' ({', '.join(columns)})",
                (f.name,),
            )
            loaded = cursor.rowcount
    conn.commit()
    if loaded != len(frame):
        raise RuntimeError(f"loaded {loaded} clean rows, expected {len(frame)}")
    return loaded


def count_rows(conn, table: str) -> int:
    with conn.cursor() as cursor:
        cursor.execute(f"SELECT COUNT(*) FROM {_checked(table)}")
        (count,) = cursor.fetchone()
    return int(count)
