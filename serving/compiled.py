"""Compiled predictors: a fitted pipeline's arithmetic, rebuilt on NumPy arrays from plain data.

Calling a fitted scikit-learn pipeline on one row costs milliseconds, nearly all of it in the
pandas ``ColumnTransformer`` and in input validation, not in the model. A compiled predictor
redoes the same arithmetic, in the same order, on plain arrays:

- preprocessing: every ``StandardScaler`` column is one affine step (``(x - mean_) / scale_``)
  and every ``OneHotEncoder`` value one slot of the feature vector;
- ``LogisticRegression`` (multinomial): ``softmax(x @ coef_.T + intercept_)``;
- ``RandomForestClassifier``: the leaf of each tree (``serving.trees``); the mean of the
  leaves' class fractions;
- ``XGBClassifier`` (``multi:softprob``): the leaves of the booster's trees (read from its JSON
  model), summed per class in float32, then XGBoost's own softmax;
- ``CalibratedClassifierCV(SVC(kernel="rbf"), ensemble=False)`` with sigmoid calibration: the
  one-vs-one RBF decision values, turned one-vs-rest as ``SVC.decision_function`` does, one
  sigmoid per class, normalised;
- ``KNeighborsClassifier`` (uniform weights, Euclidean): distances to every training row.

Each has two paths to the same numbers (``Estimator``): one for a matrix of rows, and one for a
single row, the service's common case, where a NumPy call costs a microsecond or more whatever
its size, so what counts is how few there are: Python floats around a handful of calls (a
forest's leaves from ``serving.trees``' tables, the SVM's kernel and the k-NN's ranking from one
matrix-vector product each). A forest's, a booster's and a k-NN's answer for one row is its
batch answer to the bit (their classes can tie, so their sums keep the batch's order, and a
k-NN's near tie is left to the batch's arithmetic); logistic regression's and the SVM's may
differ from it in the last bit, a sum in another order.

It is built in two phases, in two processes, because unpickling a model runs whatever code the
pickle names: only a worker process, with limited resources, ever unpickles.

- In the worker, ``export_spec`` reads the learnt parameters out of the fitted pipeline (or
  raises ``NotCompilable``) into a spec: plain data only (``serving.plain_data`` carries it
  across), with what the serving side would otherwise discover worked out (a tree's depth).
- In the serving process, ``CompiledPredictor.from_spec`` builds the predictor from that spec
  alone, with NumPy: no scikit-learn, no XGBoost. The worker may have been subverted, so the spec
  is checked first (``serving.compiled_spec``): a spec that passes cannot index out of range or
  loop longer than its own size allows.

None of this is trusted on its own: a compiled predictor is served only after it has matched the
pipeline's own ``predict`` and ``predict_proba`` on a set of check rows (``check_rows``,
``predictors.compile_checked``), and the one the serving process rebuilds the worker's answers on
them, exactly for all of them at once, within ``TOLERANCE`` one at a time (``serving.loader``).
"""

from __future__ import annotations

import array
import ctypes
import ctypes.util
import itertools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from operator import attrgetter, itemgetter, mul
from typing import Any, NamedTuple

import msgspec
import numpy as np

from serving import compiled_spec, plain_data
from serving.compiled_spec import NotCompilable
from serving.contract import ISLANDS, PLAUSIBLE_RANGES, SEXES
from serving.trees import Forest

Row = Mapping[str, Any]
"""One penguin: a value for each of ``contract.FEATURES``."""
Answer = tuple[np.ndarray, np.ndarray]
"""Class codes, shape ``(n,)``, and class probabilities, shape ``(n, classes)``."""
OneAnswer = tuple[int, list[float]]
"""One row's class code and class probabilities."""
Spec = dict[str, Any]
"""A compiled predictor as plain data: what ``export_spec`` gives, ``from_spec`` takes."""

TOLERANCE = 1e-6
"""How far a compiled predictor's probabilities may stray from the pipeline's on a check row
(its classes must be the same on every row), and its one-row path's from its batch path's."""


# --- In the worker: the fitted pipeline's parameters, as plain data ---------------------------


