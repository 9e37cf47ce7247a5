"""The real service under uvicorn, called with ``requests``, the client library and its CLI."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from penguins import contract, publishing
from serving.client import PenguinsClient, ServiceError
from tests.serving.conftest import PENGUIN, REPO, copy_model, wait_until


def test_the_service_answers_over_http(live_service):
    url = live_service.url
    assert requests.get(f"{url}/health", timeout=5).json() == {"status": "ok"}
    assert requests.get(f"{url}/ready", timeout=5).json()["models_loaded"] == 5
    answer = requests.post(f"{url}/predict/svm", json=PENGUIN, timeout=5)
    assert answer.status_code == 200 and answer.json()["species"] == "Adelie"
    bad = requests.post(f"{url}/predict/svm", json={**PENGUIN, "island": "Mars"}, timeout=5)
    assert bad.status_code == 400 and bad.json()["extra"][0]["key"] == "island"
    assert "penguins_predictions_total" in requests.get(f"{url}/metrics", timeout=5).text


def test_the_client_library(live_service):
    with PenguinsClient(live_service.url) as client:
        assert client.health() == {"status": "ok"}
        assert client.ready()["ready"] is True
        assert {m["name"] for m in client.models()["models"]} == set(contract.MODEL_NAMES)
        assert client.model("knn")["name"] == "knn"
        assert client.predict(PENGUIN)["species"] == "Adelie"
        assert client.predict(model="svm", **PENGUIN)["model"]["name"] == "svm"
        batch = client.predict_batch([PENGUIN, PENGUIN], model="knn")
        assert [p["species"] for p in batch["predictions"]] == ["Adelie", "Adelie"]
        assert "penguins_models_loaded 5" in client.metrics()
        with pytest.raises(ServiceError) as error:
            client.predict({**PENGUIN, "year": 1900})
        assert error.value.status_code == 400 and error.value.extra[0]["key"] == "year"
        with pytest.raises(ServiceError, match="404"):
            client.model("../manifest")


def _cli(url: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "serving.client", "--url", url, *args],
        cwd=REPO, input=stdin, capture_output=True, text=True, timeout=60,
    )


def test_the_command_line_client(live_service, tmp_path):
    flags = [f"--{name.replace('_', '-')}={PENGUIN[name]}" for name in contract.FEATURES]
    done = _cli(live_service.url, "predict", "--model", "svm", *flags)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["species"] == "Adelie"

    batch_file = tmp_path / "penguins.json"
    batch_file.write_text(json.dumps([PENGUIN, PENGUIN]))
    done = _cli(live_service.url, "batch", str(batch_file))
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["predictions"]) == 2

    done = _cli(live_service.url, "predict", "--json", json.dumps({**PENGUIN, "sex": "x"}))
    assert done.returncode == 1
    assert "HTTP 400" in done.stderr and '"key": "sex"' in done.stderr

    done = _cli(live_service.url, "models")
    assert json.loads(done.stdout)["best_model"] == "random_forest"


def _raw(url: str, method: str, path: str, body: bytes = b"", headers=None) -> int:
    """Send ``path`` exactly as written (``requests`` would normalise dot segments)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


@pytest.mark.parametrize("path", [
    "/models/..%2Fmanifest", "/models/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd", "/models/%2Fetc%2Fpasswd",
    "/models/../../etc/passwd", "/models//etc/passwd", "/models/svm%00.pkl", "/models/svm.pkl",
    "/models/%2e%2e", "/models/svm%2F..%2F..%2Fmanifest",
])
def test_a_model_name_cannot_leave_the_folder(live_service, path):
    status = _raw(live_service.url, "GET", path)
    assert 400 <= status < 500, status
    post = _raw(live_service.url, "POST", path.replace("/models/", "/predict/"),
                json.dumps(PENGUIN).encode(), {"content-type": "application/json"})
    assert 400 <= post < 500, post


