"""Hot reload through the API: models appear, change and disappear; bad files are never served."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import time

import pytest
import sklearn

from penguins import publishing
from serving import registry
from tests.serving.conftest import (
    PENGUIN,
    RUN_ID,
    SIGNING_KEY,
    copy_model,
    publish_raw,
    version_of,
    wait_until,
)


@pytest.fixture(autouse=True)
def short_publish_grace(monkeypatch):
    # A pickle that disagrees with its metadata counts as a publish in progress for this long;
    # shortened so that the tests of tampered files need not wait.
    monkeypatch.setattr(registry, "PUBLISH_GRACE_SECONDS", 0.3)


def _load_error(client, name: str) -> str | None:
    response = client.get(f"/models/{name}")
    error = response.json().get("load_error") if response.status_code == 200 else None
    return error["message"] if error else None


def _republish_as(published, directory, source: str, target: str, key=None) -> dict:
    """Publish the trained model ``source`` under the name ``target``: a new, valid version."""
    model = dataclasses.replace(published.trained[source], model_name=target)
    return publishing.publish_model(model, directory, run_id="manual__replaced",
                                    source="test", test_size=0.2, seed=1, key=key)


def test_a_new_model_is_served_within_a_second(make_client, models_dir, published, tmp_path):
    for suffix in (".pkl", ".json"):
        (models_dir / f"knn{suffix}").unlink()
    client = make_client(models_dir)
    assert client.get("/models/knn").status_code == 404

    started = time.monotonic()
    copy_model(published.unsigned, models_dir, "knn")
    wait_until(lambda: client.post("/predict/knn", json=PENGUIN).status_code == 200, timeout=1.0)
    assert time.monotonic() - started < 1.0


def test_a_replaced_model_is_served_in_its_new_version(make_client, models_dir, published):
    client = make_client(models_dir)
    old = version_of(client, "svm")
    metadata = _republish_as(published, models_dir, "logistic_regression", "svm")

    new = wait_until(lambda: (v := version_of(client, "svm")) != old and v, timeout=1.0)
    assert new == metadata["sha256"][:12]
    answer = client.post("/predict/svm", json=PENGUIN).json()
    assert answer["model"]["dag_run_id"] == "manual__replaced"
    assert answer["probabilities"] == client.post("/predict/logistic_regression",
                                                  json=PENGUIN).json()["probabilities"]


@pytest.mark.parametrize("removed", [(".pkl", ".json"), (".pkl",)], ids=["both files", "pickle"])
def test_a_removed_model_disappears(make_client, models_dir, removed):
    client = make_client(models_dir)
    for suffix in removed:
        (models_dir / f"svm{suffix}").unlink()
    wait_until(lambda: client.get("/models/svm").status_code == 404, timeout=1.0)
    assert "svm" not in [m["name"] for m in client.get("/models").json()["models"]]
    assert client.post("/predict/svm", json=PENGUIN).status_code == 404


def test_removing_the_best_model_moves_predict_to_the_next_best(make_client, models_dir):
    client = make_client(models_dir)
    best = client.get("/models").json()["best_model"]
    (models_dir / f"{best}.pkl").unlink()
    wait_until(lambda: client.get("/models").json()["best_model"] not in (best, None))
    assert client.post("/predict", json=PENGUIN).status_code == 200


def _payload(published, name="svm") -> bytes:
    return (published.unsigned / f"{name}.pkl").read_bytes()


class _Exploit:
    """A pickle that would run a shell command when loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _flip_a_bit(payload: bytes) -> bytes:
    middle = len(payload) // 2
    return payload[:middle] + bytes([payload[middle] ^ 1]) + payload[middle + 1:]


def _other_sklearn_pickle(published) -> bytes:
    # The same pickle, but each estimator says it was made by another scikit-learn version.
    fake = re.sub(r"\d", "0", sklearn.__version__).encode()
    return _payload(published).replace(sklearn.__version__.encode(), fake)


