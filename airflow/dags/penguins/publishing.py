"""Exporting trained models into the model store, through the gate.

The store's format belongs to the service (``serving.store``, copied into the Airflow image):
this module only fills in what the pipeline knows. Each training task exports its model as a new
version and scores the promoted version on the same held-out rows for the gate; the run's last
task then writes one signed manifest that promotes the versions the gate let through and holds
back the others, with why.
"""

from __future__ import annotations

import os
import pickle
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sklearn.metrics import accuracy_score

from penguins.contract import CATEGORICAL_FEATURES, FEATURES
from penguins.gate import Decision, decide
from penguins.training import TrainedModel
from serving.settings import DEFAULT_MODELS_DIR
from serving.store import signing
from serving.store.documents import MAX_PICKLE_BYTES, Manifest, ModelEntry
from serving.store.layout import StoreError
from serving.store.reader import Trust, read_manifest, read_metadata, read_version
from serving.store.writer import change_manifest, export_version, held_back, promoted
from serving.unpickler import RefusedPickle, load_model_pickle


def models_dir() -> Path:
    """``MODELS_DIR`` from the environment; by default ``shared_models/`` at the repository root."""
    return Path(os.environ.get("MODELS_DIR") or DEFAULT_MODELS_DIR)


def signing_key() -> Ed25519PrivateKey:
    """The private key from ``MODEL_SIGNING_KEY_FILE``; a StoreError naming the file if none."""
    return signing.load_private_key(signing.private_key_file())


@dataclass(frozen=True)
class Baseline:
    version: str | None
    accuracy: float | None
    problem: str | None = None
    """Why the promoted version could not be scored, if it could not."""


def score_promoted(directory: Path, trained: TrainedModel, key: Ed25519PrivateKey) -> Baseline:
    """The promoted version of ``trained``'s model, scored on ``trained``'s held-out rows.

    The version is verified with the pipeline's own key before its pickle is read, and read with
    the service's exact allow-list. One that cannot be read, or predicts other classes, cannot be
    compared: the gate then judges the new version on its own, and says why.
    """
    trust = Trust(key.public_key())
    entry = read_manifest(directory, trust).models.get(trained.model_name)
    if entry is None or entry.promoted is None:
        return Baseline(None, None)
    try:
        files = read_version(directory, trained.model_name, entry.promoted, trust,
                             max_pickle_bytes=MAX_PICKLE_BYTES)
        if list(files.info.classes) != trained.classes:
            raise ValueError(f"it predicts the classes {list(files.info.classes)}")
        pipeline = load_model_pickle(files.payload)
        x_test, y_test = trained.held_out
        accuracy = float(accuracy_score(y_test, np.asarray(pipeline.predict(x_test))))
    except (OSError, StoreError, RefusedPickle, ValueError) as exc:
        return Baseline(entry.promoted, None, f"{type(exc).__name__}: {exc}")
    return Baseline(entry.promoted, accuracy)


def export(trained: TrainedModel, directory: Path, *, decision: Decision, run_id: str,
           source: str, test_size: float, seed: int, key: Ed25519PrivateKey) -> dict[str, Any]:
    """Export ``trained`` as a new version; return its signed metadata.

    ``rows`` says how many rows it was fitted on (``fit``), ``max_fit_rows`` the setting that
    bounded them for the sampled models.
    """
    fields = {
        "classes": trained.classes,
        "features": _feature_descriptions(),
        "metrics": trained.metrics,
        "gate": decision.as_json(),
        "rows": trained.rows,
        "test_size": test_size,
        "random_seed": seed,
        "max_fit_rows": trained.max_fit_rows,
        "dag_run_id": run_id,
        "source": source,
        "trained_at": trained.trained_at,
        "training_seconds": round(trained.training_seconds, 3),
        "versions": library_versions(),
    }
    payload = pickle.dumps(trained.pipeline, protocol=5)
    return export_version(directory, trained.model_name, payload, fields, key)


def gate(trained: TrainedModel, baseline: Baseline, *, min_accuracy: float,
         max_regression: float) -> Decision:
    return decide(trained.metrics["accuracy"], baseline.version, baseline.accuracy,
                  min_accuracy=min_accuracy, max_regression=max_regression,
                  baseline_problem=baseline.problem)


def record_run(directory: Path, key: Ed25519PrivateKey, *, run_id: str,
               results: list[dict[str, Any]]) -> tuple[Manifest, dict[str, str]]:
    """Promote the run's versions that passed the gate and hold back the others, in one signed
    manifest. ``results`` are the training tasks' XComs, which name the versions; the gate's
    decision is read from each version's signed metadata, not from the XCom. Returns the
    manifest and, per model held back, why.

    A version that passed is still held back if another version was promoted since it was
    scored: it was compared with a version that is no longer the one it would replace.
    """
    held: dict[str, str] = {}
    trust = Trust(key.public_key())

    def change(current: Manifest) -> dict[str, ModelEntry]:
        entries = dict(current.models)
        for result in results:
            name, version = result["model_name"], result["version"]
            decision = read_metadata(directory, name, version, trust).metadata.get("gate")
            if not isinstance(decision, dict):
                decision = {"promote": False, "baseline_version": None,
                            "reason": "its signed metadata holds no gate decision"}
            entry = entries.get(name, ModelEntry())
            reason = str(decision.get("reason"))
            if decision.get("promote") is True and \
                    entry.promoted != decision.get("baseline_version"):
                reason = (f"passed the gate against {decision['baseline_version']}, but "
                          f"{entry.promoted} was promoted meanwhile; promote it by hand if wanted")
            elif decision.get("promote") is True:
                entries[name] = promoted(entry, version)
                continue
            held[name] = reason
            entries[name] = held_back(entry, version, reason)
        return entries

    manifest = change_manifest(directory, key, change, written_by=f"dag run {run_id}")
    return manifest, held


def _feature_descriptions() -> list[dict[str, Any]]:
    return [
        {"name": name, "type": "category", "categories": list(CATEGORICAL_FEATURES[name])}
        if name in CATEGORICAL_FEATURES
        else {"name": name, "type": "number"}
        for name in FEATURES
    ]


def library_versions() -> dict[str, str]:
    import numpy
    import pandas
    import sklearn
    import xgboost

    return {
        "python": platform.python_version(),
        "scikit-learn": sklearn.__version__,
        "xgboost": xgboost.__version__,
        "numpy": numpy.__version__,
        "pandas": pandas.__version__,
    }
