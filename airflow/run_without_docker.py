"""Run the whole system on one machine without Docker:

    python3 airflow/run_without_docker.py
    python3 airflow/run_without_docker.py --executor celery --celery-workers 2

The first time, it installs what is missing (``bash .ci/setup``: Debian packages, uv, and
``.venv`` from ``uv.lock``) and restarts itself in ``.venv``. Then it starts, in this order and
each in a session of its own:

- a MariaDB of its own (``local_mariadb``), unless ``AIRFLOW_CONN_MYSQL_AIRFLOW_CONN`` names your
  server: data in ``<AIRFLOW_HOME>/mariadb``, kept between runs; the pipeline logs in as a user
  whose generated password is in ``<AIRFLOW_HOME>/mariadb/credentials.json``;
- Airflow 3 on SQLite: ``airflow db migrate``, then its api-server, scheduler (LocalExecutor),
  dag-processor and triggerer, with the DAG unpaused and no examples; with ``--executor celery``,
  Airflow's metadata in Postgres instead (a database of its own, created if missing), Redis as
  the Celery broker, the results in Postgres, and N ``airflow celery worker`` processes, each
  under a name of its own (``worker1@<host>``, ...) on the queue ``default``;
- the prediction service (``python -m serving``: uvicorn behind its front door).

Everything listens on 127.0.0.1 only (``PENGUINS_HOST`` changes that), and one banner says where
everything is once it all answers. Ctrl-C, SIGINT, SIGTERM or SIGHUP, once or many times, to this
process or its whole group, stops everything and leaves nothing running.

Optional environment: ``AIRFLOW_CONN_MYSQL_AIRFLOW_CONN``, ``AIRFLOW_HOME`` (``airflow/home``),
``PENGUINS_HOST`` (127.0.0.1), ``AIRFLOW_API_PORT`` (8080), ``SERVING_PORT`` (8989),
``PENGUINS_MYSQL_PORT`` (3307, the embedded MariaDB), ``AIRFLOW_PARALLELISM`` (4), ``MODELS_DIR``,
``MODEL_SIGNING_KEY_FILE`` and ``MODEL_PUBLIC_KEY_FILE`` (the model signing key pair, made on the
first start in ``<AIRFLOW_HOME>/model-signing/``; the prediction service is given only the public
key's path). With ``--executor celery``: ``AIRFLOW__DATABASE__SQL_ALCHEMY_CONN``
(``postgresql+psycopg2://postgres@127.0.0.1:5432/airflow_penguins``),
``AIRFLOW__CELERY__BROKER_URL`` (``redis://127.0.0.1:6379/0``), ``AIRFLOW__CELERY__RESULT_BACKEND``
(``db+`` and the metadata database's URL), ``AIRFLOW__CELERY__WORKER_CONCURRENCY`` (2 task
processes per worker).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit
from urllib.request import urlopen

REPO = Path(__file__).resolve().parents[1]
CONNECTION_VARIABLE = "AIRFLOW_CONN_MYSQL_AIRFLOW_CONN"
PRIVATE_KEY_ENV, PUBLIC_KEY_ENV = "MODEL_SIGNING_KEY_FILE", "MODEL_PUBLIC_KEY_FILE"
"""The model signing key pair's files (``serving.store.signing``, imported only once the
environment is set up)."""
DATABASE = "penguins"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_NEEDED_MODULES = ("airflow", "MySQLdb", "uvicorn", "litestar", "cryptography")

EXECUTORS = {"local": "LocalExecutor", "celery": "CeleryExecutor"}
METADATA_VARIABLE = "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"
BROKER_VARIABLE = "AIRFLOW__CELERY__BROKER_URL"
# The celery shape on this machine's servers; compose's `celery` profile has the same settings with
# its own hosts (tests/test_compose.py keeps the two in step).
CELERY_DEFAULTS = {
    METADATA_VARIABLE: "postgresql+psycopg2://postgres@127.0.0.1:5432/airflow_penguins",
    BROKER_VARIABLE: "redis://127.0.0.1:6379/0",
    # Two task processes per worker: two workers fill a 2-core machine's four slots.
    "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2",
}
CELERY_QUEUE = "default"
WORKER_NAME_VARIABLE = "PENGUINS_CELERY_WORKER"
"""The Celery worker's name (``worker1@<host>``), which its task instances record as their
``hostname`` (``celery_worker_hostname``): several workers on one machine stay apart."""


class StartError(Exception):
    """The system cannot start; the message says why and what to do."""


class Stopped(Exception):
    """A stop signal arrived: everything started so far is to be stopped."""


class StopRequests:
    """Remembers the first stop signal. The handler only notes it: the launcher checks between
    steps, so a second signal (``uv run`` forwards the one a terminal already sent to the group)
    can never interrupt the stopping itself."""

    def __init__(self) -> None:
        self.signal: str | None = None

    def install(self) -> None:
        for number in STOP_SIGNALS:
            signal.signal(number, self._note)

    def _note(self, number: int, frame: object) -> None:
        name = signal.Signals(number).name
        if self.signal is None:
            self.signal = name
        else:
            print(f"({name}: already stopping, please wait)", file=sys.stderr, flush=True)

    def check(self) -> None:
        if self.signal is not None:
            raise Stopped(self.signal)

    def sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.check()
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        self.check()


@dataclass
class Component:
    """One program of the system, run in a session of its own with its output in a log file."""

    name: str
    argv: list[str]
    log: Path
    hidden: tuple[str, ...] = ()
    """Variables of the system's environment this program is not given."""
    own: dict[str, str] = field(default_factory=dict)
    """Variables this program is given besides (or instead of) the system's."""
    process: subprocess.Popen | None = field(default=None, repr=False)

    def start(self, env: dict[str, str]) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.argv,
                env={k: v for k, v in env.items() if k not in self.hidden} | self.own,
                cwd=REPO, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
                # A background job of a non-interactive shell starts with SIGINT ignored, and
                # children would inherit that.
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            )

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def tail(self, lines: int = 30) -> str:
        with suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return "(no output)"


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python3 airflow/run_without_docker.py",
        description="Run the whole system on this machine without Docker: MariaDB (unless "
                    f"{CONNECTION_VARIABLE} names your server), Airflow and the prediction "
                    "service. Ctrl-C stops everything.",
        epilog="With --executor celery: Airflow's metadata in Postgres "
               f"({METADATA_VARIABLE}, default {CELERY_DEFAULTS[METADATA_VARIABLE]}; the database "
               f"is created if missing), Redis as the broker ({BROKER_VARIABLE}, default "
               f"{CELERY_DEFAULTS[BROKER_VARIABLE]}), the task results in Postgres "
               "(AIRFLOW__CELERY__RESULT_BACKEND, default db+ and the metadata URL), "
               f"AIRFLOW__CELERY__WORKER_CONCURRENCY task processes per worker (default "
               f"{CELERY_DEFAULTS['AIRFLOW__CELERY__WORKER_CONCURRENCY']}). Both servers must "
               "be running. Other settings: see the README's 'Without Docker'.")
    parser.add_argument("--executor", choices=EXECUTORS, default="local",
                        help="local: tasks run in the scheduler's own processes, Airflow on "
                             "SQLite (the default); celery: tasks run on Celery workers")
    parser.add_argument("--celery-workers", type=int, metavar="N",
                        help="how many `airflow celery worker` processes to start, named "
                             "worker1@<host>, worker2@<host>, ... (with --executor celery; "
                             "default 2)")
    options = parser.parse_args(argv)
    if options.celery_workers is None:
        options.celery_workers = 2 if options.executor == "celery" else 0
    elif options.executor != "celery":
        parser.error("--celery-workers needs --executor celery")
    elif not 1 <= options.celery_workers <= 16:
        parser.error("--celery-workers: from 1 to 16")
    return options


