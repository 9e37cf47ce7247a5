"""Compiled predictors rebuilt from plain data: the pipeline's answers, and no hostile spec built.

The worker exports a spec from the fitted pipeline; the serving process rebuilds the predictor
from that spec alone, after it has crossed as bytes. These tests train the real models.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pandas as pd
import pytest
from sklearn.neighbors import KNeighborsClassifier
from sklearn.tree import DecisionTreeClassifier

from penguins import cleaning, contract, models, training
from serving import compiled_spec, plain_data
from serving.compiled import (
    TOLERANCE,
    CompiledPredictor,
    NotCompilable,
    check_rows,
    export_spec,
)
from serving.predictors import NotAModelError, compile_checked
from serving.schemas import Penguin

REPO = Path(__file__).resolve().parents[2]
N_CLASSES = len(contract.SPECIES)
KINDS = {"logistic_regression": "LogisticRegression", "random_forest": "RandomForestClassifier",
         "svm": "CalibratedClassifierCV", "knn": "KNeighborsClassifier",
         "xgboost": "XGBClassifier"}


@pytest.fixture(scope="module")
def clean() -> pd.DataFrame:
    raw = pd.read_csv(contract.default_source())
    raw.insert(0, "source_row", range(1, len(raw) + 1))
    return cleaning.clean(raw)[0]


@pytest.fixture(scope="module")
def trained(clean) -> dict[str, training.TrainedModel]:
    return {name: training.train(clean, name, 0.2, 42) for name in contract.MODEL_NAMES}


@pytest.fixture(scope="module")
def rows(clean) -> list[dict]:
    """Every clean row of the packaged data set, as the service's routes hand them over."""
    return [msgspec.structs.asdict(msgspec.convert(row, Penguin))
            for row in clean[list(contract.FEATURES)].to_dict(orient="records")]


def _sent(tree: Any) -> Any:
    """``tree`` as the serving process receives it: encoded, then decoded."""
    data = plain_data.encode(tree)
    return plain_data.decode(data, max_bytes=len(data))