def test_an_oversized_body_is_refused_over_http(live_service):
    huge = b" " * 1_100_000 + json.dumps(PENGUIN).encode()
    assert _raw(live_service.url, "POST", "/predict/svm", huge,
                {"content-type": "application/json"}) == 413
    chunked = requests.post(f"{live_service.url}/predict/svm", data=iter([huge]),
                            headers={"content-type": "application/json"}, timeout=10)
    assert chunked.status_code == 413


# --- Reloading under load -----------------------------------------------------------------------


@pytest.fixture
def reloading_service(live_service, published):
    """The session's service, whose models the test may change: they are put back afterwards."""
    yield live_service
    originals = {}
    for name in contract.MODEL_NAMES:
        copy_model(published.unsigned, live_service.models_dir, name)
        originals[name] = json.loads((published.unsigned / f"{name}.json").read_text())["sha256"]
    wait_until(lambda: all(_served_version(live_service.url, name) == sha[:12]
                           for name, sha in originals.items()))


def _served_version(url: str, name: str) -> str | None:
    info = requests.get(f"{url}/models/{name}", timeout=5)
    return info.json()["version"]["version"] if info.status_code == 200 else None


def test_a_new_version_is_served_within_a_second(reloading_service, published):
    url, models = reloading_service.url, reloading_service.models_dir
    versions = {name: json.loads((published.unsigned / f"{name}.json").read_text())["sha256"][:12]
                for name in ("knn", "logistic_regression")}
    latencies = []
    for round_ in range(6):
        source = "knn" if round_ % 2 == 0 else "logistic_regression"
        _publish_as(published, models, source, "svm")
        started = time.monotonic()
        while _served_version(url, "svm") != versions[source]:
            assert time.monotonic() - started < 1.0, "not reloaded within a second"
            time.sleep(0.005)
        latencies.append(time.monotonic() - started)
    print(f"reload latency: max {max(latencies):.3f} s, mean "
          f"{sum(latencies) / len(latencies):.3f} s over {len(latencies)} publishes")


def _publish_as(published, directory: Path, source: str, target: str) -> None:
    """Publish the already-pickled ``source`` under the name ``target``, pickle first."""
    metadata = json.loads((published.unsigned / f"{source}.json").read_text())
    metadata.update(model_name=target, pickle_file=f"{target}.pkl")
    publishing.write_atomically(directory / f"{target}.pkl",
                                (published.unsigned / f"{source}.pkl").read_bytes())
    publishing.write_atomically(directory / f"{target}.json", json.dumps(metadata).encode())


def test_requests_in_flight_during_reloads_never_fail(reloading_service, published):
    url, models = reloading_service.url, reloading_service.models_dir
    stop = threading.Event()
    failures: list[str] = []
    answered: list[str] = []

    def hammer(path: str, body: dict) -> None:
        with requests.Session() as session:
            while not stop.is_set():
                response = session.post(f"{url}{path}", json=body, timeout=10)
                if response.status_code != 200:
                    failures.append(f"{path}: {response.status_code} {response.text[:200]}")
                else:
                    answered.append(response.json()["model"]["version"])

    workers = [
        threading.Thread(target=hammer, args=("/predict/svm", PENGUIN)),
        threading.Thread(target=hammer, args=("/predict-batch/svm", {"penguins": [PENGUIN] * 50})),
        threading.Thread(target=hammer, args=("/predict", PENGUIN)),
    ]
    for worker in workers:
        worker.start()
    try:
        deadline = time.monotonic() + 3.0
        round_ = 0
        while time.monotonic() < deadline:
            _publish_as(published, models, ("knn", "logistic_regression", "svm")[round_ % 3], "svm")
            if round_ % 4 == 1:  # a corrupt file now and then: the last good version answers
                publishing.write_atomically(models / "svm.pkl", b"corrupt")
            # The best model disappears and comes back: /predict moves to another one.
            if round_ % 2:
                (models / "random_forest.pkl").unlink()
            else:
                copy_model(published.unsigned, models, "random_forest")
            round_ += 1
            time.sleep(0.15)
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=30)
    assert not failures, failures[:5]
    assert len(answered) > 50
    assert len(set(answered)) >= 3  # several versions answered while they were swapped
