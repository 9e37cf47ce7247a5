"""The registry on its own, one ``refresh`` at a time: what it reloads, and when."""

from __future__ import annotations

import json
import os
import time

import pytest

from penguins import publishing
from serving.metrics import Metrics
from serving.registry import PUBLISH_GRACE_SECONDS, ModelRegistry
from tests.serving.conftest import PENGUIN


@pytest.fixture
def loaded(models_dir):
    metrics = Metrics()
    reg = ModelRegistry(models_dir, key=None, metrics=metrics)
    reg.refresh()
    return reg, metrics


def _reloads(metrics: Metrics, name: str) -> float:
    return metrics.reloads.value((("model", name),))


def test_unchanged_files_are_not_loaded_again(loaded):
    reg, metrics = loaded
    before = reg.snapshot
    reg.refresh()
    reg.refresh()
    assert _reloads(metrics, "svm") == 1
    assert reg.snapshot.models["svm"] is before.models["svm"]


def test_a_touched_file_is_verified_again(loaded, models_dir):
    reg, metrics = loaded
    os.utime(models_dir / "svm.json")
    reg.refresh()
    assert _reloads(metrics, "svm") == 2


def test_between_the_two_renames_of_a_publish_the_old_version_stays(loaded, models_dir, published):
    reg, metrics = loaded
    old = reg.snapshot.models["svm"]
    new_payload = (published.unsigned / "knn.pkl").read_bytes()
    # The pipeline renames the pickle first: for a moment it disagrees with the old metadata.
    publishing.write_atomically(models_dir / "svm.pkl", new_payload)
    reg.refresh()
    assert reg.snapshot.models["svm"] is old
    assert "svm" not in reg.snapshot.failures  # not an error yet: a publish in progress
    assert metrics.load_errors.value((("model", "svm"),)) == 0

    metadata = json.loads((published.unsigned / "knn.json").read_text())
    metadata.update(model_name="svm", pickle_file="svm.pkl")
    publishing.write_atomically(models_dir / "svm.json", json.dumps(metadata).encode())
    reg.refresh()
    assert reg.snapshot.models["svm"].sha256 == metadata["sha256"]


def test_a_disagreement_that_lasts_becomes_an_error(loaded, models_dir, published):
    reg, _ = loaded
    knn = (published.unsigned / "knn.pkl").read_bytes()
    publishing.write_atomically(models_dir / "svm.pkl", knn)
    past = time.time() - PUBLISH_GRACE_SECONDS - 1
    os.utime(models_dir / "svm.pkl", (past, past))
    os.utime(models_dir / "svm.json", (past, past))
    reg.refresh()
    assert "more than the" in reg.snapshot.failures["svm"].message
    assert "svm" in reg.snapshot.models


def test_a_request_keeps_the_version_it_started_with(loaded, models_dir):
    reg, _ = loaded
    in_flight = reg.snapshot.models["svm"]
    for suffix in (".pkl", ".json"):
        (models_dir / f"svm{suffix}").unlink()
    reg.refresh()
    assert "svm" not in reg.snapshot.models
    codes, probabilities = in_flight.predictor.predict([PENGUIN])
    assert probabilities.shape == (1, 3)


def test_an_unreadable_folder_keeps_what_is_served(loaded, monkeypatch):
    reg, _ = loaded

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "listdir", unreadable)
    reg.refresh()
    assert len(reg.snapshot.models) == 5


def test_the_manifest_names_the_best_model_only_if_it_is_loaded(loaded, models_dir):
    reg, _ = loaded
    manifest = json.loads((models_dir / "manifest.json").read_text())
    manifest["best_model"] = "knn"
    publishing.write_atomically(models_dir / "manifest.json", json.dumps(manifest).encode())
    reg.refresh()
    assert reg.snapshot.best_model == "knn"
    manifest["best_model"] = "not_published"
    publishing.write_atomically(models_dir / "manifest.json", json.dumps(manifest).encode())
    reg.refresh()
    # Then the highest accuracy wins, ties broken by macro-F1 and then name, as in the pipeline.
    assert reg.snapshot.best_model == "random_forest"


def test_a_broken_manifest_is_ignored(loaded, models_dir):
    reg, _ = loaded
    (models_dir / "manifest.json").write_text("{not json")
    reg.refresh()
    assert reg.snapshot.best_model == "random_forest"
    assert "manifest" not in reg.snapshot.names()


def test_the_watcher_thread_starts_and_stops(models_dir):
    reg = ModelRegistry(models_dir, key=None)
    reg.start(0.01)
    try:
        deadline = time.monotonic() + 5
        while not reg.snapshot.models and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(reg.snapshot.models) == 5
    finally:
        reg.stop()
    assert reg._thread is None
