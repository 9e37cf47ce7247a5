"""Turning a loaded model into something that classifies rows of raw measurements.

The service talks to a model only through ``Predictor.predict``. ``PipelinePredictor`` calls the
fitted pipeline itself, as training did: exact, and about 4 ms a call, nearly all of it pandas
and input validation. ``serving.compiled`` rebuilds the same arithmetic on NumPy arrays, a few
tens of microseconds a row; ``choose_predictor`` serves such a compiled predictor only once it
has given the pipeline's own answers on a set of check rows, and the pipeline otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import pandas as pd

from serving.compiled import CompiledPredictor, NotCompilable, Row, check_rows
from serving.contract import FEATURES

TOLERANCE = 1e-6
"""How far a compiled predictor's probabilities may stray from the pipeline's on a check row;
its classes must be the same on every row."""


class Predictor(Protocol):
    fast: bool
    """One row takes well under a millisecond: cheap enough to run on the event loop."""

    def predict(self, rows: Sequence[Row]) -> tuple[np.ndarray, np.ndarray]:
        """Class codes, shape ``(n,)``, and class probabilities, shape ``(n, classes)``."""
        ...


class NotAModelError(TypeError):
    """The object cannot classify penguins the way the published metadata says it does."""


class PipelinePredictor:
    """Calls the fitted pipeline exactly as training did: a DataFrame of the raw features."""

    fast = False

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


def choose_predictor(pipeline: Any, n_classes: int, *, compile_model: bool = True
                     ) -> tuple[Predictor, str | None]:
    """The predictor to serve ``pipeline`` with, and why it is not a compiled one (or None).

    Raises NotAModelError if the pipeline cannot be served at all.
    """
    exact = PipelinePredictor(pipeline, n_classes)
    if not compile_model:
        return exact, None
    try:
        compiled = CompiledPredictor(pipeline, n_classes)
        check(compiled, exact, check_rows(compiled.features))
    except NotCompilable as exc:
        return exact, str(exc)
    except Exception as exc:  # A compiled path that breaks must not cost the model its service.
        return exact, f"the compiled path failed its check ({type(exc).__name__}: {exc})"
    return compiled, None


def check(candidate: Predictor, reference: Predictor, rows: Sequence[Row]) -> None:
    """Raise NotCompilable unless ``candidate`` answers ``reference``'s classes on every row, and
    its probabilities within ``TOLERANCE``: all rows at once, and every third row alone (the
    single-row code paths differ only in building features and walking trees)."""
    codes, probabilities = reference.predict(rows)
    alone = np.arange(0, len(rows), 3)
    one_by_one = [candidate.predict([rows[i]]) for i in alone]
    answers = {
        "all rows at once": (np.arange(len(rows)), candidate.predict(rows)),
        "one row at a time": (alone, (np.concatenate([c for c, _ in one_by_one]),
                                      np.concatenate([p for _, p in one_by_one]))),
    }
    for how, (which, (got_codes, got_probabilities)) in answers.items():
        want_codes, want_probabilities = codes[which], probabilities[which]
        if (got_codes.shape, got_probabilities.shape) != (want_codes.shape,
                                                           want_probabilities.shape):
            raise NotCompilable(
                f"answers shapes {got_codes.shape} and {got_probabilities.shape} ({how}), the "
                f"pipeline {want_codes.shape} and {want_probabilities.shape}"
            )
        wrong = int(np.sum(got_codes != want_codes))
        gap = float(np.max(np.abs(got_probabilities - want_probabilities)))
        if wrong or not gap <= TOLERANCE:  # `not <=` also catches NaN
            raise NotCompilable(
                f"differs from the pipeline on {len(which)} check rows ({how}): {wrong} "
                f"other classes, probabilities up to {gap:.3g} apart (allowed {TOLERANCE:g})"
            )


def _describe(codes: Any) -> str:
    return "(none)" if codes is None else str(list(codes))
