"""Publishing models into ``MODELS_DIR``: the only thing the pipeline and the service share.

The published artifact, per model ``<name>`` (one of ``contract.MODEL_NAMES``):

- ``<name>.pkl``: a pickle (protocol 5) of the fitted scikit-learn ``Pipeline``. It takes a
  DataFrame of the raw features (``contract.FEATURES``) and predicts integer class codes.
- ``<name>.json``: its metadata, UTF-8 JSON with these keys:
  ``format_version`` (1), ``model_name``, ``pickle_file``, ``sha256`` (hex digest of the pickle's
  bytes), ``size_bytes``, ``classes`` (``classes[i]`` is the species of code ``i``), ``features``
  (name, type, and categories for categorical ones), ``metrics`` (held-out ``accuracy`` and
  ``f1_macro``), ``rows`` (train, test, total), ``test_size``, ``random_seed``, ``dag_run_id``,
  ``source``, ``trained_at`` (UTC, ISO 8601), ``training_seconds``, ``versions`` (python,
  scikit-learn, xgboost, numpy, pandas), and ``signature``.
- ``signature`` is null, or, when ``MODEL_SIGNING_KEY`` is set, the hex HMAC-SHA256 under that key
  of the metadata's canonical JSON without the ``signature`` key (``sort_keys``, separators
  ``,`` and ``:``). Since the metadata holds the pickle's digest, the signature covers both files.
- ``manifest.json``: written once per run by the last task: the run id, every model's result,
  the failures, and ``best_model`` (highest held-out accuracy, then macro-F1, then name).

A reader accepts a model only when the JSON names the model as its file does, its ``sha256``
matches the pickle's bytes, and (with a key) the signature matches - all checked before unpickling.

Files are written atomically: a temporary file in the same folder (a dot-name ending ``.tmp``,
which no reader's ``*.pkl`` / ``*.json`` pattern matches), flushed and fsynced, made readable by
other users, then renamed over the old one. The pickle is renamed first and its metadata second;
between the two renames the digests disagree, so a reader keeps the previous model.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import pickle
import platform
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from penguins.contract import CATEGORICAL_FEATURES, FEATURES
from penguins.training import TrainedModel

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"


def models_dir() -> Path:
    """``MODELS_DIR`` from the environment; by default ``shared_models/`` at the repository root."""
    default = Path(__file__).resolve().parents[3] / "shared_models"
    return Path(os.environ.get("MODELS_DIR") or default)


def signing_key() -> bytes | None:
    key = os.environ.get("MODEL_SIGNING_KEY")
    return key.encode() if key else None


def sign(metadata: dict[str, Any], key: bytes) -> str:
    """The HMAC-SHA256 of the metadata's canonical JSON, ``signature`` left out."""
    unsigned = {k: v for k, v in metadata.items() if k != "signature"}
    canonical = json.dumps(unsigned, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key, canonical, hashlib.sha256).hexdigest()


def publish_model(
    trained: TrainedModel,
    directory: Path,
    *,
    run_id: str,
    source: str,
    test_size: float,
    seed: int,
    key: bytes | None,
) -> dict[str, Any]:
    """Write ``<name>.pkl`` and ``<name>.json`` atomically; return the metadata written."""
    directory.mkdir(parents=True, exist_ok=True)
    payload = pickle.dumps(trained.pipeline, protocol=5)
    metadata: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "model_name": trained.model_name,
        "pickle_file": f"{trained.model_name}.pkl",
        "sha256": hashlib.sha256(payload).hexdigest(),
        "size_bytes": len(payload),
        "classes": trained.classes,
        "features": _feature_descriptions(),
        "metrics": trained.metrics,
        "rows": trained.rows,
        "test_size": test_size,
        "random_seed": seed,
        "dag_run_id": run_id,
        "source": source,
        "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "training_seconds": round(trained.training_seconds, 3),
        "versions": library_versions(),
        "signature": None,
    }
    if key is not None:
        metadata["signature"] = sign(metadata, key)
    write_atomically(directory / metadata["pickle_file"], payload)
    write_atomically(directory / f"{trained.model_name}.json", _json_bytes(metadata))
    return metadata


def write_manifest(directory: Path, *, run_id: str, results: list[dict[str, Any]],
                   failures: dict[str, str]) -> dict[str, Any]:
    """Record every model's result and the best one in ``manifest.json``; return the manifest."""
    ranked = sorted(
        results,
        key=lambda r: (-r["metrics"]["accuracy"], -r["metrics"]["f1_macro"], r["model_name"]),
    )
    manifest = {
        "format_version": FORMAT_VERSION,
        "dag_run_id": run_id,
        "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "best_model": ranked[0]["model_name"] if ranked else None,
        "models": {
            r["model_name"]: {"metrics": r["metrics"], "sha256": r["sha256"]} for r in ranked
        },
        "failed": failures,
    }
    directory.mkdir(parents=True, exist_ok=True)
    write_atomically(directory / MANIFEST_FILE, _json_bytes(manifest))
    return manifest


def write_atomically(target: Path, data: bytes) -> None:
    """Replace ``target`` with ``data``: a reader sees the old file or the new one, never half."""
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes files 0600; the service may run as another user.
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_directory(target.parent)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_bytes(document: dict[str, Any]) -> bytes:
    return (json.dumps(document, indent=2) + "\n").encode()


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
