"""Create the compose system's secrets on its first start, and keep them (``init-secrets``).

compose runs this once, as root, before any database or Airflow component starts, with the
``secrets`` volume at ``SECRETS_DIR``. Each secret is, in order: the value given in the
environment (``.env`` is optional, for overrides), the value kept in the volume from an earlier
start, or a new random one. A placeholder such as ``change-me`` is refused, naming the variable.

Each file is readable by its reader only: the database images read their ``*_FILE`` as uid 999;
Airflow reads its own through ``*_CMD`` options, its secrets backend and SimpleAuthManager's
password file, as ``AIRFLOW_UID``. Nothing secret is printed, except the Airflow admin's password
once, on the start that creates it.

It also makes the model signing key pair (``serving.store.signing``) unless the private key
exists; an existing one is never replaced, since the models signed with it would no longer
verify. The private key (``MODEL_SIGNING_KEY_FILE``, in the ``secrets`` volume) is readable by
``AIRFLOW_UID`` only; the public key (``MODEL_PUBLIC_KEY_FILE``) goes to a volume of its own, the
only one the prediction service gets, read-only: the service never sees the private key. Only
the key's fingerprint is printed.

The secrets need only the standard library. The key pair is made by the project's own
``serving.store.signing`` (one definition of the key format for the pipeline, the service and
this), which needs ``cryptography``: the Airflow image has it (Airflow depends on it) and holds
the ``serving`` package on its ``PYTHONPATH`` (airflow/Dockerfile).
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import sys
from pathlib import Path
from urllib.parse import quote

DATABASE_UID = 999
"""The ``postgres`` and ``mysql`` users of the official database images."""

PLACEHOLDER = re.compile(r"change[-_ ]?me|replace[-_ ]?me|^<.*>$|^x+$", re.IGNORECASE)


class SecretError(Exception):
    """A given value cannot be used; the message names its variable, never the value."""


def _token() -> str:
    return secrets.token_hex(24)


def _fernet_key() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


# variable -> (file in the volume, how a new value is made)
SECRETS = {
    "POSTGRES_PASSWORD": ("postgres_password", _token),
    "MYSQL_ROOT_PASSWORD": ("mysql_root_password", _token),
    "MYSQL_PASSWORD": ("mysql_password", _token),
    "AIRFLOW_FERNET_KEY": ("fernet_key", _fernet_key),
    "AIRFLOW_JWT_SECRET": ("jwt_secret", _token),
    "AIRFLOW_API_SECRET_KEY": ("api_secret_key", _token),
    "AIRFLOW_ADMIN_PASSWORD": ("airflow_admin_password", _token),
}
DATABASE_FILES = {"postgres_password", "mysql_root_password", "mysql_password"}

# Files derived from the secrets, in the forms Airflow reads.
SQL_ALCHEMY_CONN_FILE = "sql_alchemy_conn"
CONNECTIONS_FILE = "connections.json"
PASSWORDS_FILE = "simple_auth_manager_passwords.json"

# The model signing key pair; compose gives both paths (the same ones it gives the readers).
PRIVATE_KEY_FILE = "model_signing_key.pem"
"""In the secrets volume, unless ``MODEL_SIGNING_KEY_FILE`` says otherwise."""
DEFAULT_PUBLIC_KEY = "/run/model-public-key/public.pem"


def main() -> int:
    env = os.environ
    folder = Path(env.get("SECRETS_DIR", "/run/secrets/penguins"))
    try:
        created = write_secrets(folder, env)
        key_created, fingerprint = write_signing_keys(folder, env)
    except SecretError as problem:
        print(f"init-secrets: {problem}", file=sys.stderr)
        return 1
    if "AIRFLOW_ADMIN_PASSWORD" in created:
        admin = env.get("AIRFLOW_ADMIN_USERNAME") or "admin"
        # Printed once, on the start that made it; kept in the volume afterwards.
        print(f"init-secrets: Airflow's admin is {admin!r}, password "
              f"{read(folder, 'airflow_admin_password')}  (kept in the secrets volume, "
              f"{folder / PASSWORDS_FILE})")
    kept = sorted(set(SECRETS) - set(created))
    print(f"init-secrets: created {', '.join(sorted(created)) or 'nothing'}; "
          f"kept {', '.join(kept) or 'nothing'}")
    # The fingerprint only (public, and what the service names when it refuses a signature).
    print(f"init-secrets: {'created' if key_created else 'kept'} the model signing key "
          f"{fingerprint}")
    return 0


def write_secrets(folder: Path, env: dict[str, str] | os._Environ) -> set[str]:
    """Write every secret and derived file into ``folder``; return the variables newly made."""
    values, created = {}, set()
    for variable, (filename, make) in SECRETS.items():
        given = env.get(variable, "")
        if given:
            _check(variable, given)
            values[variable] = given
        elif (folder / filename).exists():
            values[variable] = read(folder, filename)
        else:
            values[variable] = make()
            created.add(variable)
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)
    airflow_uid = int(env.get("AIRFLOW_UID") or 50000)
    for variable, (filename, _) in SECRETS.items():
        owner = DATABASE_UID if filename in DATABASE_FILES else airflow_uid
        _write(folder / filename, values[variable], owner)
    mysql_user = env.get("MYSQL_USER") or "penguins"
    admin = env.get("AIRFLOW_ADMIN_USERNAME") or "admin"
    derived = {
        SQL_ALCHEMY_CONN_FILE: "postgresql+psycopg2://airflow:"
        f"{quote(values['POSTGRES_PASSWORD'], safe='')}@postgres:5432/airflow",
        CONNECTIONS_FILE: json.dumps({"mysql_airflow_conn": f"mysql://{quote(mysql_user)}:"
                                      f"{quote(values['MYSQL_PASSWORD'], safe='')}"
                                      "@mysql:3306/penguins"}),
        PASSWORDS_FILE: json.dumps({admin: values["AIRFLOW_ADMIN_PASSWORD"]}),
    }
    for filename, text in derived.items():
        _write(folder / filename, text, airflow_uid)
    return created


def write_signing_keys(folder: Path, env: dict[str, str] | os._Environ) -> tuple[bool, str]:
    """Make the model signing key pair unless the private key exists; give both files their
    owners and modes. Return whether it was made now, and the key's fingerprint."""
    try:
        from serving.store import signing
        from serving.store.layout import StoreError
    except ImportError as exc:  # an image built without serving/ (airflow/Dockerfile copies it)
        raise SecretError(f"cannot make the model signing key: {exc} (the Airflow image must "
                          "hold the serving package on its PYTHONPATH)") from None
    private = Path(env.get(signing.PRIVATE_KEY_ENV) or folder / PRIVATE_KEY_FILE)
    public = Path(env.get(signing.PUBLIC_KEY_ENV) or DEFAULT_PUBLIC_KEY)
    try:
        created = signing.ensure_key_pair(private, public)
        key = signing.load_private_key(private).public_key()
        try:
            matches = signing.key_id(signing.load_public_key(public)) == signing.key_id(key)
        except StoreError:
            matches = False
        if not matches:
            # The public key is derived data (e.g. its volume outlived the secrets volume, or
            # was changed): derive it again from the private key, which is never replaced.
            public.unlink(missing_ok=True)
            signing.ensure_key_pair(private, public)
    except StoreError as problem:  # names the file, never its contents
        raise SecretError(f"MODEL_SIGNING_KEY_FILE: {problem}; move it away and a new key "
                          "pair is made (models signed with the old key are then refused)"
                          ) from None
    # Where the pipeline records the last manifest it wrote (serving.store.marks): created
    # here, since the pipeline's user may write files in this folder but not create them.
    written = private.with_name("manifest-marks.json")
    if not written.exists():
        written.write_text("{}\n")
    airflow_uid = int(env.get("AIRFLOW_UID") or 50000)
    if os.geteuid() == 0:
        os.chown(private, airflow_uid, 0)
        os.chown(written, airflow_uid, 0)
        os.chown(public, 0, 0)
    written.chmod(0o600)
    private.chmod(0o600)
    public.chmod(0o644)
    public.parent.chmod(0o755)  # the service reads it as its own user
    return created, signing.key_id(key)


def read(folder: Path, filename: str) -> str:
    return (folder / filename).read_text().strip()


def _check(variable: str, value: str) -> None:
    if PLACEHOLDER.search(value):
        raise SecretError(f"{variable} in .env is a placeholder: give a real value, or remove "
                          "the line and a random one is generated")
    if variable == "AIRFLOW_FERNET_KEY":
        try:
            valid = len(base64.urlsafe_b64decode(value.encode())) == 32
        except ValueError:
            valid = False
        if not valid:
            raise SecretError(f"{variable} is not a Fernet key (32 url-safe base64 bytes); "
                              "remove it and one is generated")
    elif len(value) < 12:
        raise SecretError(f"{variable} is shorter than 12 characters")


def _write(path: Path, text: str, owner: int) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as f:
        f.write(text + "\n")
    if os.geteuid() == 0:
        os.chown(temporary, owner, 0)
    os.replace(temporary, path)


if __name__ == "__main__":
    sys.exit(main())
