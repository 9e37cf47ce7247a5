"""The models being served, and the watcher that keeps them in step with ``MODELS_DIR``.

A background thread looks at the folder every ``reload_interval_seconds`` (a ``stat`` per file,
which also works on bind mounts where inotify does not) and reloads only the models whose files
changed. Everything the routes read is one immutable ``Snapshot``; a reload builds a new one and
swaps the reference, so a request that started on a model finishes on that same version.

A model whose new files are refused keeps its last good version in service, with the refusal
shown beside it; a model whose pickle disappears stops being served.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType

from serving.artifacts import ArtifactError, LoadedModel, load_model, read_inside
from serving.contract import MANIFEST_FILE, MODEL_NAME_PATTERN
from serving.metrics import Metrics

log = logging.getLogger(__name__)

PUBLISH_GRACE_SECONDS = 2.0
"""How long a pickle and metadata that disagree are taken for a publish in progress (the pipeline
renames the pickle, then its metadata) before it counts as an error."""

_NAME = re.compile(MODEL_NAME_PATTERN)
_MANIFEST_MAX_BYTES = 1_000_000

FileStamp = tuple[int, int, int, int, int] | None
"""A file's identity and version (device, inode, size, mtime, ctime), or None when it is absent."""


@dataclass(frozen=True)
class LoadFailure:
    message: str
    at: datetime


@dataclass(frozen=True)
class Snapshot:
    """What is served at one moment. Never modified: the registry replaces it whole."""

    models: Mapping[str, LoadedModel] = field(default_factory=lambda: MappingProxyType({}))
    failures: Mapping[str, LoadFailure] = field(default_factory=lambda: MappingProxyType({}))
    best_model: str | None = None

    def names(self) -> list[str]:
        """Every model found in MODELS_DIR, served or not."""
        return sorted({*self.models, *self.failures})