def export_spec(pipeline: Any, n_classes: int) -> Spec:
    """The spec of ``pipeline``'s compiled predictor; NotCompilable if it has none.

    ``{"kind": the estimator's class name, "n_classes": ..., "features": ..., "estimator": ...}``
    (``compiled_spec`` describes every part). Imports scikit-learn, so it runs in the worker.
    """
    from sklearn.pipeline import Pipeline

    if not (isinstance(pipeline, Pipeline) and len(pipeline.steps) == 2):
        raise NotCompilable(f"the model is a {_name(pipeline)}, not a two-step Pipeline "
                            "(preprocessing, estimator)")
    (_, preprocess), (_, estimator) = pipeline.steps
    features = _export_features(preprocess)
    classes = getattr(estimator, "classes_", None)
    if classes is None or list(classes) != list(range(n_classes)):
        raise NotCompilable(f"the estimator's classes are not the codes 0 to {n_classes - 1}")
    kind = type(estimator)
    export_estimator = _EXPORTERS.get((kind.__module__.partition(".")[0], kind.__name__))
    if export_estimator is None:
        raise NotCompilable(f"no compiled path for a {_name(estimator)}")
    return {"kind": kind.__name__, "n_classes": int(n_classes), "features": features,
            "estimator": export_estimator(estimator, n_classes)}


def _export_features(transformer: Any) -> dict[str, Any]:
    """A dense ``ColumnTransformer`` of ``StandardScaler``s and plain ``OneHotEncoder``s: each
    scaled column's slot, mean and scale, each encoded column's categories and first slot."""
    from sklearn.compose import ColumnTransformer
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    if not isinstance(transformer, ColumnTransformer) or transformer.sparse_output_:
        raise NotCompilable(f"the preprocessing is a {_name(transformer)}, not a dense "
                            "ColumnTransformer")
    numeric: list[dict[str, Any]] = []
    categorical: list[dict[str, Any]] = []
    for name, step, columns in transformer.transformers_:
        if step == "drop":
            continue
        if not (isinstance(columns, list) and all(isinstance(c, str) for c in columns)):
            raise NotCompilable(f"transformer {name!r} selects columns {columns!r}, not names")
        start = transformer.output_indices_[name].start
        if type(step) is StandardScaler:
            # Subtracting 0 and dividing by 1 are exact: a scaler without mean or std fits.
            mean = step.mean_ if step.with_mean else np.zeros(len(columns))
            scale = step.scale_ if step.with_std else np.ones(len(columns))
            numeric += [{"column": column, "slot": start + i, "mean": float(m), "scale": float(s)}
                        for i, (column, m, s) in enumerate(zip(columns, mean, scale, strict=True))]
        elif type(step) is OneHotEncoder and _plain_one_hot(step):
            for column, categories in zip(columns, step.categories_, strict=True):
                categorical.append({"column": column, "categories": [str(c) for c in categories],
                                    "start": start,
                                    "ignore_unknown": step.handle_unknown == "ignore"})
                start += len(categories)
        else:
            raise NotCompilable(f"transformer {name!r} is a {_name(step)}; only "
                                "StandardScaler and plain OneHotEncoder are compiled")
    width = max(s.stop for s in transformer.output_indices_.values())
    return {"width": int(width), "numeric": numeric, "categorical": categorical}


def _plain_one_hot(encoder: Any) -> bool:
    """No dropped or grouped categories, dense output, string categories."""
    return (encoder.drop_idx_ is None and encoder.max_categories is None
            and encoder.min_frequency is None and not encoder.sparse_output
            and all(isinstance(v, str) for c in encoder.categories_ for v in c))


def _export_logistic_regression(model: Any, n_classes: int) -> dict[str, Any]:
    if n_classes < 3 or model.coef_.shape != (n_classes, model.n_features_in_):
        raise NotCompilable("only a multinomial LogisticRegression (3 classes or more) is compiled")
    return {"coef": np.asarray(model.coef_, dtype=np.float64),
            "intercept": np.asarray(model.intercept_, dtype=np.float64)}


def _export_trees(left: list[np.ndarray], right: list[np.ndarray], feature: list[np.ndarray],
                  threshold: list[np.ndarray]) -> dict[str, Any]:
    """Trees whose leaves have negative children, as one set of arrays (``trees.Forest``):
    node indices counted across all trees, a leaf's children (and feature, unused) itself (0)."""
    starts = np.cumsum([0, *(len(nodes) for nodes in left)])
    offsets = np.repeat(starts[:-1], np.diff(starts))
    left_all, right_all = np.concatenate(left), np.concatenate(right)
    leaf = left_all < 0
    node = np.arange(starts[-1])
    trees = {
        "feature": np.where(leaf, 0, np.concatenate(feature)).astype(np.int64),
        "threshold": np.concatenate(threshold),
        "left": np.where(leaf, node, left_all + offsets).astype(np.int64),
        "right": np.where(leaf, node, right_all + offsets).astype(np.int64),
        "roots": starts[:-1].astype(np.int64),
    }
    # Checked as the serving side checks it: a broken tree is refused here, not walked forever.
    trees["depth"] = compiled_spec.forest_depth(trees["left"], trees["right"], trees["roots"])
    return trees


