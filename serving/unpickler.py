"""Unpickling a model with an exact list of the globals it may name.

A pickle is a program: every global it names is imported and may be called. This unpickler
resolves only the module-and-name pairs that the five pipelines of ``penguins.models`` name when
pickled (a test pickles each one and compares), not whole packages: a package such as NumPy also
holds functions that open files or run code. It runs only inside the isolated loader
(``serving.loader``) and, for the promotion gate, in the pipeline on its own signed versions.
"""

from __future__ import annotations

import io
import pickle
import warnings
from typing import Any

ALLOWED_GLOBALS = frozenset({
    ("builtins", "slice"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    # NumPy scalars, of the types training data and parameters come in.
    ("numpy", "bool_"), ("numpy", "float32"), ("numpy", "float64"), ("numpy", "int32"),
    ("numpy", "int64"),
    # How NumPy rebuilds arrays and scalars.
    ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("sklearn.pipeline", "Pipeline"),
    ("sklearn.compose._column_transformer", "ColumnTransformer"),
    ("sklearn.preprocessing._data", "StandardScaler"),
    ("sklearn.preprocessing._encoders", "OneHotEncoder"),
    ("sklearn.linear_model._logistic", "LogisticRegression"),
    ("sklearn.ensemble._forest", "RandomForestClassifier"),
    ("sklearn.tree._classes", "DecisionTreeClassifier"),
    ("sklearn.tree._tree", "Tree"),
    ("sklearn.calibration", "CalibratedClassifierCV"),
    ("sklearn.calibration", "_CalibratedClassifier"),
    ("sklearn.calibration", "_SigmoidCalibration"),
    ("sklearn.svm._classes", "SVC"),
    ("sklearn.neighbors._classification", "KNeighborsClassifier"),
    # KNeighborsClassifier(algorithm="auto") picks a KD tree or a ball tree by the data.
    ("sklearn.neighbors._kd_tree", "KDTree"), ("sklearn.neighbors._kd_tree", "newObj"),
    ("sklearn.neighbors._ball_tree", "BallTree"), ("sklearn.neighbors._ball_tree", "newObj"),
    ("sklearn.metrics._dist_metrics", "EuclideanDistance64"),
    ("sklearn.metrics._dist_metrics", "newObj"),
    ("xgboost.sklearn", "XGBClassifier"),
    ("xgboost.core", "Booster"),
})
"""(module, name) pairs a model's pickle may name; anything else refuses the whole pickle."""


class RefusedPickle(pickle.UnpicklingError):
    """The pickle names a global outside ``ALLOWED_GLOBALS``, or could not be read."""


class _ExactUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise RefusedPickle(f"it names {module[:100]}.{name[:100]}, which is not on the "
                                "list of what a penguins model needs")
        return super().find_class(module, name)


def load_model_pickle(payload: bytes) -> Any:
    """The object in ``payload``; raises RefusedPickle if it names a global not allowed, or is
    not a pickle that this scikit-learn reads without complaint."""
    from sklearn.exceptions import InconsistentVersionWarning

    try:
        # scikit-learn warns, rather than fails, when a pickle comes from another version.
        with warnings.catch_warnings():
            warnings.simplefilter("error", InconsistentVersionWarning)
            return _ExactUnpickler(io.BytesIO(payload)).load()
    except (RefusedPickle, MemoryError):
        raise  # a MemoryError is the loader's limit, reported as such
    except Exception as exc:
        raise RefusedPickle(f"it could not be unpickled ({type(exc).__name__}: "
                            f"{str(exc)[:200]})") from None
