"""What a user does: start the system without Docker, press Trigger, ask the service.

Starts ``airflow/run_without_docker.py`` (Airflow's components + the prediction service) as a
user would, triggers ``penguins_pipeline`` through Airflow's REST API exactly as the UI's
Trigger button does (a token, then a new DAG run with its conf), waits for it, then asks the
service, through ``serving/client.py``, for a prediction from every new model. Every process
is stopped at the end, also when the test fails, and the test fails if any is left behind.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from penguins.contract import MODEL_NAMES
from serving.client import PenguinsClient
from tests.conftest import REPO
from tests.mysql_server import free_port
from tests.support import processes_with_environment

pytestmark = pytest.mark.airflow

PENGUIN = {"island": "Biscoe", "bill_length_mm": 47.5, "bill_depth_mm": 15.0,
           "flipper_length_mm": 218, "body_mass_g": 4950, "sex": "female", "year": 2008}


def _wait(what: str, check, seconds: float, log: Path):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if result := check():
                return result
        except requests.RequestException:
            pass  # a busy api-server on a loaded 2-core machine: ask again
        time.sleep(1)
    pytest.fail(f"{what} did not happen within {seconds:.0f} s; log:\n"
                + log.read_text(errors="replace")[-4000:])


@pytest.fixture(scope="module")
def system(mysql, tmp_path_factory):
    """The whole system, started with the README's no-Docker command, once for the module's
    tests; stopped afterwards."""
    tmp_path = tmp_path_factory.mktemp("system")
    home, models, log = tmp_path / "home", tmp_path / "models", tmp_path / "system.log"
    api_port, serving_port = free_port(), free_port()
    # Not the test setup's key pair either: the launcher makes its own on its first start.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__")
           and k not in ("MODEL_SIGNING_KEY_FILE", "MODEL_PUBLIC_KEY_FILE")}
    env.update(AIRFLOW_HOME=str(home), AIRFLOW_API_PORT=str(api_port),
               SERVING_PORT=str(serving_port), MODELS_DIR=str(models),
               AIRFLOW_CONN_MYSQL_AIRFLOW_CONN=mysql.url, AIRFLOW_PARALLELISM="3")

    with log.open("wb") as out:
        launcher = subprocess.Popen(
            [sys.executable, str(REPO / "airflow" / "run_without_docker.py")], env=env,
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        _wait("the system's start", lambda: launcher.poll() is not None
              or "Penguins MLOps is up." in log.read_text(errors="replace"), 300, log)
        assert launcher.poll() is None, log.read_text(errors="replace")[-4000:]
        yield {"airflow": f"http://127.0.0.1:{api_port}",
               "serving": f"http://127.0.0.1:{serving_port}", "home": home, "models": models,
               "log": log}
    finally:
        launcher.send_signal(signal.SIGTERM)
        try:
            launcher.wait(timeout=120)
        finally:
            leftovers = processes_with_environment(f"AIRFLOW_HOME={home}")
            for pid in leftovers:
                os.kill(pid, signal.SIGKILL)
        assert launcher.returncode == 0, log.read_text(errors="replace")[-4000:]
        assert leftovers == [], f"processes left behind: {leftovers}"


def test_trigger_through_the_rest_api_then_predict_with_every_new_model(system, mysql):
    api = requests.Session()
    users = json.loads((system["home"] / "simple_auth_manager_passwords.json.generated")
                       .read_text())
    username, password = next(iter(users.items()))
    token = api.post(f"{system['airflow']}/auth/token",
                     json={"username": username, "password": password}, timeout=30)
    assert token.status_code in (200, 201), token.text
    api.headers["Authorization"] = f"Bearer {token.json()['access_token']}"
    dag_url = f"{system['airflow']}/api/v2/dags/penguins_pipeline"
    _wait("the DAG's parsing", lambda: api.get(dag_url, timeout=30).ok, 120, system["log"])
    assert api.get(dag_url, timeout=30).json()["is_paused"] is False

    # Two triggers at once, as two impatient users would: the DAG allows one active run, so the
    # second waits and their truncate and load cannot interleave.
    run_ids = []
    for models in (list(MODEL_NAMES), ["knn"]):
        triggered = api.post(f"{dag_url}/dagRuns", timeout=30,
                             json={"logical_date": None, "conf": {"models": models}})
        assert triggered.status_code == 200, triggered.text
        run_ids.append(triggered.json()["dag_run_id"])
    run_id = run_ids[0]
    run_url = f"{dag_url}/dagRuns/{run_id}"

    def finished(url):
        run = api.get(url, timeout=30).json()
        return run if run["state"] in ("success", "failed") else None

    runs = [_wait("a DAG run", lambda u=f"{dag_url}/dagRuns/{r}": finished(u), 600, system["log"])
            for r in run_ids]
    assert [r["state"] for r in runs] == ["success", "success"]
    assert runs[1]["start_date"] >= runs[0]["end_date"], "the two runs overlapped"
    with mysql.connect() as conn, conn.cursor() as cursor:
        cursor.execute("SELECT (SELECT COUNT(*) FROM penguins_raw), "
                       "(SELECT COUNT(*) FROM penguins_clean)")
        assert cursor.fetchone() == (344, 333)
    instances = api.get(f"{run_url}/taskInstances", timeout=30).json()["task_instances"]
    training = {ti["rendered_map_index"]: ti["state"] for ti in instances
                if ti["task_id"] == "train"}
    assert training == dict.fromkeys(MODEL_NAMES, "success")

    # The second run retrained k-NN only: it answers from that run, the rest from the first.
    trained_by = dict.fromkeys(MODEL_NAMES, run_ids[0]) | {"knn": run_ids[1]}
    with PenguinsClient(system["serving"]) as client:
        def all_new_models_served():
            listed = client.models().models
            return all(
                any(m.name == name and m.serving and m.version.dag_run_id == trained_by[name]
                    for m in listed)
                for name in MODEL_NAMES
            )

        _wait("the service's reload", all_new_models_served, 10, system["log"])
        for name in MODEL_NAMES:
            answer = client.predict(PENGUIN, model=name)
            assert answer.species == "Gentoo", (name, answer)
            assert answer.model.dag_run_id == trained_by[name]
            assert abs(sum(answer.probabilities.values()) - 1) < 1e-6
        # k-NN's second version went through the gate against its first, on the same rows.
        versions = client.versions("knn").versions
        assert [v.state for v in versions] == ["promoted", "previous"]
        assert versions[0].gate["baseline_version"] == versions[1].version
        first = client.predict(PENGUIN, model="knn", version=versions[1].version)
        assert first.model.dag_run_id == run_ids[0]


def test_the_first_start_makes_a_key_pair_and_the_service_gets_only_the_public_key(system):
    keys = system["home"] / "model-signing"
    assert stat.S_IMODE((keys / "private.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((keys / "public.pem").stat().st_mode) == 0o644
    assert "created the model signing key pair" in system["log"].read_text()
    serving = [pid for pid in processes_with_environment(f"AIRFLOW_HOME={system['home']}")
               if b"serving" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
    assert serving, "the prediction service's process was not found"
    for pid in serving:
        environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert f"MODEL_PUBLIC_KEY_FILE={keys / 'public.pem'}".encode() in environment
        assert not any(v.startswith(b"MODEL_SIGNING_KEY_FILE=") for v in environment)