def _export_random_forest(model: Any, n_classes: int) -> dict[str, Any]:
    trees = [tree.tree_ for tree in model.estimators_]
    if model.n_outputs_ != 1 or any(t.value.shape[1:] != (1, n_classes) for t in trees):
        raise NotCompilable("only a single-output forest is compiled")
    # DecisionTreeClassifier: left when x <= threshold; a leaf's value is its class fractions.
    return {"trees": _export_trees([t.children_left for t in trees],
                                   [t.children_right for t in trees],
                                   [t.feature for t in trees],
                                   [t.threshold.astype(np.float64) for t in trees]),
            "value": np.concatenate([t.value[:, 0, :] for t in trees]).astype(np.float64)}


def _export_calibrated_svm(model: Any, n_classes: int) -> dict[str, Any]:
    from sklearn.svm import SVC

    if len(model.calibrated_classifiers_) != 1 or model.method != "sigmoid":
        raise NotCompilable("only CalibratedClassifierCV(ensemble=False, method='sigmoid') "
                            "is compiled")
    calibrated = model.calibrated_classifiers_[0]
    svc = calibrated.estimator
    if not (type(svc) is SVC and svc.kernel == "rbf" and not svc._sparse
            and svc.decision_function_shape == "ovr" and n_classes >= 3
            and list(calibrated.classes) == list(range(n_classes))
            and list(svc.classes_) == list(range(n_classes))):
        raise NotCompilable("only a dense RBF SVC over 3 classes or more, with 'ovr' decisions, "
                            "is compiled inside CalibratedClassifierCV")
    vectors = np.asarray(svc.support_vectors_, dtype=np.float64)
    # libsvm's one-vs-one decision for the pair (i, j): the support vectors of class i weighted
    # by row j - 1 of the dual coefficients, those of class j by row i, minus rho (-intercept).
    starts = np.cumsum([0, *svc._n_support])
    pairs = list(itertools.combinations(range(n_classes), 2))
    weights = np.zeros((len(pairs), len(vectors)))
    for p, (i, j) in enumerate(pairs):
        weights[p, starts[i]:starts[i + 1]] = svc._dual_coef_[j - 1, starts[i]:starts[i + 1]]
        weights[p, starts[j]:starts[j + 1]] = svc._dual_coef_[i, starts[j]:starts[j + 1]]
    return {"vectors": vectors, "gamma": float(svc._gamma), "weights": weights,
            "intercept": np.asarray(svc._intercept_, dtype=np.float64),
            "slopes": [float(c.a_) for c in calibrated.calibrators],
            "offsets": [float(c.b_) for c in calibrated.calibrators]}


def _export_k_neighbours(model: Any, n_classes: int) -> dict[str, Any]:
    if not (model.weights == "uniform" and model.effective_metric_ == "euclidean"
            and not model.outputs_2d_ and isinstance(model._fit_X, np.ndarray)):
        raise NotCompilable("only uniform weights and the Euclidean metric are compiled "
                            "for KNeighborsClassifier")
    return {"train": np.asarray(model._fit_X, dtype=np.float64),
            "labels": np.asarray(model._y, dtype=np.int64), "k": int(model.n_neighbors)}


