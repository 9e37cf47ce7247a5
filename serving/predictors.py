"""Turning a loaded model into something that classifies rows of raw measurements.

The service talks to a model only through ``Predictor.predict``, so a faster implementation (one
that skips pandas for single rows, say) can replace ``PipelinePredictor`` without touching the
routes or the registry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import pandas as pd

from serving.contract import FEATURES

Row = Mapping[str, Any]
"""One penguin: a value for each of ``contract.FEATURES``."""


class Predictor(Protocol):
    def predict(self, rows: Sequence[Row]) -> tuple[np.ndarray, np.ndarray]:
        """Class codes, shape ``(n,)``, and class probabilities, shape ``(n, classes)``."""
        ...


class NotAModelError(TypeError):
    """The object cannot classify penguins the way the published metadata says it does."""


class PipelinePredictor:
    """Calls the fitted pipeline exactly as training did: a DataFrame of the raw features."""

    def __init__(self, pipeline: Any, n_classes: int) -> None:
        for method in ("predict", "predict_proba"):
            if not callable(getattr(pipeline, method, None)):
                raise NotAModelError(
                    f"the pickle holds a {type(pipeline).__qualname__}, which has no {method}()"
                )
        codes = getattr(pipeline, "classes_", None)
        if codes is None or list(codes) != list(range(n_classes)):
            raise NotAModelError(
                f"the model predicts the classes {_describe(codes)}, but its metadata names "
                f"{n_classes} classes (codes 0 to {n_classes - 1})"
            )
        self._pipeline = pipeline

    def predict(self, rows: Sequence[Row]) -> tuple[np.ndarray, np.ndarray]:
        frame = pd.DataFrame.from_records(list(rows), columns=list(FEATURES))
        # `predict` itself, not the arg-max of the probabilities: the service must answer what
        # the model answers, ties included.
        return self._pipeline.predict(frame), self._pipeline.predict_proba(frame)


def _describe(codes: Any) -> str:
    return "(none)" if codes is None else str(list(codes))
