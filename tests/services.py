"""Finding a Postgres and a Redis for the Celery tests, or starting throwaway ones.

As ``tests/mysql_server.py`` does for MySQL, in order: the server in
``PENGUINS_TEST_POSTGRES_URL`` / ``PENGUINS_TEST_REDIS_URL``; one answering on the standard port
of 127.0.0.1 (Postgres as ``postgres`` or as this OS user, without a password); else a private
server of our own, started from the Debian packages' programs (``postgresql``: ``initdb`` and
``pg_ctl`` from /usr/lib/postgresql/*/bin; ``redis-server``) on a free port in a temporary
folder, and removed at the end. A test gets a database of its own on Postgres (dropped at the
end) and an empty database number on Redis (emptied at the end), so that nothing it queues
reaches another system's workers.
"""

from __future__ import annotations

import getpass
import glob
import os
import pwd
import random
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import psycopg2
import redis

from tests.mysql_server import free_port
from tests.support import stop

SETUP_HINT = "bash .ci/setup --tests installs it"


@dataclass(frozen=True)
class Postgres:
    host: str
    port: int
    user: str
    password: str = ""

    def url(self, database: str) -> str:
        """An Airflow ``sql_alchemy_conn`` for ``database`` on this server."""
        login = quote(self.user, safe="") + (f":{quote(self.password, safe='')}"
                                             if self.password else "")
        return f"postgresql+psycopg2://{login}@{self.host}:{self.port}/{database}"

    def connect(self, database: str = "postgres", **kwargs):
        return psycopg2.connect(host=self.host, port=self.port, user=self.user,
                                password=self.password or None, dbname=database, **kwargs)

    def drop(self, database: str) -> None:
        """Drop ``database`` if it exists, closing whatever connections it still has."""
        conn = self.connect()
        try:
            conn.autocommit = True  # DROP DATABASE cannot run in a transaction
            with conn.cursor() as cursor:
                cursor.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        finally:
            conn.close()


def _postgres_answers(server: Postgres) -> bool:
    try:
        server.connect(connect_timeout=3).close()
    except psycopg2.OperationalError:
        return False
    return True


@contextmanager
def postgres_database() -> Iterator[tuple[Postgres, str]]:
    """A server and the name of a database of this test's own on it, which does not exist yet
    (the launcher creates it); dropped afterwards, connections and all."""
    with postgres_server() as server:
        database = f"airflow_penguins_test_{uuid.uuid4().hex[:8]}"
        try:
            yield server, database
        finally:
            server.drop(database)


@contextmanager
def postgres_server() -> Iterator[Postgres]:
    """A Postgres that answers: the one named, the one on 5432, or a throwaway one."""
    if url := os.environ.get("PENGUINS_TEST_POSTGRES_URL"):
        parts = urlsplit(url)
        server = Postgres(parts.hostname or "127.0.0.1", parts.port or 5432,
                          parts.username or "postgres", parts.password or "")
        if not _postgres_answers(server):
            raise RuntimeError("PENGUINS_TEST_POSTGRES_URL is set, but no Postgres answers "
                               f"at {server.host}:{server.port}")
        yield server
        return
    for user in dict.fromkeys(("postgres", getpass.getuser())):
        if _postgres_answers(found := Postgres("127.0.0.1", 5432, user)):
            yield found
            return
    with throwaway_postgres() as server:
        yield server


def _postgres_program(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                   key=lambda path: int(Path(path).parts[-3]))
    program = found[-1] if found else shutil.which(name)
    if not program:
        raise RuntimeError(f"no Postgres answers on 127.0.0.1:5432 and {name} is not "
                           f"installed (Debian package postgresql; {SETUP_HINT})")
    return program


@contextmanager
def throwaway_postgres() -> Iterator[Postgres]:
    """A Postgres of our own in a temporary folder (user postgres, trust), removed afterwards.
    Postgres refuses to run as root: as root it runs as the package's ``postgres`` user."""
    folder = Path(tempfile.mkdtemp(prefix="penguins-postgres-"))
    user = None
    if os.getuid() == 0:
        user = "postgres" if _has_user("postgres") else "nobody"
        entry = pwd.getpwnam(user)
        os.chown(folder, entry.pw_uid, entry.pw_gid)
    data, port = folder / "data", free_port()
    log = folder / "server.log"

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(argv, user=user, cwd=folder, capture_output=True, text=True,
                              timeout=120)

    try:
        made = run(_postgres_program("initdb"), "-D", str(data), "-U", "postgres",
                   "--auth=trust", "--no-sync")
        if made.returncode != 0:
            raise RuntimeError(f"initdb failed: {made.stdout}{made.stderr}")
        started = run(_postgres_program("pg_ctl"), "-D", str(data), "-l", str(log), "-w",
                      "-t", "60", "-o",
                      f"-p {port} -c listen_addresses=127.0.0.1 -k {folder} -c fsync=off",
                      "start")
        if started.returncode != 0:
            raise RuntimeError(f"a throwaway Postgres did not start: {started.stderr}"
                               f"{log.read_text(errors='replace') if log.exists() else ''}")
        try:
            yield Postgres("127.0.0.1", port, "postgres")
        finally:
            run(_postgres_program("pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@contextmanager
def redis_broker() -> Iterator[str]:
    """A ``redis://`` URL of a database number nobody else uses right now, emptied afterwards."""
    with _redis() as (host, port):
        client = None
        if os.environ.get("PENGUINS_TEST_REDIS_URL") or port == 6379:
            # A shared server: a database number that holds nothing (0 is the launcher's).
            for number in random.sample(range(1, 16), 15):
                client = redis.Redis(host=host, port=port, db=number)
                if client.dbsize() == 0:
                    break
            else:
                raise RuntimeError(f"every database of the Redis at {host}:{port} is in use")
        else:
            number = 0
            client = redis.Redis(host=host, port=port, db=number)
        try:
            yield f"redis://{host}:{port}/{number}"
        finally:
            with suppress(redis.RedisError):
                client.flushdb()
            client.close()


@contextmanager
def _redis() -> Iterator[tuple[str, int]]:
    if url := os.environ.get("PENGUINS_TEST_REDIS_URL"):
        parts = urlsplit(url)
        yield parts.hostname or "127.0.0.1", parts.port or 6379
        return
    with suppress(redis.RedisError):
        if redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=2).ping():
            yield "127.0.0.1", 6379
            return
    with throwaway_redis() as port:
        yield "127.0.0.1", port


@contextmanager
def throwaway_redis() -> Iterator[int]:
    """A ``redis-server`` of our own on a free port, keeping nothing on disk."""
    program = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(program).exists():
        raise RuntimeError(f"no Redis answers on 127.0.0.1:6379 and redis-server is not "
                           f"installed (Debian package redis-server; {SETUP_HINT})")
    folder = Path(tempfile.mkdtemp(prefix="penguins-redis-"))
    port = free_port()
    server = subprocess.Popen(
        [program, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
         "no", "--dir", str(folder)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
        deadline = time.monotonic() + 30
        while True:
            with suppress(redis.RedisError):
                if client.ping():
                    break
            if server.poll() is not None or time.monotonic() > deadline:
                output = server.stdout.read().decode(errors="replace") if server.poll() else ""
                raise RuntimeError(f"a throwaway redis-server did not answer: {output}")
            time.sleep(0.1)
        yield port
    finally:
        stop(server)
        server.stdout.close()
        shutil.rmtree(folder, ignore_errors=True)