class ModelRegistry:
    """Finds, verifies, loads and reloads the models of one folder."""

    def __init__(self, directory: Path, key: bytes | None, metrics: Metrics | None = None, *,
                 compile_models: bool = True) -> None:
        self.directory = directory
        self._key = key
        self._compile = compile_models
        self._metrics = metrics or Metrics()
        self._snapshot = Snapshot()
        self._seen: dict[str, tuple[FileStamp, FileStamp]] = {}
        self._manifest_seen: FileStamp = None
        self._manifest_best: str | None = None
        self._refresh_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._folder_problem: str | None = None

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def refresh(self) -> None:
        """Bring the served models in step with the folder, reloading only what changed."""
        with self._refresh_lock:
            try:
                found = self._scan()
            except OSError as exc:
                # Keep serving what we have: a folder that cannot be read now may be back soon.
                self._report_folder(f"cannot read MODELS_DIR {self.directory}: {exc}")
                return
            models = dict(self._snapshot.models)
            failures = dict(self._snapshot.failures)
            for name in set(self._seen) - set(found):
                self._forget(name, models, failures)
            for name, stamps in found.items():
                if self._seen.get(name) != stamps:
                    self._update(name, stamps, models, failures)
            self._read_manifest()
            self._snapshot = Snapshot(
                MappingProxyType(models), MappingProxyType(failures), self._best(models)
            )

    def start(self, interval: float) -> None:
        """Watch the folder from a background thread until ``stop``."""
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._watch, args=(interval,), name="models-watcher", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _watch(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.refresh()
            except Exception:
                # The watcher must outlive any surprise, or models would silently stop updating.
                log.exception("unexpected error while reloading models; retrying")

    def _scan(self) -> dict[str, tuple[FileStamp, FileStamp]]:
        """``{name: (pickle stamp, metadata stamp)}`` for every model name with a file here."""
        try:
            entries = os.listdir(self.directory)
        except FileNotFoundError:
            self._report_folder(f"MODELS_DIR {self.directory} does not exist (yet): no models")
            return {}
        self._report_folder(None)
        names = {
            stem
            for stem, dot, suffix in (entry.rpartition(".") for entry in entries)
            # Dot-files include the pipeline's temporary files (.<name>.<random>.tmp).
            if dot and suffix in ("pkl", "json") and _NAME.fullmatch(stem) and stem != "manifest"
        }
        return {name: (self._stamp(f"{name}.pkl"), self._stamp(f"{name}.json")) for name in names}

    def _report_folder(self, problem: str | None) -> None:
        """Log a problem with the folder itself once, not at every poll; and its end."""
        if problem != self._folder_problem:
            if problem:
                log.warning("%s", problem)
            elif self._folder_problem:
                log.info("MODELS_DIR %s is readable again", self.directory)
            self._folder_problem = problem

    def _stamp(self, filename: str) -> FileStamp:
        try:
            st = os.stat(self.directory / filename)
        except FileNotFoundError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def _update(self, name: str, stamps: tuple[FileStamp, FileStamp],
                models: dict[str, LoadedModel], failures: dict[str, LoadFailure]) -> None:
        pickle_stamp, metadata_stamp = stamps
        if pickle_stamp is None:
            self._forget(name, models, failures)
            self._seen[name] = stamps
            return
        try:
            if metadata_stamp is None:
                raise ArtifactError(f"{name}.pkl has no metadata file {name}.json", pending=True)
            loaded = load_model(self.directory, name, self._key, compile_model=self._compile)
        except FileNotFoundError:
            return  # Replaced or removed while being read: the next scan sees the new state.
        except Exception as exc:
            if isinstance(exc, ArtifactError) and exc.pending and _is_recent(stamps):
                log.debug("model %s: %s; waiting for the publish to finish", name, exc)
                return  # Not marked as seen: tried again on the next scan.
            self._seen[name] = stamps
            self._fail(name, exc, models, failures)
            return
        self._seen[name] = stamps
        models[name] = loaded
        failures.pop(name, None)
        self._metrics.count_reload(name)
        log.info("model %s: serving version %s (trained %s, run %s) with %s", name,
                 loaded.version, loaded.metadata.get("trained_at"),
                 loaded.metadata.get("dag_run_id"), _describe_predictor(loaded))
        if loaded.not_compiled:
            log.warning("model %s: served by its pipeline (pandas on every request, tens of "
                        "times slower than compiled): %s", name, loaded.not_compiled)

    def _fail(self, name: str, exc: Exception, models: Mapping[str, LoadedModel],
              failures: dict[str, LoadFailure]) -> None:
        message = self._public_message(exc)
        failures[name] = LoadFailure(message, datetime.now(UTC))
        self._metrics.count_load_error(name)
        kept = models.get(name)
        still = f"; still serving version {kept.version}" if kept else "; not served"
        log.error("model %s refused: %s%s", name, exc, still,
                  exc_info=not isinstance(exc, ArtifactError))

    def _public_message(self, exc: Exception) -> str:
        """What the API may show of a refusal: models and reasons, never a server path (the
        log has the whole message)."""
        if isinstance(exc, ArtifactError):
            return str(exc)  # written by us, from file names only
        if isinstance(exc, OSError):
            return f"{type(exc).__name__}: {exc.strerror or 'cannot read the file'}"
        text = str(exc)
        for path in {str(self.directory), str(self.directory.resolve())}:
            text = text.replace(path, "MODELS_DIR")
        return f"{type(exc).__name__}: {text}"

    def _forget(self, name: str, models: dict[str, LoadedModel],
                failures: dict[str, LoadFailure]) -> None:
        self._seen.pop(name, None)
        failures.pop(name, None)
        if models.pop(name, None) is not None:
            log.info("model %s: its pickle was removed; no longer served", name)

    def _read_manifest(self) -> None:
        stamp = self._stamp(MANIFEST_FILE)
        if stamp == self._manifest_seen:
            return
        self._manifest_seen, self._manifest_best = stamp, None
        if stamp is None:
            return
        try:
            manifest = json.loads(read_inside(self.directory, MANIFEST_FILE, _MANIFEST_MAX_BYTES))
            best = manifest.get("best_model") if isinstance(manifest, dict) else None
        except (OSError, ValueError, RecursionError, ArtifactError) as exc:
            log.warning("ignoring %s: %s", MANIFEST_FILE, exc)
            return
        self._manifest_best = best if isinstance(best, str) else None

    def _best(self, models: Mapping[str, LoadedModel]) -> str | None:
        """The manifest's best model if it is served, else the served one that scored highest."""
        if self._manifest_best in models:
            return self._manifest_best
        if not models:
            return None
        return min(models.values(), key=_rank).name


def _describe_predictor(model: LoadedModel) -> str:
    kind = getattr(model.predictor, "kind", None)
    return f"a compiled {kind}" if kind else "its pipeline"


def _rank(model: LoadedModel) -> tuple[float, float, str]:
    # The pipeline's own order: accuracy, then macro-F1, then the name.
    metrics = model.metadata.get("metrics") or {}
    return (-float(metrics.get("accuracy", 0.0)), -float(metrics.get("f1_macro", 0.0)), model.name)


def _is_recent(stamps: tuple[FileStamp, FileStamp]) -> bool:
    newest = max(stamp[3] for stamp in stamps if stamp is not None) / 1e9
    return time.time() - newest < PUBLISH_GRACE_SECONDS
