"""The real service under uvicorn, called with ``requests``, the client library and its CLI."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from penguins import contract, training
from serving.client import PenguinsClient, ServiceError
from serving.schemas import Health
from serving.store import writer
from tests.serving.conftest import (
    PENGUIN,
    REPO,
    private_key,
    promote,
    publish,
    run_uvicorn,
    sample,
    wait_until,
)


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
        assert client.health() == Health(status="ok")
        assert client.ready().ready is True
        assert {m.name for m in client.models().models} == set(contract.MODEL_NAMES)
        assert client.model("knn").name == "knn"
        assert client.predict(PENGUIN).species == "Adelie"
        assert client.predict(model="svm", **PENGUIN).model.name == "svm"
        batch = client.predict_batch([PENGUIN, PENGUIN], model="knn")
        assert [p.species for p in batch.predictions] == ["Adelie", "Adelie"]
        (kept,) = client.versions("knn").versions
        assert kept.state == "promoted"
        answer = client.predict(PENGUIN, model="knn", version=kept.version)
        assert answer.model.version == kept.version
        with pytest.raises(ValueError, match="name the model"):
            client.predict(PENGUIN, version=kept.version)
        assert sample(client.metrics(), "penguins_models_loaded") == 5
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


def test_serving_unsigned_models_is_said_loudly_at_start(published, tmp_path):
    log = tmp_path / "uvicorn.log"
    with run_uvicorn(published.store, log, SERVING_ALLOW_UNSIGNED="1"):
        pass
    assert "SERVING_ALLOW_UNSIGNED=1: serving UNSIGNED models too" in log.read_text()


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


# --- Promotion and rollback under load ---------------------------------------------------------


@pytest.fixture
def store_service(live_service, published):
    """The session's service, whose store the test may change: the session's versions are
    promoted again afterwards."""
    yield live_service
    for name, version in published.versions.items():
        promote(live_service.models_dir, name, version)
    wait_until(lambda: all(_served_version(live_service.url, name) == version
                           for name, version in published.versions.items()))


def _served_version(url: str, name: str) -> str | None:
    info = requests.get(f"{url}/models/{name}", timeout=5)
    return info.json()["version"]["version"] if info.status_code == 200 else None


def _kept(url: str, name: str, version: str) -> bool:
    listing = requests.get(f"{url}/models/{name}/versions", timeout=5).json()
    return any(v["version"] == version and v["loaded"] for v in listing["versions"])


def _second_version(service, published, name: str) -> str:
    """Another version of ``name``, trained with another seed, exported and loaded, and
    candidate: the gate held it back (nothing may regress by more than -1)."""
    other = training.train(published.clean, name, 0.2, 7)
    version = publish(service.models_dir, other, min_accuracy=1.01)["version"]
    wait_until(lambda: _kept(service.url, name, version))
    return version


def test_a_promotion_and_a_rollback_are_served_within_a_second(store_service, published):
    url, models = store_service.url, store_service.models_dir
    first = published.versions["svm"]
    second = _second_version(store_service, published, "svm")
    assert _served_version(url, "svm") == first
    latencies = []
    for round_ in range(6):
        if round_ % 2 == 0:
            promote(models, "svm", second)
            wanted = second
        else:
            done = _store_cli(models, "rollback", "svm")
            assert done.returncode == 0, done.stderr
            assert f"svm: serving {first}" in done.stdout
            wanted = first
        started = time.monotonic()
        while _served_version(url, "svm") != wanted:
            assert time.monotonic() - started < 1.0, "not followed within a second"
            time.sleep(0.005)
        latencies.append(time.monotonic() - started)
    print(f"promotion to service: max {max(latencies):.3f} s, mean "
          f"{sum(latencies) / len(latencies):.3f} s over {len(latencies)} changes")


def _store_cli(models: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving.store", *args], cwd=REPO,
                          env={**os.environ, "MODELS_DIR": str(models)},
                          capture_output=True, text=True, timeout=60)


def test_promotions_and_rollbacks_under_load_fail_no_request(store_service, published):
    """8 clients, 10,000 requests, 10 promotions and 10 rollbacks: every request answers 200,
    from one of the two versions, with exactly that version's own answer."""
    url, models = store_service.url, store_service.models_dir
    first = published.versions["svm"]
    second = _second_version(store_service, published, "svm")
    expected = {}
    for version in (first, second):
        answer = requests.post(f"{url}/predict/svm?version={version}", json=PENGUIN, timeout=5)
        expected[version] = answer.json()["probabilities"]
    requests_left = iter(range(10_000))
    lock = threading.Lock()
    failures: list[str] = []
    answered: dict[str, int] = {first: 0, second: 0}

    def client() -> None:
        with requests.Session() as session:
            while True:
                with lock:
                    if next(requests_left, None) is None:
                        return
                response = session.post(f"{url}/predict/svm", json=PENGUIN, timeout=10)
                body = response.json()
                version = body.get("model", {}).get("version")
                with lock:
                    if response.status_code != 200 or version not in expected:
                        failures.append(f"{response.status_code} {response.text[:200]}")
                    elif body["probabilities"] != expected[version]:
                        failures.append(f"{version} answered {body['probabilities']}")
                    else:
                        answered[version] += 1

    clients = [threading.Thread(target=client) for _ in range(8)]
    for thread in clients:
        thread.start()
    changes = 0
    try:
        while changes < 20 and any(thread.is_alive() for thread in clients):
            if changes % 2 == 0:
                promote(models, "svm", second)
            else:
                writer.change_manifest(
                    models, private_key(),
                    lambda m: {**m.models, "svm": writer.rolled_back(m.models["svm"], "svm")},
                    written_by="tests")
            changes += 1
            time.sleep(0.1)
    finally:
        for thread in clients:
            thread.join(timeout=120)
    assert not failures, failures[:5]
    assert sum(answered.values()) == 10_000
    assert changes == 20 and all(answered.values()), answered
