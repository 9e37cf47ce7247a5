"""Compiled predictors: a fitted pipeline's arithmetic, rebuilt on NumPy arrays at load time.

Calling a fitted scikit-learn pipeline on one row costs milliseconds, nearly all of it in the
pandas ``ColumnTransformer`` and in input validation, not in the model. ``CompiledPredictor``
reads the learnt parameters out of the pipeline once and redoes the same arithmetic, in the same
order, on plain arrays:

- preprocessing: every ``StandardScaler`` column is one affine step (``(x - mean_) / scale_``)
  and every ``OneHotEncoder`` value one slot of the feature vector;
- ``LogisticRegression`` (multinomial): ``softmax(x @ coef_.T + intercept_)``;
- ``RandomForestClassifier``: every node's test decided at once on the float32 features the
  trees compare, then all trees walked together from root to leaf; the mean of the leaves'
  class fractions;
- ``XGBClassifier`` (``multi:softprob``): the same walk over the booster's trees (read from its
  JSON model), the leaves summed per class in float32, then XGBoost's own softmax;
- ``CalibratedClassifierCV(SVC(kernel="rbf"), ensemble=False)`` with sigmoid calibration: the
  one-vs-one RBF decision values, turned one-vs-rest as ``SVC.decision_function`` does, one
  sigmoid per class, normalised;
- ``KNeighborsClassifier`` (uniform weights, Euclidean): distances to every training row.

Anything else raises ``NotCompilable``. None of this is trusted on its own: ``predictors`` serves
a compiled predictor only after it has matched the pipeline's own ``predict`` and
``predict_proba`` on a set of check rows (``check_rows``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from operator import itemgetter
from typing import Any

import numpy as np

from serving.contract import ISLANDS, PLAUSIBLE_RANGES, SEXES

Row = Mapping[str, Any]
"""One penguin: a value for each of ``contract.FEATURES``."""
Answer = tuple[np.ndarray, np.ndarray]
"""Class codes, shape ``(n,)``, and class probabilities, shape ``(n, classes)``."""


class NotCompilable(Exception):
    """This pipeline has no compiled path; the message says which part and why."""


class Features:
    """A fitted ``ColumnTransformer`` of ``StandardScaler``s and ``OneHotEncoder``s, as arithmetic.

    ``matrix(rows)`` gives, as float64, what the transformer's ``transform`` gives for a
    DataFrame of the same rows.
    """

    def __init__(self, transformer: Any) -> None:
        from sklearn.compose import ColumnTransformer
        from sklearn.preprocessing import OneHotEncoder, StandardScaler

        if not isinstance(transformer, ColumnTransformer) or transformer.sparse_output_:
            raise NotCompilable(f"the preprocessing is a {_name(transformer)}, not a dense "
                                "ColumnTransformer")
        self._numeric: list[tuple[str, int, float, float]] = []
        self._categorical: list[tuple[str, dict[str, int], bool]] = []
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
                self._numeric += zip(columns, range(start, start + len(columns)),
                                     map(float, mean), map(float, scale), strict=True)
            elif type(step) is OneHotEncoder and _plain_one_hot(step):
                for column, categories in zip(columns, step.categories_, strict=True):
                    slots = {value: start + i for i, value in enumerate(categories)}
                    self._categorical.append((column, slots, step.handle_unknown == "ignore"))
                    start += len(categories)
            else:
                raise NotCompilable(f"transformer {name!r} is a {_name(step)}; only "
                                    "StandardScaler and plain OneHotEncoder are compiled")
        self._width = max(s.stop for s in transformer.output_indices_.values())
        self.learnt = {column: (mean, scale) for column, _, mean, scale in self._numeric}
        """Each scaled column's mean and scale, as learnt from the training data."""
        self._numeric_values = itemgetter(*self.learnt)
        self._numeric_slots = np.array([slot for _, slot, _, _ in self._numeric], dtype=np.intp)
        self._means = np.array([mean for _, _, mean, _ in self._numeric])
        self._scales = np.array([scale for _, _, _, scale in self._numeric])

    def matrix(self, rows: Sequence[Row]) -> np.ndarray:
        if len(rows) == 1:  # The common case: a few microseconds in plain Python.
            return np.array([self._vector(rows[0])], dtype=np.float64)
        features = np.zeros((len(rows), self._width))
        values = np.array(list(map(self._numeric_values, rows)), dtype=np.float64)
        values -= self._means
        values /= self._scales
        features[:, self._numeric_slots] = values.reshape(len(rows), -1)
        for column, slots, ignore_unknown in self._categorical:
            found = np.fromiter((slots.get(value, -1) for value in map(itemgetter(column), rows)),
                                dtype=np.intp, count=len(rows))
            known = found >= 0
            if not (ignore_unknown or known.all()):
                unknown = rows[int(np.argmin(known))][column]
                raise ValueError(f"{column} {unknown!r} is a category the model never saw")
            features[known.nonzero()[0], found[known]] = 1.0
        return features

    def _vector(self, row: Row) -> list[float]:
        # Python floats are IEEE doubles: the scaler's own two operations (subtract, then divide;
        # not a multiply) give its results to the last bit, here as in ``matrix``.
        vector = [0.0] * self._width
        for column, slot, mean, scale in self._numeric:
            vector[slot] = (row[column] - mean) / scale
        for column, slots, ignore_unknown in self._categorical:
            slot = slots.get(row[column])
            if slot is not None:
                vector[slot] = 1.0
            elif not ignore_unknown:
                raise ValueError(f"{column} {row[column]!r} is a category the model never saw")
        return vector


