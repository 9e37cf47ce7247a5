"""The model zoo: one scikit-learn Pipeline per model name.

Each pipeline carries its own preprocessing (scaling, one-hot encoding), fitted on the training
split only, so a caller gives raw measurements and gets a species back. Pickles of these hold
only scikit-learn and XGBoost classes, so the service unpickles them without this package.
"""

from __future__ import annotations

from sklearn.base import ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from sklearn.svm import SVC
from xgboost import XGBClassifier

from penguins.contract import CATEGORICAL_FEATURES, MODEL_NAMES, NUMERIC_FEATURES

SAMPLED_MODELS = ("random_forest", "svm", "knn")
"""The models fitted on a stratified sample of at most ``max_fit_rows`` training rows (by
default ``contract.DEFAULT_MAX_FIT_ROWS``), not on all of them: the kernel SVM's fit grows
between n^2 and n^3 (and calibrating it fits it six times); k-NN keeps every row it is fitted
on, and the service measures each penguin's distance to all of them; each of the forest's 200
trees would sort every row. Logistic regression and XGBoost (histograms) grow linearly and fit
the whole training split. With fewer training rows than ``max_fit_rows`` (the packaged data has
249), every model fits them all."""

# A leaf holds at least this share of the rows a tree is fitted on, so no tree has more than
# 2,000 leaves however many rows it sees: the forest stays under 800,000 nodes, ~70 MB pickled,
# within the service's SERVING_MAX_MODEL_BYTES (200 MB) whatever max_fit_rows is. Up to 2,000
# rows that is one row, scikit-learn's default: the packaged data's forest is the same tree for
# tree.
FOREST_MIN_LEAF_SHARE = 0.0005


def _estimator(model_name: str, seed: int) -> ClassifierMixin:
    # One thread each: the mapped training copies already run in parallel.
    if model_name == "logistic_regression":
        return LogisticRegression(max_iter=1000)
    if model_name == "random_forest":
        return RandomForestClassifier(n_estimators=200, min_samples_leaf=FOREST_MIN_LEAF_SHARE,
                                      random_state=seed, n_jobs=1)
    if model_name == "svm":
        # Calibration gives the SVM class probabilities (SVC's own `probability=True` is
        # deprecated since scikit-learn 1.9).
        return CalibratedClassifierCV(SVC(random_state=seed), ensemble=False)
    if model_name == "knn":
        return KNeighborsClassifier(n_neighbors=5)
    if model_name == "xgboost":
        return XGBClassifier(
            n_estimators=200, max_depth=3, learning_rate=0.1, tree_method="hist",
            random_state=seed, n_jobs=1,
        )
    raise ValueError(f"unknown model {model_name!r}; the known models are {MODEL_NAMES}")


def build_model(model_name: str, seed: int) -> Pipeline:
    """An unfitted pipeline for ``model_name``: preprocessing, then the estimator."""
    preprocessing = ColumnTransformer(
        [
            ("numeric", StandardScaler(), list(NUMERIC_FEATURES)),
            (
                "categorical",
                OneHotEncoder(
                    categories=[list(v) for v in CATEGORICAL_FEATURES.values()],
                    handle_unknown="ignore",
                    sparse_output=False,
                ),
                list(CATEGORICAL_FEATURES),
            ),
        ]
    )
    return Pipeline([("preprocess", preprocessing), ("model", _estimator(model_name, seed))])
