"""Reading the store: the manifest, a model's version folders, and one version's files, each
verified before anything in it is used. The service and ``python -m serving.store`` read
through here; neither ever follows a symbolic link inside MODELS_DIR."""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from serving.store import signing
from serving.store.documents import (
    EMPTY_MANIFEST,
    Manifest,
    VersionInfo,
    manifest_from_json,
    parse_json,
    version_from_json,
)
from serving.store.layout import (
    MANIFEST_FILE,
    MAX_DOCUMENT_BYTES,
    METADATA_FILE,
    PICKLE_FILE,
    StoreError,
    is_version_id,
    read_bounded,
)


@dataclass(frozen=True)
class Trust:
    """Which documents a reader accepts: those ``public_key`` verifies; and, only when
    ``allow_unsigned`` (a development switch), unsigned ones too."""

    public_key: Ed25519PublicKey | None
    allow_unsigned: bool = False

    def check(self, document: dict, what: str) -> None:
        if self.allow_unsigned and not signing.is_signed(document):
            return
        if self.public_key is None:
            raise signing.SignatureError(f"{what} cannot be verified: this reader has no "
                                         "public key")
        signing.verify(document, self.public_key, what)


@dataclass(frozen=True)
class VersionFiles:
    info: VersionInfo
    payload: bytes
    """The pickle's bytes, whose digest and size the signed metadata gave."""


def read_manifest(models_dir: Path, trust: Trust) -> Manifest:
    """The verified manifest, or ``EMPTY_MANIFEST`` if there is none yet."""
    try:
        data = read_bounded(models_dir / MANIFEST_FILE, MAX_DOCUMENT_BYTES, MANIFEST_FILE)
    except FileNotFoundError:
        return EMPTY_MANIFEST
    document = parse_json(data, MANIFEST_FILE)
    trust.check(document, MANIFEST_FILE)
    return manifest_from_json(document)


def version_ids(models_dir: Path, model: str) -> list[str]:
    """The version folders of ``model``, oldest first; [] if it has none. Anything else in its
    folder (a publish in progress, a pruned version on its way out, junk) is not a version."""
    try:
        entries = os.listdir(_folder(models_dir / model, model))
    except FileNotFoundError:
        return []
    return sorted(entry for entry in entries if is_version_id(entry))


def read_metadata(models_dir: Path, model: str, version: str, trust: Trust) -> VersionInfo:
    """A version's verified metadata, without touching its pickle."""
    what = f"{model}/{version}/{METADATA_FILE}"
    folder = _folder(models_dir / model / version, f"{model}/{version}")
    document = parse_json(read_bounded(folder / METADATA_FILE, MAX_DOCUMENT_BYTES, what), what)
    trust.check(document, what)
    return version_from_json(document, model, version)


def read_version(models_dir: Path, model: str, version: str, trust: Trust, *,
                 max_pickle_bytes: int) -> VersionFiles:
    """A version's metadata and pickle bytes, verified: signature, then size, then digest."""
    info = read_metadata(models_dir, model, version, trust)
    what = f"{model}/{version}/{PICKLE_FILE}"
    if info.pickle_bytes > max_pickle_bytes:
        raise StoreError(f"{what} has {info.pickle_bytes} bytes, more than this service's "
                         f"limit of {max_pickle_bytes} (SERVING_MAX_MODEL_BYTES)")
    payload = read_bounded(models_dir / model / version / PICKLE_FILE, info.pickle_bytes, what)
    digest = hashlib.sha256(payload).hexdigest()
    if len(payload) != info.pickle_bytes or not hmac.compare_digest(digest, info.pickle_sha256):
        raise StoreError(f"{what} is not the file its signed metadata describes (sha256 "
                         f"{digest[:12]}..., expected {info.pickle_sha256[:12]}...)")
    return VersionFiles(info, payload)


def _folder(path: Path, what: str) -> Path:
    """``path``, which must be a real directory: not a symbolic link (a link could loop, or
    lead out of MODELS_DIR), not a file."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise StoreError(f"{what} is a symbolic link, which the store never contains")
    if not stat.S_ISDIR(st.st_mode):
        raise StoreError(f"{what} is not a folder")
    return path
