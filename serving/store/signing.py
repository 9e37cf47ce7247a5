"""Ed25519 signatures over the store's JSON documents, and the key pair that makes them.

The private key signs (the pipeline, and ``python -m serving.store`` when it promotes); the
public key verifies (the service). A document is signed over its canonical JSON without the
``signature`` member (keys sorted, no spaces), and the signature names the key that made it by a
fingerprint of the public key, so a refusal can say "another key" without showing either key.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from serving.store.layout import StoreError

ALGORITHM = "ed25519"
KEYS_DIR = Path(__file__).resolve().parents[2] / "airflow" / "home" / "model-signing"
"""Where the no-Docker launcher keeps the key pair, and so where both sides look by default."""
PRIVATE_KEY_ENV = "MODEL_SIGNING_KEY_FILE"
PUBLIC_KEY_ENV = "MODEL_PUBLIC_KEY_FILE"


class SignatureError(StoreError):
    """A document is unsigned, signed by another key, or changed after signing."""


def private_key_file() -> Path:
    return Path(os.environ.get(PRIVATE_KEY_ENV) or KEYS_DIR / "private.pem")


def public_key_file() -> Path:
    return Path(os.environ.get(PUBLIC_KEY_ENV) or KEYS_DIR / "public.pem")


def ensure_key_pair(private_file: Path, public_file: Path) -> bool:
    """Create the key pair unless the private key exists; True if it was created now.

    The private key is written 0600 (only its owner, the pipeline's user, may read it), the
    public key 0644. An existing private key is never replaced: models signed with it would no
    longer verify. A missing public key is derived from it again.
    """
    if private_file.exists():
        if not public_file.exists():
            _write_new(public_file, _public_pem(load_private_key(private_file).public_key()),
                       0o644)
        return False
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    _write_new(private_file, private_pem, 0o600)
    public_file.unlink(missing_ok=True)  # it belongs to no key now
    _write_new(public_file, _public_pem(key.public_key()), 0o644)
    return True


def load_private_key(path: Path) -> Ed25519PrivateKey:
    key = _load(path, "private", serialization.load_pem_private_key, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise StoreError(f"the private key file {path.name} does not hold an Ed25519 key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    key = _load(path, "public", serialization.load_pem_public_key)
    if not isinstance(key, Ed25519PublicKey):
        raise StoreError(f"the public key file {path.name} does not hold an Ed25519 key")
    return key


def key_id(key: Ed25519PublicKey) -> str:
    """A short fingerprint of the public key: safe to print, and enough to tell keys apart."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def canonical(document: dict[str, Any]) -> bytes:
    unsigned = {k: v for k, v in document.items() if k != "signature"}
    return json.dumps(unsigned, sort_keys=True, separators=(",", ":"),
                      allow_nan=False).encode()


def sign(document: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """``document`` with its ``signature`` member set."""
    signature = key.sign(canonical(document)).hex()
    return {**document, "signature": {"algorithm": ALGORITHM,
                                      "key_id": key_id(key.public_key()), "value": signature}}


def verify(document: dict[str, Any], key: Ed25519PublicKey, what: str) -> None:
    """Raise SignatureError unless ``document`` carries a valid signature by ``key``."""
    signature = document.get("signature")
    if not isinstance(signature, dict):
        raise SignatureError(f"{what} is not signed, and this service serves only signed models")
    value, signer = signature.get("value"), signature.get("key_id")
    if signature.get("algorithm") != ALGORITHM or not isinstance(value, str):
        raise SignatureError(f"{what} has a signature that is not an {ALGORITHM} signature")
    if signer != key_id(key):
        raise SignatureError(f"{what} is signed by key {str(signer)[:16]!r}, not by this "
                             f"service's key {key_id(key)!r}")
    try:
        key.verify(bytes.fromhex(value), canonical(document))
    except (InvalidSignature, ValueError):
        raise SignatureError(f"{what} was changed after it was signed (its signature does not "
                             "verify)") from None


def is_signed(document: dict[str, Any]) -> bool:
    return isinstance(document.get("signature"), dict)


def _load(path: Path, which: str, loader: Any, **options: Any) -> Any:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise StoreError(f"no {which} key file at {path} (created on first start by the "
                         "launcher or the compose init service; or run "
                         "`uv run python -m serving.store keygen`)") from None
    except OSError as exc:
        raise StoreError(f"cannot read the {which} key file {path}: {exc.strerror}") from None
    try:
        return loader(data, **options)
    except (ValueError, TypeError):
        # Never the library's message: it could quote the file's contents.
        raise StoreError(f"the {which} key file {path} is not a PEM key") from None


def _public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # the umask may have taken bits away from the public key