BAD_FILES = {
    # id: (publish the bad version of "svm", text expected in the load error)
    "truncated pickle": (lambda p, d: publish_raw(d, "svm", _payload(p)[:1000]), "unpickled"),
    "not a pickle": (lambda p, d: publish_raw(d, "svm", b"hello, world"), "unpickled"),
    "empty pickle": (lambda p, d: publish_raw(d, "svm", b""), "sha256 and size_bytes"),
    "not a model": (lambda p, d: publish_raw(d, "svm", pickle.dumps({"weights": [1, 2]})),
                    "has no predict()"),
    "wrong classes": (lambda p, d: publish_raw(d, "svm", _payload(p), classes=["A", "B"]),
                      "metadata names 2 classes"),
    "other scikit-learn in metadata": (
        lambda p, d: publish_raw(d, "svm", _payload(p),
                                 versions={**publishing.library_versions(),
                                           "scikit-learn": "0.24.2"}),
        "trained with scikit-learn 0.24.2"),
    "other scikit-learn in the pickle": (
        lambda p, d: publish_raw(d, "svm", _other_sklearn_pickle(p)),
        "InconsistentVersionWarning"),
    "other xgboost": (
        lambda p, d: publish_raw(d, "xgboost", _payload(p, "xgboost"),
                                 versions={**publishing.library_versions(), "xgboost": "0.1"}),
        "trained with xgboost 0.1"),
    "metadata not JSON": (lambda p, d: publishing.write_atomically(d / "svm.json", b"{oops"),
                          "not valid JSON"),
    "metadata of another model": (
        lambda p, d: publishing.write_atomically(d / "svm.json", (d / "knn.json").read_bytes()),
        "describes model 'knn'"),
    "pickle modified after publishing": (
        lambda p, d: publishing.write_atomically(d / "svm.pkl", _flip_a_bit(_payload(p))),
        "sha256"),
    "pickle replaced after publishing": (
        lambda p, d: publishing.write_atomically(d / "svm.pkl", _payload(p, "knn")),
        "more than the"),
    "pickle truncated after publishing": (
        lambda p, d: publishing.write_atomically(d / "svm.pkl", _payload(p)[:-10]),
        "bytes, its metadata says"),
    "metadata removed": (lambda p, d: (d / "svm.json").unlink(), "no metadata file"),
}


@pytest.mark.parametrize("bad", list(BAD_FILES), ids=list(BAD_FILES))
def test_a_bad_file_is_refused_and_the_last_good_version_keeps_answering(
        make_client, models_dir, published, bad):
    publish_bad, expected = BAD_FILES[bad]
    name = "xgboost" if "xgboost" in bad else "svm"
    client = make_client(models_dir)
    good = version_of(client, name)
    good_answer = client.post(f"/predict/{name}", json=PENGUIN).json()

    publish_bad(published, models_dir)
    error = wait_until(lambda: _load_error(client, name), timeout=2.0)
    assert expected in error

    assert version_of(client, name) == good
    assert client.post(f"/predict/{name}", json=PENGUIN).json() == good_answer
    listed = {m["name"]: m for m in client.get("/models").json()["models"]}
    assert listed[name]["serving"] is True and expected in listed[name]["load_error"]["message"]


def test_a_malicious_pickle_never_runs(make_client, models_dir, tmp_path):
    marker = tmp_path / "pwned"
    client = make_client(models_dir)
    publish_raw(models_dir, "svm", pickle.dumps(_Exploit(marker)))
    error = wait_until(lambda: _load_error(client, "svm"))
    assert "names posix.system" in error
    assert not marker.exists()


def test_a_good_version_clears_the_error(make_client, models_dir, published):
    client = make_client(models_dir)
    publish_raw(models_dir, "svm", b"garbage")
    wait_until(lambda: _load_error(client, "svm"))
    copy_model(published.unsigned, models_dir, "svm")
    wait_until(lambda: _load_error(client, "svm") is None)
    assert version_of(client, "svm") is not None


