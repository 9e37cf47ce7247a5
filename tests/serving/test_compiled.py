"""Compiled predictors: the same answers as each model's own pipeline, or not served at all."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pandas as pd
import pytest
from sklearn.tree import DecisionTreeClassifier

from penguins import contract, models, training
from serving import compiled
from serving.compiled import CompiledPredictor, check_rows
from serving.predictors import TOLERANCE, PipelinePredictor
from serving.registry import ModelRegistry
from serving.schemas import Penguin
from serving.settings import Settings
from tests.serving.conftest import PENGUIN, publish_raw

LOGISTIC = ("sklearn", "LogisticRegression")


@pytest.fixture(scope="module")
def rows(published) -> list[dict]:
    """Every clean row of the packaged data set, as the service's routes hand them over."""
    return [msgspec.structs.asdict(msgspec.convert(row, Penguin))
            for row in published.clean[list(contract.FEATURES)].to_dict(orient="records")]


def _assert_same(answer, expected) -> None:
    codes, probabilities = answer
    expected_codes, expected_probabilities = expected
    np.testing.assert_array_equal(codes, expected_codes)
    np.testing.assert_allclose(probabilities, expected_probabilities, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("model_name", contract.MODEL_NAMES)
def test_every_model_type_compiles_to_its_own_answers_on_every_row(published, rows, model_name):
    pipeline = published.trained[model_name].pipeline
    fast = CompiledPredictor(pipeline, len(contract.SPECIES))
    frame = published.clean[list(contract.FEATURES)]
    expected = pipeline.predict(frame), pipeline.predict_proba(frame)

    _assert_same(fast.predict(rows), expected)
    one_by_one = [fast.predict([row]) for row in rows]
    _assert_same((np.concatenate([c for c, _ in one_by_one]),
                  np.concatenate([p for _, p in one_by_one])), expected)


@pytest.mark.parametrize("model_name", contract.MODEL_NAMES)
def test_the_service_serves_each_model_compiled_with_its_own_answers(
        client, published, rows, model_name):
    served = client.app.state.registry.snapshot.models[model_name]
    assert isinstance(served.predictor, CompiledPredictor)
    assert served.not_compiled is None

    response = client.post(f"/predict-batch/{model_name}", json={"penguins": rows})
    assert response.status_code == 200, response.text
    answers = response.json()["predictions"]
    trained = published.trained[model_name]
    frame = published.clean[list(contract.FEATURES)]
    assert [a["species"] for a in answers] == [trained.classes[c]
                                                for c in trained.pipeline.predict(frame)]
    np.testing.assert_allclose(
        [[a["probabilities"][c] for c in trained.classes] for a in answers],
        trained.pipeline.predict_proba(frame), rtol=0, atol=TOLERANCE,
    )


def _off_by(amount: float):
    def perturb(codes, probabilities):
        return codes, probabilities + amount
    return perturb


def _classes_shifted(codes, probabilities):
    return (codes + 1) % len(contract.SPECIES), probabilities


def _raising(codes, probabilities):
    raise ZeroDivisionError("a bug in the compiled path")


@pytest.mark.parametrize(("breakage", "reason"), [
    (_off_by(10 * TOLERANCE), "probabilities up to"),
    (_classes_shifted, "other classes"),
    (_raising, "ZeroDivisionError: a bug in the compiled path"),
])
def test_a_compiled_path_that_disagrees_is_not_served(
        make_client, models_dir, published, monkeypatch, caplog, breakage, reason):
    exact = compiled._COMPILERS[LOGISTIC]

    def broken(model, n_classes):
        estimate = exact(model, n_classes)
        return lambda x: breakage(*estimate(x))

    monkeypatch.setitem(compiled._COMPILERS, LOGISTIC, broken)
    served = _load(models_dir, caplog)

    assert isinstance(served["logistic_regression"].predictor, PipelinePredictor)
    assert reason in served["logistic_regression"].not_compiled
    assert _warned(caplog, "logistic_regression", reason)
    assert isinstance(served["svm"].predictor, CompiledPredictor)
    # The pipeline itself answers, so the answers are still the model's own.
    client = make_client(models_dir)
    served = client.app.state.registry.snapshot.models
    assert isinstance(served["logistic_regression"].predictor, PipelinePredictor)
    trained = published.trained["logistic_regression"]
    answer = client.post("/predict/logistic_regression", json=PENGUIN).json()
    expected = trained.pipeline.predict(pd.DataFrame([PENGUIN], columns=list(contract.FEATURES)))
    assert answer["species"] == trained.classes[expected[0]]


def test_a_model_type_without_a_compiled_path_is_served_by_its_pipeline(
        make_client, models_dir, published, caplog):
    labels, _ = training.encode_labels(published.clean[contract.LABEL])
    pipeline = models.build_model("logistic_regression", 42).set_params(
        model=DecisionTreeClassifier(random_state=42))
    pipeline.fit(published.clean[list(contract.FEATURES)], labels)
    publish_raw(models_dir, "tree", pickle.dumps(pipeline, protocol=5))

    tree = _load(models_dir, caplog)["tree"]
    assert isinstance(tree.predictor, PipelinePredictor)
    reason = "no compiled path for a DecisionTreeClassifier"
    assert reason in tree.not_compiled
    assert _warned(caplog, "tree", reason)
    assert make_client(models_dir).post("/predict/tree", json=PENGUIN).status_code == 200


def test_fast_predictors_can_be_turned_off(make_client, models_dir, caplog):
    for model in _load(models_dir, caplog, compile_models=False).values():
        assert isinstance(model.predictor, PipelinePredictor)
        assert model.not_compiled is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    client = make_client(models_dir, fast_predictors=False)
    assert not any(isinstance(m.predictor, CompiledPredictor)
                   for m in client.app.state.registry.snapshot.models.values())
    assert client.post("/predict/random_forest", json=PENGUIN).status_code == 200


def _load(directory: Path, caplog: pytest.LogCaptureFixture, **options: Any) -> dict:
    """The models a registry loads from ``directory``, its warnings in ``caplog``. (Without an
    application: Litestar's logging set-up takes the records away from ``caplog``.)"""
    registry = ModelRegistry(directory, key=None, **options)
    with caplog.at_level(logging.WARNING, logger="serving.registry"):
        registry.refresh()
    return dict(registry.snapshot.models)


def _warned(caplog: pytest.LogCaptureFixture, name: str, reason: str) -> bool:
    return any(r.levelno == logging.WARNING and f"model {name}:" in r.message
               and reason in r.message for r in caplog.records)


def test_the_check_rows_are_valid_penguins_of_every_island_and_sex(published):
    fast = CompiledPredictor(published.trained["knn"].pipeline, len(contract.SPECIES))
    checks = check_rows(fast.features)
    for row in checks:
        msgspec.convert(row, Penguin, strict=True)
    assert {(row["island"], row["sex"]) for row in checks} == {
        (island, sex) for island in contract.ISLANDS for sex in contract.SEXES}
    assert len(checks) >= 300


def test_the_ceiling_endpoint_exists_only_when_asked_for(make_client, models_dir):
    default = make_client(models_dir)
    assert default.post("/benchmark/ceiling", json=PENGUIN).status_code == 404

    client = make_client(models_dir, benchmark_endpoints=True)
    answer = client.post("/benchmark/ceiling", json=PENGUIN)
    assert answer.status_code == 200
    assert set(answer.json()) == {"species", "probabilities", "model"}
    # Validated as strictly as /predict: the same body costs the same work.
    refused = client.post("/benchmark/ceiling", json={**PENGUIN, "year": "2007"})
    assert refused.status_code == 400 and "year" in refused.text
    assert "/benchmark/ceiling" not in client.get("/schema/openapi.json").json()["paths"]


def test_the_switches_come_from_the_environment():
    assert Settings.from_env({}).fast_predictors is True
    assert Settings.from_env({}).benchmark_endpoints is False
    settings = Settings.from_env({"SERVING_FAST_PREDICTORS": "0",
                                  "SERVING_BENCHMARK_ENDPOINTS": "1"})
    assert (settings.fast_predictors, settings.benchmark_endpoints) == (False, True)
    with pytest.raises(ValueError, match="SERVING_FAST_PREDICTORS"):
        Settings.from_env({"SERVING_FAST_PREDICTORS": "yes"})
