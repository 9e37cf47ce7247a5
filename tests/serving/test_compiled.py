"""The service's compiled predictors: the same answers as each model's own pipeline, or the
model is refused, saying why. (How a spec is exported and rebuilt: ``test_compiled_spec.py``.)"""

from __future__ import annotations

import pickle

import msgspec
import numpy as np
import pandas as pd
import pytest
from sklearn.tree import DecisionTreeClassifier

from penguins import contract, models, training
from serving.compiled import TOLERANCE, CompiledPredictor, check_rows
from serving.schemas import Penguin
from serving.settings import Settings
from tests.serving.conftest import PENGUIN, export_raw, promote, registry_of, wait_until


@pytest.fixture(scope="module")
def rows(published) -> list[dict]:
    """Every clean row of the packaged data set, as the service's routes hand them over."""
    return [msgspec.structs.asdict(msgspec.convert(row, Penguin))
            for row in published.clean[list(contract.FEATURES)].to_dict(orient="records")]


@pytest.mark.parametrize("model_name", contract.MODEL_NAMES)
def test_the_service_serves_each_model_compiled_with_its_own_answers(
        client, published, rows, model_name):
    served = registry_of(client).snapshot.models[model_name].served
    assert isinstance(served.predictor, CompiledPredictor)

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


def test_a_model_type_without_a_compiled_path_is_refused_saying_so(
        client, models_dir, published):
    labels, _ = training.encode_labels(published.clean[contract.LABEL])
    pipeline = models.build_model("logistic_regression", 42).set_params(
        model=DecisionTreeClassifier(random_state=42))
    pipeline.fit(published.clean[list(contract.FEATURES)], labels)
    version = export_raw(models_dir, "tree", pickle.dumps(pipeline, protocol=5))
    promote(models_dir, "tree", version)

    def refusal():
        response = client.get("/models/tree/versions")
        versions = response.json()["versions"] if response.status_code == 200 else []
        return versions and versions[0]["state"] == "refused" and versions[0]["reason"]

    # A random forest's trees are DecisionTreeClassifiers, so the unpickler allows the class;
    # but the service serves compiled models only.
    assert wait_until(refusal) == \
        "refused by the loader: no compiled path for a DecisionTreeClassifier"
    assert client.post("/predict/tree", json=PENGUIN).status_code == 503


def test_the_check_rows_are_valid_penguins_of_every_island_and_sex(published):
    fast = CompiledPredictor.from_pipeline(published.trained["knn"].pipeline,
                                           len(contract.SPECIES))
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
    assert Settings.from_env({}).benchmark_endpoints is False
    assert Settings.from_env({"SERVING_BENCHMARK_ENDPOINTS": "1"}).benchmark_endpoints is True
    with pytest.raises(ValueError, match="SERVING_BENCHMARK_ENDPOINTS"):
        Settings.from_env({"SERVING_BENCHMARK_ENDPOINTS": "yes"})


@pytest.mark.parametrize("model_name", ["knn", "svm"])
def test_distances_are_computed_in_blocks_with_the_same_answers(published, rows, monkeypatch,
                                                                model_name):
    """A batch against the stored points is computed a block of rows at a time, so that its
    memory stays bounded whatever the training set's size; the answers do not change (but for
    the last bits of a matrix product, which BLAS sums in another order for fewer rows)."""
    from serving import compiled

    pipeline = published.trained[model_name].pipeline
    whole = CompiledPredictor.from_pipeline(pipeline, len(contract.SPECIES)).predict(rows)
    monkeypatch.setattr(compiled, "BLOCK_NUMBERS", 1000)  # a few rows per block
    blocked = CompiledPredictor.from_pipeline(pipeline, len(contract.SPECIES)).predict(rows)
    np.testing.assert_array_equal(blocked[0], whole[0])
    np.testing.assert_allclose(blocked[1], whole[1], rtol=0, atol=1e-12)


def test_a_model_with_many_stored_points_is_not_run_on_the_event_loop(published):
    """k-NN over 250,000 training rows touches millions of numbers per penguin: such a model is
    answered from a worker thread, so that it cannot hold up the event loop (and /health)."""
    clean = published.clean
    many = clean.sample(250_000, replace=True, random_state=0)
    labels, _ = training.encode_labels(many[contract.LABEL])
    pipeline = models.build_model("knn", 42).fit(many[list(contract.FEATURES)], labels)
    large = CompiledPredictor.from_pipeline(pipeline, len(contract.SPECIES))
    small = CompiledPredictor.from_pipeline(published.trained["knn"].pipeline,
                                            len(contract.SPECIES))
    assert (large.fast, small.fast) == (False, True)
    codes, _ = large.predict([PENGUIN])
    frame = pd.DataFrame([PENGUIN], columns=list(contract.FEATURES))
    assert codes.tolist() == pipeline.predict(frame).tolist()
