"""Writing the store: exporting a version, and changing the manifest (promote, hold back,
roll back, prune) under a lock, signed with the private key.

Only the pipeline and ``python -m serving.store`` write; the service never does.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from serving.store import marks, signing
from serving.store.documents import Manifest, ModelEntry, manifest_from_json, parse_json
from serving.store.layout import (
    FORMAT_VERSION,
    LOCK_FILE,
    MANIFEST_FILE,
    MAX_DOCUMENT_BYTES,
    METADATA_FILE,
    MODEL_NAME,
    PICKLE_FILE,
    StoreError,
    fsync_directory,
    new_version_id,
    read_bounded,
    write_atomically,
)
from serving.store.reader import Trust, read_manifest, read_metadata, version_ids

DEFAULT_HISTORY = 5


def history_limit() -> int:
    """``MODEL_HISTORY``: how many versions of each model are kept (the promoted one, and the
    one a rollback would go back to, are kept besides)."""
    text = os.environ.get("MODEL_HISTORY") or str(DEFAULT_HISTORY)
    if not text.isdigit() or int(text) < 1:
        raise StoreError(f"MODEL_HISTORY={text!r} must be a whole number of at least 1")
    return int(text)


def export_version(models_dir: Path, model: str, payload: bytes, fields: dict[str, Any],
                   key: Ed25519PrivateKey) -> dict[str, Any]:
    """Write a new version of ``model``: the pickle ``payload`` and its signed metadata made of
    ``fields`` plus the store's own. Returns the metadata. The version appears whole or not at
    all: it is written into a dot-named folder, then renamed into place."""
    if not MODEL_NAME.fullmatch(model):
        raise StoreError(f"{model!r} is not a valid model name")
    folder = models_dir / model
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        version = new_version_id()
        metadata = signing.sign({
            **fields, "format_version": FORMAT_VERSION, "model_name": model,
            "version": version, "pickle_sha256": hashlib.sha256(payload).hexdigest(),
            "pickle_bytes": len(payload),
        }, key)
        incoming = folder / f".incoming-{version}-{secrets.token_hex(4)}"
        incoming.mkdir(mode=0o755)
        try:
            _write_new(incoming / PICKLE_FILE, payload)
            _write_new(incoming / METADATA_FILE, (json.dumps(metadata, indent=2) + "\n").encode())
            fsync_directory(incoming)
            os.chmod(incoming, 0o755)  # mkdir's mode is cut by the umask
            try:
                os.rename(incoming, folder / version)  # fails if that version exists
            except OSError:
                if not (folder / version).exists():
                    raise
                continue  # the same microsecond as another export: take the next id
            fsync_directory(folder)
            return metadata
        finally:
            if incoming.exists():
                shutil.rmtree(incoming)


@contextlib.contextmanager
def locked(models_dir: Path) -> Iterator[None]:
    """Hold the store's lock: one writer of the manifest at a time, across processes."""
    models_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(models_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def change_manifest(models_dir: Path, key: Ed25519PrivateKey,
                    change: Callable[[Manifest], dict[str, ModelEntry]], *,
                    written_by: str) -> Manifest:
    """Apply ``change`` (current manifest -> new model entries) and write the result: a new
    sequence number, the best model among the promoted versions, old versions pruned.

    Builds only on the manifest this store's writers last wrote (``marks``)."""
    trust = Trust(key.public_key())
    with locked(models_dir), marks.held(marks.marks_file()) as written:
        current = read_manifest(models_dir, trust)
        marks.check(written, models_dir, _manifest_bytes(models_dir))
        entries = change(current)
        entries, doomed = _prune(models_dir, entries, history_limit())
        manifest = Manifest(
            # Also above any earlier manifest's sequence after manifest.json was lost or moved
            # away, so that a running service accepts the new one.
            sequence=max(current.sequence + 1, time.time_ns() // 1_000_000),
            models=entries, best_model=_best(models_dir, entries, trust),
            written_at=datetime.now(UTC).isoformat(timespec="milliseconds"),
            written_by=written_by,
        )
        data = (json.dumps(signing.sign(manifest.as_json(), key), indent=2) + "\n").encode()
        write_atomically(models_dir / MANIFEST_FILE, data)
        marks.record(written, models_dir, manifest.sequence, data)
        for folder in doomed:  # only once no manifest names them
            _remove_version(folder)
    return manifest


def accept_manifest(models_dir: Path) -> int:
    """Take the manifest now in ``models_dir`` (or its absence) as the last one written; return
    its sequence (0 if none). For a store restored from a backup, after checking it."""
    with locked(models_dir), marks.held(marks.marks_file()) as written:
        data = _manifest_bytes(models_dir)
        sequence = 0
        if data is not None:
            sequence = manifest_from_json(parse_json(data, MANIFEST_FILE)).sequence
        marks.record(written, models_dir, sequence, data)
    return sequence


def _manifest_bytes(models_dir: Path) -> bytes | None:
    try:
        return read_bounded(models_dir / MANIFEST_FILE, MAX_DOCUMENT_BYTES, MANIFEST_FILE)
    except FileNotFoundError:
        return None


def promoted(entry: ModelEntry, version: str) -> ModelEntry:
    """``entry`` with ``version`` promoted, and the version it replaces kept for rollback."""
    history = list(entry.history)
    if entry.promoted is not None and entry.promoted != version:
        history.append(entry.promoted)
    held_back = {v: r for v, r in entry.held_back.items() if v != version}
    return ModelEntry(version, tuple(v for v in history if v != version), held_back)


def held_back(entry: ModelEntry, version: str, reason: str) -> ModelEntry:
    return replace(entry, held_back={**entry.held_back, version: reason})


ROLLED_BACK = "rolled back to"
"""How the reason of a version that a rollback demoted begins: pruning keeps such versions."""


def rolled_back(entry: ModelEntry, model: str) -> ModelEntry:
    """``entry`` with the previously promoted version promoted again; the one it replaces is
    held back, and kept, so it can be promoted again by hand."""
    if not entry.history:
        raise StoreError(f"{model} has no earlier promoted version to roll back to")
    back_to = entry.history[-1]
    held = dict(entry.held_back)
    if entry.promoted is not None:
        held[entry.promoted] = f"{ROLLED_BACK} {back_to} at {datetime.now(UTC):%Y-%m-%d %H:%M:%S}"
    held.pop(back_to, None)
    return ModelEntry(back_to, entry.history[:-1], held)


def _prune(models_dir: Path, entries: dict[str, ModelEntry], keep: int
           ) -> tuple[dict[str, ModelEntry], list[Path]]:
    """Keep each model's newest ``keep`` versions, its promoted one, its rollback target and the
    versions a rollback demoted; drop the rest from the entries and return their folders."""
    kept_entries, doomed = {}, []
    for model, entry in entries.items():
        found = version_ids(models_dir, model)
        demoted = {v for v, reason in entry.held_back.items() if reason.startswith(ROLLED_BACK)}
        kept = set(found[-keep:]) | demoted | {entry.promoted, *entry.history[-1:]} - {None}
        doomed += [models_dir / model / v for v in found if v not in kept]
        kept_entries[model] = ModelEntry(
            entry.promoted, tuple(v for v in entry.history if v in kept),
            {v: r for v, r in entry.held_back.items() if v in kept},
        )
    return kept_entries, doomed


def _best(models_dir: Path, entries: dict[str, ModelEntry], trust: Trust) -> str | None:
    """The promoted version with the highest held-out accuracy, then macro-F1, then name."""
    ranked = []
    for model, entry in entries.items():
        if entry.promoted is None:
            continue
        try:
            info = read_metadata(models_dir, model, entry.promoted, trust)
        except (OSError, StoreError):
            continue
        metrics = info.metadata["metrics"]
        ranked.append((-metrics["accuracy"], -metrics["f1_macro"], model))
    return min(ranked)[2] if ranked else None


def _remove_version(folder: Path) -> None:
    """Rename it out of the way first, so no reader sees a version half deleted."""
    doomed = folder.with_name(f".pruned-{folder.name}-{secrets.token_hex(4)}")
    try:
        os.rename(folder, doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def _write_new(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, 0o644)