def _assert_same(answer, expected) -> None:
    codes, probabilities = answer
    expected_codes, expected_probabilities = expected
    np.testing.assert_array_equal(codes, expected_codes)
    np.testing.assert_allclose(probabilities, expected_probabilities, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("model_name", contract.MODEL_NAMES)
def test_every_model_type_rebuilt_from_its_spec_gives_its_own_answers_on_every_row(
        trained, clean, rows, model_name):
    pipeline = trained[model_name].pipeline
    spec = _sent(export_spec(pipeline, N_CLASSES))
    fast = CompiledPredictor.from_spec(spec, n_classes=N_CLASSES)
    assert (fast.kind, fast.n_classes, fast.fast) == (KINDS[model_name], N_CLASSES, True)
    frame = clean[list(contract.FEATURES)]
    expected = pipeline.predict(frame), pipeline.predict_proba(frame)

    _assert_same(fast.predict(rows), expected)
    one_by_one = [fast.predict([row]) for row in rows]
    _assert_same((np.concatenate([c for c, _ in one_by_one]),
                  np.concatenate([p for _, p in one_by_one])), expected)


@pytest.mark.parametrize("model_name", contract.MODEL_NAMES)
def test_the_spec_holds_the_learnt_scaling_for_the_check_rows(trained, model_name):
    pipeline = trained[model_name].pipeline
    fast = CompiledPredictor.from_pipeline(pipeline, N_CLASSES)
    scaler = pipeline.named_steps["preprocess"].named_transformers_["numeric"]
    assert fast.features.learnt == {
        column: (float(mean), float(scale))
        for column, mean, scale in zip(scaler.feature_names_in_, scaler.mean_, scaler.scale_,
                                       strict=True)}
    checks = check_rows(fast.features)
    for row in checks:
        msgspec.convert(row, Penguin, strict=True)
    assert {(row["island"], row["sex"]) for row in checks} == {
        (island, sex) for island in contract.ISLANDS for sex in contract.SEXES}


@pytest.mark.parametrize("model_name", contract.MODEL_NAMES)
def test_compile_checked_sends_answers_that_the_rebuilt_predictor_reproduces(
        trained, model_name):
    spec, expected = compile_checked(trained[model_name].pipeline, N_CLASSES)
    received = _sent({"spec": spec, "expected": expected})

    rebuilt = CompiledPredictor.from_spec(received["spec"], n_classes=N_CLASSES)
    want = received["expected"]
    assert want["rows"] == check_rows(rebuilt.features)
    assert want["codes"].shape == (len(want["rows"]),)
    assert want["probabilities"].shape == (len(want["rows"]), N_CLASSES)
    codes, probabilities = rebuilt.predict(want["rows"])
    np.testing.assert_array_equal(codes, want["codes"])
    np.testing.assert_array_equal(probabilities, want["probabilities"])


def test_compile_checked_refuses_a_model_without_a_compiled_path(trained, clean):
    labels, _ = training.encode_labels(clean[contract.LABEL])
    features = clean[list(contract.FEATURES)]
    tree = models.build_model("logistic_regression", 42).set_params(
        model=DecisionTreeClassifier(random_state=42)).fit(features, labels)
    with pytest.raises(NotCompilable, match="no compiled path for a DecisionTreeClassifier"):
        compile_checked(tree, N_CLASSES)
    weighted = models.build_model("knn", 42).set_params(
        model=KNeighborsClassifier(weights="distance")).fit(features, labels)
    with pytest.raises(NotCompilable, match="only uniform weights"):
        compile_checked(weighted, N_CLASSES)
    with pytest.raises(NotAModelError):
        compile_checked(object(), N_CLASSES)


# --- Hostile specs ---------------------------------------------------------------------------


def _first_leaf(trees: dict) -> int:
    return int(np.flatnonzero(trees["left"] == np.arange(len(trees["left"])))[0])


def _cyclic(depth: int | None) -> Callable[[dict], None]:
    """A leaf of the first tree leads back to its root (and the depth is ``depth``)."""
    def change(spec: dict) -> None:
        trees = spec["estimator"]["trees"]
        trees["left"][_first_leaf(trees)] = trees["roots"][0]
        if depth is not None:
            trees["depth"] = depth
    return change


def _set(path: str, value: Any) -> Callable[[dict], None]:
    """Set ``spec[a][b]...`` for the path ``"a.b..."``; a number in the path is a list index, a
    path ending ``[i]`` sets element ``i`` of an array."""
    def change(spec: dict) -> None:
        *parents, last = path.split(".")
        where = spec
        for key in parents:
            where = where[int(key)] if key.isdigit() else where[key]
        if last.endswith("]"):
            name, index = last[:-1].split("[")
            where[name][int(index)] = value
        else:
            where[last] = value(where[last]) if callable(value) else value
    return change


def _delete(path: str) -> Callable[[dict], None]:
    def change(spec: dict) -> None:
        *parents, last = path.split(".")
        where = spec
        for key in parents:
            where = where[key]
        del where[last]
    return change


HOSTILE = {
    "a child index far out of range": (
        "random_forest", _set("estimator.trees.left[0]", 10**9),
        r"left child index outside \[0, "),
    "a cyclic tree 10**9 deep": (
        "random_forest", _cyclic(10**9),
        r"estimator.trees.depth is 1000000000, not an integer in \[0, "),
    "a cyclic tree of plausible depth": (
        "random_forest", _cyclic(None), "not a forest: a root has a parent"),
    "a node that is both children of its parent": (
        "xgboost", _set("estimator.trees.right[3]", 4), "not a forest"),
    "a depth other than the trees'": (
        "xgboost", _set("estimator.trees.depth", lambda d: d - 1),
        "depth is 2, not the trees' depth"),
    "a negative feature index": (
        "random_forest", _set("estimator.trees.feature[0]", -1),
        r"feature has an index outside \[0, 10\)"),
    "a feature index past the width": (
        "xgboost", _set("estimator.trees.feature[0]", 10), r"outside \[0, 10\)"),
    "a NaN threshold": (
        "random_forest", _set("estimator.trees.threshold[0]", np.nan),
        "threshold has a number that is not finite"),
    "float32 thresholds for a forest": (
        "random_forest", _set("estimator.trees.threshold", lambda t: t.astype(np.float32)),
        "threshold is an array of float32, not of float64"),
    "leaf values of the wrong shape": (
        "random_forest", _set("estimator.value", lambda v: v[:, :2]), "value has the shape"),
    "trees not one per class": (
        "xgboost", _set("estimator.trees.roots", lambda r: r[:-1]), "not one per class"),
    "no roots": (
        "xgboost", _set("estimator.trees.roots", lambda r: r[:0]), "no roots"),
    "a root twice": (
        "xgboost", _set("estimator.trees.roots[1]", 0), "a root twice"),
    "a coef of the wrong shape": (
        "logistic_regression", _set("estimator.coef", lambda c: c[:, :-1]),
        r"estimator.coef has the shape \(3, 9\), not \(3, 10\)"),
    "a coef as a list": (
        "logistic_regression", _set("estimator.coef", lambda c: c.tolist()),
        "estimator.coef is a list, not an array"),
    "an infinite intercept": (
        "logistic_regression", _set("estimator.intercept[1]", np.inf), "not finite"),
    "a KNN with k > rows": (
        "knn", _set("estimator.k", lambda k: 10**6), r"estimator.k is 1000000, not an integer"),
    "a KNN with k = 0": ("knn", _set("estimator.k", 0), "estimator.k is 0"),
    "a KNN label outside the classes": (
        "knn", _set("estimator.labels[0]", 3), r"labels has a class outside \[0, 3\)"),
    "KNN labels as floats": (
        "knn", _set("estimator.labels", lambda y: y.astype(np.float64)), "not of int64"),
    "SVM weights of the wrong shape": (
        "svm", _set("estimator.weights", lambda w: w[:2]), "weights has the shape"),
    "an SVM gamma of NaN": ("svm", _set("estimator.gamma", float("nan")), "gamma is nan"),
    "too few SVM slopes": ("svm", _set("estimator.slopes", lambda s: s[:2]), "2 numbers, not 3"),
    "a wrong kind": (
        "random_forest", _set("kind", "DecisionTreeClassifier"),
        "kind is 'DecisionTreeClassifier', not one of"),
    "a missing key": (
        "logistic_regression", _delete("estimator.intercept"), r"lacks the keys \['intercept'\]"),
    "an extra key": (
        "svm", _set("features.remainder", []), r"has the extra keys \['remainder'\]"),
    "two classes": ("knn", _set("n_classes", 2), r"n_classes is 2, not an integer in \[3, "),
    "a million classes": ("knn", _set("n_classes", 10**6), "n_classes is 1000000"),
    "true classes": ("knn", _set("n_classes", True), "n_classes is True"),
    "overlapping slots": (
        "logistic_regression", _set("features.categorical.0.start", 0), "overlap or leave gaps"),
    "a width wider than the slots": (
        "random_forest", _set("features.width", 10**9), "overlap or leave gaps"),
    "a column outside the contract": (
        "svm", _set("features.numeric.0.column", "__class__"), "column is '__class__'"),
    "a column taken twice": (
        "svm", _set("features.numeric.1.column", "bill_length_mm"), "a column twice"),
    "a scale of zero": ("knn", _set("features.numeric.2.scale", 0.0), "scale is 0.0"),
    "a NaN mean": ("knn", _set("features.numeric.2.mean", float("nan")), "not a finite float"),
    "a category twice": (
        "xgboost", _set("features.categorical.1.categories", ["male", "male"]),
        "not a list of distinct strings"),
    "a category that is not a string": (
        "xgboost", _set("features.categorical.1.categories", ["female", 1]), "distinct strings"),
    "an empty spec": ("knn", lambda spec: spec.clear(), "lacks the keys"),
}


@pytest.mark.parametrize(("model_name", "change", "complaint"), HOSTILE.values(), ids=HOSTILE)
def test_from_spec_refuses_a_hostile_spec_saying_what_is_wrong(
        trained, model_name, change, complaint):
    spec = copy.deepcopy(_sent(export_spec(trained[model_name].pipeline, N_CLASSES)))
    change(spec)
    with pytest.raises(NotCompilable, match=complaint):
        CompiledPredictor.from_spec(_sent(spec))


def test_from_spec_refuses_a_spec_for_other_classes_or_not_a_spec(trained):
    spec = _sent(export_spec(trained["knn"].pipeline, N_CLASSES))
    with pytest.raises(NotCompilable, match="the spec is for 3 classes, the model has 4"):
        CompiledPredictor.from_spec(spec, n_classes=4)
    with pytest.raises(NotCompilable, match="the spec is a list, not a dict"):
        CompiledPredictor.from_spec([spec])


def test_a_forest_deeper_than_the_limit_is_refused():
    # A chain: node 2i tests and goes left to 2i + 2 or right to the leaf 2i + 1.
    levels = compiled_spec.MAX_TREE_DEPTH + 1
    node = np.arange(2 * levels + 1)
    inner = (node % 2 == 0) & (node < 2 * levels)
    left, right = np.where(inner, node + 2, node), np.where(inner, node + 1, node)
    roots = np.array([0])
    with pytest.raises(NotCompilable, match="more than 10000 levels deep"):
        compiled_spec.forest_depth(left, right, roots)
    shorter = np.where(node == 2 * levels - 2, node, left), np.where(node == 2 * levels - 2,
                                                                     node, right)
    assert compiled_spec.forest_depth(*shorter, roots) == levels - 1


def test_the_serving_side_imports_neither_scikit_learn_nor_xgboost():
    imported = subprocess.run(
        [sys.executable, "-c",
         "import sys, serving.compiled, serving.compiled_spec, serving.plain_data; "
         "print(sorted({m.split('.')[0] for m in sys.modules} & {'sklearn', 'xgboost'}))"],
        cwd=REPO, capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "[]"
