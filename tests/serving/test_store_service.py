"""How the service follows the store: promotions, rollbacks, new versions and models, refusals.

Each test changes a store through the pipeline's own code (``conftest.publish``) or the store's
writer, as the DAG and ``python -m serving.store`` do, and watches the real registry through the
API.
"""

from __future__ import annotations

import shutil
import time

from serving.store import writer
from tests.serving.conftest import (
    PENGUIN,
    export_raw,
    private_key,
    promote,
    publish,
    registry_of,
    sample,
    served_version,
    wait_until,
)


def _versions(client, name: str) -> dict[str, dict]:
    listing = client.get(f"/models/{name}/versions").json()
    return {v["version"]: v for v in listing["versions"]}


def _reloads(client, name: str) -> float:
    return sample(client.get("/metrics").text, "penguins_model_reloads_total", model=name) or 0.0


def test_a_new_model_is_served_within_a_second_of_its_promotion(make_client, models_dir,
                                                                published):
    shutil.rmtree(models_dir / "knn")
    writer.change_manifest(models_dir, private_key(),
                           lambda m: {k: v for k, v in m.models.items() if k != "knn"},
                           written_by="tests")
    client = make_client(models_dir)
    assert client.get("/models/knn").status_code == 404
    version = publish(models_dir, published.trained["knn"])["version"]
    started = time.monotonic()
    wait_until(lambda: served_version(client, "knn") == version, timeout=5)
    assert client.post("/predict/knn", json=PENGUIN).json()["model"]["version"] == version
    print(f"new model: served {time.monotonic() - started:.3f} s after its promotion")


def test_a_promoted_version_replaces_the_old_which_is_kept(client, models_dir, published):
    old = published.versions["svm"]
    new = publish(models_dir, published.trained["svm"])["version"]
    wait_until(lambda: served_version(client, "svm") == new)
    versions = _versions(client, "svm")
    assert versions[old]["state"] == "previous" and versions[old]["loaded"]
    assert versions[new]["state"] == "promoted"
    answer = client.post(f"/predict/svm?version={old}", json=PENGUIN).json()
    assert answer["model"]["version"] == old


def test_a_version_the_gate_holds_back_is_listed_but_not_served(client, models_dir, published):
    held = publish(models_dir, published.trained["svm"], min_accuracy=1.01)["version"]
    wait_until(lambda: _versions(client, "svm").get(held, {}).get("loaded"))
    assert _versions(client, "svm")[held]["state"] == "held back"
    assert "below min_accuracy 1.01" in _versions(client, "svm")[held]["reason"]
    assert served_version(client, "svm") == published.versions["svm"]


def test_a_refused_promotion_keeps_the_last_good_version_answering(client, models_dir,
                                                                   published):
    good = published.versions["knn"]
    bad = export_raw(models_dir, "knn", b"not a pickle")
    promote(models_dir, "knn", bad)
    wait_until(lambda: _versions(client, "knn").get(bad, {}).get("state") == "refused")
    info = client.get("/models/knn").json()
    assert info["promoted"] == bad and info["version"]["version"] == good
    assert f"the promoted version {bad} was refused" in info["problem"]
    assert f"still serving {good}" in info["problem"]
    assert client.post("/predict/knn", json=PENGUIN).json()["model"]["version"] == good

    # The gate cannot score the broken promoted version, so it stays closed; a person decides.
    fixed = publish(models_dir, published.trained["knn"])
    assert fixed["gate"]["promote"] is False
    assert f"the promoted version {bad} could not be scored" in fixed["gate"]["reason"]
    promote(models_dir, "knn", fixed["version"])
    wait_until(lambda: served_version(client, "knn") == fixed["version"])
    assert client.get("/models/knn").json()["problem"] is None


