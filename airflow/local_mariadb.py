"""A MariaDB server of the project's own, run from the programs of Debian's ``mariadb-server``.

Two users: the no-Docker launcher (``run_without_docker.py``), whose embedded database keeps its
data folder between runs and gives the pipeline a generated user and password; and the tests,
which start a throwaway server when no other answers (``tests/mysql_server.py``).

The server listens on 127.0.0.1 (or the host given) and on a socket in its folder. It is started
with ``--no-defaults``, so the machine's own MySQL configuration never leaks in. When it cannot
be prepared or started, ``MariaDBError`` carries the server's own error output.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINT = "install the Debian package mariadb-server (bash .ci/setup does)"
_MAX_SOCKET_PATH = 100  # a Unix socket's path holds at most 107 bytes on Linux


class MariaDBError(RuntimeError):
    """The server could not be prepared or started; the message holds its own error output."""


@dataclass(frozen=True)
class LocalServer:
    """A running ``mariadbd`` of ours."""

    process: subprocess.Popen
    folder: Path
    host: str
    port: int
    socket: Path
    admin: str
    """The administrator: the OS user who started it (``socket``), or root (``normal``)."""

    def connect_as_admin(self, **kwargs):
        """A connection over the socket as ``admin``, with no password."""
        import MySQLdb

        return MySQLdb.connect(unix_socket=str(self.socket), user=self.admin, **kwargs)

    def stop(self, seconds: float = 60) -> None:
        """A clean shutdown (SIGTERM), then SIGKILL if it takes longer than ``seconds``."""
        if self.process.poll() is None:
            self.process.terminate()
            with suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=seconds)
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def programs() -> tuple[str, str]:
    """The paths of ``mariadbd`` and ``mariadb-install-db``; MariaDBError if they are missing."""
    daemon = shutil.which("mariadbd") or shutil.which("mariadbd", path="/usr/sbin")
    install_db = shutil.which("mariadb-install-db")
    if not (daemon and install_db):
        raise MariaDBError(f"MariaDB's server programs are not installed: {INSTALL_HINT}")
    return daemon, install_db


def start(folder: Path, *, port: int, host: str = "127.0.0.1", root_auth: str = "socket",
          seconds: float = 60, new_session: bool = False) -> LocalServer:
    """Start a server on the data in ``folder/data``, creating it first if it is missing.

    ``root_auth`` is how the first administrator logs in: ``socket`` (the OS user who runs this,
    over the socket only) or ``normal`` (root with no password, for throwaway servers).
    ``new_session`` puts the server in its own session, out of reach of signals sent to ours.
    """
    daemon, install_db = programs()
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data"
    # As root, mariadbd runs only when told to; any other user runs it as themselves.
    user = ["--user=root"] if os.geteuid() == 0 else []
    # With ``socket``, the socket lets in the OS user who runs this, with no password.
    admin = "root" if root_auth == "normal" else pwd.getpwuid(os.geteuid()).pw_name
    # Written once mariadb-install-db has finished: a data folder without it is half made (the
    # launcher was killed meanwhile) and is made again.
    initialized = folder / "initialized"
    if not initialized.exists():
        shutil.rmtree(data, ignore_errors=True)
        _initialize(install_db, data, root_auth, admin, user)
        initialized.touch()
    socket = _socket_path(folder)
    log = folder / "mariadbd.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [daemon, "--no-defaults", f"--datadir={data}", f"--socket={socket}",
             f"--pid-file={folder / 'mariadbd.pid'}", f"--port={port}",
             f"--bind-address={host}", "--local-infile=1", *user],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=out,
            start_new_session=new_session,
        )
    server = LocalServer(process, folder, host, port, socket, admin)
    try:
        _wait_until_it_answers(server, log, seconds)
    except BaseException:
        server.stop(seconds=10)
        raise
    return server


def ensure_database(server: LocalServer, database: str, credentials_file: Path) -> dict[str, str]:
    """Create ``database`` and a user that may use it, whose password is generated once and kept
    in ``credentials_file`` (readable by its owner only); return ``{"user", "password"}``."""
    if credentials_file.exists():
        credentials = json.loads(credentials_file.read_text())
    else:
        credentials = {"user": "penguins", "password": secrets.token_urlsafe(24)}
        descriptor = os.open(credentials_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as f:
            json.dump(credentials, f)
    with server.connect_as_admin() as conn, conn.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE IF NOT EXISTS `{database}`")
        for host in ("localhost", "127.0.0.1"):
            account = f"'{credentials['user']}'@'{host}'"
            # Values are bound by the client library, never pasted into the statement.
            cursor.execute(f"CREATE USER IF NOT EXISTS {account} IDENTIFIED BY %s",
                           (credentials["password"],))
            cursor.execute(f"ALTER USER {account} IDENTIFIED BY %s", (credentials["password"],))
            cursor.execute(f"GRANT ALL PRIVILEGES ON `{database}`.* TO {account}")
    return credentials


def _initialize(install_db: str, data: Path, root_auth: str, admin: str,
                user: list[str]) -> None:
    socket_user = [f"--auth-root-socket-user={admin}"] if root_auth == "socket" else []
    result = subprocess.run(
        [install_db, "--no-defaults", f"--datadir={data}", "--skip-test-db",
         f"--auth-root-authentication-method={root_auth}", *socket_user, *user],
        # Out of reach of a Ctrl-C meant for the launcher, which stops after this step.
        capture_output=True, text=True, start_new_session=True,
    )
    if result.returncode != 0:
        shutil.rmtree(data, ignore_errors=True)  # half a data folder would be taken for a whole
        output = (result.stderr or result.stdout).strip()[-3000:]
        raise MariaDBError(f"mariadb-install-db failed (exit {result.returncode}):\n{output}")


def _socket_path(folder: Path) -> Path:
    socket = folder.resolve() / "mysqld.sock"
    if len(str(socket)) <= _MAX_SOCKET_PATH:
        return socket
    # A deep project folder: keep the socket in /tmp, under a name only this folder maps to.
    digest = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"penguins-mariadb-{digest}.sock"


def _wait_until_it_answers(server: LocalServer, log: Path, seconds: float) -> None:
    import MySQLdb

    deadline = time.monotonic() + seconds
    offset = log.stat().st_size if log.exists() else 0
    while True:
        if server.process.poll() is not None:
            raise MariaDBError(f"mariadbd exited with {server.process.returncode}:\n"
                               + _tail(log, offset))
        try:
            server.connect_as_admin(connect_timeout=2).close()
            return
        except MySQLdb.OperationalError:
            if time.monotonic() > deadline:
                raise MariaDBError(f"mariadbd did not answer within {seconds:.0f} s:\n"
                                   + _tail(log, offset)) from None
            time.sleep(0.2)


def _tail(log: Path, offset: int) -> str:
    with log.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace").strip()[-3000:] or "(no output)"
