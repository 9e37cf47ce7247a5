"""The models being served, kept in step with the store in ``MODELS_DIR``.

A background thread looks at the store every ``reload_interval_seconds``: a ``stat`` of the
manifest, of ``MODELS_DIR`` and of each model's folder, and a listing only of a folder that
changed (version folders never change once in place). A new manifest is verified and must carry
a higher sequence number than the one held; a new version is verified, then loaded by the
isolated loader in a small thread pool, the promoted versions first, so a slow or hostile
version never holds up the others.

Everything the routes read is one immutable ``Snapshot``; each change builds a new one and swaps
the reference, so a request that started on a version finishes on it. A model keeps answering
with the version it served until its newly promoted version has loaded; a version that is
refused stays refused, with its reason, until its folder changes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from types import MappingProxyType

from serving.compiled import CompiledPredictor
from serving.loader import Loader, LoadError
from serving.metrics import Metrics
from serving.schemas import ModelVersion
from serving.store.documents import EMPTY_MANIFEST, Manifest, ModelEntry, VersionInfo
from serving.store.layout import MANIFEST_FILE, METADATA_FILE, MODEL_NAME, PICKLE_FILE, StoreError
from serving.store.reader import Trust, read_manifest, read_version, version_ids

log = logging.getLogger(__name__)

MAX_UNLISTED_MODELS = 50
"""How many model folders that the manifest does not name are followed."""

RETRY_SECONDS = 30.0
"""How long after a refusal that was not the version's fault (a loader timed out on a busy
machine, a worker killed from outside) its load is tried again."""

Stamp = tuple[int, int, int, int, int] | None
"""A file's identity and version (device, inode, size, mtime, ctime), or None when absent."""


@dataclass(frozen=True)
class ServedVersion:
    """A loaded, verified version: its predictor holds plain arrays only."""

    name: str
    version: str
    predictor: CompiledPredictor
    info: VersionInfo
    loaded_at: datetime

    @property
    def classes(self) -> tuple[str, ...]:
        return self.info.classes

    @property
    def metadata(self) -> dict:
        return self.info.metadata

    @cached_property
    def answered_by(self) -> ModelVersion:
        """This version as each of its answers names it; built once, on its first answer."""
        run_id = self.metadata.get("dag_run_id")
        return ModelVersion(name=self.name, version=self.version, sha256=self.info.pickle_sha256,
                            trained_at=str(self.metadata.get("trained_at")),
                            dag_run_id=run_id if isinstance(run_id, str) else None)


@dataclass(frozen=True)
class Refusal:
    message: str
    at: datetime


@dataclass(frozen=True)
class ModelState:
    """One model as the service sees it at one moment."""

    name: str
    entry: ModelEntry
    """What the manifest says of it."""
    served: ServedVersion | None
    """The version that answers by default: the promoted one once loaded, until then the one
    served before (the last good version)."""
    loaded: Mapping[str, ServedVersion]
    refused: Mapping[str, Refusal]
    found: tuple[str, ...]
    """Every kept version folder, oldest first."""
    folder_problem: str | None = None
    """Why the model's folder itself cannot be read (a link, a file), if it cannot."""

    def state_of(self, version: str) -> tuple[str, str | None]:
        """(promoted | previous | held back | candidate | refused | loading, why)."""
        if version in self.refused:
            return "refused", self.refused[version].message
        if version == self.entry.promoted and version not in self.loaded:
            return "loading", None
        return self.entry.state_of(version)

    @property
    def problem(self) -> str | None:
        if self.folder_problem:
            return self.folder_problem
        promoted = self.entry.promoted
        if promoted is None:
            return "no version has been promoted yet"
        if promoted in self.refused:
            still = f"; still serving {self.served.version}" if self.served else ""
            return f"the promoted version {promoted} was refused: " \
                   f"{self.refused[promoted].message}{still}"
        if promoted not in self.found and self.served is None:
            return f"the promoted version {promoted} is not in MODELS_DIR"
        return None


@dataclass(frozen=True)
class Snapshot:
    """What is served at one moment. Never modified: the registry replaces it whole."""

    models: Mapping[str, ModelState] = field(default_factory=lambda: MappingProxyType({}))
    best_model: str | None = None
    store_problem: str | None = None
    """Why the manifest, or the store as a whole, is not being followed right now."""

    def served(self) -> dict[str, ServedVersion]:
        return {name: m.served for name, m in self.models.items() if m.served is not None}


