"""What a benchmark section is given and what it gives back.

A section is a module with ``run(context: Context) -> SectionResult``, registered by name in
``__main__.SECTIONS``. It measures, and returns tables to print plus targets to judge; it never
fails the command because a target was missed.
"""

from __future__ import annotations

import sys
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from penguins.contract import default_source
from tests.mysql_server import Server, mysql_database

PACKAGED_ROWS = 344
"""The size of the source that ships with ``palmerpenguins``; other sizes are synthetic."""


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]]
    notes: list[str] = field(default_factory=list)


@dataclass
class Target:
    """A goal from the issue, judged on this run's numbers."""

    name: str
    wanted: str
    measured: str
    passed: bool


@dataclass
class SectionResult:
    name: str
    tables: list[Table] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    """Every measurement, unformatted, for the JSON file."""


@dataclass
class Context:
    """Shared by the sections of one run: a scratch folder, the scale, and one database."""

    workdir: Path
    quick: bool
    """Smaller sizes, for trying the benchmark out; the full sizes are what gets reported."""
    server_version: str | None = None
    """The database server's ``VERSION()``, once a section has used it."""
    _stack: ExitStack = field(default_factory=ExitStack)
    _synthetic: dict[int, Path] = field(default_factory=dict)

    @cached_property
    def server(self) -> Server:
        """A throwaway database on the tests' MySQL server, opened on first use, dropped at close.

        Found or started as the tests do it (``tests/mysql_server.py``), named
        ``penguins_test_<random>``, so a run never touches another's tables.
        """
        server = self._stack.enter_context(mysql_database())
        with server.connect() as conn, conn.cursor() as cursor:
            cursor.execute("SELECT VERSION()")
            (self.server_version,) = cursor.fetchone()
        return server

    def source(self, rows: int) -> Path:
        """The packaged source for 344 rows, else a synthetic one, written once per run."""
        from tests.benchmarks.synthetic import write_synthetic_source

        if rows == PACKAGED_ROWS:
            return default_source()
        if rows not in self._synthetic:
            progress(f"writing {rows:,} synthetic rows")
            path = self.workdir / f"synthetic-{rows}.csv"
            self._synthetic[rows] = write_synthetic_source(path, rows, seed=rows)
        return self._synthetic[rows]

    def close(self) -> None:
        self._stack.close()


def progress(message: str) -> None:
    """A line on stderr, so a long run shows where it is; stdout carries only the results."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)
