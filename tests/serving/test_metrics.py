"""``/metrics``, as Prometheus reads it: in process, and from a real service of two workers,
which must answer the same totals whichever worker takes the scrape."""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import requests
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from serving.store.layout import PICKLE_FILE
from tests.serving.conftest import (
    PENGUIN,
    REPO,
    export_raw,
    promote,
    run_uvicorn,
    sample,
    served_version,
    wait_until,
)

PREDICT = "/predict/{model_name}"
TWO_STARTING = 180
"""Seconds two workers may take to start: each loads every model, on a busy test machine."""


def _labels_of(exposition: str) -> set[tuple[str, str]]:
    return {(key, value) for family in text_string_to_metric_families(exposition)
            for found in family.samples for key, value in found.labels.items()}


def test_metrics_as_prometheus_reads_them(client, models_dir):
    for _ in range(3):
        assert client.post("/predict/svm", json=PENGUIN).status_code == 200
    assert client.post("/predict/knn", json=PENGUIN).status_code == 200
    assert client.post("/predict/svm", json={**PENGUIN, "sex": "unknown"}).status_code == 400
    assert client.post("/predict-batch/knn", json={"penguins": [PENGUIN] * 4}).status_code == 200
    assert client.get("/models/no_such_model").status_code == 404
    export_raw(models_dir, "knn", b"not a pickle")
    wait_until(lambda: sample(client.get("/metrics").text, "penguins_model_load_errors_total",
                              model="knn"))

    response = client.get("/metrics")
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    text = response.text

    def requests_counted(route: str, status: str, method: str = "POST") -> float | None:
        return sample(text, "penguins_http_requests_total", method=method, route=route,
                      status=status)

    assert requests_counted(PREDICT, "200") == 4
    assert requests_counted(PREDICT, "400") == 1
    assert requests_counted("/predict-batch/{model_name}", "200") == 1
    assert requests_counted("/models/{model_name}", "404", method="GET") == 1
    assert sample(text, "penguins_http_request_duration_seconds_count", route=PREDICT) == 5
    assert sample(text, "penguins_http_request_duration_seconds_bucket", route=PREDICT,
                  le="+Inf") == 5
    assert sample(text, "penguins_predictions_total", model="svm") == 3
    assert sample(text, "penguins_predictions_total", model="knn") == 2
    assert sample(text, "penguins_predicted_rows_total", model="knn") == 5
    assert sample(text, "penguins_prediction_duration_seconds_count", model="knn") == 2
    assert sample(text, "penguins_model_load_errors_total", model="knn") == 1
    assert sample(text, "penguins_model_load_errors_total", model="svm") is None

    models = client.get("/models").json()["models"]
    served = {m["name"]: m["version"]["version"] for m in models if m["serving"]}
    assert len(served) == 5
    infos = {found.labels["model"]: found.labels["version"]
             for family in text_string_to_metric_families(text)
             for found in family.samples if found.name == "penguins_model_info"}
    assert infos == served
    assert sample(text, "penguins_models_loaded") == 5
    # Bounded labels: route templates, never the path asked for; no series' creation times.
    assert not any("no_such_model" in value for _, value in _labels_of(text))
    assert "_created" not in text


def test_each_app_counts_its_own_requests(make_client, models_dir):
    """Two apps in one process: each has its own registry (the global one would refuse the
    second app's metrics, or mix both apps' counts)."""
    first, second = make_client(models_dir), make_client(models_dir)
    for _ in range(3):
        first.post("/predict/svm", json=PENGUIN)
    second.post("/predict/svm", json=PENGUIN)
    assert sample(first.get("/metrics").text, "penguins_predictions_total", model="svm") == 3
    assert sample(second.get("/metrics").text, "penguins_predictions_total", model="svm") == 1


def test_the_served_version_follows_a_promotion(client, models_dir, published):
    """The info metric is read from the snapshot at each scrape, not recorded at a load."""
    first = published.versions["svm"]
    second = export_raw(models_dir, "svm",
                        (published.store / "svm" / first / PICKLE_FILE).read_bytes())
    promote(models_dir, "svm", second)
    wait_until(lambda: served_version(client, "svm") == second)
    text = client.get("/metrics").text
    assert sample(text, "penguins_model_info", model="svm", version=second) == 1
    assert sample(text, "penguins_model_info", model="svm", version=first) is None


# --- Two workers under uvicorn ----------------------------------------------------------------


