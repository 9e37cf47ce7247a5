"""Fixtures for the prediction service: real models, published by the pipeline's own code.

The models are trained once per session on the palmerpenguins CSV (no MySQL, no Airflow) and
published with ``penguins.publishing``, so every test also checks that what the pipeline
publishes, the service accepts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
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

from penguins import cleaning, contract, publishing, training
from serving.app import create_app
from serving.settings import Settings

REPO = Path(__file__).resolve().parents[2]
SIGNING_KEY = b"test-signing-key"
RUN_ID = "manual__serving_tests"
FAST_RELOAD = 0.05
"""The registry's polling interval in tests that wait for a reload (the default is 0.2 s)."""

PENGUIN: dict[str, Any] = {
    "island": "Biscoe", "bill_length_mm": 39.1, "bill_depth_mm": 18.7,
    "flipper_length_mm": 181.0, "body_mass_g": 3750.0, "sex": "male", "year": 2007,
}
"""A valid request body: the first penguin of the data set (an Adelie), moved to Biscoe."""


@dataclass(frozen=True)
class Published:
    """The session's models, trained once and published unsigned and signed."""

    trained: dict[str, training.TrainedModel]
    clean: pd.DataFrame
    unsigned: Path
    signed: Path


@pytest.fixture(scope="session")
def published(tmp_path_factory: pytest.TempPathFactory) -> Published:
    raw = pd.read_csv(contract.default_source())
    raw.insert(0, "source_row", range(1, len(raw) + 1))
    clean, _ = cleaning.clean(raw)
    trained = {name: training.train(clean, name, 0.2, 42) for name in contract.MODEL_NAMES}
    folders = {}
    for label, key in (("unsigned", None), ("signed", SIGNING_KEY)):
        folder = tmp_path_factory.mktemp(f"published-{label}")
        results = [
            publishing.publish_model(model, folder, run_id=RUN_ID, source="palmerpenguins",
                                     test_size=0.2, seed=42, key=key)
            for model in trained.values()
        ]
        publishing.write_manifest(folder, run_id=RUN_ID, results=results, failures={})
        folders[label] = folder
    return Published(trained, clean, folders["unsigned"], folders["signed"])


@pytest.fixture
def models_dir(published: Published, tmp_path: Path) -> Path:
    """A test's own copy of the unsigned models, free to change."""
    return Path(shutil.copytree(published.unsigned, tmp_path / "models"))


@pytest.fixture
def signed_models_dir(published: Published, tmp_path: Path) -> Path:
    return Path(shutil.copytree(published.signed, tmp_path / "signed-models"))


@pytest.fixture
def make_client() -> Iterator[Callable[..., TestClient]]:
    """``make_client(models_dir, **settings)``: a TestClient whose lifespan (the watcher) runs."""
    with contextlib.ExitStack() as stack:

        def make(directory: Path, **settings: Any) -> TestClient:
            settings.setdefault("reload_interval_seconds", FAST_RELOAD)
            app = create_app(Settings(models_dir=directory, **settings))
            return stack.enter_context(TestClient(app))

        yield make


@pytest.fixture
def client(make_client: Callable[..., TestClient], models_dir: Path) -> TestClient:
    return make_client(models_dir)


def wait_until(condition: Callable[[], Any], timeout: float = 5.0, interval: float = 0.02) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if result := condition():
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def publish_raw(directory: Path, name: str, payload: bytes, *, key: bytes | None = None,
                **overrides: Any) -> dict[str, Any]:
    """Publish ``payload`` as the pickle of ``name``, with metadata that matches it.

    The metadata is a real one's with a correct digest and size (and signature, with ``key``),
    then ``overrides`` applied: this is how tests publish files the pipeline never would.
    """
    template = directory / f"{name}.json"
    metadata = json.loads(template.read_text()) if template.exists() else {}
    metadata.update(
        format_version=publishing.FORMAT_VERSION, model_name=name, pickle_file=f"{name}.pkl",
        sha256=hashlib.sha256(payload).hexdigest(), size_bytes=len(payload),
        classes=list(contract.SPECIES), metrics={"accuracy": 0.5, "f1_macro": 0.5},
        versions=publishing.library_versions(), signature=None,
    )
    metadata.update(overrides)
    if key is not None:
        metadata["signature"] = publishing.sign(metadata, key)
    publishing.write_atomically(directory / f"{name}.pkl", payload)
    publishing.write_atomically(directory / f"{name}.json", (json.dumps(metadata) + "\n").encode())
    return metadata


def copy_model(source: Path, target: Path, name: str) -> None:
    """Publish ``name`` from ``source`` into ``target`` as the pipeline does: pickle, then JSON."""
    for suffix in (".pkl", ".json"):
        data = (source / f"{name}{suffix}").read_bytes()
        publishing.write_atomically(target / f"{name}{suffix}", data)


def version_of(client: TestClient, name: str) -> str | None:
    """The version of ``name`` that /models/{name} reports as served, or None."""
    response = client.get(f"/models/{name}")
    if response.status_code != 200 or not response.json()["serving"]:
        return None
    return response.json()["version"]["version"]


# --- The real service, under uvicorn ---------------------------------------------------------


@dataclass
class LiveService:
    url: str
    models_dir: Path
    process: subprocess.Popen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def run_uvicorn(models_dir: Path, log_file: Path, *, cpu: int | None = None,
                access_log: bool = True, **env: str) -> Iterator[LiveService]:
    """``python -m serving`` (uvicorn behind the front door) in a subprocess on a free port, as
    users start it; stopped on exit. ``cpu``: pin the process to that core (``taskset``), as
    the benchmark does.
    """
    port = free_port()
    environment = {**os.environ, "MODELS_DIR": str(models_dir), "MODEL_SIGNING_KEY": "",
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
        wait_until(lambda: _answers(service), timeout=60, interval=0.1)
        yield service
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


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
    models = Path(shutil.copytree(published.unsigned, folder / "models"))
    with run_uvicorn(models, folder / "uvicorn.log") as service:
        yield service
