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

from penguins.contract import FEATURES, LABEL
from penguins.models import build_model


@dataclass(frozen=True)
class TrainedModel:
    model_name: str
    pipeline: Pipeline
    classes: list[str]
    """``classes[i]`` is the species the pipeline predicts as ``i``."""
    metrics: dict[str, float]
    rows: dict[str, int]
    training_seconds: float
    trained_at: str
    """UTC, ISO 8601, to the second."""
    held_out: tuple[pd.DataFrame, np.ndarray]
    """The held-out rows and their labels: the gate scores the promoted version on them too."""


def encode_labels(species: pd.Series) -> tuple[np.ndarray, list[str]]:
    """Species as integer codes 0..k-1 (XGBoost accepts nothing else), and the code's names."""
    classes = sorted(species.unique())
    codes = species.map({name: code for code, name in enumerate(classes)}).to_numpy()
    return codes, classes


def train(frame: pd.DataFrame, model_name: str, test_size: float, seed: int) -> TrainedModel:
    """Fit ``model_name`` on a stratified split of ``frame`` and score it on the held-out part."""
    labels, classes = encode_labels(frame[LABEL])
    features = frame[list(FEATURES)]
    x_train, x_test, y_train, y_test = train_test_split(
        features, labels, test_size=test_size, random_state=seed, stratify=labels
    )
    pipeline = build_model(model_name, seed)
    started = time.perf_counter()
    pipeline.fit(x_train, y_train)
    training_seconds = time.perf_counter() - started

    predicted = pipeline.predict(x_test)
    metrics = {
        "accuracy": float(accuracy_score(y_test, predicted)),
        "f1_macro": float(f1_score(y_test, predicted, average="macro")),
    }
    rows = {"train": len(x_train), "test": len(x_test), "total": len(frame)}
    trained_at = datetime.now(UTC).isoformat(timespec="seconds")
    return TrainedModel(model_name, pipeline, classes, metrics, rows, training_seconds,
                        trained_at, (x_test, y_test))