def _export_xgboost(model: Any, n_classes: int) -> dict[str, Any]:
    # The booster's own inplace_predict costs ~0.3 ms per call whatever the rows, so the trees
    # are read from its JSON model and walked here, in XGBoost's float32 arithmetic.
    if getattr(model, "best_iteration", None) is not None:
        raise NotCompilable("an early-stopped XGBoost model is not compiled")
    saved = json.loads(model.get_booster().save_raw("json"))["learner"]
    booster, objective = saved["gradient_booster"], saved["objective"]["name"]
    if objective != "multi:softprob" or booster["name"] != "gbtree" or n_classes < 3:
        raise NotCompilable(f"only a gbtree booster with the multi:softprob objective is "
                            f"compiled for XGBoost, not {booster['name']} with {objective}")
    trees = booster["model"]["trees"]
    if len(trees) % n_classes or booster["model"]["tree_info"] != [
            t % n_classes for t in range(len(trees))] or any(
            any(tree["split_type"]) or tree["categories"] for tree in trees):
        raise NotCompilable("only one numeric tree per class and round is compiled for XGBoost")
    # The base score (per class, in margin space) goes first, as one single-leaf tree per class,
    # so that summing the leaves in tree order adds them up as XGBoost does: base, then each tree.
    base = json.loads(saved["learner_model_param"]["base_score"])
    bases = [{"left_children": [-1], "right_children": [-1], "split_indices": [0],
              "split_conditions": [score]} for score in np.broadcast_to(base, n_classes)]
    trees = bases + trees
    # A leaf's split_condition is its value.
    conditions = [np.array(t["split_conditions"], dtype=np.float32) for t in trees]
    return {"trees": _export_trees([np.array(t["left_children"]) for t in trees],
                                   [np.array(t["right_children"]) for t in trees],
                                   [np.array(t["split_indices"]) for t in trees], conditions),
            "value": np.concatenate(conditions)}


_EXPORTERS: dict[tuple[str, str], Callable[[Any, int], dict[str, Any]]] = {
    ("sklearn", "LogisticRegression"): _export_logistic_regression,
    ("sklearn", "RandomForestClassifier"): _export_random_forest,
    ("sklearn", "CalibratedClassifierCV"): _export_calibrated_svm,
    ("sklearn", "KNeighborsClassifier"): _export_k_neighbours,
    ("xgboost", "XGBClassifier"): _export_xgboost,
}
"""(package, estimator class) -> its spec's ``estimator`` part. The exact class: a subclass is
not assumed to compute the same thing (and importing xgboost to ask would cost half a second)."""


# --- In the serving process: the predictor, from the spec alone ------------------------------


class Features:
    """The preprocessing, as arithmetic: ``matrix(rows)`` gives, as float64, what the fitted
    ``ColumnTransformer``'s ``transform`` gives for a DataFrame of the same rows."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        """``spec``: a spec's ``features`` part, as ``compiled_spec.validate`` passed it."""
        self._width: int = spec["width"]
        self._numeric = [(n["column"], n["slot"], n["mean"], n["scale"]) for n in spec["numeric"]]
        self._categorical = [
            (c["column"], {value: c["start"] + i for i, value in enumerate(c["categories"])},
             c["ignore_unknown"])
            for c in spec["categorical"]
        ]
        self.learnt = {column: (mean, scale) for column, _, mean, scale in self._numeric}
        """Each scaled column's mean and scale, as learnt from the training data."""
        self._needed = [*self.learnt, *(column for column, _, _ in self._categorical)]
        self._numeric_slots = np.array([slot for _, slot, _, _ in self._numeric], dtype=np.intp)
        self._means = np.array([mean for _, _, mean, _ in self._numeric])
        self._scales = np.array([scale for _, _, _, scale in self._numeric])
        # One C call takes a row's values of every needed column, in the order of ``_needed``.
        self._items, self._attributes = (_values_of(get, self._needed)
                                         for get in (itemgetter, attrgetter))

    def matrix(self, rows: Sequence[Row] | Sequence[Any]) -> np.ndarray:
        """``rows``: mappings by column, or structs with the columns as fields (the service's
        ``Penguin``, which then need no copying into dicts)."""
        if not rows:
            return np.zeros((0, self._width))
        if isinstance(rows[0], Mapping):
            columns = _mapping_columns(rows, self._needed)
        else:
            columns = _struct_columns(rows)
        features = np.zeros((len(rows), self._width))
        if self._numeric:
            values = np.array([columns[column] for column, _, _, _ in self._numeric],
                              dtype=np.float64).T
            values -= self._means
            values /= self._scales
            features[:, self._numeric_slots] = values
        for column, slots, ignore_unknown in self._categorical:
            found = np.fromiter(map(slots.get, columns[column], itertools.repeat(-1)),
                                dtype=np.intp, count=len(rows))
            known = found >= 0
            if not (ignore_unknown or known.all()):
                unknown = columns[column][int(np.argmin(known))]
                raise ValueError(f"{column} {unknown!r} is a category the model never saw")
            features[known.nonzero()[0], found[known]] = 1.0
        return features

    def vector(self, row: Row | Any) -> list[float]:
        """One row of ``matrix``, as Python floats: a few microseconds, no NumPy."""
        values = (self._items if isinstance(row, Mapping) else self._attributes)(row)
        # Python floats are IEEE doubles: the scaler's own two operations (subtract, then divide;
        # not a multiply) give its results to the last bit, here as in ``matrix``.
        vector = [0.0] * self._width
        for (_, slot, mean, scale), value in zip(self._numeric, values, strict=False):
            vector[slot] = (value - mean) / scale
        categories = values[len(self._numeric):]
        for (column, slots, ignore_unknown), value in zip(self._categorical, categories,
                                                          strict=True):
            slot = slots.get(value)
            if slot is not None:
                vector[slot] = 1.0
            elif not ignore_unknown:
                raise ValueError(f"{column} {value!r} is a category the model never saw")
        return vector


