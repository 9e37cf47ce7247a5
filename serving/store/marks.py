"""What the writers last wrote into each store: a defence against a manifest put back.

A manifest is signed, so one taken from the past still verifies; the service refuses it while it
runs (its sequence is lower), but a writer building on it would sign its old state again with a
new sequence. So each writer records, beside the private key (where only the pipeline's user can
write), the sequence and digest of the last manifest it wrote into each store, and builds only on
that very manifest: not on an older one, nor on none at all once one was written.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from serving.store import signing
from serving.store.layout import MANIFEST_FILE, StoreError

MARKS_ENV = "MODEL_MANIFEST_MARKS_FILE"


def marks_file() -> Path:
    """``MODEL_MANIFEST_MARKS_FILE``; by default ``manifest-marks.json`` beside the private key."""
    return Path(os.environ.get(MARKS_ENV)
                or signing.private_key_file().with_name("manifest-marks.json"))


@contextlib.contextmanager
def held(path: Path) -> Iterator[dict[str, Any]]:
    """The marks, locked; changes to the dict are written back, in place (compose's secrets
    folder lets the pipeline's user write this file, not create files beside it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "r+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        text = f.read()
        try:
            marks = json.loads(text) if text.strip() else {}
        except ValueError:
            raise StoreError(f"{MARKS_ENV} ({path.name}) is not valid JSON; fix or remove it "
                             "(then `python -m serving.store accept-manifest`)") from None
        before = dict(marks)
        yield marks
        if marks != before:
            f.seek(0)
            f.truncate()
            f.write((json.dumps(marks, indent=2) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())


def store_key(models_dir: Path) -> str:
    return str(models_dir.resolve())


def digest(data: bytes | None) -> str | None:
    return hashlib.sha256(data).hexdigest() if data is not None else None


def check(marks: dict[str, Any], models_dir: Path, data: bytes | None) -> None:
    """Raise unless ``data`` (the manifest's bytes, None if absent) is what was last written."""
    mark = marks.get(store_key(models_dir))
    if mark is None or mark.get("sha256") == digest(data):
        return
    now = "is missing" if data is None else "is not the one last written"
    raise StoreError(
        f"{MANIFEST_FILE} {now} (sequence {mark.get('sequence')} was written here last): an older "
        "manifest put back, or the store restored from a backup. Nothing was changed. If the "
        "store is as it should be, run `python -m serving.store accept-manifest`."
    )


def record(marks: dict[str, Any], models_dir: Path, sequence: int, data: bytes | None) -> None:
    if data is None:
        marks.pop(store_key(models_dir), None)
    else:
        marks[store_key(models_dir)] = {"sequence": sequence, "sha256": digest(data)}
