"""Finding a MySQL-compatible server for the tests, or starting a throwaway one.

In order: the server in ``PENGUINS_TEST_MYSQL_URL`` (``mysql://user:password@host:port``); a
server answering on 127.0.0.1:3306 as root with no password (as on the project's machines); else
a private ``mariadbd`` started in a temporary folder, stopped when the tests end. Each test
session works in a database of its own, dropped at the end.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import unquote, urlsplit

import MySQLdb

import local_mariadb


@dataclass(frozen=True)
class Server:
    host: str
    port: int
    user: str
    password: str
    database: str = ""
    folder: Path | None = None
    """Where a throwaway server keeps its files; None for a server found running."""

    def connect(self, **kwargs) -> MySQLdb.Connection:
        return MySQLdb.connect(
            host=self.host, port=self.port, user=self.user, password=self.password,
            database=self.database, local_infile=1, **kwargs,
        )

    @property
    def url(self) -> str:
        return f"mysql://{self.user}:{self.password}@{self.host}:{self.port}/{self.database}"


def _answers(server: Server) -> bool:
    try:
        server.connect(connect_timeout=2).close()
    except MySQLdb.OperationalError:
        return False
    return True


def _from_url(url: str) -> Server:
    parts = urlsplit(url)
    return Server(parts.hostname or "127.0.0.1", parts.port or 3306, unquote(parts.username or ""),
                  unquote(parts.password or ""))


@contextmanager
def mysql_database() -> Iterator[Server]:
    """A fresh, empty database on a server that answers; dropped afterwards."""
    with _server() as server:
        database = f"penguins_test_{uuid.uuid4().hex[:8]}"
        with server.connect() as conn:
            conn.cursor().execute(f"CREATE DATABASE {database}")
        try:
            yield replace(server, database=database)
        finally:
            with server.connect() as conn:
                conn.cursor().execute(f"DROP DATABASE IF EXISTS {database}")


@contextmanager
def _server() -> Iterator[Server]:
    if url := os.environ.get("PENGUINS_TEST_MYSQL_URL"):
        server = _from_url(url)
        if not _answers(server):
            raise RuntimeError(f"PENGUINS_TEST_MYSQL_URL is set, but no server answers at {url}")
        yield server
        return
    local = Server("127.0.0.1", 3306, "root", "")
    if _answers(local):
        yield local
        return
    with throwaway_mariadb() as server:
        yield server


@contextmanager
def throwaway_mariadb() -> Iterator[Server]:
    """A MariaDB of our own in a temporary folder (root, no password), removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="penguins-mariadb-"))
    try:
        try:
            local = local_mariadb.start(folder, port=free_port(), root_auth="normal")
        except local_mariadb.MariaDBError as exc:
            raise RuntimeError(f"no MySQL server answers, and a throwaway MariaDB could not "
                               f"start ({exc}); or set PENGUINS_TEST_MYSQL_URL") from exc
        try:
            yield Server(local.host, local.port, "root", "", folder=folder)
        finally:
            local.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on, below the kernel's range of ephemeral ports:
    a port the kernel hands out (``bind(0)``) can be taken, before the server binds it, by any
    process's next outgoing connection (seen: a launcher test's service, "address in use")."""
    low = _ephemeral_ports()[0]
    for _ in range(200):
        port = random.randrange(10_000, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port between 10000 and {low}")


def _ephemeral_ports() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default
