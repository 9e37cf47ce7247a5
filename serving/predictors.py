"""Turning a loaded model into something that classifies rows of raw measurements (in a worker).

The service talks to a model only through ``Predictor.predict``. ``PipelinePredictor`` calls the
fitted pipeline itself, as training did: exact, but slow, nearly all of it pandas and input
validation. ``serving.compiled`` redoes the same arithmetic on NumPy arrays.

Unpickling a model runs whatever code the pickle names, so only a worker process, with limited
resources, unpickles; everything here runs there. ``compile_checked`` exports the model's
compiled predictor as plain data (a spec), rebuilds the predictor from that spec exactly as the
serving process will (after a round trip through ``serving.plain_data``, so what is checked is
what is sent), and hands the spec back only once the rebuilt predictor has given the pipeline's
own answers on a set of check rows. With the spec go those answers, so that the serving process,
which never sees the pipeline, can check the predictor it rebuilds against them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import pandas as pd

from serving import plain_data
from serving.compiled import (
    TOLERANCE,
    CompiledPredictor,
    NotCompilable,
    Row,
    Spec,
    check_rows,
    export_spec,
)
from serving.contract import FEATURES


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


def compile_checked(pipeline: Any, n_classes: int) -> tuple[Spec, dict[str, Any]]:
    """The spec of ``pipeline``'s compiled predictor, and what that predictor answers on the
    check rows: ``{"rows": [...], "codes": (n,) ints, "probabilities": (n, classes) floats}``.

    Raises NotAModelError if the pipeline cannot be served at all, and NotCompilable (saying
    why) if it cannot be served compiled: no compiled path, or one whose answers differ from the
    pipeline's, or that fails.
    """
    exact = PipelinePredictor(pipeline, n_classes)
    try:
        data = plain_data.encode(export_spec(pipeline, n_classes))
        spec = plain_data.decode(data, max_bytes=len(data))
        rebuilt = CompiledPredictor.from_spec(spec, n_classes=n_classes)
        rows = check_rows(rebuilt.features)
        check(rebuilt, exact, rows)
        codes, probabilities = rebuilt.predict(rows)
    except (NotCompilable, MemoryError):  # Out of memory is the worker's limit, not a reason.
        raise
    except Exception as exc:  # A compiled path that breaks is one that does not match.
        raise NotCompilable(f"the compiled path failed its check ({type(exc).__name__}: {exc})"
                            ) from exc
    return spec, {"rows": rows, "codes": codes, "probabilities": probabilities}


def check(candidate: Predictor, reference: Predictor, rows: Sequence[Row]) -> None:
    """Raise NotCompilable unless ``candidate`` answers ``reference``'s classes on every row, and
    its probabilities within ``TOLERANCE``: all rows at once, and every third row alone (a
    compiled predictor's one-row path is its own arithmetic)."""
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