def _plain_one_hot(encoder: Any) -> bool:
    """No dropped or grouped categories, dense output, string categories."""
    return (encoder.drop_idx_ is None and encoder.max_categories is None
            and encoder.min_frequency is None and not encoder.sparse_output
            and all(isinstance(v, str) for c in encoder.categories_ for v in c))


class CompiledPredictor:
    """A ``Predictor`` that computes what the pipeline computes, without pandas or validation."""

    fast = True

    def __init__(self, pipeline: Any, n_classes: int) -> None:
        from sklearn.pipeline import Pipeline

        if not (isinstance(pipeline, Pipeline) and len(pipeline.steps) == 2):
            raise NotCompilable(f"the model is a {_name(pipeline)}, not a two-step Pipeline "
                                "(preprocessing, estimator)")
        (_, preprocess), (_, estimator) = pipeline.steps
        self.features = Features(preprocess)
        classes = getattr(estimator, "classes_", None)
        if classes is None or list(classes) != list(range(n_classes)):
            raise NotCompilable(f"the estimator's classes are not the codes 0 to {n_classes - 1}")
        kind = type(estimator)
        compile_estimator = _COMPILERS.get((kind.__module__.partition(".")[0], kind.__name__))
        if compile_estimator is None:
            raise NotCompilable(f"no compiled path for a {_name(estimator)}")
        self.kind = kind.__name__
        self._estimate = compile_estimator(estimator, n_classes)

    def predict(self, rows: Sequence[Row]) -> Answer:
        return self._estimate(self.features.matrix(rows))


def _logistic_regression(model: Any, n_classes: int) -> Callable[[np.ndarray], Answer]:
    if n_classes < 3 or model.coef_.shape != (n_classes, model.n_features_in_):
        raise NotCompilable("only a multinomial LogisticRegression (3 classes or more) is compiled")
    coef, intercept = model.coef_, model.intercept_

    def estimate(x: np.ndarray) -> Answer:
        scores = x @ coef.T + intercept
        codes = scores.argmax(axis=1)
        # sklearn.utils.extmath.softmax, step by step.
        scores -= scores.max(axis=1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=1, keepdims=True)
        return codes, scores

    return estimate