def _values_of(get: Callable[..., Callable[[Any], Any]], names: list[str]
               ) -> Callable[[Any], tuple[Any, ...]]:
    """``get(*names)``, which for one name gives a value rather than a tuple of one."""
    if len(names) == 1:
        one = get(names[0])
        return lambda row: (one(row),)
    return get(*names)


def _struct_columns(rows: Sequence[Any]) -> dict[str, Sequence[Any]]:
    """The fields of structs of one type, column by column: a C call per struct, then a
    transposition, rather than a Python call per field of each row."""
    by_column = zip(*map(msgspec.structs.astuple, rows), strict=True)
    return dict(zip(rows[0].__struct_fields__, by_column, strict=True))


def _mapping_columns(rows: Sequence[Row], names: Sequence[str]) -> dict[str, Sequence[Any]]:
    return {name: list(map(itemgetter(name), rows)) for name in names}


class Estimator(NamedTuple):
    """A model's arithmetic, from the features on."""

    many: Callable[[np.ndarray], Answer]
    """For a feature matrix (float64, a row per penguin)."""
    one: Callable[[list[float]], OneAnswer]
    """For one row of it, as Python floats."""


class CompiledPredictor:
    """A ``Predictor`` that computes what the pipeline computes, without pandas or validation."""

    def __init__(self, kind: str, n_classes: int, features: Features, estimator: Estimator,
                 work_per_row: int) -> None:
        """Use ``from_spec``: this trusts its arguments."""
        self.kind = kind
        self.n_classes = n_classes
        self.features = features
        self._estimator = estimator
        self.fast = work_per_row <= FAST_WORK_PER_ROW

    @classmethod
    def from_spec(cls, spec: Any, *, n_classes: int | None = None) -> CompiledPredictor:
        """The predictor ``spec`` describes (for ``n_classes`` classes, if given); NotCompilable
        if ``spec`` is not a sound one. NumPy only: the serving process's way to build one."""
        checked = compiled_spec.validate(spec, n_classes)
        kind, classes = checked["kind"], checked["n_classes"]
        return cls(kind, classes, Features(checked["features"]),
                   _BUILDERS[kind](checked["estimator"], classes),
                   _work_per_row(checked["estimator"], classes))

    @classmethod
    def from_pipeline(cls, pipeline: Any, n_classes: int) -> CompiledPredictor:
        """The predictor the serving process would build from ``pipeline``'s spec, once sent
        as bytes. Imports scikit-learn: for the worker, and tests."""
        data = plain_data.encode(export_spec(pipeline, n_classes))
        return cls.from_spec(plain_data.decode(data, max_bytes=len(data)), n_classes=n_classes)

    def predict(self, rows: Sequence[Row] | Sequence[Any]) -> Answer:
        """``rows``: mappings by column, or structs with the columns as fields."""
        if len(rows) == 1:  # One row's own path: a batch of one answers what one row does.
            code, probabilities = self.predict_one(rows[0])
            return np.array([code]), np.array([probabilities])
        return self._estimator.many(self.features.matrix(rows))

    def predict_one(self, row: Row | Any) -> OneAnswer:
        return self._estimator.one(self.features.vector(row))


FAST_WORK_PER_ROW = 2_000_000
"""A model that touches more stored numbers than this for one row (a k-NN over a few hundred
thousand training rows, an SVM over a thousand classes) is not run on the event loop, where
its milliseconds would hold up every other request, ``/health`` included."""


