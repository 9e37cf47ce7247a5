"""Run the whole system on one machine without Docker: Airflow, and the prediction service.

    AIRFLOW_CONN_MYSQL_AIRFLOW_CONN=mysql://user:password@127.0.0.1:3306/penguins \\
        uv run python airflow/run_without_docker.py

starts ``airflow standalone`` (metadata in SQLite under ``airflow/home/``, LocalExecutor with a
small parallelism, the DAG unpaused, no examples) and ``uvicorn serving.app:app``, both reading
and writing ``MODELS_DIR``. The MySQL server is yours: any MySQL-compatible server that allows
``LOCAL INFILE``; its database is created if it is missing. Ctrl-C stops everything.

Environment (all optional but the connection): ``AIRFLOW_HOME`` (default ``airflow/home``),
``AIRFLOW_API_PORT`` (8080), ``SERVING_PORT`` (8989), ``AIRFLOW_PARALLELISM`` (4),
``MODELS_DIR``, ``MODEL_SIGNING_KEY``.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path
from urllib.parse import unquote, urlsplit
from urllib.request import urlopen

REPO = Path(__file__).resolve().parents[1]
CONNECTION_VARIABLE = "AIRFLOW_CONN_MYSQL_AIRFLOW_CONN"


def system_environment(environ: dict[str, str]) -> dict[str, str]:
    """The environment both processes run in: the caller's, plus what this system needs."""
    env = dict(environ)
    airflow_home = Path(env.get("AIRFLOW_HOME") or REPO / "airflow" / "home")
    api_port = env.get("AIRFLOW_API_PORT", "8080")
    env.update(
        AIRFLOW_HOME=str(airflow_home),
        AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "airflow" / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="False",
        # The default of 32 forks 32 task workers on a 2-core machine.
        AIRFLOW__CORE__PARALLELISM=env.get("AIRFLOW_PARALLELISM", "4"),
        AIRFLOW__API__PORT=api_port,
        AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"http://localhost:{api_port}/execution/",
        MODELS_DIR=env.get("MODELS_DIR") or str(REPO / "shared_models"),
        # airflow standalone starts its components as `airflow ...` from PATH.
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    )
    # Every component must verify the Execution API's tokens with the same secret.
    env.setdefault("AIRFLOW__API_AUTH__JWT_SECRET", secrets.token_hex(32))
    return env


def ensure_database(url: str) -> None:
    """Create the connection's database if it is missing, so a fresh server works at once."""
    import MySQLdb

    parts = urlsplit(url)
    database = parts.path.lstrip("/")
    if not database.replace("_", "").isalnum():
        raise SystemExit(f"{CONNECTION_VARIABLE}: the database name {database!r} is not plain")
    try:
        conn = MySQLdb.connect(
            host=parts.hostname or "127.0.0.1", port=parts.port or 3306,
            user=unquote(parts.username or ""), password=unquote(parts.password or ""),
            connect_timeout=5,
        )
    except MySQLdb.OperationalError as exc:
        raise SystemExit(f"{CONNECTION_VARIABLE}: cannot reach MySQL at "
                         f"{parts.hostname}:{parts.port or 3306}: {exc}") from exc
    with conn:
        conn.cursor().execute(f"CREATE DATABASE IF NOT EXISTS `{database}`")


def _refuse_taken_port(port: str, what: str) -> None:
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", int(port))) == 0:
            raise SystemExit(f"port {port} is taken: something already listens there, so {what} "
                             "cannot; stop it or choose another port (see the docstring)")


def _wait_for(url: str, process: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{process.args[0]} exited with {process.returncode}")
        try:
            with urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"nothing answered at {url} within {seconds:.0f} s")


def stop(process: subprocess.Popen, first_signal: signal.Signals, seconds: float = 30) -> None:
    """Stop a process group: ``first_signal``, then SIGKILL to the whole group if it lingers."""
    if process.poll() is None:
        process.send_signal(first_signal)
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=seconds)
    # airflow standalone's children (scheduler, api-server, task workers) share its group.
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def main() -> None:
    if not os.environ.get(CONNECTION_VARIABLE):
        raise SystemExit(f"set {CONNECTION_VARIABLE}, e.g. "
                         "mysql://penguins:secret@127.0.0.1:3306/penguins (see the README)")
    env = system_environment(dict(os.environ))
    ensure_database(env[CONNECTION_VARIABLE])
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    Path(env["MODELS_DIR"]).mkdir(parents=True, exist_ok=True)
    api_port, serving_port = env["AIRFLOW__API__PORT"], env.get("SERVING_PORT", "8989")
    _refuse_taken_port(api_port, "Airflow's api-server")
    _refuse_taken_port(serving_port, "the prediction service")

    # Own process groups, and the default SIGINT handling restored: airflow standalone stops
    # cleanly on SIGINT only, and a background shell job would start with SIGINT ignored.
    def child_setup() -> None:
        os.setsid()
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    airflow = subprocess.Popen([sys.executable, "-m", "airflow", "standalone"], env=env,
                               cwd=REPO, preexec_fn=child_setup)
    serving = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "serving.app:app", "--host",
         env.get("SERVING_HOST", "127.0.0.1"), "--port", serving_port],
        env=env, cwd=REPO, preexec_fn=child_setup,
    )

    def shut_down(signum, frame) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, shut_down)
    try:
        _wait_for(f"http://127.0.0.1:{serving_port}/health", serving, 60)
        _wait_for(f"http://127.0.0.1:{api_port}/api/v2/monitor/health", airflow, 180)
        password_file = Path(env["AIRFLOW_HOME"]) / "simple_auth_manager_passwords.json.generated"
        print(f"\nAirflow:            http://localhost:{api_port}"
              f" (admin password in {password_file})"
              f"\nPrediction service: http://localhost:{serving_port}/schema"
              f"\nModels folder:      {env['MODELS_DIR']}\nCtrl-C stops both.\n", flush=True)
        while airflow.poll() is None and serving.poll() is None:
            time.sleep(1)
        ended = "airflow standalone" if airflow.poll() is not None else "the prediction service"
        print(f"{ended} stopped by itself; stopping the rest", file=sys.stderr, flush=True)
        exit_code = 1
    except KeyboardInterrupt:
        exit_code = 0
    finally:
        stop(serving, signal.SIGTERM)
        stop(airflow, signal.SIGINT)
    sys.exit(exit_code)


if __name__ == "__main__":
    main()