def main(argv: list[str] | None = None) -> None:
    options = parse_arguments(argv)
    if not all(importlib.util.find_spec(name) for name in _NEEDED_MODULES):
        _set_up_and_restart()
    sys.path[:0] = [str(REPO), str(REPO / "airflow" / "dags")]
    requests = StopRequests()
    requests.install()
    host = os.environ.get("PENGUINS_HOST") or "127.0.0.1"
    home = Path(os.environ.get("AIRFLOW_HOME") or REPO / "airflow" / "home").resolve()
    components: list[Component] = []
    mariadb = None
    exit_code = 0
    try:
        ports = {"AIRFLOW_API_PORT": ("Airflow's api-server", "8080"),
                 "SERVING_PORT": ("the prediction service", "8989")}
        if not os.environ.get(CONNECTION_VARIABLE):
            ports["PENGUINS_MYSQL_PORT"] = ("the embedded MariaDB", "3307")
        port = {name: _free_port(name, what, default, host) for name, (what, default)
                in ports.items()}
        celery_lines = []
        if options.executor == "celery":
            celery_lines = check_celery_servers(celery_environment(os.environ))
        if os.environ.get(CONNECTION_VARIABLE):
            connection, mysql_line = os.environ[CONNECTION_VARIABLE], None
            ensure_database(connection)
        else:
            mariadb, connection, mysql_line = _start_mariadb(home, host,
                                                             port["PENGUINS_MYSQL_PORT"])
        requests.check()
        env = system_environment(dict(os.environ), home=home, host=host, connection=connection,
                                 api_port=port["AIRFLOW_API_PORT"], executor=options.executor,
                                 celery_workers=options.celery_workers)
        env.update(SERVING_HOST=host, SERVING_PORT=str(port["SERVING_PORT"]))
        Path(env["MODELS_DIR"]).mkdir(parents=True, exist_ok=True)
        _ensure_signing_keys(env)
        logs = home / "launcher-logs"
        _run_to_end(Component("airflow db migrate", _airflow("db", "migrate"),
                              logs / "db-migrate.log"), env, requests)
        workers = celery_workers(options.celery_workers, env, logs)
        components = [
            Component("api-server", _airflow("api-server", "--host", host, "--port",
                                             str(port["AIRFLOW_API_PORT"])),
                      logs / "api-server.log"),
            # Task logs are read from the local files: no log server on 8793/8794 is needed.
            Component("scheduler", _airflow("scheduler", "--skip-serve-logs"),
                      logs / "scheduler.log"),
            Component("dag-processor", _airflow("dag-processor"), logs / "dag-processor.log"),
            Component("triggerer", _airflow("triggerer", "--skip-serve-logs"),
                      logs / "triggerer.log"),
            *workers,
            Component("prediction service", [sys.executable, "-m", "serving"],
                      logs / "serving.log", hidden=(PRIVATE_KEY_ENV,)),
        ]
        for component in components:
            requests.check()
            component.start(env)
        local = _local_address(host)
        airflow_url = f"http://{local}:{port['AIRFLOW_API_PORT']}"
        serving_url = f"http://{local}:{port['SERVING_PORT']}"
        checks = {
            "the prediction service": lambda: _answers(f"{serving_url}/health"),
            "Airflow": lambda: _airflow_healthy(airflow_url),
        }
        if workers:
            names = [w.own[WORKER_NAME_VARIABLE] for w in workers]
            checks["the Celery workers"] = _celery_workers_answer(env[BROKER_VARIABLE], names)
            celery_lines.append(
                f"Celery workers      {', '.join(names)} (queue {CELERY_QUEUE}, "
                f"{env['AIRFLOW__CELERY__WORKER_CONCURRENCY']} task processes each)")
        _wait_until_ready(components, requests, checks)
        passwords = home / "simple_auth_manager_passwords.json.generated"
        with suppress(OSError):
            passwords.chmod(0o600)
        print(_banner(airflow_url, serving_url, passwords, mysql_line, env["MODELS_DIR"], logs,
                      celery_lines), flush=True)
        ended = _watch(components, workers, requests)
        print(f"{ended.name} stopped by itself (exit {ended.process.returncode}); stopping the "
              f"rest. The end of its log, {ended.log}:\n{ended.tail()}", file=sys.stderr)
        exit_code = 1
    except Stopped as stop:
        print(f"{stop}: stopping everything", file=sys.stderr, flush=True)
    except (StartError, OSError) as problem:
        print(f"error: {problem}", file=sys.stderr, flush=True)
        exit_code = 1
    finally:
        stop_all(components)
        if mariadb is not None:
            mariadb.stop()
    print("stopped", file=sys.stderr, flush=True)
    sys.exit(exit_code)