class ModelRegistry:
    """Finds, verifies, loads and reloads the models of one store."""

    def __init__(self, directory: Path, trust: Trust, loader: Loader, *, keep: int,
                 max_pickle_bytes: int, metrics: Metrics | None = None,
                 load_threads: int = 2, problem: str | None = None) -> None:
        self.directory = directory
        self._trust = trust
        self._loader = loader
        self._keep = keep
        self._max_pickle_bytes = max_pickle_bytes
        self._metrics = metrics or Metrics()
        self._fixed_problem = problem
        self._snapshot = Snapshot(store_problem=problem)
        self._lock = threading.RLock()
        self._pool = ThreadPoolExecutor(load_threads, thread_name_prefix="model-loader")
        self._manifest: Manifest = EMPTY_MANIFEST
        self._manifest_stamp: Stamp = None
        self._manifest_problem: str | None = None
        self._folders: dict[str, tuple[Stamp, list[str]]] = {}
        self._folder_problems: dict[str, str | None] = {}
        self._root: tuple[Stamp, list[str]] = (None, [])
        self._loaded: dict[tuple[str, str], ServedVersion] = {}
        self._refused: dict[tuple[str, str],
                            tuple[tuple[Stamp, Stamp, Stamp], Refusal, float | None]] = {}
        """(model, version) -> its files' stamps when refused, why, and when to try again (None:
        only once its files change)."""
        self._loading: set[tuple[str, str]] = set()
        self._served: dict[str, ServedVersion] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._folder_problem: str | None = None
        self._changed = True
        """Something the snapshot shows changed since it was built."""
        self._warm = False

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def refresh(self) -> None:
        """Look at the store once: follow a new manifest, start loading new versions."""
        if self._fixed_problem:
            return
        if not self._warm:
            self._loader.warm_up()
            self._warm = True
        with self._lock:
            manifest_changed = self._follow_manifest()
            wanted = self._scan(manifest_changed)
            for key in wanted:
                if key in self._loaded or key in self._loading:
                    continue  # a version never changes once in place
                stamp = self._version_stamp(*key)
                refused = self._refused.get(key)
                if refused is not None and refused[0] == stamp and (
                        refused[2] is None or time.monotonic() < refused[2]):
                    continue
                self._refused.pop(key, None)
                self._loading.add(key)
                self._pool.submit(self._load, key, stamp)
            self._forget(wanted)
            if self._changed:
                self._publish()

    def wait_for_promoted(self, timeout: float) -> bool:
        """Wait until no promoted version is still loading (at start, so that /ready is right
        from the first request); False if some still were after ``timeout`` seconds."""
        done = threading.Event()
        for _ in range(max(1, int(timeout / 0.02))):
            with self._lock:
                promoted = {(name, entry.promoted) for name, entry in self._manifest.models.items()}
                if not promoted & self._loading:
                    return True
            done.wait(0.02)
        return False

    def start(self, interval: float) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, args=(interval,),
                                        name="models-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self._loader.close()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _watch(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.refresh()
            except Exception:
                # The watcher must outlive any surprise, or models would silently stop updating.
                log.exception("unexpected error while following MODELS_DIR; retrying")

    # --- the manifest ---------------------------------------------------------------------

    def _follow_manifest(self) -> bool:
        """Read the manifest if its file changed; True if it did."""
        stamp = _stamp(self.directory / MANIFEST_FILE)
        if stamp == self._manifest_stamp:
            return False
        self._manifest_stamp = stamp
        self._changed = True
        if stamp is None and self._manifest.sequence:
            self._report_manifest(f"{MANIFEST_FILE} is missing; following sequence "
                                  f"{self._manifest.sequence} until a newer one appears")
        else:
            self._read_manifest()
        return True

    def _read_manifest(self) -> None:
        try:
            manifest = read_manifest(self.directory, self._trust)
        except FileNotFoundError:
            return  # replaced while being read: the next look sees the new one
        except (OSError, StoreError) as exc:
            self._report_manifest(f"{MANIFEST_FILE} refused: {_public(exc)}; following "
                                  f"sequence {self._manifest.sequence}")
            return
        if manifest.sequence < self._manifest.sequence:
            self._report_manifest(
                f"{MANIFEST_FILE} refused: its sequence {manifest.sequence} is lower than "
                f"{self._manifest.sequence}, the one already followed (an older manifest put "
                "back)")
            return
        if manifest.sequence == self._manifest.sequence and manifest != self._manifest:
            self._report_manifest(f"{MANIFEST_FILE} refused: a different manifest with the "
                                  f"same sequence {manifest.sequence}")
            return
        if manifest != self._manifest:
            log.info("following %s sequence %d (written by %s at %s)", MANIFEST_FILE,
                     manifest.sequence, manifest.written_by, manifest.written_at)
        self._manifest = manifest
        self._report_manifest(None)

    def _report_manifest(self, problem: str | None) -> None:
        if problem != self._manifest_problem:
            self._changed = True
        if problem and problem != self._manifest_problem:
            log.error("%s", problem)
            self._metrics.count_load_error("manifest")
        self._manifest_problem = problem

    # --- the folders ----------------------------------------------------------------------

    def _scan(self, manifest_changed: bool) -> list[tuple[str, str]]:
        """The (model, version) pairs to have loaded: each model's newest ``keep`` versions,
        its promoted one and its rollback target; promoted versions first.

        Each look stats the folders of the models the manifest names or that hold versions;
        every other entry of MODELS_DIR only when MODELS_DIR itself or the manifest changed, so
        thousands of stray entries cost a listing now and then, not a ``stat`` each time.
        """
        root_changed = self._list_root()
        listed = set(self._manifest.models)
        others = sorted(set(self._root[1]) - listed) if root_changed or manifest_changed else \
            sorted(n for n in set(self._root[1]) - listed if self._folders.get(n, (None, []))[1])
        # Folders the manifest does not name are candidates at most; a few are followed, not
        # thousands (anyone who can write MODELS_DIR can make folders).
        names = listed | set(others[:MAX_UNLISTED_MODELS])
        promoted, others = [], []
        for name in sorted(names):
            found = self._versions(name)
            entry = self._manifest.models.get(name, ModelEntry())
            kept = set(found[-self._keep:]) | ({entry.promoted, *entry.history[-1:]} & set(found))
            for version in sorted(kept, reverse=True):
                (promoted if version == entry.promoted else others).append((name, version))
        return promoted + others

    def _list_root(self) -> bool:
        """List MODELS_DIR again if it changed; True if it did."""
        stamp = _stamp(self.directory)
        if stamp == self._root[0]:
            return False
        try:
            with os.scandir(self.directory) as entries:
                names = [e.name for e in entries if MODEL_NAME.fullmatch(e.name)
                         and (e.is_dir(follow_symlinks=False) or e.is_symlink())]
        except FileNotFoundError:
            names = []
            self._report_folder("MODELS_DIR does not exist (yet)")
        except OSError as exc:
            self._report_folder(f"cannot read MODELS_DIR: {exc.strerror}")
            return False  # keep what we had: it may be back soon
        else:
            self._report_folder(None)
        self._root = (stamp, names)
        self._changed = True
        for gone in set(self._folders) - set(names) - set(self._manifest.models):
            del self._folders[gone]
            self._folder_problems.pop(gone, None)
        return True

    def _versions(self, name: str) -> list[str]:
        stamp = _stamp(self.directory / name)
        seen = self._folders.get(name)
        if seen is None or seen[0] != stamp:
            try:
                found, problem = version_ids(self.directory, name), None
            except FileNotFoundError:
                found, problem = [], None
            except (OSError, StoreError) as exc:
                found, problem = [], _public(exc)  # a link or a file where a folder should be
            if problem != self._folder_problems.get(name):
                if problem:
                    log.error("model %s: %s", name, problem)
                self._folder_problems[name] = problem
            seen = self._folders[name] = (stamp, found)
            self._changed = True
        return seen[1]

    def _version_stamp(self, name: str, version: str) -> tuple[Stamp, Stamp, Stamp]:
        """The version folder's and its two files' stamps: a refused version is tried again
        only when one of them changes (a folder copied in file by file, then completed)."""
        folder = self.directory / name / version
        return _stamp(folder), _stamp(folder / PICKLE_FILE), _stamp(folder / METADATA_FILE)

    def _report_folder(self, problem: str | None) -> None:
        """Log a problem with the folder itself once, not at every look; and its end."""
        if problem != self._folder_problem:
            self._changed = True
            if problem:
                log.warning("%s (%s)", problem, self.directory)
            elif self._folder_problem:
                log.info("MODELS_DIR %s is readable again", self.directory)
            self._folder_problem = problem

    # --- loading --------------------------------------------------------------------------

    def _load(self, key: tuple[str, str], stamp: tuple[Stamp, Stamp, Stamp]) -> None:
        name, version = key
        try:
            files = read_version(self.directory, name, version, self._trust,
                                 max_pickle_bytes=self._max_pickle_bytes)
            predictor = self._loader.load(files)
        except Exception as exc:
            with self._lock:
                self._loading.discard(key)
                if isinstance(exc, FileNotFoundError) or self._stop.is_set():
                    return  # pruned or removed while being read
                message = _public(exc)
                retry = (time.monotonic() + RETRY_SECONDS
                         if isinstance(exc, LoadError) and exc.transient else None)
                self._refused[key] = (stamp, Refusal(message, datetime.now(UTC)), retry)
                self._metrics.count_load_error(name)
                log.error("model %s version %s refused: %s", name, version, message,
                          exc_info=not isinstance(exc, StoreError | LoadError))
                self._publish()
            return
        loaded = ServedVersion(name, version, predictor, files.info, datetime.now(UTC))
        with self._lock:
            self._loading.discard(key)
            if self._stop.is_set():
                return
            self._loaded[key] = loaded
            self._metrics.count_reload(name)
            log.info("model %s version %s loaded: a compiled %s (trained %s, run %s)", name,
                     version, predictor.kind, files.info.metadata.get("trained_at"),
                     files.info.metadata.get("dag_run_id"))
            self._publish()

    def _forget(self, wanted: list[tuple[str, str]]) -> None:
        """Unload versions no longer kept; never the one a model is serving."""
        keep = set(wanted) | {(v.name, v.version) for v in self._served.values()}
        for key in set(self._loaded) - keep:
            del self._loaded[key]
            self._changed = True
        for key in set(self._refused) - set(wanted):
            del self._refused[key]
            self._changed = True

    def _publish(self) -> None:
        """Build the new snapshot from the state under the lock."""
        self._changed = False
        models = {}
        loaded_by: dict[str, dict[str, ServedVersion]] = {}
        for (name, version), served_version in self._loaded.items():
            loaded_by.setdefault(name, {})[version] = served_version
        refused_by: dict[str, dict[str, Refusal]] = {}
        for (name, version), (_, refusal, _) in self._refused.items():
            refused_by.setdefault(name, {})[version] = refusal
        names = ({*self._manifest.models, *self._folders} | set(loaded_by) | set(self._served))
        for name in sorted(names):
            entry = self._manifest.models.get(name, ModelEntry())
            loaded, refused = loaded_by.get(name, {}), refused_by.get(name, {})
            served = loaded.get(entry.promoted) if entry.promoted else None
            if served is None and entry.promoted is not None:
                served = self._served.get(name)  # the last good version, until the new loads
            if served is not None:
                if self._served.get(name) is not served:
                    log.info("model %s: now serving version %s", name, served.version)
                self._served[name] = served
            else:
                self._served.pop(name, None)
            found = tuple(self._folders.get(name, (None, []))[1])
            folder_problem = self._folder_problems.get(name)
            if not (found or loaded or refused or folder_problem
                    or name in self._manifest.models):
                continue
            models[name] = ModelState(name, entry, served, MappingProxyType(loaded),
                                      MappingProxyType(refused), found, folder_problem)
        best = self._manifest.best_model
        if best not in models or models[best].served is None:
            best = _best_served(models)
        self._snapshot = Snapshot(MappingProxyType(models), best,
                                  self._manifest_problem or self._folder_problem)


def _best_served(models: Mapping[str, ModelState]) -> str | None:
    ranked = [(-m.served.info.accuracy, -float(m.served.metadata["metrics"]["f1_macro"]), name)
              for name, m in models.items() if m.served is not None]
    return min(ranked)[2] if ranked else None


def _stamp(path: Path) -> Stamp:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _public(exc: BaseException) -> str:
    """What the API may show of a refusal: names and reasons, never a server path (the store's
    and the loader's messages name files inside MODELS_DIR only)."""
    if isinstance(exc, StoreError | LoadError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"{type(exc).__name__}: {exc.strerror or 'cannot read the file'}"
    return f"{type(exc).__name__}"
