"""Reading one published model from ``MODELS_DIR``: verify first, unpickle last.

The format is the pipeline's (``penguins.publishing``): ``<name>.pkl`` and its metadata
``<name>.json``, which records the pickle's sha256 and, when the pipeline has a signing key, an
HMAC-SHA256 signature of the metadata. A pickle can run arbitrary code when it is loaded, so every
check that does not need the pickle's contents (names, signature, size, digest, library versions)
passes before a single byte of it is unpickled, and the unpickler then imports nothing but
library classes. Anything amiss raises ``ArtifactError`` with a message for the operator.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import pickle
import re
import stat
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sklearn
from sklearn.exceptions import InconsistentVersionWarning

from serving.contract import FEATURES, FORMAT_VERSION, ISLANDS, PLAUSIBLE_RANGES, SEXES
from serving.predictors import Predictor, choose_predictor

MAX_METADATA_BYTES = 1_000_000
_SHA256 = re.compile(r"[0-9a-f]{64}")

ALLOWED_PACKAGES = frozenset({"sklearn", "numpy", "scipy", "xgboost"})
"""The only packages whose classes a model's pickle may name."""
ALLOWED_BUILTINS = frozenset({"slice", "set", "frozenset", "complex", "range", "bytearray"})
"""Harmless builtins a pickle may name (never ``eval``, ``exec``, ``getattr`` or ``__import__``)."""
ALLOWED_FUNCTIONS = frozenset({
    "numpy._core.multiarray._reconstruct", "numpy._core.multiarray.scalar",
    "numpy._core.numeric._frombuffer", "numpy.core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar", "numpy.core.numeric._frombuffer",
    "numpy.random._pickle.__randomstate_ctor", "numpy.random._pickle.__bit_generator_ctor",
    "numpy.random._pickle.__generator_ctor",
})
"""The functions, as opposed to classes, a pickle may name: NumPy's array and random-state
rebuilders. These packages also hold functions that run code (``numpy.testing``'s ``runstring``)
or load files, so a function must be listed here (or be one of scikit-learn's Cython ``newObj``)."""

_SMOKE_ROW = {
    **{name: (low + high) / 2 for name, (low, high) in PLAUSIBLE_RANGES.items()},
    "island": ISLANDS[0], "sex": SEXES[0], "year": PLAUSIBLE_RANGES["year"][0],
}
"""A plausible penguin every model must classify before it is served."""


class ArtifactError(Exception):
    """A model's files were refused; the message says which file and why."""

    def __init__(self, message: str, *, pending: bool = False) -> None:
        super().__init__(message)
        self.pending = pending
        """The pickle and its metadata disagree, as they do for a moment during a publish."""


@dataclass(frozen=True)
class LoadedModel:
    """A verified, unpickled model with its metadata. Immutable: a reload makes a new one."""

    name: str
    predictor: Predictor
    metadata: dict[str, Any]
    classes: tuple[str, ...]
    loaded_at: datetime
    not_compiled: str | None = None
    """Why the model is served by its pipeline rather than compiled, when compiling was wanted
    (``predictors.choose_predictor``)."""

    @property
    def sha256(self) -> str:
        return self.metadata["sha256"]

    @property
    def version(self) -> str:
        return self.sha256[:12]