def _watch(components: list[Component], workers: list[Component],
           requests: StopRequests) -> Component:
    """Wait until a component stops by itself, and return it. A Celery worker that stops is
    only reported while another one runs: Airflow retries its tasks on the others."""
    lost: list[str] = []
    while True:
        for component in components:
            if component.running() or component.name in lost:
                continue
            if component not in workers or not any(w.running() for w in workers):
                return component
            lost.append(component.name)
            print(f"{component.name} stopped by itself (exit {component.process.returncode}); "
                  "the other workers carry on, and Airflow retries its tasks once their "
                  f"heartbeats time out. The end of its log, {component.log}:\n"
                  f"{component.tail(10)}", file=sys.stderr, flush=True)
        requests.sleep(1)


def system_environment(environ: dict[str, str], *, home: Path, host: str, connection: str,
                       api_port: int, executor: str = "local",
                       celery_workers: int = 0) -> dict[str, str]:
    """The environment every component runs in: the caller's, plus what this system needs."""
    env = dict(environ)
    local = _local_address(host)
    slots = "4"
    if executor == "celery":
        env.update(celery_environment(environ))
        # As many tasks at once as the workers have task processes.
        slots = str(celery_workers * int(env["AIRFLOW__CELERY__WORKER_CONCURRENCY"]))
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "airflow" / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="False",
        AIRFLOW__CORE__EXECUTOR=EXECUTORS[executor],
        # The default of 32 forks 32 task workers on a 2-core machine.
        AIRFLOW__CORE__PARALLELISM=env.get("AIRFLOW_PARALLELISM", slots),
        AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"http://{local}:{api_port}/execution/",
        MODELS_DIR=env.get("MODELS_DIR") or str(REPO / "shared_models"),
        # Airflow's task processes import the store's format from the service's package.
        PYTHONPATH=os.pathsep.join(p for p in [str(REPO), env.get("PYTHONPATH")] if p),
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    )
    env[CONNECTION_VARIABLE] = connection
    keys = home / "model-signing"
    env.setdefault(PRIVATE_KEY_ENV, str(keys / "private.pem"))
    env.setdefault(PUBLIC_KEY_ENV, str(keys / "public.pem"))
    env.setdefault("AIRFLOW__CORE__AUTH_MANAGER", "airflow.api_fastapi.auth.managers.simple."
                   "simple_auth_manager.SimpleAuthManager")
    # Every component must verify the Execution API's tokens with the same secret, and sign
    # the same way; new ones each run, since nothing outlives a run.
    env.setdefault("AIRFLOW__API_AUTH__JWT_SECRET", secrets.token_hex(32))
    env.setdefault("AIRFLOW__API__SECRET_KEY", secrets.token_hex(32))
    return env


