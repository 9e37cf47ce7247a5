"""The distributed shape: ``run_without_docker.py --executor celery --celery-workers 2``.

Each test starts the real system (Airflow on a Postgres database of its own, Redis as the
broker, two Celery workers named ``worker1@<host>`` and ``worker2@<host>``, the prediction
service; ``tests/services.py`` finds or starts Postgres and Redis), triggers
``penguins_pipeline`` through the REST API as the UI's Trigger button does, and reads what
happened from Airflow's task instances: which worker ran each training copy (``hostname``),
when, and in which try. Nothing is mocked.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests

from penguins.contract import MODEL_NAMES
from run_without_docker import processes_in_session
from tests.conftest import REPO
from tests.mysql_server import free_port
from tests.services import postgres_database, redis_broker
from tests.support import processes_with_environment

pytestmark = [pytest.mark.airflow, pytest.mark.celery]

LAUNCHER = REPO / "airflow" / "run_without_docker.py"
DAG = "penguins_pipeline"
WORKERS = [f"worker{n}@{socket.gethostname()}" for n in (1, 2)]
# An orphaned task (its worker killed) is noticed once its heartbeats stop for this long; Airflow's
# default, 300 s, is for machines that pause under load, not for a test.
HEARTBEAT_TIMEOUT = {"AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
                     "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "2"}


@dataclass
class System:
    airflow: str
    serving: str
    home: Path
    log: Path
    api: requests.Session

    def logs(self) -> str:
        """The end of the launcher's output and of every component's log, for a failure."""
        parts = [f"== launcher\n{_tail(self.log)}"]
        for path in sorted((self.home / "launcher-logs").glob("*.log")):
            parts.append(f"== {path.name}\n{_tail(path, 1500)}")
        return "\n".join(parts)

    def wait(self, what: str, check: Callable[[], Any], seconds: float) -> Any:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                if result := check():
                    return result
            except requests.RequestException:
                pass  # a busy api-server on a loaded 2-core machine: ask again
            time.sleep(0.5)
        pytest.fail(f"{what} did not happen within {seconds:.0f} s\n{self.logs()}")

    def get(self, path: str) -> Any:
        answer = self.api.get(f"{self.airflow}/api/v2/dags/{DAG}{path}", timeout=30)
        answer.raise_for_status()
        return answer.json()

    def trigger(self) -> str:
        self.wait("the DAG's parsing", lambda: self.get(""), 120)
        triggered = self.api.post(f"{self.airflow}/api/v2/dags/{DAG}/dagRuns", timeout=30,
                                  json={"logical_date": None, "conf": {}})
        assert triggered.status_code == 200, triggered.text
        return triggered.json()["dag_run_id"]

    def finished(self, run_id: str, seconds: float) -> dict:
        def done():
            run = self.get(f"/dagRuns/{run_id}")
            return run if run["state"] in ("success", "failed") else None

        return self.wait(f"the run {run_id}", done, seconds)

    def training(self, run_id: str) -> list[dict]:
        """The run's mapped ``train`` copies, as the API lists their task instances."""
        instances = self.get(f"/dagRuns/{run_id}/taskInstances?limit=100")["task_instances"]
        return [ti for ti in instances if ti["task_id"] == "train"]

    def tries(self, run_id: str, map_index: int) -> list[dict]:
        return self.get(f"/dagRuns/{run_id}/taskInstances/train/{map_index}/tries")[
            "task_instances"]


def _tail(path: Path, characters: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-characters:]
    except OSError:
        return "(no log)"


