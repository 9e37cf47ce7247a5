"""Fixtures for the prediction service: real models, published by the pipeline's own code.

The models are trained once per session on the palmerpenguins CSV (no MySQL, no Airflow) and
published into a store with ``penguins.publishing`` and the test setup's key pair, so every test
also checks that what the pipeline publishes, the service accepts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import requests
from litestar.testing import TestClient
from prometheus_client.parser import text_string_to_metric_families

from penguins import cleaning, contract, publishing, training
from serving.app import create_app
from serving.registry import ModelRegistry
from serving.settings import Settings
from serving.store import signing, writer
from serving.store.documents import ModelEntry
from tests.mysql_server import free_port
from tests.support import stop

REPO = Path(__file__).resolve().parents[2]
RUN_ID = "manual__serving_tests"
FAST_RELOAD = 0.05
"""The registry's polling interval in tests that wait for a reload (the default is 0.2 s)."""
PRIVATE_KEY_FILE = Path(os.environ["MODEL_SIGNING_KEY_FILE"])
PUBLIC_KEY_FILE = Path(os.environ["MODEL_PUBLIC_KEY_FILE"])
"""The test setup's key pair (``tests/conftest.py``)."""

PENGUIN: dict[str, Any] = {
    "island": "Biscoe", "bill_length_mm": 39.1, "bill_depth_mm": 18.7,
    "flipper_length_mm": 181.0, "body_mass_g": 3750.0, "sex": "male", "year": 2007,
}
"""A valid request body: the first penguin of the data set (an Adelie), moved to Biscoe."""


def private_key():
    return signing.load_private_key(PRIVATE_KEY_FILE)


@dataclass(frozen=True)
class Published:
    """The session's models, trained once and published through the pipeline's own code."""

    trained: dict[str, training.TrainedModel]
    clean: pd.DataFrame
    store: Path
    """A store in which each model has one version, promoted."""
    versions: dict[str, str]
    """Each model's promoted version in ``store``."""


def publish(directory: Path, trained: training.TrainedModel, *, run_id: str = RUN_ID,
            min_accuracy: float = 0.9, max_regression: float = 0.01) -> dict[str, Any]:
    """Export ``trained`` into the store and run it through the gate, as the DAG's tasks do;
    return the training task's result (model_name, version, metrics, gate)."""
    key = private_key()
    baseline = publishing.score_promoted(directory, trained, key)
    decision = publishing.gate(trained, baseline, min_accuracy=min_accuracy,
                               max_regression=max_regression)
    metadata = publishing.export(trained, directory, decision=decision, run_id=run_id,
                                 source="palmerpenguins", test_size=0.2, seed=42, key=key)
    result = {"model_name": trained.model_name, "version": metadata["version"],
              "metrics": trained.metrics, "gate": decision.as_json()}
    publishing.record_run(directory, key, run_id=run_id, results=[result])
    return result


def packaged_clean() -> pd.DataFrame:
    """The packaged data set, cleaned as the pipeline cleans it."""
    raw = pd.read_csv(contract.default_source())
    raw.insert(0, "source_row", range(1, len(raw) + 1))
    return cleaning.clean(raw)[0]


@pytest.fixture(scope="session")
def published(tmp_path_factory: pytest.TempPathFactory) -> Published:
    clean = packaged_clean()
    trained = {name: training.train(clean, name, 0.2, 42) for name in contract.MODEL_NAMES}
    store = tmp_path_factory.mktemp("published") / "models"
    versions = {name: publish(store, model)["version"] for name, model in trained.items()}
    return Published(trained, clean, store, versions)


@pytest.fixture
def models_dir(published: Published, tmp_path: Path) -> Path:
    """A test's own copy of the published store, free to change."""
    return Path(shutil.copytree(published.store, tmp_path / "models"))


@pytest.fixture
def make_client() -> Iterator[Callable[..., TestClient]]:
    """``make_client(models_dir, **settings)``: a TestClient whose lifespan (the watcher) runs."""
    with contextlib.ExitStack() as stack:

        def make(directory: Path, **settings: Any) -> TestClient:
            settings.setdefault("reload_interval_seconds", FAST_RELOAD)
            settings.setdefault("public_key_file", PUBLIC_KEY_FILE)
            app = create_app(Settings(models_dir=directory, **settings))
            return stack.enter_context(TestClient(app))

        yield make


