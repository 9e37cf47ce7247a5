"""The pipeline's Assets as the Airflow UI and REST API show them, from a real system.

Starts the system as the README's no-Docker command does (the end-to-end test's fixture),
triggers one run as the Trigger button does, then reads the run's asset events through the
REST API (``/api/v2/assets/events``) and the graph the UI's Assets view draws for a model
(``/ui/dependencies``, data lineage).
"""

from __future__ import annotations

import json

import pytest
import requests

from penguins.contract import MODEL_NAMES
from serving.store import signing
from serving.store.reader import Trust, read_manifest
from tests.test_end_to_end import _wait, system  # noqa: F401 (system is a fixture)

pytestmark = pytest.mark.airflow


def _api(system) -> requests.Session:  # noqa: F811
    api = requests.Session()
    users = json.loads((system["home"] / "simple_auth_manager_passwords.json.generated")
                       .read_text())
    username, password = next(iter(users.items()))
    token = api.post(f"{system['airflow']}/auth/token",
                     json={"username": username, "password": password}, timeout=30)
    assert token.status_code in (200, 201), token.text
    api.headers["Authorization"] = f"Bearer {token.json()['access_token']}"
    return api


def test_a_run_publishes_its_lineage_and_one_event_per_model(system):  # noqa: F811
    api, airflow = _api(system), system["airflow"]
    dag_url = f"{airflow}/api/v2/dags/penguins_pipeline"
    _wait("the DAG's parsing", lambda: api.get(dag_url, timeout=30).ok, 120, system["log"])
    triggered = api.post(f"{dag_url}/dagRuns", timeout=30,
                         json={"logical_date": None, "conf": {"models": ["knn", "svm"]}})
    assert triggered.status_code == 200, triggered.text
    run_id = triggered.json()["dag_run_id"]

    def finished():
        run = api.get(f"{dag_url}/dagRuns/{run_id}", timeout=30).json()
        return run if run["state"] in ("success", "failed") else None

    assert _wait("the DAG run", finished, 600, system["log"])["state"] == "success"

    answer = api.get(f"{airflow}/api/v2/assets/events", timeout=30,
                     params={"source_run_id": run_id, "limit": 100})
    assert answer.ok, answer.text
    events = {e["name"]: e for e in answer.json()["asset_events"]}
    models = {f"penguins_model_{name}": name for name in MODEL_NAMES}
    assert sorted(events) == sorted(["penguins_raw", "penguins_clean", *models])
    assert events["penguins_raw"]["source_task_id"] == "load_raw"
    assert events["penguins_raw"]["uri"] == "x-penguins://mysql/penguins_raw"
    assert events["penguins_raw"]["extra"]["rows"] == 344
    assert events["penguins_clean"]["source_task_id"] == "preprocess"
    assert events["penguins_clean"]["extra"]["rows"] == 333
    manifest = read_manifest(system["models"], Trust(signing.load_public_key(
        system["home"] / "model-signing" / "public.pem")))
    for asset, name in models.items():
        event = events[asset]
        assert (event["source_task_id"], event["source_map_index"]) == ("promote", -1)
        assert event["uri"] == f"x-penguins://models/{name}"
        extra = event["extra"]
        if name in ("knn", "svm"):
            assert extra["version"] == manifest.models[name].promoted
            assert extra["promoted"] is True
            assert extra["metrics"]["accuracy"] > 0.9
        else:
            assert (extra["version"], extra["promoted"]) == (None, False)
            assert extra["not_trained"] == "not among the models chosen for this run"

    # The Assets view's graph for a model: the whole way back to the source CSV.
    assets = api.get(f"{airflow}/api/v2/assets", params={"limit": 100}, timeout=30).json()
    ids = {a["name"]: a["id"] for a in assets["assets"]}
    graph = api.get(f"{airflow}/ui/dependencies", timeout=30, params={
        "node_id": f"asset:{ids['penguins_model_knn']}", "dependency_type": "data"})
    assert graph.ok, graph.text
    labels = {node["id"]: node["label"] for node in graph.json()["nodes"]}
    edges = {(labels[e["source_id"]], labels[e["target_id"]]) for e in graph.json()["edges"]}
    task = "penguins_pipeline.{}".format
    assert edges == {
        ("penguins_source_csv", task("load_raw")), (task("load_raw"), "penguins_raw"),
        ("penguins_raw", task("preprocess")), (task("preprocess"), "penguins_clean"),
        ("penguins_clean", task("train")), ("penguins_clean", task("promote")),
        (task("promote"), "penguins_model_knn"),
    }