@pytest.fixture(scope="module")
def celery_system(mysql, tmp_path_factory) -> Iterator[System]:
    """The distributed shape, started as the README says, once for this module's tests (the
    killed worker's test comes last); stopped afterwards, leaving nothing. A dead worker's
    tasks are noticed after ``HEARTBEAT_TIMEOUT``, not Airflow's five minutes."""
    tmp_path = tmp_path_factory.mktemp("celery")
    home, log = tmp_path / "home", tmp_path / "launcher.log"
    api_port, serving_port = free_port(), free_port()
    with postgres_database() as (postgres, database), redis_broker() as broker:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__")
               and k not in ("MODEL_SIGNING_KEY_FILE", "MODEL_PUBLIC_KEY_FILE")}
        env.update(AIRFLOW_HOME=str(home), AIRFLOW_API_PORT=str(api_port),
                   SERVING_PORT=str(serving_port), MODELS_DIR=str(tmp_path / "models"),
                   AIRFLOW_CONN_MYSQL_AIRFLOW_CONN=mysql.url,
                   AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=postgres.url(database),
                   AIRFLOW__CELERY__BROKER_URL=broker)
        env.update(HEARTBEAT_TIMEOUT)
        with log.open("wb") as out:
            launcher = subprocess.Popen(
                [sys.executable, str(LAUNCHER), "--executor", "celery", "--celery-workers", "2"],
                env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        system = System(f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{serving_port}",
                        home, log, requests.Session())
        try:
            system.wait("the system's start", lambda: launcher.poll() is not None
                        or "Penguins MLOps is up." in log.read_text(errors="replace"), 300)
            assert launcher.poll() is None, system.logs()
            assert f"creating the database {database} " in log.read_text(), system.logs()
            users = json.loads((home / "simple_auth_manager_passwords.json.generated")
                               .read_text())
            username, password = next(iter(users.items()))
            token = system.api.post(f"{system.airflow}/auth/token", timeout=30,
                                    json={"username": username, "password": password})
            assert token.status_code in (200, 201), token.text
            system.api.headers["Authorization"] = f"Bearer {token.json()['access_token']}"
            yield system
        finally:
            # A pool or task process may retitle itself over its environment: the sessions of
            # those found this way hold the others.
            found = processes_with_environment(f"AIRFLOW_HOME={home}")
            sessions = {launcher.pid} | _sessions(found)
            launcher.send_signal(signal.SIGTERM)
            try:
                launcher.wait(timeout=120)
            finally:
                leftovers = sorted(set(processes_with_environment(f"AIRFLOW_HOME={home}")).union(
                    *(processes_in_session(session) for session in sessions)))
                for pid in leftovers:
                    with suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            assert launcher.returncode == 0, system.logs()
            assert leftovers == [], f"processes left behind: {leftovers}"


def _sessions(pids: list[int]) -> set[int]:
    found = set()
    for pid in pids:
        with suppress(ProcessLookupError):
            found.add(os.getsid(pid))
    return found


def _when(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _overlapping_on_different_workers(copies: list[dict]) -> list[tuple[str, str]]:
    return [(a["rendered_map_index"], b["rendered_map_index"])
            for a in copies for b in copies
            if a["hostname"] < b["hostname"]
            and _when(a["start_date"]) < _when(b["end_date"])
            and _when(b["start_date"]) < _when(a["end_date"])]


def test_the_mapped_training_runs_on_both_workers_at_once(celery_system):
    system = celery_system
    started = time.monotonic()
    run_id = system.trigger()
    run = system.finished(run_id, 240)
    assert run["state"] == "success", system.logs()
    copies = system.training(run_id)
    ran_on = {ti["rendered_map_index"]: ti["hostname"] for ti in copies}
    print(f"run {run_id} took {time.monotonic() - started:.0f} s; each copy's worker: {ran_on}")
    assert sorted(ran_on) == sorted(MODEL_NAMES), ran_on
    assert all(ti["state"] == "success" for ti in copies), copies
    assert set(ran_on.values()) == set(WORKERS), f"not on both workers: {ran_on}"
    assert _overlapping_on_different_workers(copies), (
        "no two copies on different workers overlapped: "
        + str([(ti["rendered_map_index"], ti["hostname"], ti["start_date"], ti["end_date"])
               for ti in copies]))

    def served_from_this_run():
        models = requests.get(f"{system.serving}/models", timeout=10).json()["models"]
        by_name = {m["name"]: m for m in models}
        return by_name if all(
            (by_name.get(name) or {}).get("serving")
            and by_name[name]["version"]["dag_run_id"] == run_id for name in MODEL_NAMES
        ) else None

    served = system.wait("the service serving the run's models", served_from_this_run, 30)
    assert {name: served[name]["version"]["dag_run_id"] for name in MODEL_NAMES} == dict.fromkeys(
        MODEL_NAMES, run_id)


def _kill_worker(name: str, home: Path) -> list[int]:
    """SIGKILL every process of the worker ``name``, as if its machine had gone away: its
    process group and its task processes (in groups of their own), which all share the session
    the launcher started it in. (Found through the session, since a pool or task process
    retitles itself over its environment.)"""
    found = (set(processes_with_environment(f"PENGUINS_CELERY_WORKER={name}"))
             & set(processes_with_environment(f"AIRFLOW_HOME={home}")))
    assert found, f"no process of {name} found"
    [session] = _sessions(sorted(found))
    pids = processes_in_session(session)
    assert len(pids) > 2, f"{name}: only {pids} in its session, no task processes"
    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def test_a_copy_on_a_killed_worker_is_retried_on_the_other(celery_system):
    system = celery_system
    started = time.monotonic()
    run_id = system.trigger()

    def two_copies_running_on_one_worker():
        # With both its task processes busy, a worker holds no further message (Airflow's
        # prefetch multiplier is 1), so no copy is left waiting in the killed worker's hands.
        running = [ti for ti in system.training(run_id) if ti["state"] == "running"]
        for worker in WORKERS:
            on_it = [ti for ti in running if ti["hostname"] == worker]
            if len(on_it) == 2:
                return worker, on_it
        return None

    victim, interrupted = system.wait("two training copies running on one worker",
                                      two_copies_running_on_one_worker, 180)
    [survivor] = [w for w in WORKERS if w != victim]
    killed = _kill_worker(victim, system.home)
    killed_at = time.monotonic()
    run = system.finished(run_id, 240)
    print(f"killed {victim} ({len(killed)} processes) while it trained "
          f"{[MODEL_NAMES[ti['map_index']] for ti in interrupted]}; the run ended "
          f"{time.monotonic() - killed_at:.0f} s later, {time.monotonic() - started:.0f} s "
          "after the trigger")
    assert run["state"] == "success", system.logs()
    assert "the other workers carry on" in system.log.read_text(), system.logs()

    copies = {ti["map_index"]: ti for ti in system.training(run_id)}
    assert all(ti["state"] == "success" for ti in copies.values()), system.logs()
    for ti in interrupted:
        tries = system.tries(run_id, ti["map_index"])
        history = [(t["try_number"], t["hostname"], t["state"]) for t in tries]
        print(f"{copies[ti['map_index']]['rendered_map_index']}: {history}")
        first = next(t for t in tries if t["try_number"] == ti["try_number"])
        assert (first["hostname"], first["state"]) == (victim, "failed"), history
        final = copies[ti["map_index"]]
        assert final["try_number"] > ti["try_number"], history
        assert (final["hostname"], final["state"]) == (survivor, "success"), history