def test_predict_follows_the_manifests_best_model(client, models_dir, published):
    best = client.get("/models").json()["best_model"]
    assert client.post("/predict", json=PENGUIN).json()["model"]["name"] == best
    worse = export_raw(models_dir, best, b"not a pickle", metrics={"accuracy": 0.1,
                                                                   "f1_macro": 0.1})
    promote(models_dir, best, worse)
    # The manifest ranks the promoted versions: another model is the best now, while the
    # refused one keeps answering for its own name with its last good version.
    wait_until(lambda: client.get("/models").json()["best_model"] != best)
    new_best = client.get("/models").json()["best_model"]
    assert client.post("/predict", json=PENGUIN).json()["model"]["name"] == new_best
    assert client.post(f"/predict/{best}", json=PENGUIN).json()["model"]["version"] == \
        published.versions[best]


def test_a_model_gone_from_the_store_is_no_longer_served(client, models_dir):
    shutil.rmtree(models_dir / "knn")
    writer.change_manifest(models_dir, private_key(),
                           lambda m: {k: v for k, v in m.models.items() if k != "knn"},
                           written_by="tests")
    wait_until(lambda: client.get("/models/knn").status_code == 404)
    assert client.post("/predict/knn", json=PENGUIN).status_code == 404


def test_nothing_unchanged_is_loaded_again(client, models_dir):
    before = _reloads(client, "svm")
    assert before == 1
    promote(models_dir, "knn", served_version(client, "knn"))  # a new manifest, same versions
    time.sleep(0.5)
    assert _reloads(client, "svm") == before


def test_an_export_in_progress_is_not_a_version(client, models_dir, published):
    incoming = models_dir / "svm" / ".incoming-20990101T000000.000000Z-0000"
    shutil.copytree(models_dir / "svm" / published.versions["svm"], incoming)
    time.sleep(0.3)
    assert list(_versions(client, "svm")) == [published.versions["svm"]]


def test_only_the_newest_versions_are_kept_loaded(make_client, models_dir, published):
    client = make_client(models_dir, model_history=2)
    promoted = published.versions["knn"]
    newer = [publish(models_dir, published.trained["knn"], min_accuracy=1.01)["version"]
             for _ in range(3)]
    wait_until(lambda: all(_versions(client, "knn").get(v, {}).get("loaded") for v in newer[-2:]))
    versions = _versions(client, "knn")
    # The pipeline pruned to MODEL_HISTORY (2 by this client; 5 by the writer's default), and
    # the service loads the newest 2 besides the promoted one.
    loaded = {v for v, entry in versions.items() if entry["loaded"]}
    assert loaded == {promoted, *newer[-2:]}


def test_the_watcher_thread_stops_with_the_service(make_client, models_dir):
    import threading

    client = make_client(models_dir)
    assert any(t.name == "models-watcher" for t in threading.enumerate())
    client.__exit__(None, None, None)
    wait_until(lambda: not any(t.name == "models-watcher" for t in threading.enumerate()))


def test_a_load_that_failed_through_no_fault_of_the_version_is_tried_again(
        make_client, models_dir, published, monkeypatch):
    """A loader stopped by its wall-clock limit (a busy machine) is retried, not refused for
    good: the version's files never change, so a refusal by its files' stamps would stick."""
    from serving import registry

    monkeypatch.setattr(registry, "RETRY_SECONDS", 0.5)
    client = make_client(models_dir, loader_timeout_seconds=1.0)
    version = publish(models_dir, published.trained["random_forest"], min_accuracy=1.01)["version"]
    wait_until(lambda: _versions(client, "random_forest").get(version, {}).get("loaded"))
    slow = registry_of(client)._loader
    real = slow.load
    calls = []

    def first_times_out(files):
        calls.append(files.info.version)
        if len(calls) == 1:
            from serving.loader import LoadError
            raise LoadError("the loader took longer than 1 s (SERVING_LOADER_TIMEOUT_SECONDS); "
                            "stopped", transient=True)
        return real(files)

    monkeypatch.setattr(slow, "load", first_times_out)
    again = export_raw(models_dir, "random_forest",
                       (models_dir / "random_forest" / version / "model.pkl").read_bytes())
    wait_until(lambda: _versions(client, "random_forest").get(again, {}).get("state")
               == "refused")
    wait_until(lambda: _versions(client, "random_forest").get(again, {}).get("loaded"))
    assert calls == [again, again]