class _Trees:
    """Many binary trees walked at once over NumPy arrays.

    Every tree's nodes live in one set of arrays. For a row, every node's test is decided at
    once, giving each node its next node; then every tree steps from its root to its next node,
    as many times as the deepest tree has levels (a leaf's next node is itself).
    """

    ROWS_AT_ONCE = 64
    """Rows per block of a batch: a block's tests (rows x nodes) stay a few megabytes."""

    def __init__(self, left: list[np.ndarray], right: list[np.ndarray],
                 feature: list[np.ndarray], threshold: list[np.ndarray], *,
                 equal_goes_right: bool) -> None:
        starts = np.cumsum([0, *(len(nodes) for nodes in left)])
        offsets = np.repeat(starts[:-1], np.diff(starts))
        left_all, right_all = np.concatenate(left), np.concatenate(right)
        leaf = left_all < 0
        node = np.arange(starts[-1])
        self._feature = np.where(leaf, 0, np.concatenate(feature)).astype(np.intp)
        self._threshold = np.concatenate(threshold)
        self._left = np.where(leaf, node, left_all + offsets).astype(np.intp)
        self._right = np.where(leaf, node, right_all + offsets).astype(np.intp)
        self._roots = starts[:-1].astype(np.intp)
        self._equal_goes_right = equal_goes_right
        self._depth = 0
        level = self._roots
        while not leaf[level].all():
            inner = level[~leaf[level]]
            level = np.concatenate([self._left[inner], self._right[inner]])
            self._depth += 1

    def leaves(self, x: np.ndarray) -> np.ndarray:
        """The leaf each tree puts each row of ``x`` on, shape ``(rows, trees)``."""
        if len(x) <= self.ROWS_AT_ONCE:
            return self._leaves(x)
        return np.concatenate([self._leaves(x[start:start + self.ROWS_AT_ONCE])
                               for start in range(0, len(x), self.ROWS_AT_ONCE)])

    def _leaves(self, x: np.ndarray) -> np.ndarray:
        # Both libraries test float32 features: scikit-learn against float64 thresholds, with
        # x <= threshold going left; XGBoost against float32 ones, with x < threshold.
        values = x.astype(np.float32).take(self._feature, axis=1)
        right = values >= self._threshold if self._equal_goes_right else values > self._threshold
        following = np.where(right, self._right, self._left)
        if len(x) == 1:  # The common case, without the offsets below.
            at = self._roots
            for _ in range(self._depth):
                at = following[0].take(at)
            return at[None, :]
        # Row r's nodes, flattened, start at r * nodes.
        nodes = len(self._feature)
        first = np.arange(0, len(x) * nodes, nodes, dtype=np.intp)[:, None]
        following = (following + first).ravel()
        at = self._roots + first
        for _ in range(self._depth):
            at = following.take(at)
        return at - first


def _random_forest(model: Any, n_classes: int) -> Callable[[np.ndarray], Answer]:
    trees = [tree.tree_ for tree in model.estimators_]
    if model.n_outputs_ != 1 or any(t.value.shape[1:] != (1, n_classes) for t in trees):
        raise NotCompilable("only a single-output forest is compiled")
    # DecisionTreeClassifier: left when x <= threshold; a leaf's value is its class fractions.
    walk = _Trees([t.children_left for t in trees], [t.children_right for t in trees],
                  [t.feature for t in trees], [t.threshold for t in trees],
                  equal_goes_right=False)
    value = np.concatenate([t.value[:, 0, :] for t in trees])

    def estimate(x: np.ndarray) -> Answer:
        # RandomForestClassifier.predict_proba: the sum of the trees' fractions, then / trees.
        probabilities = value[walk.leaves(x)].sum(axis=1)
        probabilities /= len(trees)
        return probabilities.argmax(axis=1), probabilities

    return estimate


def _calibrated_svm(model: Any, n_classes: int) -> Callable[[np.ndarray], Answer]:
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
    vectors, gamma = svc.support_vectors_, svc._gamma
    # libsvm's one-vs-one decision for the pair (i, j): the support vectors of class i weighted
    # by row j - 1 of the dual coefficients, those of class j by row i, minus rho (-intercept).
    starts = np.cumsum([0, *svc._n_support])
    pairs = list(itertools.combinations(range(n_classes), 2))
    weights = np.zeros((len(pairs), len(vectors)))
    for p, (i, j) in enumerate(pairs):
        weights[p, starts[i]:starts[i + 1]] = svc._dual_coef_[j - 1, starts[i]:starts[i + 1]]
        weights[p, starts[j]:starts[j + 1]] = svc._dual_coef_[i, starts[j]:starts[j + 1]]
    intercept = svc._intercept_
    slopes = [float(c.a_) for c in calibrated.calibrators]
    offsets = [float(c.b_) for c in calibrated.calibrators]
    uniform = [1 / n_classes] * n_classes

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

    def estimate(x: np.ndarray) -> Answer:
        squared = ((x[:, None, :] - vectors[None, :, :]) ** 2).sum(axis=2)
        return _per_row(finish, np.exp(-gamma * squared) @ weights.T + intercept, np.float64)

    return estimate


