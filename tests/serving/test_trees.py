"""One row's leaves found by QuickScorer's tables are the leaves the walk finds, in every shape
of forest the tables are built for, and in those they are not built for.

The forests are fitted for real (scikit-learn's and XGBoost's), on the packaged data and on
noisy copies of it that grow trees of hundreds of leaves; the rows include feature values equal
to the trees' thresholds and the floats just beside them, where "go left" and "go right" part.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.ensemble import RandomForestClassifier
from xgboost import XGBClassifier

from penguins import contract, models, training
from serving import trees
from serving.compiled import CompiledPredictor, check_rows, export_spec
from serving.trees import Forest
from tests.serving.conftest import packaged_clean

N_CLASSES = len(contract.SPECIES)


@pytest.fixture(scope="module")
def clean() -> pd.DataFrame:
    return packaged_clean()


def _noisy(clean: pd.DataFrame, copies: int) -> tuple[pd.DataFrame, np.ndarray]:
    """The packaged rows, repeated with their measurements jittered and random species: a tree
    fitted on them down to single rows has hundreds of leaves."""
    rng = np.random.default_rng(7)
    features = pd.concat([clean[list(contract.FEATURES)]] * copies, ignore_index=True)
    for column in contract.NUMERIC_FEATURES:
        if column != "year":
            features[column] = features[column] + rng.normal(0, 1, len(features))
    return features, rng.integers(0, N_CLASSES, len(features))


def _fitted(clean: pd.DataFrame, estimator, noisy_copies: int = 0):
    if noisy_copies:
        features, labels = _noisy(clean, noisy_copies)
    else:
        features = clean[list(contract.FEATURES)]
        labels, _ = training.encode_labels(clean[contract.LABEL])
    return models.build_model("random_forest", 0).set_params(model=estimator).fit(
        features, labels)


FORESTS = {
    # name: (estimator, noisy copies, how one row is found)
    "stumps": (RandomForestClassifier(n_estimators=20, max_depth=1, random_state=0), 0,
               "tables of bytes"),
    "forest of depth 3": (RandomForestClassifier(n_estimators=50, max_depth=3, random_state=0),
                          0, "tables of bytes"),
    "the pipeline's forest": (RandomForestClassifier(n_estimators=200, random_state=0), 0,
                              "tables"),
    "forest of hundreds of leaves": (RandomForestClassifier(n_estimators=5, random_state=0), 8,
                                     "walk"),
    "booster of depth 3": (XGBClassifier(n_estimators=60, max_depth=3, random_state=0), 0,
                           "tables of bytes"),
    "booster of depth 6": (XGBClassifier(n_estimators=30, max_depth=6, random_state=0), 2,
                           "tables"),
}


def _forest(clean, name) -> tuple[Forest, np.ndarray, list[list[float]], CompiledPredictor]:
    estimator, noisy_copies, _ = FORESTS[name]
    pipeline = _fitted(clean, estimator, noisy_copies)
    spec = export_spec(pipeline, N_CLASSES)
    booster = spec["kind"] == "XGBClassifier"
    values = spec["estimator"]["value"]
    forest = Forest(spec["estimator"]["trees"], values if booster else values.T,
                    equal_goes_right=booster)
    predictor = CompiledPredictor.from_pipeline(pipeline, N_CLASSES)
    rows = [*clean[list(contract.FEATURES)].to_dict(orient="records"),
            *check_rows(predictor.features)]
    vectors = [predictor.features.vector(row) for row in rows]
    return forest, values if booster else values.T, vectors, predictor


def _on_thresholds(spec_trees: dict, vectors: list[list[float]]) -> list[list[float]]:
    """Rows with one feature set to a node's threshold (as float32, what the trees compare), or
    to the float32 just below or above it."""
    rng = np.random.default_rng(3)
    made = []
    inner = np.flatnonzero(spec_trees["left"] != np.arange(len(spec_trees["left"])))
    for node in rng.choice(inner, size=min(300, len(inner)), replace=False):
        at = np.float32(spec_trees["threshold"][node])
        for value in (np.nextafter(at, np.float32(-np.inf)), at,
                      np.nextafter(at, np.float32(np.inf))):
            vector = list(vectors[int(rng.integers(len(vectors)))])
            vector[int(spec_trees["feature"][node])] = float(value)
            made.append(vector)
    return made


@pytest.mark.parametrize("name", list(FORESTS))
def test_one_rows_leaves_are_the_walks(clean, name):
    forest, values, vectors, _ = _forest(clean, name)
    assert forest.one_row_path == FORESTS[name][2]
    estimator, noisy_copies, _ = FORESTS[name]
    spec_trees = export_spec(_fitted(clean, estimator, noisy_copies), N_CLASSES)[
        "estimator"]["trees"]
    rows = vectors + _on_thresholds(spec_trees, vectors)

    walked = forest.leaves(np.array(rows))
    for row, leaves in zip(rows, walked, strict=True):
        np.testing.assert_array_equal(forest.values_of_one(row), values.take(leaves, axis=-1))


def test_a_forest_whose_tables_would_be_too_large_is_walked(clean, monkeypatch):
    monkeypatch.setattr(trees, "MAX_TABLE_BYTES", 1000)
    forest, values, vectors, _ = _forest(clean, "the pipeline's forest")
    assert forest.one_row_path == "walk"
    for row, leaves in zip(vectors, forest.leaves(np.array(vectors)), strict=True):
        np.testing.assert_array_equal(forest.values_of_one(row), values.take(leaves, axis=-1))


@pytest.mark.parametrize("name", ["forest of depth 3", "forest of hundreds of leaves",
                                  "booster of depth 3", "booster of depth 6"])
def test_a_predictors_one_row_answers_are_its_batchs(clean, name):
    _, _, vectors, predictor = _forest(clean, name)
    rows = [*clean[list(contract.FEATURES)].to_dict(orient="records"),
            *check_rows(predictor.features)]
    codes, probabilities = predictor.predict(rows)
    for row, code, expected in zip(rows, codes.tolist(), probabilities, strict=True):
        got_code, got = predictor.predict_one(row)
        assert got_code == code
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def _stumps(features: int) -> dict:
    """One stump per feature, each testing its own: a forest as wide as it is small."""
    roots = np.arange(0, 3 * features, 3)
    node = np.arange(3 * features)
    tests = node % 3 == 0
    return {"feature": np.where(tests, node // 3, 0), "threshold": np.where(tests, 0.5, 0.0),
            "left": np.where(tests, node + 1, node), "right": np.where(tests, node + 2, node),
            "roots": roots, "depth": 1}


def test_a_forest_testing_many_features_each_once_is_walked():
    # Its tables would AND as many rows of masks as it has trees, more than walking it reads.
    wide = _stumps(300)
    values = np.arange(900, dtype=np.float64)
    forest = Forest(wide, values, equal_goes_right=False)
    assert forest.one_row_path == "walk"
    narrow = Forest(_stumps(3), values[:9], equal_goes_right=False)
    assert narrow.one_row_path == "tables of bytes"
    rng = np.random.default_rng(5)
    for row in rng.normal(0.5, 1, (50, 300)).tolist():
        leaves = forest.leaves(np.array([row]))[0]
        assert forest.values_of_one(row).tolist() == values.take(leaves).tolist()
        assert narrow.values_of_one(row[:3]).tolist() == values[:9].take(
            narrow.leaves(np.array([row[:3]]))[0]).tolist()


def test_leaf_values_by_byte_are_left_out_when_they_would_be_too_large(monkeypatch):
    # Eight slots a tree, each a value per class: with many classes, more than the masks take.
    stumps = _stumps(3)
    values = np.random.default_rng(2).random((100, 9))  # 100 classes, by node
    monkeypatch.setattr(trees, "MAX_TABLE_BYTES", 1000)
    forest = Forest(stumps, values, equal_goes_right=True)
    assert forest.one_row_path == "tables"
    for row in np.random.default_rng(6).normal(0.5, 1, (50, 3)).tolist():
        leaves = forest.leaves(np.array([row]))[0]
        np.testing.assert_array_equal(forest.values_of_one(row), values.take(leaves, axis=-1))
