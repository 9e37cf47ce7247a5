"""Checking a compiled predictor's spec before the serving process builds anything from it.

A spec is the plain data a model worker exports (``compiled.export_spec``). The worker may have
been subverted, so ``validate`` takes nothing on trust: every key, type, dtype, shape, index and
number is checked, and anything else raises ``NotCompilable`` naming the part that is wrong.
What passes is safe to build from: no index out of range, no loop whose length the spec does not
bound (a tree walk takes at most ``MAX_TREE_DEPTH`` steps), no division by zero. Whether its
answers are the model's is for the check rows to say (``predictors.compile_checked``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from serving.contract import FEATURES, PLAUSIBLE_RANGES

MAX_CLASSES = 1000
MAX_TREE_DEPTH = 10_000
NUMERIC_COLUMNS = tuple(PLAUSIBLE_RANGES)
CATEGORICAL_COLUMNS = tuple(c for c in FEATURES if c not in PLAUSIBLE_RANGES)

_F8, _F4, _I8 = np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.int64)


class NotCompilable(Exception):
    """This model has no compiled path, or its spec is not one; the message says which part."""


def validate(spec: Any, n_classes: int | None = None) -> dict[str, Any]:
    """``spec`` if it is a sound spec (for ``n_classes`` classes, if given); NotCompilable if not.

    What comes back is the same tree, its numbers as the builders want them (Python ints and
    floats; arrays of the dtypes below, never written to).
    """
    top = _keys(spec, "the spec", "kind", "n_classes", "features", "estimator")
    kind = top["kind"]
    if not (isinstance(kind, str) and kind in _ESTIMATORS):
        raise NotCompilable(f"the spec's kind is {kind!r}, not one of {sorted(_ESTIMATORS)}")
    classes = _integer(top["n_classes"], "n_classes", 3, MAX_CLASSES)
    if n_classes is not None and classes != n_classes:
        raise NotCompilable(f"the spec is for {classes} classes, the model has {n_classes}")
    features = _features(top["features"])
    estimator = _ESTIMATORS[kind](top["estimator"], features["width"], classes)
    return {"kind": kind, "n_classes": classes, "features": features, "estimator": estimator}


def forest_depth(left: np.ndarray, right: np.ndarray, roots: np.ndarray) -> int:
    """How many levels the deepest tree of this forest has; NotCompilable unless it is a forest.

    ``left`` and ``right`` give each node's children, a leaf's being itself. In a forest no root
    has a parent and no node has two, so no walk from a root meets a node twice (or cycles):
    level by level from the roots, this meets each node at most once. (Nodes that hang from no
    root, such as a booster's pruned ones, are never walked to, so they do no harm.)
    """
    nodes = len(left)
    for name, indices in (("left child", left), ("right child", right), ("root", roots)):
        if indices.size and not (indices.min() >= 0 and indices.max() < nodes):
            raise NotCompilable(f"the trees have a {name} index outside [0, {nodes})")
    if len(np.unique(roots)) != len(roots):
        raise NotCompilable("the trees have a root twice")
    node = np.arange(nodes)
    inner = (left != node) | (right != node)
    parents = np.bincount(np.concatenate([left[inner], right[inner]]), minlength=nodes)
    if parents[roots].any() or (parents > 1).any():
        raise NotCompilable("the trees are not a forest: a root has a parent, or a node has "
                            "two (a node that is its own child is its own parent)")
    depth, level = 0, roots
    while (level := level[inner[level]]).size:
        if depth == MAX_TREE_DEPTH:
            raise NotCompilable(f"the trees are more than {MAX_TREE_DEPTH} levels deep")
        level = np.concatenate([left[level], right[level]])
        depth += 1
    return depth


# --- The parts of a spec ---------------------------------------------------------------------


def _features(spec: Any) -> dict[str, Any]:
    """Each numeric column's slot, mean and scale, each categorical column's categories and first
    slot: the slots together cover ``[0, width)``, each once."""
    top = _keys(spec, "features", "width", "numeric", "categorical")
    width = _integer(top["width"], "features.width", 1, math.inf)
    numeric, categorical, slots, columns = [], [], [], []
    for i, column in enumerate(_list(top["numeric"], "features.numeric")):
        where = f"features.numeric[{i}]"
        entry = _keys(column, where, "column", "slot", "mean", "scale")
        slot = _integer(entry["slot"], f"{where}.slot", 0, width - 1)
        scale = _number(entry["scale"], f"{where}.scale")
        if scale <= 0:  # A standard deviation (or 1): positive, and check_rows draws with it.
            raise NotCompilable(f"{where}.scale is {scale}, not positive")
        numeric.append({"column": _choice(entry["column"], f"{where}.column", NUMERIC_COLUMNS),
                        "slot": slot, "mean": _number(entry["mean"], f"{where}.mean"),
                        "scale": scale})
        slots.append(slot)
    for i, column in enumerate(_list(top["categorical"], "features.categorical")):
        where = f"features.categorical[{i}]"
        entry = _keys(column, where, "column", "categories", "start", "ignore_unknown")
        categories = _list(entry["categories"], f"{where}.categories")
        if not categories or not all(isinstance(c, str) for c in categories) or len(
                set(categories)) != len(categories):
            raise NotCompilable(f"{where}.categories is not a list of distinct strings")
        start = _integer(entry["start"], f"{where}.start", 0, width - len(categories))
        if not isinstance(entry["ignore_unknown"], bool):
            raise NotCompilable(f"{where}.ignore_unknown is not true or false")
        categorical.append({
            "column": _choice(entry["column"], f"{where}.column", CATEGORICAL_COLUMNS),
            "categories": categories, "start": start, "ignore_unknown": entry["ignore_unknown"]})
        slots += range(start, start + len(categories))
    columns = [c["column"] for c in numeric + categorical]
    if len(set(columns)) != len(columns):
        raise NotCompilable(f"the features take a column twice: {columns}")
    if len(slots) != width or sorted(slots) != list(range(width)):  # Never a list of `width`.
        raise NotCompilable(f"the features' slots overlap or leave gaps in [0, {width})")
    return {"width": width, "numeric": numeric, "categorical": categorical}


def _logistic_regression(spec: Any, width: int, n_classes: int) -> dict[str, Any]:
    top = _keys(spec, "estimator", "coef", "intercept")
    return {"coef": _array(top["coef"], "estimator.coef", _F8, (n_classes, width)),
            "intercept": _array(top["intercept"], "estimator.intercept", _F8, (n_classes,))}


def _random_forest(spec: Any, width: int, n_classes: int) -> dict[str, Any]:
    top = _keys(spec, "estimator", "trees", "value")
    trees = _trees(top["trees"], width, _F8)
    nodes = len(trees["left"])
    return {"trees": trees,
            "value": _array(top["value"], "estimator.value", _F8, (nodes, n_classes))}


def _xgboost(spec: Any, width: int, n_classes: int) -> dict[str, Any]:
    top = _keys(spec, "estimator", "trees", "value")
    trees = _trees(top["trees"], width, _F4)
    if len(trees["roots"]) % n_classes:
        raise NotCompilable(f"the booster has {len(trees['roots'])} trees, not one per class "
                            f"({n_classes}) and round")
    nodes = len(trees["left"])
    return {"trees": trees, "value": _array(top["value"], "estimator.value", _F4, (nodes,))}


def _trees(spec: Any, width: int, threshold_dtype: np.dtype) -> dict[str, Any]:
    """All the trees' nodes, concatenated: each node's feature, threshold and children (a leaf's
    children are itself); each tree's root; the depth of the deepest tree."""
    top = _keys(spec, "estimator.trees", "feature", "threshold", "left", "right", "roots",
                "depth")
    left = _array(top["left"], "estimator.trees.left", _I8, (None,), finite=False)
    nodes = len(left)
    if nodes == 0:
        raise NotCompilable("estimator.trees has no nodes")
    right = _array(top["right"], "estimator.trees.right", _I8, (nodes,), finite=False)
    feature = _array(top["feature"], "estimator.trees.feature", _I8, (nodes,), finite=False)
    threshold = _array(top["threshold"], "estimator.trees.threshold", threshold_dtype, (nodes,))
    roots = _array(top["roots"], "estimator.trees.roots", _I8, (None,), finite=False)
    depth = _integer(top["depth"], "estimator.trees.depth", 0, min(nodes, MAX_TREE_DEPTH))
    if not (feature.min() >= 0 and feature.max() < width):
        raise NotCompilable(f"estimator.trees.feature has an index outside [0, {width})")
    if len(roots) == 0:
        raise NotCompilable("estimator.trees has no roots")
    if forest_depth(left, right, roots) != depth:
        raise NotCompilable(f"estimator.trees.depth is {depth}, not the trees' depth")
    return {"feature": feature, "threshold": threshold, "left": left, "right": right,
            "roots": roots, "depth": depth}


def _calibrated_svm(spec: Any, width: int, n_classes: int) -> dict[str, Any]:
    top = _keys(spec, "estimator", "vectors", "gamma", "weights", "intercept", "slopes",
                "offsets")
    vectors = _array(top["vectors"], "estimator.vectors", _F8, (None, width))
    if len(vectors) == 0:
        raise NotCompilable("estimator.vectors has no support vectors")
    pairs = n_classes * (n_classes - 1) // 2
    gamma = _number(top["gamma"], "estimator.gamma")
    if gamma < 0:
        raise NotCompilable(f"estimator.gamma is {gamma}, not 0 or more")
    return {"vectors": vectors, "gamma": gamma,
            "weights": _array(top["weights"], "estimator.weights", _F8, (pairs, len(vectors))),
            "intercept": _array(top["intercept"], "estimator.intercept", _F8, (pairs,)),
            "slopes": _numbers(top["slopes"], "estimator.slopes", n_classes),
            "offsets": _numbers(top["offsets"], "estimator.offsets", n_classes)}


def _k_neighbours(spec: Any, width: int, n_classes: int) -> dict[str, Any]:
    top = _keys(spec, "estimator", "train", "labels", "k")
    train = _array(top["train"], "estimator.train", _F8, (None, width))
    labels = _array(top["labels"], "estimator.labels", _I8, (len(train),), finite=False)
    if len(train) == 0:
        raise NotCompilable("estimator.train has no rows")
    if not (labels.min() >= 0 and labels.max() < n_classes):
        raise NotCompilable(f"estimator.labels has a class outside [0, {n_classes})")
    return {"train": train, "labels": labels,
            "k": _integer(top["k"], "estimator.k", 1, len(train))}


_ESTIMATORS: dict[str, Callable[[Any, int, int], dict[str, Any]]] = {
    "LogisticRegression": _logistic_regression,
    "RandomForestClassifier": _random_forest,
    "CalibratedClassifierCV": _calibrated_svm,
    "KNeighborsClassifier": _k_neighbours,
    "XGBClassifier": _xgboost,
}
"""Each kind of spec -> the check of its ``estimator`` part (given the width and classes)."""


# --- Values ----------------------------------------------------------------------------------


def _keys(value: Any, where: str, *names: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise NotCompilable(f"{where} is a {type(value).__qualname__}, not a dict")
    if set(value) != set(names):
        missing, extra = sorted(set(names) - set(value)), sorted(set(value) - set(names))
        raise NotCompilable(f"{where} lacks the keys {missing} and has the extra keys {extra}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise NotCompilable(f"{where} is a {type(value).__qualname__}, not a list")
    return value


def _integer(value: Any, where: str, low: float, high: float) -> int:
    if type(value) is not int or not low <= value <= high:
        raise NotCompilable(f"{where} is {value!r}, not an integer in [{low}, {high}]")
    return value


def _number(value: Any, where: str) -> float:
    if type(value) is not float or not math.isfinite(value):
        raise NotCompilable(f"{where} is {value!r}, not a finite float")
    return value


def _numbers(value: Any, where: str, length: int) -> list[float]:
    if len(_list(value, where)) != length:
        raise NotCompilable(f"{where} has {len(value)} numbers, not {length}")
    return [_number(v, f"{where}[{i}]") for i, v in enumerate(value)]


def _choice(value: Any, where: str, choices: tuple[str, ...]) -> str:
    if not (isinstance(value, str) and value in choices):
        raise NotCompilable(f"{where} is {value!r}, not one of {list(choices)}")
    return value


def _array(value: Any, where: str, dtype: np.dtype, shape: tuple[int | None, ...], *,
           finite: bool = True) -> np.ndarray:
    """``value`` if it is an array of ``dtype`` and ``shape`` (None: any size), all finite."""
    if not isinstance(value, np.ndarray):
        raise NotCompilable(f"{where} is a {type(value).__qualname__}, not an array")
    if value.dtype != dtype:
        raise NotCompilable(f"{where} is an array of {value.dtype}, not of {dtype}")
    if len(value.shape) != len(shape) or any(
            want is not None and got != want for got, want in zip(value.shape, shape, strict=True)):
        wanted = tuple("any" if n is None else n for n in shape)
        raise NotCompilable(f"{where} has the shape {value.shape}, not {wanted}")
    if finite and not np.isfinite(value).all():
        raise NotCompilable(f"{where} has a number that is not finite")
    return value
