"""What a benchmark section is given and what it gives back.

A section is a module with ``run(context: Context) -> SectionResult``, registered by name in
``__main__.SECTIONS``. It measures, and returns tables to print plus targets to judge; it never
fails the command because a target was missed.
"""

from __future__ import annotations

import os
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from penguins.contract import default_source
from serving.store import signing
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
    """Shared by the sections of one run: a scratch folder, the scale, one database, and one
    model signing key pair.

    The key pair is made in ``workdir`` as the run starts and named by ``MODEL_SIGNING_KEY_FILE``
    and ``MODEL_PUBLIC_KEY_FILE`` in this process's environment until ``close()``, so that
    whatever a section starts (the pipeline's code, a DAG run, ``python -m serving``) signs and
    verifies with it, and never with a key of the machine's.
    """

    workdir: Path
    quick: bool
    """Smaller sizes, for trying the benchmark out; the full sizes are what gets reported."""
    server_version: str | None = None
    """The database server's ``VERSION()``, once a section has used it."""
    private_key_file: Path = field(init=False)
    public_key_file: Path = field(init=False)
    _stack: ExitStack = field(default_factory=ExitStack)
    _synthetic: dict[int, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        keys = self.workdir / "model-signing"
        self.private_key_file, self.public_key_file = keys / "private.pem", keys / "public.pem"
        signing.ensure_key_pair(self.private_key_file, self.public_key_file)
        names = (signing.PRIVATE_KEY_ENV, signing.PUBLIC_KEY_ENV)
        before = {name: os.environ.get(name) for name in names}
        self._stack.callback(_restore_environment, before)
        os.environ.update({names[0]: str(self.private_key_file),
                           names[1]: str(self.public_key_file)})

    @cached_property
    def signing_key(self) -> Ed25519PrivateKey:
        """The run's private key, for the pipeline's code run in this process."""
        return signing.load_private_key(self.private_key_file)

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


def _restore_environment(before: dict[str, str | None]) -> None:
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def progress(message: str) -> None:
    """A line on stderr, so a long run shows where it is; stdout carries only the results."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)