def registry_of(client: TestClient) -> ModelRegistry:
    """The registry behind ``client``'s app, as its routes receive it (a dependency)."""
    return client.app.dependencies["registry"].dependency()


@pytest.fixture
def client(make_client: Callable[..., TestClient], models_dir: Path) -> TestClient:
    return make_client(models_dir)


def wait_until(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if result := condition():
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def export_raw(directory: Path, name: str, payload: bytes, *, key: Any = None,
               **overrides: Any) -> str:
    """Export ``payload`` as a new version of ``name``, signed (by the test setup's key unless
    ``key``), with the metadata of a real version and ``overrides``: this is how tests make the
    versions an insider with the private key could. Returns the version id."""
    fields = {
        "classes": list(contract.SPECIES), "metrics": {"accuracy": 0.99, "f1_macro": 0.99},
        "versions": publishing.library_versions(), "dag_run_id": RUN_ID,
        "trained_at": "2026-01-01T00:00:00+00:00", **overrides,
    }
    return writer.export_version(directory, name, payload, fields, key or private_key())["version"]


def promote(directory: Path, name: str, version: str) -> None:
    """Promote ``version`` of ``name``, as ``python -m serving.store promote`` does."""
    writer.change_manifest(
        directory, private_key(),
        lambda m: {**m.models, name: writer.promoted(m.models.get(name, ModelEntry()), version)},
        written_by="tests",
    )


def served_version(client: TestClient, name: str) -> str | None:
    """The version of ``name`` that /models/{name} reports as answering, or None."""
    response = client.get(f"/models/{name}")
    if response.status_code != 200 or not response.json()["serving"]:
        return None
    return response.json()["version"]["version"]


def sample(exposition: str, name: str, **labels: str) -> float | None:
    """The value of the sample ``name{labels}`` (exactly those labels) in a Prometheus text
    exposition, as ``prometheus_client``'s parser reads it; None if there is none."""
    for family in text_string_to_metric_families(exposition):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return found.value
    return None


# --- The real service, under uvicorn ---------------------------------------------------------


@dataclass
class LiveService:
    url: str
    models_dir: Path
    process: subprocess.Popen


@contextlib.contextmanager
def run_uvicorn(models_dir: Path, log_file: Path, *, cpu: int | None = None,
                access_log: bool = True, startup_seconds: float = 60,
                **env: str) -> Iterator[LiveService]:
    """``python -m serving`` (uvicorn behind the front door) in a subprocess on a free port, as
    users start it; stopped on exit. ``cpu``: pin the process to that core (``taskset``), as
    the benchmark does; ``startup_seconds``: how long it may take to answer ``/health``.
    """
    port = free_port()
    environment = {**os.environ, "MODELS_DIR": str(models_dir),
                   "SERVING_HOST": "127.0.0.1", "SERVING_PORT": str(port),
                   "SERVING_ACCESS_LOG": "1" if access_log else "0", **env}
    command = [sys.executable, "-m", "serving"]
    if cpu is not None:
        command = ["taskset", "--cpu-list", str(cpu), *command]
    with log_file.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=REPO, env=environment, stdout=log, stderr=subprocess.STDOUT,
        )
    service = LiveService(f"http://127.0.0.1:{port}", models_dir, process)
    try:
        wait_until(lambda: _answers(service), timeout=startup_seconds, interval=0.1)
        yield service
    finally:
        stop(process)


def _answers(service: LiveService) -> bool:
    if service.process.poll() is not None:
        raise AssertionError(f"uvicorn exited with status {service.process.returncode}")
    try:
        return requests.get(f"{service.url}/health", timeout=1).status_code == 200
    except requests.ConnectionError:
        return False


@pytest.fixture(scope="session")
def live_service(published: Published, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[LiveService]:
    """One real service for the session (default polling interval). A test that changes its
    models puts them back (see ``test_live.reloading_service``)."""
    folder = tmp_path_factory.mktemp("live")
    models = Path(shutil.copytree(published.store, folder / "models"))
    with run_uvicorn(models, folder / "uvicorn.log") as service:
        yield service
