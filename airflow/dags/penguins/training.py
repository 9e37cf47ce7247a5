"""Training one model on the clean rows and scoring it on a held-out split."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline

from penguins.contract import DEFAULT_MAX_FIT_ROWS, FEATURES, LABEL
from penguins.models import SAMPLED_MODELS, build_model


@dataclass(frozen=True)
class TrainedModel:
    model_name: str
    pipeline: Pipeline
    classes: list[str]
    """``classes[i]`` is the species the pipeline predicts as ``i``."""
    metrics: dict[str, float]
    rows: dict[str, int]
    """``train`` and ``test``: the split; ``fit``: the training rows the model was fitted on (a
    sample, for ``SAMPLED_MODELS``); ``total``: the clean rows."""
    training_seconds: float
    trained_at: str
    """UTC, ISO 8601, to the second."""
    held_out: tuple[pd.DataFrame, np.ndarray]
    """The held-out rows and their labels: the gate scores the promoted version on them too."""
    max_fit_rows: int
    """The bound on ``rows["fit"]`` it was trained with (if it is one of ``SAMPLED_MODELS``)."""


def encode_labels(species: pd.Series) -> tuple[np.ndarray, list[str]]:
    """Species as integer codes 0..k-1 (XGBoost accepts nothing else), and the code's names."""
    classes = sorted(species.unique())
    return pd.Index(classes).get_indexer(species), classes


def fit_sample(features: pd.DataFrame, labels: np.ndarray, max_rows: int,
               seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """At most ``max_rows`` of the rows, drawn with ``seed``, each class keeping its share
    (stratified); all of them, as they are, if there are no more."""
    if len(features) <= max_rows:
        return features, labels
    sample, _, sample_labels, _ = train_test_split(
        features, labels, train_size=max_rows, random_state=seed, stratify=labels
    )
    return sample, sample_labels


def train(frame: pd.DataFrame, model_name: str, test_size: float, seed: int,
          max_fit_rows: int = DEFAULT_MAX_FIT_ROWS) -> TrainedModel:
    """Fit ``model_name`` on a stratified split of ``frame`` and score it on the held-out part.

    A model of ``SAMPLED_MODELS`` is fitted on a stratified sample of at most ``max_fit_rows``
    of the training rows (drawn with ``seed``), so its cost stops growing there; it is scored
    on every held-out row all the same.
    """
    labels, classes = encode_labels(frame[LABEL])
    features = frame[list(FEATURES)]
    x_train, x_test, y_train, y_test = train_test_split(
        features, labels, test_size=test_size, random_state=seed, stratify=labels
    )
    x_fit, y_fit = x_train, y_train
    if model_name in SAMPLED_MODELS:
        x_fit, y_fit = fit_sample(x_train, y_train, max_fit_rows, seed)
    pipeline = build_model(model_name, seed)
    started = time.perf_counter()
    pipeline.fit(x_fit, y_fit)
    training_seconds = time.perf_counter() - started

    predicted = pipeline.predict(x_test)
    metrics = {
        "accuracy": float(accuracy_score(y_test, predicted)),
        "f1_macro": float(f1_score(y_test, predicted, average="macro")),
    }
    rows = {"train": len(x_train), "fit": len(x_fit), "test": len(x_test), "total": len(frame)}
    trained_at = datetime.now(UTC).isoformat(timespec="seconds")
    return TrainedModel(model_name, pipeline, classes, metrics, rows, training_seconds,
                        trained_at, (x_test, y_test), max_fit_rows)
