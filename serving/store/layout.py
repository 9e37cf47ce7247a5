"""Names and paths inside ``MODELS_DIR``, and reading and writing files there safely."""

from __future__ import annotations

import os
import re
import stat
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from serving.contract import MODEL_NAME_PATTERN

FORMAT_VERSION = 2
"""The store's format: version folders and a signed manifest (1 was one file pair per model)."""

MANIFEST_FILE = "manifest.json"
PICKLE_FILE = "model.pkl"
METADATA_FILE = "metadata.json"
LOCK_FILE = ".store.lock"
"""Held (``flock``) by whoever changes the manifest, so that two writers never lose a change."""

MAX_DOCUMENT_BYTES = 1_000_000
"""A manifest or a version's metadata is a few kilobytes; anything this large is not one."""

MODEL_NAME = re.compile(MODEL_NAME_PATTERN)
VERSION_ID = re.compile(r"^\d{8}T\d{6}\.\d{6}Z$")
"""``YYYYMMDDTHHMMSS.ffffffZ``: no dots or slashes to leave a folder by, and sorts by time."""


class StoreError(Exception):
    """Something in the store was refused; the message names it and says why, never a path
    outside MODELS_DIR nor a key."""


def new_version_id(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S.%fZ")


def is_version_id(text: str) -> bool:
    return bool(VERSION_ID.fullmatch(text))


def read_bounded(path: Path, max_bytes: int, what: str) -> bytes:
    """The bytes of the regular file ``path``, at most ``max_bytes`` of them.

    Never follows a symbolic link (a link could lead out of MODELS_DIR or loop) and never opens
    anything but a regular file (a FIFO would block the reader forever). Raises
    FileNotFoundError if it is gone, StoreError for anything else amiss.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise StoreError(f"{what} cannot be opened ({exc.strerror}; a symbolic link?)") from None
    with os.fdopen(fd, "rb", closefd=True) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise StoreError(f"{what} is not a regular file")
        if st.st_size > max_bytes:
            raise StoreError(f"{what} has {st.st_size} bytes, more than the {max_bytes} allowed")
        data = f.read(max_bytes + 1)  # one byte more, to notice a file that grew
    if len(data) > max_bytes:
        raise StoreError(f"{what} has more than the {max_bytes} bytes allowed")
    return data


def write_atomically(target: Path, data: bytes) -> None:
    """Replace ``target`` with ``data``: a reader sees the old file or the new one, never half."""
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, 0o644)  # mkstemp makes 0600; the service may run as another user
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    fsync_directory(target.parent)


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
