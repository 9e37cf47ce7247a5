"""The no-Docker launcher: its embedded MariaDB, its errors, and that stopping it leaves nothing.

The stop tests start the real system (embedded MariaDB, Airflow's four components, the service)
as a user would, from a terminal or not, directly or through ``uv run``, and stop it with each
kind of signal, once or repeatedly, to the launcher or to its whole process group.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import shutil
import signal
import socket
import subprocess
import sys
import termios
import time
from dataclasses import dataclass
from pathlib import Path

import MySQLdb
import pytest

import local_mariadb
import run_without_docker
from run_without_docker import StartError, ensure_database, ensure_postgres_database
from tests.conftest import REPO
from tests.mysql_server import free_port
from tests.services import postgres_server
from tests.support import processes_with_environment

LAUNCHER = REPO / "airflow" / "run_without_docker.py"
READY = "Penguins MLOps is up."


def test_embedded_mariadb_keeps_its_data_and_credentials_between_runs(tmp_path):
    folder, port = tmp_path / "mariadb", free_port()
    server = local_mariadb.start(folder, port=port)
    try:
        credentials = local_mariadb.ensure_database(server, "penguins", folder / "creds.json")
        with MySQLdb.connect(host="127.0.0.1", port=port, user=credentials["user"],
                             password=credentials["password"], database="penguins") as conn:
            conn.cursor().execute("CREATE TABLE kept (n INT)")
            conn.cursor().execute("INSERT INTO kept VALUES (7)")
            conn.commit()
        # Administration is over the socket only: no password-less root over TCP.
        with pytest.raises(MySQLdb.OperationalError) as refused:
            MySQLdb.connect(host="127.0.0.1", port=port, user="root", password="")
        assert refused.value.args[0] in (1045, 1698)
    finally:
        server.stop()
    assert server.process.returncode == 0, "not a clean shutdown"
    assert (folder / "creds.json").stat().st_mode & 0o777 == 0o600

    server = local_mariadb.start(folder, port=port)
    try:
        again = local_mariadb.ensure_database(server, "penguins", folder / "creds.json")
        assert again == credentials
        with MySQLdb.connect(host="127.0.0.1", port=port, user=again["user"],
                             password=again["password"], database="penguins") as conn:
            cursor = conn.cursor()
            cursor.execute("SELECT n FROM kept")
            assert cursor.fetchall() == ((7,),)
    finally:
        server.stop()


def test_a_server_that_cannot_start_says_why(tmp_path):
    folder, port = tmp_path / "mariadb", free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        with pytest.raises(local_mariadb.MariaDBError) as failed:
            local_mariadb.start(folder, port=port, seconds=20)
    message = str(failed.value)
    assert "mariadbd exited" in message
    assert "Address already in use" in message or "Can't start server" in message


def test_a_refused_login_is_not_reported_as_unreachable(mysql):
    secret = "not-the-password-4711"
    refused = f"mysql://{mysql.user}x:{secret}@{mysql.host}:{mysql.port}/penguins"
    with pytest.raises(StartError) as login:
        ensure_database(refused)
    assert "refused" in str(login.value) and "cannot reach" not in str(login.value)
    assert secret not in str(login.value)

    with pytest.raises(StartError) as nobody:
        ensure_database(f"mysql://u:{secret}@127.0.0.1:{free_port()}/penguins")
    assert "cannot reach" in str(nobody.value)
    assert secret not in str(nobody.value)


def test_help_documents_the_executors_and_what_celery_needs():
    shown = subprocess.run([sys.executable, str(LAUNCHER), "--help"], capture_output=True,
                           text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())
    for words in ("--executor {local,celery}", "--celery-workers N", "worker1@<host>",
                  "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CELERY__BROKER_URL",
                  "redis://127.0.0.1:6379/0", "AIRFLOW__CELERY__RESULT_BACKEND",
                  "AIRFLOW__CELERY__WORKER_CONCURRENCY"):
        assert words in text, words
    wrong = subprocess.run([sys.executable, str(LAUNCHER), "--celery-workers", "2"],
                           capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and "needs --executor celery" in wrong.stderr


def test_the_celery_shape_keeps_airflow_metadata_in_postgres():
    settings = run_without_docker.celery_environment({})
    metadata = settings["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert metadata == "postgresql+psycopg2://postgres@127.0.0.1:5432/airflow_penguins"
    assert settings["AIRFLOW__CELERY__RESULT_BACKEND"] == f"db+{metadata}"
    assert settings["AIRFLOW__CELERY__BROKER_URL"] == "redis://127.0.0.1:6379/0"
    given = run_without_docker.celery_environment(
        {"AIRFLOW__CELERY__WORKER_CONCURRENCY": "1",
         "AIRFLOW__CELERY__BROKER_URL": "redis://10.0.0.5:6380/3"})
    assert given["AIRFLOW__CELERY__WORKER_CONCURRENCY"] == "1"
    assert given["AIRFLOW__CELERY__BROKER_URL"] == "redis://10.0.0.5:6380/3"
    with pytest.raises(StartError, match="Postgres, not in 'sqlite'"):
        run_without_docker.celery_environment(
            {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "sqlite:////tmp/airflow.db"})


def test_a_worker_records_its_own_name_as_the_hostname(monkeypatch):
    monkeypatch.setenv(run_without_docker.WORKER_NAME_VARIABLE, "worker2@box")
    assert run_without_docker.celery_worker_hostname() == "worker2@box"
    workers = run_without_docker.celery_workers(2, {"PYTHONPATH": str(REPO)}, Path("/logs"))
    names = [w.own[run_without_docker.WORKER_NAME_VARIABLE] for w in workers]
    assert names == [f"worker{n}@{socket.gethostname()}" for n in (1, 2)]
    for worker, name in zip(workers, names, strict=True):
        assert worker.argv[3:] == ["celery", "worker", "--celery-hostname", name, "--queues",
                                   "default", "--skip-serve-logs"]
        assert worker.own["AIRFLOW__CORE__HOSTNAME_CALLABLE"] == (
            "run_without_docker.celery_worker_hostname")


def test_postgres_is_created_in_or_refused_or_unreachable_without_showing_a_password():
    secret = "not-the-password-4711"
    with postgres_server() as server:
        database = f"airflow_penguins_test_{os.getpid()}"
        try:
            where = ensure_postgres_database(server.url(database))
            assert where == f"{server.host}:{server.port}/{database}"
            assert ensure_postgres_database(server.url(database)) == where  # made once
        finally:
            server.drop(database)
        with pytest.raises(StartError) as refused:
            ensure_postgres_database(f"postgresql+psycopg2://nobody_4711:{secret}@"
                                     f"{server.host}:{server.port}/airflow_penguins")
    assert "refused the login of 'nobody_4711'" in str(refused.value)
    with pytest.raises(StartError) as nobody:
        ensure_postgres_database(f"postgresql+psycopg2://u:{secret}@127.0.0.1:{free_port()}/a")
    assert "cannot reach Postgres" in str(nobody.value)
    for problem in (refused.value, nobody.value):
        assert secret not in str(problem)


def test_a_missing_redis_stops_the_start_before_anything_runs(tmp_path):
    secret = "not-the-password-4711"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(AIRFLOW_HOME=str(tmp_path / "home"), AIRFLOW_API_PORT=str(free_port()),
               SERVING_PORT=str(free_port()), PENGUINS_MYSQL_PORT=str(free_port()),
               AIRFLOW__CELERY__BROKER_URL=f"redis://:{secret}@127.0.0.1:{free_port()}/0")
    with postgres_server() as server:
        env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = server.url("postgres")
        started = subprocess.run([sys.executable, str(LAUNCHER), "--executor", "celery"],
                                 env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 1, started.stdout + started.stderr
    assert "error: cannot reach Redis at 127.0.0.1:" in started.stderr, started.stderr
    assert secret not in started.stdout + started.stderr
    assert "MariaDB" not in started.stdout, "it started something first"
    assert not (tmp_path / "home").exists()


@dataclass(frozen=True)
class Way:
    """One way a user stops the launcher."""

    signal: signal.Signals
    times: int
    to_group: bool
    terminal: bool
    through_uv: bool = False
    when: str = READY
    """What the launcher has printed when the signal is sent."""
    fresh_home: bool = False
    """Start from a new AIRFLOW_HOME, whose MariaDB data folder is yet to be made."""


WAYS = {
    "ctrl-c-in-a-terminal-while-starting": Way(signal.SIGINT, 1, True, True,
                                               when="starting api-server"),
    "ctrl-c-three-times-in-a-terminal": Way(signal.SIGINT, 3, True, True),
    "sigint-to-the-group-of-uv-run": Way(signal.SIGINT, 1, True, False, through_uv=True),
    "sigterm-to-the-group": Way(signal.SIGTERM, 1, True, False),
    "sigterm-three-times-while-starting": Way(signal.SIGTERM, 3, False, False,
                                              when="starting api-server"),
    "sighup-while-migrating": Way(signal.SIGHUP, 1, False, False, when="running airflow db"),
    "sigint-to-the-group-while-mariadb-initializes": Way(
        signal.SIGINT, 1, True, False, when="starting the embedded MariaDB", fresh_home=True),
}


@pytest.fixture(scope="module")
def launcher_home(tmp_path_factory) -> Path:
    """One AIRFLOW_HOME (with its embedded MariaDB) for every stop test, as a user's own
    ``airflow/home`` is reused from run to run."""
    return tmp_path_factory.mktemp("launcher") / "home"


@pytest.mark.airflow
@pytest.mark.parametrize("way", WAYS.values(), ids=WAYS.keys())
def test_stopping_leaves_nothing_running(way: Way, launcher_home: Path, tmp_path):
    if way.fresh_home:
        launcher_home = tmp_path / "home"
    ports = {name: free_port() for name in ("AIRFLOW_API_PORT", "SERVING_PORT",
                                             "PENGUINS_MYSQL_PORT")}
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AIRFLOW") and k != "MODELS_DIR"}
    env.update({name: str(port) for name, port in ports.items()},
               AIRFLOW_HOME=str(launcher_home), MODELS_DIR=str(tmp_path / "models"))
    command = [sys.executable, str(LAUNCHER)]
    if way.through_uv:
        command = [shutil.which("uv") or "uv", "run", "--locked", "python", str(LAUNCHER)]
    launcher = _Launched(command, env, terminal=way.terminal)
    try:
        launcher.wait_for(way.when, seconds=300)
        if way.when == READY:
            assert "127.0.0.1" in launcher.output and "0.0.0.0" not in launcher.output
        for _ in range(way.times):
            launcher.send(way)
            time.sleep(0.3)
        code = launcher.wait(seconds=120)
    finally:
        leftovers = processes_with_environment(f"AIRFLOW_HOME={launcher_home}")
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
        launcher.close()
    assert leftovers == [], f"processes left behind: {leftovers}\n{launcher.output[-3000:]}"
    assert code == 0, launcher.output[-3000:]
    assert "Traceback" not in launcher.output, launcher.output[-3000:]
    for port in ports.values():
        with socket.socket() as probe:
            # Refused while anything listens there; connections in TIME_WAIT do not count.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", port))
    assert "error" not in launcher.output, launcher.output[-3000:]
    credentials = launcher_home / "mariadb" / "credentials.json"
    if credentials.exists():
        assert set(json.loads(credentials.read_text())) == {"user", "password"}
    if way.fresh_home:
        # Stopped half way or not, the next start makes a working server.
        server = local_mariadb.start(launcher_home / "mariadb", port=free_port())
        try:
            server.connect_as_admin().close()
        finally:
            server.stop()


class _Launched:
    """The launcher, started in a session of its own, on a terminal of its own or on a pipe."""

    def __init__(self, command: list[str], env: dict[str, str], *, terminal: bool) -> None:
        self.output = ""
        self._terminal = terminal
        if terminal:
            self._master, slave = pty.openpty()
            self.process = subprocess.Popen(
                command, env=env, cwd=REPO, stdin=slave, stdout=slave, stderr=slave,
                preexec_fn=_take_terminal,
            )
            os.close(slave)
            self._reader = self._master
        else:
            self.process = subprocess.Popen(
                command, env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
            self._reader = self.process.stdout.fileno()
        os.set_blocking(self._reader, False)

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self._reader, 65536)
            except (BlockingIOError, OSError):
                return
            if not chunk:
                return
            self.output += chunk.decode(errors="replace")

    def wait_for(self, text: str, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while text not in self.output:
            self._read()
            assert self.process.poll() is None, f"the launcher exited:\n{self.output[-3000:]}"
            assert time.monotonic() < deadline, f"no {text!r} in {seconds} s:\n{self.output}"
            time.sleep(0.2)

    def send(self, way: Way) -> None:
        if self._terminal:
            # What Ctrl-C is: the terminal sends SIGINT to its foreground process group.
            os.write(self._master, b"\x03")
        elif way.to_group:
            os.killpg(self.process.pid, way.signal)
        else:
            self.process.send_signal(way.signal)

    def wait(self, seconds: float) -> int:
        deadline = time.monotonic() + seconds
        while self.process.poll() is None and time.monotonic() < deadline:
            self._read()
            time.sleep(0.2)
        self._read()
        assert self.process.poll() is not None, f"still running:\n{self.output[-3000:]}"
        return self.process.returncode

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        if self._terminal:
            os.close(self._master)
        else:
            self.process.stdout.close()


def _take_terminal() -> None:
    """In the child: a new session whose controlling terminal is its stdin, as a shell does."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