def test_a_new_model_that_cannot_be_loaded_is_listed_but_not_served(make_client, models_dir):
    client = make_client(models_dir)
    publish_raw(models_dir, "brand_new", b"garbage")
    wait_until(lambda: _load_error(client, "brand_new"))
    info = client.get("/models/brand_new").json()
    assert info["serving"] is False and info["version"] is None
    refused = client.post("/predict/brand_new", json=PENGUIN)
    assert refused.status_code == 503
    assert "could not be loaded" in refused.json()["detail"]


def test_with_a_key_an_unsigned_replacement_is_refused(make_client, signed_models_dir, published):
    client = make_client(signed_models_dir, signing_key=SIGNING_KEY)
    good = version_of(client, "svm")
    _republish_as(published, signed_models_dir, "knn", "svm", key=None)
    assert "is not signed" in wait_until(lambda: _load_error(client, "svm"))
    assert version_of(client, "svm") == good


def test_with_a_key_a_replacement_signed_with_another_key_is_refused(
        make_client, signed_models_dir, published):
    client = make_client(signed_models_dir, signing_key=SIGNING_KEY)
    good = version_of(client, "svm")
    _republish_as(published, signed_models_dir, "knn", "svm", key=b"attacker")
    assert "does not match" in wait_until(lambda: _load_error(client, "svm"))
    assert version_of(client, "svm") == good


def test_with_a_key_a_signed_replacement_is_served(make_client, signed_models_dir, published):
    client = make_client(signed_models_dir, signing_key=SIGNING_KEY)
    metadata = _republish_as(published, signed_models_dir, "knn", "svm", key=SIGNING_KEY)
    wait_until(lambda: version_of(client, "svm") == metadata["sha256"][:12])


def test_with_a_key_a_pickle_swapped_under_signed_metadata_is_refused(
        make_client, signed_models_dir, published):
    client = make_client(signed_models_dir, signing_key=SIGNING_KEY)
    good = version_of(client, "svm")
    publishing.write_atomically(signed_models_dir / "svm.pkl", _flip_a_bit(_payload(published)))
    assert "sha256" in wait_until(lambda: _load_error(client, "svm"))
    assert version_of(client, "svm") == good


def test_a_symlink_out_of_the_folder_is_refused(make_client, models_dir, published, tmp_path):
    outside = tmp_path / "outside.pkl"
    outside.write_bytes(_payload(published))
    (models_dir / "svm.pkl").unlink()
    (models_dir / "svm.pkl").symlink_to(outside)
    client = make_client(models_dir)
    assert "outside MODELS_DIR" in wait_until(lambda: _load_error(client, "svm"))
    assert client.get("/models/svm").json()["serving"] is False


def test_a_symlink_inside_the_folder_is_followed(make_client, models_dir):
    (models_dir / "svm.pkl").rename(models_dir / "svm-v1.pkl")
    (models_dir / "svm.pkl").symlink_to(models_dir / "svm-v1.pkl")
    client = make_client(models_dir)
    assert client.get("/models/svm").json()["serving"] is True


def test_a_fifo_does_not_hang_the_service(make_client, models_dir):
    (models_dir / "svm.pkl").unlink()
    os.mkfifo(models_dir / "svm.pkl")
    client = make_client(models_dir)
    assert "not a regular file" in wait_until(lambda: _load_error(client, "svm"))
    assert client.post("/predict/knn", json=PENGUIN).status_code == 200


def test_temporary_hidden_and_badly_named_files_are_ignored(make_client, models_dir):
    payload = (models_dir / "svm.pkl").read_bytes()
    metadata = (models_dir / "svm.json").read_bytes()
    for filename in (".svm.pkl.abc123.tmp", ".hidden.pkl", "Upper.pkl", "with-dash.pkl",
                     "svm.pkl.tmp", "notes.txt"):
        (models_dir / filename).write_bytes(payload)
    (models_dir / "Upper.json").write_bytes(metadata)
    client = make_client(models_dir)
    time.sleep(0.2)  # a few polls of the watcher
    names = [m["name"] for m in client.get("/models").json()["models"]]
    assert names == sorted(json.loads((models_dir / "manifest.json").read_text())["models"])
    assert all(m["load_error"] is None for m in client.get("/models").json()["models"])
    assert RUN_ID in (models_dir / "manifest.json").read_text()
