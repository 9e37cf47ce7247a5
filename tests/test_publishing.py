"""The published artifact: atomic files, digest, signature, manifest."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import stat

import pytest

from penguins.cleaning import clean
from penguins.publishing import publish_model, sign, write_atomically, write_manifest
from penguins.training import train
from tests.data import raw_frame


@pytest.fixture(scope="module")
def trained():
    return train(clean(raw_frame())[0], "knn", test_size=0.25, seed=42)


def _publish(trained, directory, key=None):
    return publish_model(trained, directory, run_id="run-1", source="penguins.csv",
                         test_size=0.25, seed=42, key=key)


def test_a_model_is_published_as_a_pickle_and_its_metadata(trained, tmp_path):
    metadata = _publish(trained, tmp_path)

    payload = (tmp_path / "knn.pkl").read_bytes()
    on_disk = json.loads((tmp_path / "knn.json").read_text())
    assert on_disk == metadata
    assert on_disk["sha256"] == hashlib.sha256(payload).hexdigest()
    assert on_disk["classes"] == ["Adelie", "Chinstrap", "Gentoo"]
    assert on_disk["signature"] is None
    assert set(on_disk["versions"]) == {"python", "scikit-learn", "xgboost", "numpy", "pandas"}
    assert type(pickle.loads(payload)).__name__ == "Pipeline"
    for name in ("knn.pkl", "knn.json"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["knn.json", "knn.pkl"]


def test_with_a_key_the_signature_covers_the_metadata_and_so_the_pickle(trained, tmp_path):
    metadata = _publish(trained, tmp_path, key=b"secret")
    assert metadata["signature"] == sign(metadata, b"secret")
    assert metadata["signature"] != sign(metadata, b"other")
    assert sign(metadata | {"sha256": "0" * 64}, b"secret") != metadata["signature"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "model.pkl"
    target.write_bytes(b"good")


    with pytest.raises(TypeError):
        write_atomically(target, object())  # not bytes: fails mid-write
    assert target.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pkl"]


def test_the_manifest_names_the_best_model(tmp_path):
    results = [
        {"model_name": "knn", "metrics": {"accuracy": 0.97, "f1_macro": 0.96}, "sha256": "a"},
        {"model_name": "svm", "metrics": {"accuracy": 1.0, "f1_macro": 1.0}, "sha256": "b"},
        {"model_name": "xgboost", "metrics": {"accuracy": 1.0, "f1_macro": 1.0}, "sha256": "c"},
    ]
    manifest = write_manifest(tmp_path, run_id="r", results=results, failures={"rf": "boom"})
    assert manifest["best_model"] == "svm"
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    assert list(manifest["models"]) == ["svm", "xgboost", "knn"]