def _work_per_row(estimator: Spec, n_classes: int) -> int:
    """The stored numbers one row's prediction goes through, roughly: every array, and for the
    SVM its one-vs-one pairs, which are walked in Python."""
    stored = 0
    for value in estimator.values():
        if isinstance(value, np.ndarray):
            stored += value.size
        elif isinstance(value, dict):
            stored += sum(v.size for v in value.values() if isinstance(v, np.ndarray))
    return stored + n_classes * (n_classes - 1) // 2 * 100


def _logistic_regression(spec: Spec, n_classes: int) -> Estimator:
    # coef_.T in the layout scikit-learn's fitted coef_ has (a transposed view, so this is
    # C-ordered): BLAS adds in an order that depends on the layout, and this is the one that
    # gives the pipeline's scores to the last bit.
    coef_t, intercept = np.ascontiguousarray(spec["coef"].T), spec["intercept"]

    def many(x: np.ndarray) -> Answer:
        scores = x @ coef_t + intercept
        codes = scores.argmax(axis=1)
        # sklearn.utils.extmath.softmax, step by step.
        scores -= scores.max(axis=1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=1, keepdims=True)
        return codes, scores

    def one(vector: list[float]) -> OneAnswer:
        scores = (np.dot(vector, coef_t) + intercept).tolist()
        top = max(scores)
        exp = [math.exp(score - top) for score in scores]
        total = _sum_in_order(exp)
        return scores.index(top), [e / total for e in exp]

    return Estimator(many, one)


def _random_forest(spec: Spec, n_classes: int) -> Estimator:
    value, n_trees = spec["value"], len(spec["trees"]["roots"])
    forest = Forest(spec["trees"], value.T, equal_goes_right=False)

    def many(x: np.ndarray) -> Answer:
        # RandomForestClassifier.predict_proba: the sum of the trees' fractions, then / trees.
        probabilities = value[forest.leaves(x)].sum(axis=1)
        probabilities /= n_trees
        return probabilities.argmax(axis=1), probabilities

    def one(vector: list[float]) -> OneAnswer:
        # Tree after tree, as scikit-learn and ``many`` add them (``sum`` would add pairwise,
        # and a class's fractions summed in another order can tie with another's, or not).
        by_class = np.add.accumulate(forest.values_of_one(vector), axis=1)[:, -1]
        probabilities = (by_class / n_trees).tolist()
        return _arg_max(probabilities), probabilities

    return Estimator(many, one)


def _calibrated_svm(spec: Spec, n_classes: int) -> Estimator:
    vectors, gamma, weights = spec["vectors"], spec["gamma"], spec["weights"]
    intercept, slopes, offsets = spec["intercept"], spec["slopes"], spec["offsets"]
    pairs = list(itertools.combinations(range(n_classes), 2))  # The rows of the weights.
    uniform = [1 / n_classes] * n_classes
    # For one row, -gamma |x - v|^2 as gamma (2 v.x - |v|^2) - gamma |x|^2, libsvm's own way:
    # one product with these rows and (x, 1) gives the first part for every support vector.
    expanded = gamma * np.hstack([2 * vectors, -(vectors * vectors).sum(axis=1, keepdims=True)])

    def finish(ovo: list[float]) -> list[float]:
        # sklearn.utils.multiclass._ovr_decision_function(ovo < 0, -ovo, n_classes): a pair
        # adds its decision to class i, takes it from class j, and votes for one of them.
        confidence, votes = [0.0] * n_classes, [0] * n_classes
        for (i, j), decision in zip(pairs, ovo, strict=True):
            confidence[i] += decision
            confidence[j] -= decision
            votes[j if decision < 0 else i] += 1
        # Then _SigmoidCalibration.predict, expit(-(a * f + b)), per class; then normalised.
        calibrated = [
            1 / (1 + math.exp(a * (v + c / (3 * (abs(c) + 1))) + b))
            for v, c, a, b in zip(votes, confidence, slopes, offsets, strict=True)
        ]
        total = _sum_in_order(calibrated)
        if total == 0:
            return uniform
        return [1.0 if 1.0 < q <= 1.0 + 1e-5 else q for q in (p / total for p in calibrated)]

    def many(x: np.ndarray) -> Answer:
        squared = ((x[:, None, :] - vectors[None, :, :]) ** 2).sum(axis=2)
        return _per_row(finish, np.exp(-gamma * squared) @ weights.T + intercept, np.float64)

    def one(vector: list[float]) -> OneAnswer:
        kernel = np.dot(expanded, [*vector, 1.0])
        kernel -= gamma * _dot(vector, vector)
        np.exp(kernel, out=kernel)
        probabilities = finish((np.dot(weights, kernel) + intercept).tolist())
        return _arg_max(probabilities), probabilities

    return Estimator(_in_blocks(many, vectors.size), one)