def celery_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The Celery shape's settings: the caller's where given, else the defaults (a Postgres and
    a Redis on this machine's standard ports)."""
    settings = {name: environ.get(name) or default for name, default in CELERY_DEFAULTS.items()}
    metadata = settings[METADATA_VARIABLE]
    if not metadata.startswith(("postgresql", "postgres")):
        raise StartError(f"{METADATA_VARIABLE}: --executor celery keeps Airflow's metadata in "
                         f"Postgres, not in {metadata.partition(':')[0]!r}")
    # Celery keeps the tasks' results beside Airflow's metadata, in the same database.
    settings["AIRFLOW__CELERY__RESULT_BACKEND"] = (environ.get("AIRFLOW__CELERY__RESULT_BACKEND")
                                                   or f"db+{metadata}")
    settings["AIRFLOW__OPERATORS__DEFAULT_QUEUE"] = CELERY_QUEUE
    return settings


def celery_workers(count: int, env: dict[str, str], logs: Path) -> list[Component]:
    """``count`` Celery workers, each named ``worker<i>@<host>`` and serving the queue
    ``default``; their task instances record that name as their hostname."""
    workers = []
    for number in range(1, count + 1):
        name = f"worker{number}@{socket.gethostname()}"
        workers.append(Component(
            f"celery {name}",
            _airflow("celery", "worker", "--celery-hostname", name, "--queues", CELERY_QUEUE,
                     "--skip-serve-logs"),
            logs / f"celery-worker{number}.log",
            own={WORKER_NAME_VARIABLE: name,
                 "AIRFLOW__CORE__HOSTNAME_CALLABLE": "run_without_docker.celery_worker_hostname",
                 # Where the task processes import celery_worker_hostname from.
                 "PYTHONPATH": os.pathsep.join([env["PYTHONPATH"], str(REPO / "airflow")])},
        ))
    return workers


def celery_worker_hostname() -> str:
    """``[core] hostname_callable`` of the Celery workers: the worker's own name, so that two
    workers on one machine record different hostnames in their task instances."""
    return os.environ.get(WORKER_NAME_VARIABLE) or socket.getfqdn()


def check_celery_servers(settings: dict[str, str]) -> list[str]:
    """Postgres and Redis answer (the metadata database is created if missing); the banner's
    lines about them, which show no password."""
    metadata = ensure_postgres_database(settings[METADATA_VARIABLE])
    broker = _redis_answers(settings[BROKER_VARIABLE])
    return [f"Airflow metadata    Postgres, {metadata}",
            f"Celery broker       Redis, {broker}; task results in Postgres"]


def ensure_postgres_database(url: str) -> str:
    """Create the URL's database if it is missing; where it is (``host:port/database``)."""
    import psycopg2
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parts = make_url(url)
    except ArgumentError:
        raise StartError(f"{METADATA_VARIABLE} is not a database URL") from None
    database = parts.database or ""
    if not database.replace("_", "").isalnum():
        raise StartError(f"{METADATA_VARIABLE}: the database name {database!r} is not plain")
    address = f"{parts.host or 'localhost'}:{parts.port or 5432}"
    try:
        # The server's own database, which every Postgres has, to create ours in.
        conn = psycopg2.connect(host=parts.host, port=parts.port or 5432,
                                user=parts.username, password=parts.password,
                                dbname="postgres", connect_timeout=5)
    except psycopg2.OperationalError as exc:
        reason = _without(str(exc).strip().splitlines()[-1], parts.password)
        unreachable = any(word in str(exc) for word in (
            "Connection refused", "timeout expired", "could not translate host name",
            "No route to host", "Is the server running"))
        if unreachable:
            raise StartError(f"cannot reach Postgres at {address} ({METADATA_VARIABLE}): "
                             f"{reason}. Start it (Debian: apt-get install postgresql), or "
                             f"point {METADATA_VARIABLE} at yours") from None
        raise StartError(f"Postgres at {address} refused the login of {parts.username!r} "
                         f"({METADATA_VARIABLE}): {reason}") from None
    try:
        conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
        with conn.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
            if cursor.fetchone() is None:
                print(f"creating the database {database} for Airflow's metadata in Postgres "
                      f"at {address}", flush=True)
                cursor.execute(f'CREATE DATABASE "{database}"')
    finally:
        conn.close()
    return f"{address}/{database}"


def _redis_answers(url: str) -> str:
    """Redis answers at the broker's URL; where it is (``host:port/db``)."""
    import redis

    parts = urlsplit(url)
    where = f"{parts.hostname}:{parts.port or 6379}{parts.path or '/0'}"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3).ping()
    except redis.AuthenticationError as exc:
        raise StartError(f"Redis at {where} refused the login ({BROKER_VARIABLE}): "
                         f"{_without(str(exc), parts.password)}") from None
    except (redis.RedisError, ValueError) as exc:
        raise StartError(f"cannot reach Redis at {where} ({BROKER_VARIABLE}): "
                         f"{_without(str(exc), parts.password)}. Start it (Debian: apt-get "
                         f"install redis-server), or point {BROKER_VARIABLE} at yours") from None
    return where