def load_model(directory: Path, name: str, key: bytes | None, *,
               compile_model: bool = True) -> LoadedModel:
    """Verify and load the model ``name`` from ``directory``; raise ArtifactError if refused.

    ``name`` must already be a valid model name (``contract.MODEL_NAME_PATTERN``). With
    ``compile_model``, the model is served by a compiled predictor if one matches it.
    """
    metadata = _read_metadata(directory, name)
    classes = _check_metadata(metadata, name, key)
    payload = read_inside(directory, metadata["pickle_file"], metadata["size_bytes"])
    if len(payload) != metadata["size_bytes"]:
        raise ArtifactError(
            f"{name}.pkl has {len(payload)} bytes, its metadata says {metadata['size_bytes']} "
            "(truncated or replaced; normal for a moment while the pipeline publishes)",
            pending=True,
        )
    digest = hashlib.sha256(payload).hexdigest()
    if not hmac.compare_digest(digest, metadata["sha256"]):
        raise ArtifactError(
            f"{name}.pkl has sha256 {digest[:12]}..., its metadata says "
            f"{metadata['sha256'][:12]}... (modified after publishing, or a publish in progress)",
            pending=True,
        )
    model = _unpickle(name, payload, metadata["versions"])
    try:
        predictor, not_compiled = choose_predictor(model, len(classes),
                                                   compile_model=compile_model)
        codes, probabilities = predictor.predict([_SMOKE_ROW])
    except Exception as exc:
        raise ArtifactError(f"{name}.pkl is not a usable penguins model: {exc}") from exc
    if codes.shape != (1,) or probabilities.shape != (1, len(classes)):
        raise ArtifactError(
            f"{name}.pkl answered shapes {codes.shape} and {probabilities.shape} for one penguin; "
            f"expected (1,) and (1, {len(classes)})"
        )
    _check_features(name, model)
    return LoadedModel(name, predictor, metadata, classes, datetime.now(UTC), not_compiled)


def _check_features(name: str, model: Any) -> None:
    """The model must have been fitted on a frame of exactly the contract's features: one fitted
    on a subset would still answer the smoke test, silently ignoring the rest."""
    fitted_on = getattr(model, "feature_names_in_", None)
    if fitted_on is None or list(fitted_on) != list(FEATURES):
        raise ArtifactError(
            f"{name}.pkl was fitted on the features "
            f"{'(unnamed)' if fitted_on is None else list(fitted_on)}, not on {list(FEATURES)}"
        )


def signature_of(metadata: dict[str, Any], key: bytes) -> str:
    """HMAC-SHA256 of the metadata's canonical JSON without ``signature``, as the pipeline signs."""
    unsigned = {k: v for k, v in metadata.items() if k != "signature"}
    canonical = json.dumps(unsigned, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key, canonical, hashlib.sha256).hexdigest()


def read_inside(directory: Path, filename: str, max_bytes: int) -> bytes:
    """The bytes of ``directory/filename``, which must not be larger than ``max_bytes``.

    Refuses a symlink that leads out of ``directory``, and anything that is not a regular file
    (a FIFO would block the reader forever). Raises FileNotFoundError if the file is gone.
    """
    path = directory / filename
    resolved = path.resolve(strict=True)
    if not resolved.is_relative_to(directory.resolve(strict=True)):
        raise ArtifactError(f"{filename} is a link to a file outside MODELS_DIR")
    fd = os.open(resolved, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        # Before fdopen, which refuses a directory with an IsADirectoryError.
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ArtifactError(f"{filename} is not a regular file")
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        # One byte more than allowed, to notice a file that grew after the fstat.
        data = f.read(max_bytes + 1)
    if st.st_size > max_bytes or len(data) > max_bytes:
        raise ArtifactError(
            f"{filename} has {max(st.st_size, len(data))} bytes, more than the {max_bytes} "
            "expected (replaced; normal for a moment while the pipeline publishes)",
            pending=True,
        )
    return data


def _read_metadata(directory: Path, name: str) -> dict[str, Any]:
    raw = read_inside(directory, f"{name}.json", MAX_METADATA_BYTES)
    try:
        metadata = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: arrays nested 100,000 deep
        raise ArtifactError(f"{name}.json is not valid JSON: {exc}") from exc
    if not isinstance(metadata, dict):
        raise ArtifactError(f"{name}.json is not a JSON object")
    return metadata


def _check_metadata(metadata: dict[str, Any], name: str, key: bytes | None) -> tuple[str, ...]:
    """Check what can be checked without the pickle; return the class names."""
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{name}.json has format_version {metadata.get('format_version')!r}; "
            f"this service reads version {FORMAT_VERSION}"
        )
    if metadata.get("model_name") != name or metadata.get("pickle_file") != f"{name}.pkl":
        raise ArtifactError(
            f"{name}.json describes model {metadata.get('model_name')!r} in file "
            f"{metadata.get('pickle_file')!r}, not {name!r} in {name}.pkl"
        )
    if key is not None:
        signature = metadata.get("signature")
        if not isinstance(signature, str):
            raise ArtifactError(f"{name}.json is not signed, and this service requires signatures")
        if not hmac.compare_digest(signature.encode(), signature_of(metadata, key).encode()):
            raise ArtifactError(
                f"{name}.json has a signature that does not match this service's "
                "MODEL_SIGNING_KEY (signed with another key, or modified after signing)"
            )
    sha256, size = metadata.get("sha256"), metadata.get("size_bytes")
    if not (isinstance(sha256, str) and _SHA256.fullmatch(sha256)
            and isinstance(size, int) and size > 0):
        raise ArtifactError(f"{name}.json has no valid sha256 and size_bytes")
    metrics = metadata.get("metrics")
    if not (isinstance(metrics, dict) and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in metrics.values())):
        raise ArtifactError(f"{name}.json has no metrics object of numbers")
    classes = metadata.get("classes")
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise ArtifactError(f"{name}.json has no list of class names")
    versions = metadata.get("versions")
    trained_with = versions.get("scikit-learn") if isinstance(versions, dict) else None
    if trained_with != sklearn.__version__:
        raise ArtifactError(
            f"{name}.pkl was trained with scikit-learn {trained_with}, this service runs "
            f"{sklearn.__version__}; pickles do not load reliably across versions "
            "(retrain, or run both with the same uv.lock)"
        )
    return tuple(classes)