def _k_neighbours(spec: Spec, n_classes: int) -> Estimator:
    train, labels, k = spec["train"], spec["labels"], spec["k"]
    # For one row, the training rows ranked by |t|^2 - 2 t.x: the squared distance less |x|^2,
    # which is the same for all of them. One product with these rows and (x, 1) gives it.
    squared_norms = (train * train).sum(axis=1, keepdims=True)
    expanded = np.hstack([-2 * train, squared_norms])
    largest_norm = math.sqrt(float(squared_norms.max()))
    labels_list = labels.tolist()

    def finish(neighbours: list[int]) -> list[float]:
        counts = [0] * n_classes
        for label in neighbours:
            counts[label] += 1
        return [count / k for count in counts]

    def many(x: np.ndarray) -> Answer:
        squared = ((x[:, None, :] - train[None, :, :]) ** 2).sum(axis=2)
        nearest = np.argpartition(squared, k - 1, axis=1)[:, :k]
        # The arg-max of the counts: the most frequent class, the smallest code among ties, as
        # the mode KNeighborsClassifier.predict takes.
        return _per_row(finish, labels[nearest], np.float64)

    def one(vector: list[float]) -> OneAnswer:
        if k < len(train):
            ranked = np.dot(expanded, [*vector, 1.0])
            kth, following = np.partition(ranked, [k - 1, k])[k - 1:k + 1].tolist()
            # Unless the k-th and the next are nearly as far (both rankings, this one and the
            # batch's distances, are within ~20 units in the last place of (|x| + |t|)^2 of the
            # exact one), the batch picks the same k: it is the one row's answer to the bit.
            scale = (math.sqrt(_dot(vector, vector)) + largest_norm) ** 2
            if following - kth > _NEAR_TIE * scale:
                nearest = np.flatnonzero(ranked <= kth).tolist()  # The next one is farther.
                probabilities = finish([labels_list[i] for i in nearest])
                return _arg_max(probabilities), probabilities
        codes, probabilities = many(np.array([vector]))
        return int(codes[0]), probabilities[0].tolist()

    return Estimator(_in_blocks(many, train.size), one)


_NEAR_TIE = 1e-9
"""Relative to the squared distances' scale, a gap between a k-NN's k-th and next training row
that the one-row ranking leaves to the batch's arithmetic: some 100,000 times what rounding
moves."""


BLOCK_NUMBERS = 2_000_000
"""How many differences a block of rows may compute at once against the stored points (16 MB):
a batch of 1,000 rows against a large training set must not take gigabytes."""


