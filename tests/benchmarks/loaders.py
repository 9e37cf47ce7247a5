"""The ways of loading a source CSV into ``penguins_raw`` that the loading section compares.

Each runs in a worker process of its own (see ``processes.py``)::

    python -m tests.benchmarks.loaders METHOD CSV SERVER_JSON --result FILE

The worker empties the tables first, so every method starts from the same empty table, then
runs the method and counts the rows it left behind. Only the phases count as the method's time:
starting Python, importing, connecting are the same for every method, or not the method's cost.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import islice
from pathlib import Path

import pandas as pd

from penguins.contract import COLUMNS, NA_MARKERS, RAW_TABLE
from penguins.database import count_rows, create_and_empty_tables, load_raw
from penguins.source import check_source
from tests.benchmarks.processes import current_rss_mb, write_result
from tests.mysql_server import Server

BATCH_ROWS = 10_000
"""Rows per ``to_sql`` chunk and per ``executemany`` call (the pipeline's own batch size)."""

Phases = dict[str, float]


@contextmanager
def _timed(phases: Phases, name: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    phases[name] = time.perf_counter() - started


def loader(server: Server, path: Path) -> Phases:
    """The pipeline's own path, as its tasks run it: empty, check the file, LOAD DATA with NULLs."""
    phases: Phases = {}
    with server.connect() as conn:
        with _timed(phases, "empty"):
            create_and_empty_tables(conn)
        with _timed(phases, "check"):
            source = check_source(path)
        with _timed(phases, "load"):
            load_raw(conn, source)
    return phases


def load_data(server: Server, path: Path) -> Phases:
    """The server's bare bulk path: no check, no NA handling, columns straight from the file.

    The ceiling, not a correct load: ``NA`` is stored as it is, not as NULL.
    """
    phases: Phases = {}
    sql = (
        f"LOAD DATA LOCAL INFILE %s INTO TABLE {RAW_TABLE} FIELDS TERMINATED BY ',' "
        f"OPTIONALLY ENCLOSED BY '\"' IGNORE 1 LINES ({', '.join(COLUMNS)})"
    )
    with server.connect() as conn, _timed(phases, "load"):
        with conn.cursor() as cursor:
            cursor.execute(sql, (str(path),))
        conn.commit()
    return phases


def to_sql(server: Server, path: Path, method: str | None = None) -> Phases:
    """The pandas way: read the whole file, then ``DataFrame.to_sql`` through SQLAlchemy."""
    # Imported here, so the other methods' memory does not include SQLAlchemy.
    import sqlalchemy

    phases: Phases = {}
    url = sqlalchemy.URL.create(
        "mysql+mysqldb", username=server.user, password=server.password or None,
        host=server.host, port=server.port, database=server.database,
    )
    engine = sqlalchemy.create_engine(url)
    engine.connect().close()  # the first connection (and dialect set-up) before the clock starts
    try:
        with _timed(phases, "read"):
            frame = pd.read_csv(path, na_values=list(NA_MARKERS), keep_default_na=False)
        with _timed(phases, "insert"):
            frame.to_sql(RAW_TABLE, engine, if_exists="append", index=False,
                         chunksize=BATCH_ROWS, method=method)
    finally:
        engine.dispose()
    return phases


def executemany(server: Server, path: Path) -> Phases:
    """The plain DB-API way: stream the CSV, bind each batch with ``cursor.executemany``."""
    phases: Phases = {}
    with server.connect() as conn, path.open(newline="") as f, _timed(phases, "insert"):
        rows = csv.reader(f)
        header = next(rows)
        sql = (
            f"INSERT INTO {RAW_TABLE} ({', '.join(header)}) "
            f"VALUES ({', '.join(['%s'] * len(header))})"
        )
        with conn.cursor() as cursor:
            while batch := list(islice(rows, BATCH_ROWS)):
                cursor.executemany(
                    sql, [[None if v in NA_MARKERS else v for v in row] for row in batch]
                )
        conn.commit()
    return phases


METHODS: dict[str, Callable[[Server, Path], Phases]] = {
    "loader": loader,
    "load_data": load_data,
    "to_sql": to_sql,
    "to_sql_multi": lambda server, path: to_sql(server, path, method="multi"),
    "executemany": executemany,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("method", choices=METHODS)
    parser.add_argument("csv", type=Path)
    parser.add_argument("server", help="the Server's fields as JSON")
    parser.add_argument("--result", required=True)
    args = parser.parse_args()

    server = Server(**json.loads(args.server))
    with server.connect() as conn:
        create_and_empty_tables(conn)
    rss_before_mb = current_rss_mb()
    phases = METHODS[args.method](server, args.csv)
    with server.connect() as conn:
        rows = count_rows(conn, RAW_TABLE)
    write_result(args.result, {"method": args.method, "seconds": sum(phases.values()),
                               "phases": phases, "rows_loaded": rows,
                               "rss_before_mb": rss_before_mb})


if __name__ == "__main__":
    main()