def _post_on_a_new_connection(url: str) -> int:
    """One prediction on a connection of its own, so that the workers share the requests."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        connection.request("POST", "/predict/svm", body=json.dumps(PENGUIN),
                           headers={"content-type": "application/json"})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def _scrape(url: str) -> str:
    answer = requests.get(f"{url}/metrics", timeout=5, headers={"connection": "close"})
    assert answer.status_code == 200
    return answer.text


def _per_worker(folder: Path, route: str, method: str = "POST", status: str = "200"
                ) -> dict[str, float]:
    """Each process's own count of ``route``, read from its own file in the shared folder."""
    wanted = {"method": method, "route": route, "status": status}
    return {file.name: sum(found.value for metric in MultiProcessCollector.merge([str(file)])
                           if metric.name == "penguins_http_requests"
                           for found in metric.samples if found.labels == wanted)
            for file in folder.glob("counter_*.db")}


def _leave_stale_counts(folder: Path) -> None:
    """What a previous run of the service leaves in PROMETHEUS_MULTIPROC_DIR: 1000 predictions
    counted by a process that is gone."""
    code = ("from serving.metrics import Metrics\n"
            "m = Metrics()\n"
            "for _ in range(1000):\n"
            "    m.observe_request('/predict/{model_name}', 'POST', 200, 0.001)\n"
            "    m.observe_prediction('svm', 1, 0.001)\n")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60,
                   env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)})


def _started_workers(log: Path) -> int:
    return len(re.findall(r"Application startup complete", log.read_text(errors="replace")))


def test_two_workers_report_one_total(published, tmp_path):
    folder, log = tmp_path / "prometheus", tmp_path / "uvicorn.log"
    folder.mkdir()
    _leave_stale_counts(folder)
    (stale,) = _per_worker(folder, PREDICT).values()
    assert stale == 1000
    (folder / "notes.txt").write_text("not the service's")

    with run_uvicorn(published.store, log, access_log=False, startup_seconds=TWO_STARTING,
                     SERVING_WORKERS="2", PROMETHEUS_MULTIPROC_DIR=str(folder)) as service:
        wait_until(lambda: _started_workers(log) == 2, timeout=TWO_STARTING)
        # Predictions on fresh connections, eight at a time (one after another, the idle
        # worker may accept every one), until both workers have answered some.
        sent = 0
        with ThreadPoolExecutor(8) as pool:
            while sent < 2000 and not (len(_per_worker(folder, PREDICT)) == 2
                                       and all(_per_worker(folder, PREDICT).values())):
                statuses = list(pool.map(_post_on_a_new_connection, [service.url] * 40))
                assert statuses == [200] * 40
                sent += 40
        per_worker = _per_worker(folder, PREDICT)
        assert len(per_worker) == 2 and all(per_worker.values()), per_worker
        assert sum(per_worker.values()) == sent

        # Scrapes until both workers have answered several: each says the total.
        scrapes = []
        while len(scrapes) < 200 and not (
                len(_per_worker(folder, "/metrics", "GET")) == 2
                and min(_per_worker(folder, "/metrics", "GET").values()) >= 3):
            text = _scrape(service.url)
            scrapes.append((sample(text, "penguins_http_requests_total", method="POST",
                                   route=PREDICT, status="200"),
                            sample(text, "penguins_predictions_total", model="svm"),
                            sample(text, "penguins_http_request_duration_seconds_count",
                                   route=PREDICT)))
        assert min(_per_worker(folder, "/metrics", "GET").values()) >= 3
        assert scrapes == [(sent, sent, sent)] * len(scrapes), scrapes
        assert sample(text, "penguins_models_loaded") == 5
        versions = {found.labels["model"]: found.labels["version"]
                    for family in text_string_to_metric_families(text)
                    for found in family.samples if found.name == "penguins_model_info"}
        assert versions == published.versions
    assert (folder / "notes.txt").read_text() == "not the service's"


def test_two_workers_share_a_private_folder_removed_at_exit(published, tmp_path):
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    log = tmp_path / "uvicorn.log"
    with run_uvicorn(published.store, log, access_log=False, startup_seconds=TWO_STARTING,
                     SERVING_WORKERS="2") as service:
        wait_until(lambda: _started_workers(log) == 2, timeout=TWO_STARTING)
        (folder,) = {Path(found) for found in re.findall(
            r"summed from (\S+) \(PROMETHEUS_MULTIPROC_DIR\)", log.read_text())}
        assert folder.is_dir() and folder != tmp_path
        for _ in range(10):
            assert _post_on_a_new_connection(service.url) == 200
        assert sample(_scrape(service.url), "penguins_predictions_total", model="svm") == 10
        assert len(list(folder.glob("counter_*.db"))) == 2
    assert not folder.exists()