def _celery_workers_answer(broker_url: str, names: list[str]):
    """A check that every one of the named Celery workers answers a ping through the broker."""
    from celery import Celery

    app = Celery(broker=broker_url)

    def check() -> bool:
        try:
            replies = app.control.ping(destination=names, timeout=1.0)
        except Exception:  # the broker restarting, say: ask again
            return False
        return {name for reply in replies for name in reply} >= set(names)

    return check


def _without(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


def _ensure_signing_keys(env: dict[str, str]) -> None:
    """The model signing key pair, made on the first start: the pipeline signs with the private
    key (0600), the service verifies with the public one."""
    from serving.store.signing import ensure_key_pair, key_id, load_public_key

    private, public = Path(env[PRIVATE_KEY_ENV]), Path(env[PUBLIC_KEY_ENV])
    if ensure_key_pair(private, public):
        print(f"created the model signing key pair {key_id(load_public_key(public))} in "
              f"{_shown(private.parent)}", flush=True)


def ensure_database(url: str) -> None:
    """Create the connection's database if it is missing, so a fresh server works at once."""
    import MySQLdb

    from penguins.database import ConnectionProblem, open_connection

    parts = urlsplit(url)
    database = parts.path.lstrip("/")
    if not database.replace("_", "").isalnum():
        raise StartError(f"{CONNECTION_VARIABLE}: the database name {database!r} is not plain")
    address = f"{parts.hostname}:{parts.port or 3306}"
    try:
        conn = open_connection(lambda: MySQLdb.connect(
            host=parts.hostname or "127.0.0.1", port=parts.port or 3306,
            user=unquote(parts.username or ""), password=unquote(parts.password or ""),
            connect_timeout=5,
        ), "mysql_airflow_conn", address)
    except ConnectionProblem as problem:
        hint = ("" if problem.retryable else " (Debian's MariaDB lets root in through its "
                "socket only: create a user with a password, or unset the variable to use the "
                "embedded server)")
        raise StartError(f"{CONNECTION_VARIABLE}: {problem}{hint}") from None
    with conn:
        conn.cursor().execute(f"CREATE DATABASE IF NOT EXISTS `{database}`")


def stop_all(components: list[Component], seconds: float = 30) -> None:
    """Stop every component: SIGTERM to each, newest first, then SIGKILL to whatever is left in
    their sessions (task processes have process groups of their own, but not sessions)."""
    for component in reversed(components):
        if component.running():
            with suppress(ProcessLookupError):
                component.process.terminate()
    deadline = time.monotonic() + seconds
    for component in reversed(components):
        if component.process is not None:
            with suppress(subprocess.TimeoutExpired):
                component.process.wait(timeout=max(0.1, deadline - time.monotonic()))
    for component in components:
        if component.process is not None:
            for pid in processes_in_session(component.process.pid):
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if component.process.poll() is None:
                component.process.kill()
            component.process.wait()


def processes_in_session(session: int) -> list[int]:
    """The processes whose session id is ``session`` (Linux's /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with suppress(OSError, IndexError, ValueError):
                # Fields after the command name, which is in parentheses and may hold spaces.
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
                if int(fields[3]) == session:
                    found.append(int(entry.name))
    return found


def _set_up_and_restart() -> None:
    """Install what is missing, then run this file again with the project's environment."""
    print("== the project's environment is missing: running bash .ci/setup", flush=True)
    result = subprocess.run(["bash", str(REPO / ".ci" / "setup")])
    python = REPO / ".venv" / "bin" / "python"
    if result.returncode != 0 or not python.exists():
        raise SystemExit(f"bash .ci/setup failed (exit {result.returncode}); see above")
    os.execv(python, [str(python), str(Path(__file__).resolve()), *sys.argv[1:]])


def _start_mariadb(home: Path, host: str, port: int):
    import local_mariadb

    folder = home / "mariadb"
    print(f"starting the embedded MariaDB on {host}:{port} (data in {_shown(folder)})",
          flush=True)
    try:
        server = local_mariadb.start(folder, port=port, host=host, new_session=True)
    except local_mariadb.MariaDBError as problem:
        raise StartError(f"the embedded MariaDB did not start: {problem}") from None
    credentials_file = folder / "credentials.json"
    try:
        credentials = local_mariadb.ensure_database(server, DATABASE, credentials_file)
    except BaseException:
        server.stop()
        raise
    local = _local_address(host)
    url = (f"mysql://{quote(credentials['user'], safe='')}:"
           f"{quote(credentials['password'], safe='')}@{local}:{port}/{DATABASE}")
    line = (f"embedded MariaDB, {local}:{port}, database {DATABASE}; user and password in "
            f"{_shown(credentials_file)}")
    return server, url, line


def _local_address(host: str) -> str:
    """Where this machine reaches a server listening on ``host`` (all addresses: loopback)."""
    return "127.0.0.1" if host in ("0.0.0.0", "::") else host


def _airflow(*args: str) -> list[str]:
    return [sys.executable, "-m", "airflow", *args]


def _run_to_end(component: Component, env: dict[str, str], requests: StopRequests) -> None:
    print(f"running {component.name}", flush=True)
    component.start(env)
    try:
        while component.running():
            requests.sleep(0.2)
    finally:
        stop_all([component])
    if component.process.returncode != 0:
        raise StartError(f"{component.name} failed (exit {component.process.returncode}); the "
                         f"end of {component.log}:\n{component.tail()}")


def _wait_until_ready(components: list[Component], requests: StopRequests, checks,
                      seconds: float = 300) -> None:
    print(f"starting {', '.join(c.name for c in components)}", flush=True)
    waiting = dict(checks)
    deadline = time.monotonic() + seconds
    while waiting:
        for component in components:
            if not component.running():
                raise StartError(f"{component.name} exited with {component.process.returncode} "
                                 f"while starting; the end of {component.log}:\n"
                                 f"{component.tail()}")
        for name, check in list(waiting.items()):
            if check():
                del waiting[name]
        if time.monotonic() > deadline:
            raise StartError(f"{' and '.join(waiting)} did not answer within {seconds:.0f} s; "
                             f"logs in {components[0].log.parent}")
        requests.sleep(0.5)


def _answers(url: str) -> bool:
    try:
        with urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _airflow_healthy(base_url: str) -> bool:
    """Airflow's own health report says the database and every component are healthy."""
    try:
        with urlopen(f"{base_url}/api/v2/monitor/health", timeout=5) as response:
            health = json.load(response)
    except (OSError, ValueError):
        return False
    parts = ("metadatabase", "scheduler", "dag_processor", "triggerer")
    return all((health.get(part) or {}).get("status") == "healthy" for part in parts)


def _free_port(variable: str, what: str, default: str, host: str) -> int:
    text = os.environ.get(variable) or default
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise StartError(f"{variable}={text!r} is not a port number")
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, int(text)))
        except OSError:
            raise StartError(f"port {text} on {host} is taken, so {what} cannot listen there: "
                             f"stop what uses it, or set {variable} to another port") from None
    return int(text)


def _banner(airflow_url: str, serving_url: str, passwords: Path, mysql_line: str | None,
            models_dir: str, logs: Path, more: list[str]) -> str:
    mysql = mysql_line or f"your server, from {CONNECTION_VARIABLE}"
    lines = "".join(f"  {line}\n" for line in more)
    return f"""
Penguins MLOps is up.
  Airflow UI          {airflow_url}  (user admin; password in {_shown(passwords)})
  Prediction service  {serving_url}  (OpenAPI page: {serving_url}/schema)
  MySQL               {mysql}
{lines}  Models              {_shown(Path(models_dir))}
  Logs                {_shown(logs)}
Press Trigger on penguins_pipeline in the Airflow UI. Ctrl-C stops everything.
"""


def _shown(path: Path) -> str:
    """``path`` relative to the current folder when it lies inside it."""
    with suppress(ValueError):
        return str(path.resolve().relative_to(Path.cwd()))
    return str(path)


if __name__ == "__main__":
    main()