def _in_blocks(estimate: Callable[[np.ndarray], Answer], numbers_per_row: int
               ) -> Callable[[np.ndarray], Answer]:
    """``estimate`` on row blocks of at most ``BLOCK_NUMBERS`` differences each. The rows are
    independent, so the answers are those on all rows at once (to the last bits of a matrix
    product, which BLAS may sum in another order for another number of rows)."""
    rows = max(1, BLOCK_NUMBERS // max(1, numbers_per_row))

    def by_blocks(x: np.ndarray) -> Answer:
        if len(x) <= rows:
            return estimate(x)
        parts = [estimate(x[start:start + rows]) for start in range(0, len(x), rows)]
        return (np.concatenate([codes for codes, _ in parts]),
                np.concatenate([probabilities for _, probabilities in parts]))

    return by_blocks


def _xgboost(spec: Spec, n_classes: int) -> Estimator:
    # The trees are one per class and round, after one single-leaf tree per class holding the
    # base score: summing a class's leaves in tree order adds them up as XGBoost does. Walked
    # class by class, so that a class's leaves are contiguous: NumPy's ``add.accumulate`` sums
    # them one after the other (its ``sum`` would add them pairwise, as XGBoost does not).
    roots = spec["trees"]["roots"]
    rounds = len(roots) // n_classes - 1
    by_class = roots.reshape(rounds + 1, n_classes).T.ravel()
    value = spec["value"]
    forest = Forest({**spec["trees"], "roots": by_class}, value, equal_goes_right=True)
    expf = _c_expf()

    def finish(margin: list[float]) -> list[float]:
        # xgboost/src/common/math.h Softmax: expf(m - max) in float32, summed in double, each
        # divided by the sum as a float. Python's doubles give the float32 results once rounded:
        # a float32 difference or quotient computed in double and rounded is the exact one.
        top = max(margin)
        exp = [expf(m - top) if m != top else 1.0 for m in margin]  # expf(0) is 1: no call.
        total = array.array("f", (_sum_in_order(exp),))[0]  # Rounded to float32.
        return [e / total for e in exp]

    def many(x: np.ndarray) -> Answer:
        leaves = value[forest.leaves(x)].reshape(len(x), n_classes, rounds + 1)
        margin = np.add.accumulate(leaves, axis=2)[:, :, -1]  # Tree by tree, in float32.
        return _per_row(finish, margin, np.float32)

    def one(vector: list[float]) -> OneAnswer:
        leaves = forest.values_of_one(vector).reshape(n_classes, rounds + 1)
        margin = np.add.accumulate(leaves, axis=1)[:, -1].tolist()
        # Each probability a float32, as XGBoost gives it (and the batch's float32 array).
        probabilities = array.array("f", finish(margin)).tolist()
        return _arg_max(probabilities), probabilities

    return Estimator(many, one)


def _c_expf() -> Callable[[float], float]:
    """The C library's ``expf``, which XGBoost calls: NumPy's float32 ``exp`` differs from it in
    the last bit for about one value in four, and float64 ``exp`` rounded in about one in 2,000."""
    path = ctypes.util.find_library("m")
    if path is None:
        raise NotCompilable("no C math library to take expf from")
    expf = ctypes.CDLL(path).expf
    expf.restype, expf.argtypes = ctypes.c_float, [ctypes.c_float]
    return expf


def _per_row(finish: Callable[[list[Any]], list[float]], values: np.ndarray,
             dtype: type[np.floating]) -> Answer:
    """The probabilities ``finish`` makes of each row of ``values``, and their arg-max.

    A tail of a few numbers per row costs a microsecond in plain Python, and several in NumPy
    calls: per row wins at one row, the case that matters, and stays cheap at a thousand.
    """
    probabilities = np.array([finish(row) for row in values.tolist()], dtype=dtype)
    return probabilities.argmax(axis=1), probabilities


def _arg_max(values: list[float]) -> int:
    """The first of the largest, as NumPy's ``argmax`` takes it."""
    return values.index(max(values))


def _dot(a: list[float], b: list[float]) -> float:
    return _sum_in_order(list(map(mul, a, b)))


def _sum_in_order(values: list[float]) -> float:
    """Left to right, as a C loop adds (``sum`` may compensate, in newer Pythons)."""
    total = 0.0
    for value in values:
        total += value
    return total


_BUILDERS: dict[str, Callable[[Spec, int], Estimator]] = {
    "LogisticRegression": _logistic_regression,
    "RandomForestClassifier": _random_forest,
    "CalibratedClassifierCV": _calibrated_svm,
    "KNeighborsClassifier": _k_neighbours,
    "XGBClassifier": _xgboost,
}
"""A spec's kind -> the builder of its numeric paths, from its checked ``estimator`` part."""


def check_rows(features: Features, per_group: int = 40, seed: int = 0) -> list[dict[str, Any]]:
    """Plausible synthetic penguins to compare a compiled predictor with its pipeline on.

    For every island and sex, ``per_group`` rows whose measurements are drawn around the training
    data's mean with its spread (as the fitted scaler learnt them), and ``per_group // 4`` drawn
    anywhere in the plausible ranges; all within ``contract.PLAUSIBLE_RANGES``.
    """
    rng = np.random.default_rng(seed)
    groups = list(itertools.product(ISLANDS, SEXES))
    near, anywhere = per_group * len(groups), per_group // 4 * len(groups)
    columns = {}
    for column, (low, high) in PLAUSIBLE_RANGES.items():
        mean, spread = features.learnt.get(column, ((low + high) / 2, (high - low) / 4))
        drawn = np.concatenate([rng.normal(mean, spread, near), rng.uniform(low, high, anywhere)])
        columns[column] = np.clip(drawn, low, high).tolist()
    columns["year"] = [round(year) for year in columns["year"]]
    categories = (groups * (per_group + per_group // 4))[:near + anywhere]
    return [{"island": island, "sex": sex, **{c: values[i] for c, values in columns.items()}}
            for i, (island, sex) in enumerate(categories)]


def _name(thing: Any) -> str:
    return type(thing).__qualname__