def _k_neighbours(model: Any, n_classes: int) -> Callable[[np.ndarray], Answer]:
    if not (model.weights == "uniform" and model.effective_metric_ == "euclidean"
            and not model.outputs_2d_ and isinstance(model._fit_X, np.ndarray)):
        raise NotCompilable("only uniform weights and the Euclidean metric are compiled "
                            "for KNeighborsClassifier")
    train, labels, k = model._fit_X, model._y, model.n_neighbors

    def finish(neighbours: list[int]) -> list[float]:
        counts = [0] * n_classes
        for label in neighbours:
            counts[label] += 1
        return [count / k for count in counts]

    def estimate(x: np.ndarray) -> Answer:
        squared = ((x[:, None, :] - train[None, :, :]) ** 2).sum(axis=2)
        nearest = np.argpartition(squared, k - 1, axis=1)[:, :k]
        # The arg-max of the counts: the most frequent class, the smallest code among ties, as
        # the mode KNeighborsClassifier.predict takes.
        return _per_row(finish, labels[nearest], np.float64)

    return estimate


def _xgboost(model: Any, n_classes: int) -> Callable[[np.ndarray], Answer]:
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
    rounds, extra = divmod(len(trees), n_classes)
    if extra or booster["model"]["tree_info"] != [t % n_classes for t in range(len(trees))] or any(
            any(tree["split_type"]) or tree["categories"] for tree in trees):
        raise NotCompilable("only one numeric tree per class and round is compiled for XGBoost")
    # The base score (per class, in margin space) goes first, as one single-leaf tree per class,
    # so that summing the leaves in tree order adds them up as XGBoost does: base, then each tree.
    base = json.loads(saved["learner_model_param"]["base_score"])
    bases = [{"left_children": [-1], "right_children": [-1], "split_indices": [0],
              "split_conditions": [score]} for score in np.broadcast_to(base, n_classes)]
    trees = bases + trees
    walk = _Trees([np.array(t["left_children"]) for t in trees],
                  [np.array(t["right_children"]) for t in trees],
                  [np.array(t["split_indices"]) for t in trees],
                  [np.array(t["split_conditions"], dtype=np.float32) for t in trees],
                  equal_goes_right=True)
    # A leaf's split_condition is its value.
    value = np.concatenate([np.array(t["split_conditions"], dtype=np.float32) for t in trees])
    expf = _c_expf()

    def finish(margin: list[float]) -> list[float]:
        # xgboost/src/common/math.h Softmax: expf(m - max) in float32, summed in double, each
        # divided by the sum as a float. Python's doubles give the float32 results once rounded:
        # a float32 difference or quotient computed in double and rounded is the exact one.
        top = max(margin)
        exp = [expf(m - top) for m in margin]
        total = float(np.float32(_sum_in_order(exp)))
        return [e / total for e in exp]

    def estimate(x: np.ndarray) -> Answer:
        leaves = value[walk.leaves(x)].reshape(len(x), rounds + 1, n_classes)
        margin = leaves.sum(axis=1, dtype=np.float32)  # Tree by tree, in float32.
        return _per_row(finish, margin, np.float32)

    return estimate


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


def _sum_in_order(values: list[float]) -> float:
    """Left to right, as a C loop adds (``sum`` may compensate, in newer Pythons)."""
    total = 0.0
    for value in values:
        total += value
    return total


_COMPILERS: dict[tuple[str, str], Callable[[Any, int], Callable[[np.ndarray], Answer]]] = {
    ("sklearn", "LogisticRegression"): _logistic_regression,
    ("sklearn", "RandomForestClassifier"): _random_forest,
    ("sklearn", "CalibratedClassifierCV"): _calibrated_svm,
    ("sklearn", "KNeighborsClassifier"): _k_neighbours,
    ("xgboost", "XGBClassifier"): _xgboost,
}
"""(package, estimator class) -> builder of its numeric path. The exact class: a subclass is
not assumed to compute the same thing (and importing xgboost to ask would cost half a second)."""


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
