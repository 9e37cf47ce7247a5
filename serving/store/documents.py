"""The two JSON documents of the store, the manifest and a version's metadata: their fields, and
the checks a reader makes of them after their signature has verified (a signed document can
still come from a buggy or stolen-key writer, so nothing in it is taken on trust)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from serving.store.layout import FORMAT_VERSION, MODEL_NAME, StoreError, is_version_id

MAX_PICKLE_BYTES = 1_000_000_000
MAX_HISTORY_ENTRIES = 1000
MAX_TEXT = 2000


@dataclass(frozen=True)
class ModelEntry:
    """What the manifest says of one model."""

    promoted: str | None = None
    """The version served by default; None until one passes the gate."""
    history: tuple[str, ...] = ()
    """The versions promoted before it, oldest first: ``rollback`` goes back to the last one."""
    held_back: dict[str, str] = field(default_factory=dict)
    """Candidates the gate did not promote, with why."""

    def state_of(self, version: str) -> tuple[str, str | None]:
        """What the manifest makes of ``version``: (promoted | previous | held back |
        candidate, why)."""
        if version == self.promoted:
            return "promoted", None
        if version in self.held_back:
            return "held back", self.held_back[version]
        if version in self.history:
            return "previous", None
        return "candidate", None

    def as_json(self) -> dict[str, Any]:
        return {"promoted": self.promoted, "history": list(self.history),
                "held_back": dict(self.held_back)}


@dataclass(frozen=True)
class Manifest:
    sequence: int
    models: dict[str, ModelEntry]
    best_model: str | None
    written_at: str
    written_by: str

    def as_json(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "sequence": self.sequence,
                "written_at": self.written_at, "written_by": self.written_by,
                "best_model": self.best_model,
                "models": {name: entry.as_json() for name, entry in sorted(self.models.items())}}


EMPTY_MANIFEST = Manifest(0, {}, None, "", "")
"""The state of a store nobody has written a manifest into yet."""


def parse_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        document = json.loads(data, parse_constant=_refuse_constant,
                              object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:  # RecursionError: arrays nested 100,000 deep
        raise StoreError(f"{what} is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(document, dict):
        raise StoreError(f"{what} is not a JSON object")
    return document


def manifest_from_json(document: dict[str, Any]) -> Manifest:
    what = "manifest.json"
    _expect_format(document, what)
    sequence = _integer(document.get("sequence"), what, "sequence", 1, 2**63 - 1)
    models_json = document.get("models")
    if not isinstance(models_json, dict):
        raise StoreError(f"{what} has no models object")
    models = {}
    for name, entry in models_json.items():
        if not (isinstance(name, str) and MODEL_NAME.fullmatch(name) and isinstance(entry, dict)):
            raise StoreError(f"{what} names a model {str(name)[:80]!r} that is not a valid name")
        models[name] = _model_entry(entry, f"{what} (model {name})")
    best = document.get("best_model")
    if best is not None and best not in models:
        raise StoreError(f"{what} names a best model that it does not list")
    return Manifest(sequence, models, best, _text(document.get("written_at"), what),
                    _text(document.get("written_by"), what))


def _model_entry(entry: dict[str, Any], what: str) -> ModelEntry:
    promoted = entry.get("promoted")
    history, held_back = entry.get("history"), entry.get("held_back")
    if not (promoted is None or _is_version(promoted)):
        raise StoreError(f"{what}: the promoted version is not a version id")
    if not (isinstance(history, list) and len(history) <= MAX_HISTORY_ENTRIES
            and all(_is_version(v) for v in history)):
        raise StoreError(f"{what}: the history is not a list of version ids")
    if not (isinstance(held_back, dict) and len(held_back) <= MAX_HISTORY_ENTRIES
            and all(_is_version(v) and isinstance(r, str) for v, r in held_back.items())):
        raise StoreError(f"{what}: held_back is not an object of version ids and reasons")
    return ModelEntry(promoted, tuple(history), {v: r[:MAX_TEXT] for v, r in held_back.items()})


@dataclass(frozen=True)
class VersionInfo:
    """The parts of a version's metadata the service relies on, checked."""

    model_name: str
    version: str
    pickle_sha256: str
    pickle_bytes: int
    classes: tuple[str, ...]
    accuracy: float
    metadata: dict[str, Any]
    """The whole signed document, for display."""


def version_from_json(document: dict[str, Any], model: str, version: str) -> VersionInfo:
    what = f"{model}/{version}/metadata.json"
    _expect_format(document, what)
    if document.get("model_name") != model or document.get("version") != version:
        raise StoreError(f"{what} describes another version (model "
                         f"{str(document.get('model_name'))[:80]!r}, version "
                         f"{str(document.get('version'))[:80]!r}): copied or moved here")
    digest = document.get("pickle_sha256")
    if not (isinstance(digest, str) and len(digest) == 64
            and all(c in "0123456789abcdef" for c in digest)):
        raise StoreError(f"{what} has no valid pickle_sha256")
    size = _integer(document.get("pickle_bytes"), what, "pickle_bytes", 1, MAX_PICKLE_BYTES)
    classes = document.get("classes")
    if not (isinstance(classes, list) and 2 <= len(classes) <= 1000
            and all(isinstance(c, str) and 0 < len(c) <= 100 for c in classes)
            and len(set(classes)) == len(classes)):
        raise StoreError(f"{what} has no list of distinct class names")
    metrics = document.get("metrics")
    if not isinstance(metrics, dict):
        raise StoreError(f"{what} has no metrics object")
    for name in ("accuracy", "f1_macro"):
        _fraction(metrics.get(name), what, f"metrics.{name}")
    return VersionInfo(model, version, digest, size, tuple(classes),
                       float(metrics["accuracy"]), document)


def _expect_format(document: dict[str, Any], what: str) -> None:
    if document.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"{what} has format_version "
                         f"{str(document.get('format_version'))[:20]}; this code reads "
                         f"{FORMAT_VERSION}")


def _integer(value: Any, what: str, name: str, low: int, high: int) -> int:
    if not (isinstance(value, int) and not isinstance(value, bool) and low <= value <= high):
        shown = str(value) if len(str(value)) <= 30 else f"a number of {len(str(value))} digits"
        raise StoreError(f"{what}: {name} must be a whole number from {low} to {high}, "
                         f"not {shown}")
    return value


def _fraction(value: Any, what: str, name: str) -> float:
    # Compared as numbers, not passed to math: a 400-digit integer overflows a float.
    if not (isinstance(value, int | float) and not isinstance(value, bool)
            and 0 <= value <= 1):
        raise StoreError(f"{what}: {name} must be a number from 0 to 1")
    return float(value)


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise StoreError(f"{what}: a text field is not text")
    return value[:MAX_TEXT]


def _is_version(value: Any) -> bool:
    return isinstance(value, str) and is_version_id(value)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A repeated key would let a reader that keeps the first value see another document than
    # the one that was verified (Python keeps the last).
    document = dict(pairs)
    if len(document) != len(pairs):
        raise ValueError("a key is repeated")
    return document


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