class _LibraryUnpickler(pickle.Unpickler):
    """Resolves only classes of the model libraries, and notes which libraries it used."""

    def __init__(self, payload: bytes) -> None:
        super().__init__(io.BytesIO(payload))
        self.packages: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        package = module.partition(".")[0]
        if module == "builtins" and name in ALLOWED_BUILTINS:
            return super().find_class(module, name)
        if package not in ALLOWED_PACKAGES:
            raise pickle.UnpicklingError(
                f"it names {module}.{name}, which is outside {', '.join(sorted(ALLOWED_PACKAGES))}"
            )
        # From protocol 4 a name may be a dotted path, which would reach any module that a
        # library module imports ("sklearn" + "os.system").
        if "." in name:
            raise pickle.UnpicklingError(f"it names {module}.{name}, an attribute path")
        if _is_test_support(module):
            raise pickle.UnpicklingError(f"it names {module}.{name}, a test helper")
        found = super().find_class(module, name)
        defined_in = getattr(found, "__module__", None) or ""
        is_library_class = (isinstance(found, type) and not _is_test_support(defined_in)
                            and defined_in.partition(".")[0] in ALLOWED_PACKAGES)
        is_rebuilder = (f"{module}.{name}" in ALLOWED_FUNCTIONS
                        or (package == "sklearn" and name == "newObj"))
        if not (is_library_class or is_rebuilder):
            raise pickle.UnpicklingError(
                f"it names {module}.{name}, which is not a class of "
                f"{', '.join(sorted(ALLOWED_PACKAGES))} nor a known array rebuilder"
            )
        self.packages.add(package)
        return found


def _is_test_support(module: str) -> bool:
    """``numpy.testing``, ``scipy._lib._testutils`` and the like: their ``PytestTester`` runs
    pytest, which imports any ``conftest.py`` in the folder it is given."""
    return any(part.lstrip("_").startswith("test") or "pytest" in part
               for part in module.split("."))


def _unpickle(name: str, payload: bytes, trained_with: dict[str, Any]) -> Any:
    unpickler = _LibraryUnpickler(payload)
    try:
        # scikit-learn warns, rather than fails, when a pickle comes from another version.
        with warnings.catch_warnings():
            warnings.simplefilter("error", InconsistentVersionWarning)
            model = unpickler.load()
    except Exception as exc:
        raise ArtifactError(
            f"{name}.pkl could not be unpickled ({type(exc).__name__}: {exc})"
        ) from exc
    if "xgboost" in unpickler.packages:
        import xgboost

        if trained_with.get("xgboost") != xgboost.__version__:
            raise ArtifactError(
                f"{name}.pkl was trained with xgboost {trained_with.get('xgboost')}, this "
                f"service runs {xgboost.__version__}; XGBoost pickles are not portable"
            )
    return model
