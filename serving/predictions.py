"""Predictions: the loaded version that answers a request, its answers, and their count.

``Predictions`` is what every prediction route receives, as its one dependency
(``predictions``, see ``serving.app``): Litestar resolves two or more dependencies of a handler
in an anyio task group, which costs a single prediction more than most models do.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import anyio.to_thread
import numpy as np
from litestar.exceptions import NotFoundException, ServiceUnavailableException

from serving import batch_answers
from serving.metrics import Metrics
from serving.registry import ModelRegistry, ModelState, ServedVersion, Snapshot
from serving.schemas import BatchPrediction, Penguin, Prediction, SpeciesPrediction

NO_MODEL_MESSAGE = (
    "No model is served: the pipeline has not promoted a model in MODELS_DIR yet "
    "(run the penguins_pipeline DAG), or none of the promoted versions could be loaded "
    "(see GET /models)."
)


class Predictions:
    """Classifies penguins with the registry's loaded versions and counts it in the metrics."""

    def __init__(self, registry: ModelRegistry, metrics: Metrics, max_batch_rows: int) -> None:
        self.registry = registry
        self.metrics = metrics
        self.max_batch_rows = max_batch_rows
        """The most penguins one request may hold (setting MAX_BATCH_ROWS)."""

    def served(self, name: str | None = None, version: str | None = None) -> ServedVersion:
        """The loaded version of ``name`` (by default the best model) that answers: its
        promoted one, or the kept ``version``; else the HTTP error that explains why none."""
        snapshot = self.registry.snapshot
        if name is None:
            name = snapshot.best_model
        if name is None or (name not in snapshot.models and not snapshot.served()):
            raise ServiceUnavailableException(no_model_message(snapshot))
        model = find_model(snapshot, name)
        if version is not None:
            if (kept := model.loaded.get(version)) is not None:
                return kept
            state, reason = model.state_of(version) if version in model.found else (None, None)
            why = f" (it is {state}: {reason})" if state == "refused" else ""
            raise NotFoundException(
                f"Model {name!r} has no servable version {version!r}{why}; the servable "
                f"versions are: {', '.join(sorted(model.loaded, reverse=True)) or 'none'}."
            )
        if model.served is None:
            raise ServiceUnavailableException(f"Model {name!r} is not served: {model.problem}")
        return model.served

    async def one(self, model: ServedVersion, penguin: Penguin) -> Prediction:
        if model.predictor.fast:
            # Tens of microseconds: less than handing the row to a worker thread and back.
            return self.answer(model, penguin)
        return await anyio.to_thread.run_sync(self.answer, model, penguin)

    def answer(self, model: ServedVersion, penguin: Penguin) -> Prediction:
        """The prediction of ``model`` for one penguin, here and now."""
        code, probabilities = self._counted(model, 1, model.predictor.predict_one, penguin)
        return Prediction(species=model.classes[code],
                          probabilities=_by_class(model.classes)(probabilities),
                          model=model.answered_by)

    def batch(self, model: ServedVersion, penguins: list[Penguin]) -> BatchPrediction:
        return BatchPrediction(model=model.answered_by,
                               predictions=self.classify(model, penguins))

    def encoded_batch(self, model: ServedVersion, penguins: list[Penguin]) -> bytes:
        """``batch``'s answer, encoded as Litestar encodes it, without its structs."""
        codes, probabilities = self.predicted(model, penguins)
        return batch_answers.encoded(model.answered_by, model.classes, codes, probabilities)

    def classify(self, model: ServedVersion, penguins: list[Penguin]
                 ) -> list[SpeciesPrediction]:
        codes, probabilities = self.predicted(model, penguins)
        classes, by_class = model.classes, _by_class(model.classes)
        # Python numbers first (`tolist`): iterating NumPy arrays makes a NumPy scalar per value.
        # Not `strict` zips, a third of the time on a batch: the shapes are checked at load time.
        return [
            SpeciesPrediction(species=classes[code], probabilities=by_class(row))
            for code, row in zip(codes.tolist(), probabilities.tolist(), strict=False)
        ]

    def predicted(self, model: ServedVersion, penguins: list[Penguin]
                  ) -> tuple[np.ndarray, np.ndarray]:
        """The predictor's class codes and probabilities for ``penguins``, counted."""
        return self._counted(model, len(penguins), model.predictor.predict, penguins)

    def _counted(self, model: ServedVersion, rows: int, predict: Callable[[Any], Any],
                 penguins: Any) -> Any:
        """``predict(penguins)``, ``rows`` penguins, timed and counted in the metrics."""
        started = time.perf_counter()
        answer = predict(penguins)
        self.metrics.observe_prediction(model.name, rows, time.perf_counter() - started)
        return answer


@functools.cache
def _by_class(classes: tuple[str, ...]) -> Callable[[list[float]], dict[str, float]]:
    """A row of probabilities as a dict by class. For three classes, a dict display: a quarter of
    the time of ``dict(zip(...))``, which was most of a batch's answer."""
    if len(classes) == 3:
        first, second, third = classes
        return lambda row: {first: row[0], second: row[1], third: row[2]}
    return lambda row: dict(zip(classes, row, strict=True))


def find_model(snapshot: Snapshot, name: str) -> ModelState:
    """The model ``name`` of the snapshot, or a 404 that lists the models."""
    if (model := snapshot.models.get(name)) is None:
        raise NotFoundException(
            f"No model named {name!r}; the models are: {', '.join(snapshot.models) or 'none'}."
        )
    return model


def no_model_message(snapshot: Snapshot) -> str:
    if snapshot.store_problem:
        return f"{NO_MODEL_MESSAGE} The store: {snapshot.store_problem}"
    return NO_MODEL_MESSAGE
