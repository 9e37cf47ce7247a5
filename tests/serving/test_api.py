"""The endpoints, through Litestar's test client, on the models the pipeline publishes."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from prometheus_client import CONTENT_TYPE_LATEST

from penguins import contract
from serving.settings import Settings
from tests.serving.conftest import (
    PENGUIN,
    PUBLIC_KEY_FILE,
    RUN_ID,
    export_raw,
    sample,
    wait_until,
)


def test_health_answers_without_models(make_client, tmp_path):
    client = make_client(tmp_path / "does-not-exist-yet")
    assert client.get("/health").json() == {"status": "ok"}


@pytest.mark.parametrize("request_line", [
    ("GET", "/ready", None),
    ("POST", "/predict", PENGUIN),
    ("POST", "/predict/svm", PENGUIN),
    ("POST", "/predict-batch", {"penguins": [PENGUIN]}),
    ("POST", "/predict-batch/svm", {"penguins": [PENGUIN]}),
])
def test_without_a_model_the_service_says_the_pipeline_has_not_published(
        make_client, tmp_path, request_line):
    method, path, body = request_line
    client = make_client(tmp_path)
    response = client.request(method, path, json=body)
    assert response.status_code == 503
    assert "pipeline has not promoted a model" in response.json()["detail"]
    assert client.get("/models").json() == {"best_model": None, "models": [],
                                            "store_problem": None}


def test_ready_counts_the_loaded_models(client):
    assert client.get("/ready").json() == {
        "ready": True, "models_loaded": len(contract.MODEL_NAMES), "best_model": "random_forest"
    }


def test_models_lists_every_published_model_with_its_metadata(client, published):
    listing = client.get("/models").json()
    manifest_best = (published.store / "manifest.json").read_text()
    assert f'"best_model": "{listing["best_model"]}"' in manifest_best
    assert [m["name"] for m in listing["models"]] == sorted(contract.MODEL_NAMES)
    for info in listing["models"]:
        trained = published.trained[info["name"]]
        assert info["serving"] is True
        assert info["best"] is (info["name"] == listing["best_model"])
        assert info["classes"] == list(contract.SPECIES)
        assert info["metrics"] == trained.metrics
        assert info["library_versions"]["scikit-learn"]
        assert info["version"]["dag_run_id"] == RUN_ID
        assert info["version"]["version"] == info["promoted"] == published.versions[info["name"]]
        assert re.fullmatch(r"[0-9a-f]{64}", info["version"]["sha256"])
        assert info["loaded_at"] and info["problem"] is None


def test_one_model(client):
    info = client.get("/models/knn").json()
    assert info["name"] == "knn" and info["serving"] is True
    assert client.get("/models/no_such_model").status_code == 404


def test_predict_names_the_species_its_probabilities_and_the_version(client):
    answer = client.post("/predict/logistic_regression", json=PENGUIN).json()
    assert answer["species"] == "Adelie"
    assert set(answer["probabilities"]) == set(contract.SPECIES)
    assert sum(answer["probabilities"].values()) == pytest.approx(1.0)
    assert max(answer["probabilities"], key=answer["probabilities"].get) == "Adelie"
    assert answer["model"]["name"] == "logistic_regression"
    assert answer["model"]["trained_at"] and answer["model"]["dag_run_id"] == RUN_ID


def test_predict_without_a_name_uses_the_best_model(client):
    best = client.get("/models").json()["best_model"]
    assert client.post("/predict", json=PENGUIN).json()["model"]["name"] == best


def test_the_best_model_is_the_most_accurate_of_those_answering(make_client, models_dir):
    for name in ("random_forest", "svm", "xgboost"):  # the three that score 1.0 on this split
        shutil.rmtree(models_dir / name)
    client = make_client(models_dir)
    assert client.get("/models").json()["best_model"] == "logistic_regression"


def test_batch_answers_each_penguin_in_order(client):
    gentoo = {**PENGUIN, "bill_length_mm": 47.5, "bill_depth_mm": 14.2,
              "flipper_length_mm": 215.0, "body_mass_g": 5400.0}
    answer = client.post("/predict-batch/svm", json={"penguins": [PENGUIN, gentoo, PENGUIN]})
    assert answer.status_code == 200
    body = answer.json()
    assert [p["species"] for p in body["predictions"]] == ["Adelie", "Gentoo", "Adelie"]
    assert body["model"]["name"] == "svm"
    best = client.post("/predict-batch", json={"penguins": [gentoo]}).json()
    assert best["model"]["name"] == client.get("/models").json()["best_model"]


def test_the_batch_limit_comes_from_the_settings(make_client, models_dir):
    client = make_client(models_dir, max_batch_rows=3)
    assert client.post("/predict-batch", json={"penguins": [PENGUIN] * 3}).status_code == 200
    too_many = client.post("/predict-batch", json={"penguins": [PENGUIN] * 4})
    assert too_many.status_code == 400
    assert too_many.json()["extra"][0] == {
        "message": "Expected `array` of length <= 3", "key": "penguins", "source": "body"
    }
    schema = client.get("/schema/openapi.json").json()
    assert schema["components"]["schemas"]["BatchRequest"]["properties"]["penguins"][
        "maxItems"] == 3


def test_without_the_public_key_nothing_is_served_and_the_reason_is_given(
        make_client, models_dir, tmp_path):
    client = make_client(models_dir, public_key_file=tmp_path / "missing.pem")
    ready = client.get("/ready")
    assert ready.status_code == 503
    assert "the public key (MODEL_PUBLIC_KEY_FILE) cannot be read" in ready.json()["detail"]
    assert str(tmp_path) not in ready.text
    assert client.post("/predict", json=PENGUIN).status_code == 503


def test_with_another_public_key_every_version_is_refused(make_client, models_dir, tmp_path):
    from serving.store.signing import ensure_key_pair

    ensure_key_pair(tmp_path / "other.pem", tmp_path / "other.pub")
    client = make_client(models_dir, public_key_file=tmp_path / "other.pub")
    assert client.get("/ready").status_code == 503
    assert "manifest.json refused: manifest.json is signed by key" in \
        client.get("/ready").json()["detail"]
    assert "manifest.json is signed by key" in client.get("/models").json()["store_problem"]


def test_unsigned_versions_are_served_only_with_the_development_switch(
        make_client, models_dir, published):
    payload = (models_dir / "knn" / published.versions["knn"] / "model.pkl").read_bytes()
    unsigned = {"format_version": 2, "model_name": "knn", "classes": list(contract.SPECIES),
                "metrics": {"accuracy": 1.0, "f1_macro": 1.0}}
    version = _export_unsigned(models_dir, "knn", payload, unsigned)
    strict = make_client(models_dir)
    wait_until(lambda: _state(strict, "knn", version) == "refused")
    assert "is not signed" in _versions(strict, "knn")[version]["reason"]
    relaxed = make_client(models_dir, allow_unsigned=True)
    wait_until(lambda: _versions(relaxed, "knn")[version]["loaded"])


def _export_unsigned(directory: Path, name: str, payload: bytes, fields: dict) -> str:
    """A version folder as somebody exporting by hand without a key would write it."""
    import hashlib
    import json

    from serving.store.layout import new_version_id

    version = new_version_id()
    folder = directory / name / version
    folder.mkdir()
    (folder / "model.pkl").write_bytes(payload)
    metadata = {**fields, "version": version, "pickle_sha256": hashlib.sha256(payload).hexdigest(),
                "pickle_bytes": len(payload), "versions": _library_versions()}
    (folder / "metadata.json").write_text(json.dumps(metadata))
    return version


def _library_versions() -> dict:
    from penguins.publishing import library_versions

    return library_versions()


def _versions(client, name: str) -> dict:
    listing = client.get(f"/models/{name}/versions").json()
    return {v["version"]: v for v in listing["versions"]}


def _state(client, name: str, version: str) -> str | None:
    return _versions(client, name).get(version, {}).get("state")


def test_versions_lists_each_kept_version_with_its_state(client, models_dir, published):
    good = published.trained["svm"]
    from tests.serving.conftest import publish

    newer = publish(models_dir, good)["version"]
    junk = export_raw(models_dir, "svm", b"not a pickle")
    wait_until(lambda: _state(client, "svm", junk) == "refused"
               and _state(client, "svm", newer) == "promoted")
    versions = _versions(client, "svm")
    assert list(versions) == sorted(versions, reverse=True)  # newest first
    assert versions[published.versions["svm"]]["state"] == "previous"
    assert versions[newer]["gate"]["promote"] is True
    assert versions[newer]["metrics"] == good.metrics
    assert versions[newer]["dag_run_id"] == RUN_ID and versions[newer]["trained_at"]
    assert "could not be unpickled" in versions[junk]["reason"]
    assert client.get("/models/svm").json()["version"]["version"] == newer


def test_a_kept_version_answers_when_asked_for(client, models_dir, published):
    from tests.serving.conftest import publish

    old = published.versions["knn"]
    new = publish(models_dir, published.trained["knn"])["version"]
    wait_until(lambda: _state(client, "knn", new) == "promoted")
    assert client.post("/predict/knn", json=PENGUIN).json()["model"]["version"] == new
    answer = client.post(f"/predict/knn?version={old}", json=PENGUIN)
    assert answer.status_code == 200 and answer.json()["model"]["version"] == old
    batch = client.post(f"/predict-batch/knn?version={old}", json={"penguins": [PENGUIN]})
    assert batch.json()["model"]["version"] == old
    missing = client.post("/predict/knn?version=20000101T000000.000000Z", json=PENGUIN)
    assert missing.status_code == 404
    assert old in missing.json()["detail"] and new in missing.json()["detail"]
    malformed = client.post("/predict/knn?version=../../etc", json=PENGUIN)
    assert malformed.status_code == 400 and "version" in malformed.text


def test_the_openapi_document_describes_the_request_exactly(client):
    schema = client.get("/schema/openapi.json").json()
    penguin = schema["components"]["schemas"]["Penguin"]
    assert list(penguin["properties"]) == list(contract.FEATURES)
    assert sorted(penguin["required"]) == sorted(contract.FEATURES)
    assert penguin["additionalProperties"] is False
    assert schema["components"]["schemas"]["BatchRequest"]["additionalProperties"] is False
    assert penguin["properties"]["island"]["enum"] == list(contract.ISLANDS)
    assert penguin["properties"]["sex"]["enum"] == list(contract.SEXES)
    for name, (low, high) in contract.PLAUSIBLE_RANGES.items():
        assert (penguin["properties"][name]["minimum"], penguin["properties"][name]["maximum"]) \
            == (low, high)
    # The Open Inference Protocol's paths: tests/serving/test_open_inference.py.
    assert {path for path in schema["paths"] if not path.startswith("/v2")} == {
        "/health", "/ready", "/metrics", "/models", "/models/{model_name}",
        "/models/{model_name}/versions", "/predict",
        "/predict/{model_name}", "/predict-batch", "/predict-batch/{model_name}",
    }
    predict = schema["paths"]["/predict/{model_name}"]["post"]
    assert predict["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Prediction"
    }
    assert predict["parameters"][0]["schema"]["pattern"] == "^[a-z0-9_]{1,64}$"
    assert set(predict["responses"]) == {"200", "400", "404", "413", "503"}


@pytest.mark.parametrize("page", ["/schema", "/schema/swagger"])
def test_the_docs_page_loads_its_assets_from_the_service_itself(client, page):
    html = client.get(page).text
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
    assert len(assets) == 4  # favicon, CSS, bundle, standalone preset
    for asset in assets:
        assert asset.startswith("/static/"), asset
        assert client.get(asset).status_code == 200
    assert "http://" not in html and "https://" not in html


def test_metrics_count_predictions_reloads_and_errors(client, models_dir):
    client.post("/predict/svm", json=PENGUIN)
    client.post("/predict-batch/svm", json={"penguins": [PENGUIN, PENGUIN]})
    client.post("/predict/svm", json={**PENGUIN, "sex": "unknown"})
    export_raw(models_dir, "knn", b"not a pickle")
    wait_until(lambda: "penguins_model_load_errors_total{" in client.get("/metrics").text)
    text = client.get("/metrics").text
    assert client.get("/metrics").headers["content-type"] == CONTENT_TYPE_LATEST
    assert sample(text, "penguins_predictions_total", model="svm") == 2
    assert sample(text, "penguins_predicted_rows_total", model="svm") == 3
    assert sample(text, "penguins_prediction_duration_seconds_count", model="svm") == 2
    assert sample(text, "penguins_model_reloads_total", model="knn") == 1
    assert sample(text, "penguins_model_load_errors_total", model="knn") == 1
    assert sample(text, "penguins_http_requests_total", method="POST",
                  route="/predict/{model_name}", status="400") == 1
    assert sample(text, "penguins_models_loaded") == len(contract.MODEL_NAMES)


def test_a_missing_models_dir_is_no_error_and_is_watched(make_client, published, tmp_path):
    directory = tmp_path / "later"
    client = make_client(directory)
    assert client.get("/ready").status_code == 503
    shutil.copytree(published.store, directory)
    wait_until(lambda: client.get("/ready").status_code == 200)


def test_settings_come_from_the_environment():
    settings = Settings.from_env({
        "MODELS_DIR": "/models", "MODEL_PUBLIC_KEY_FILE": "/keys/public.pem",
        "SERVING_ALLOW_UNSIGNED": "1", "MODEL_HISTORY": "3", "SERVING_HOST": "0.0.0.0",
        "SERVING_PORT": "9000", "MAX_BATCH_ROWS": "10", "MAX_BODY_BYTES": "2048",
        "RELOAD_INTERVAL_SECONDS": "0.5", "SERVING_LOADER_MEMORY_MB": "512",
        "SERVING_WORKERS": "4",
    })
    assert settings == Settings(
        models_dir=Path("/models"), public_key_file=Path("/keys/public.pem"),
        allow_unsigned=True, model_history=3, host="0.0.0.0", port=9000, max_batch_rows=10,
        max_body_bytes=2048, reload_interval_seconds=0.5, loader_memory_mb=512, workers=4,
    )
    assert Settings.from_env({}) == Settings()
    assert Settings.from_env({"MODEL_PUBLIC_KEY_FILE": str(PUBLIC_KEY_FILE)}).public_key_file \
        == PUBLIC_KEY_FILE


@pytest.mark.parametrize(("name", "value"), [
    ("MAX_BATCH_ROWS", "many"), ("MAX_BATCH_ROWS", "0"), ("SERVING_PORT", "70000"),
    ("RELOAD_INTERVAL_SECONDS", "nan"), ("MAX_BODY_BYTES", "1.5"), ("MODEL_HISTORY", "0"),
    ("SERVING_ALLOW_UNSIGNED", "yes"), ("SERVING_LOADER_CPU_SECONDS", "-1"),
    ("SERVING_WORKERS", "0"),
])
def test_a_malformed_setting_is_named(name, value):
    with pytest.raises(ValueError, match=name):
        Settings.from_env({name: value})
