"""What the compose services actually receive, checked against what the code reads.

No Docker engine here, so the tests do what compose and the containers would: interpolate
compose.yml's variables as compose does (with no ``.env``: it must need none), run the real
``airflow/init_secrets.py`` into folders that stand for the ``secrets`` and ``model-public-key``
volumes (with ``serving/`` on its path where the Airflow image puts it), map each service's mounts
onto those folders, and then let the real readers read: Airflow's configuration and secrets
backend for the Airflow components, the ``*_FILE`` files for the database images,
``penguins.publishing`` and ``serving.settings`` for where models go, and
``serving.store.signing`` for the key pair the pipeline signs with and the service verifies with.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
from cryptography.fernet import Fernet

from penguins import contract
from serving.store import signing
from tests.test_compose import (
    PUBLIC_KEY_VOLUME,
    ROOT,
    SECRETS_VOLUME,
    airflow_image_serving_package,
    airflow_services,
    services,
)

INIT_SECRETS = ROOT / "airflow" / "init_secrets.py"
_INTERPOLATION = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
                            r"(?:(?P<op>:-|-|:\?|\?|:\+|\+)(?P<arg>[^}]*))?\}")


def interpolate(value: str, variables: dict[str, str]) -> str:
    """``value`` as compose interpolates it from ``variables`` (the shell and ``.env``)."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match["name"], match["op"], match["arg"]
        given = variables.get(name)
        if op in (":?", "?") and (given is None or (op == ":?" and not given)):
            raise KeyError(f"compose refuses to start: {name}: {arg}")
        if op == ":-":
            return given or arg
        if op == "-":
            return arg if given is None else given
        if op in (":+", "+"):
            return arg if (given if op == ":+" else given is not None) else ""
        return given or ""

    return _INTERPOLATION.sub(replace, value)


def received_environment(name: str, variables: dict[str, str] | None = None) -> dict[str, str]:
    """The environment compose gives the service ``name``."""
    env = services()[name].get("environment", {})
    return {key: interpolate(str(value), variables or {}) for key, value in env.items()}


def volume_target(name: str, source: str) -> str:
    """Where the service ``name`` mounts ``source``: a named volume or a host path."""
    for entry in services()[name].get("volumes", []):
        host, target, *_ = entry.split(":")
        if host == source:
            return target
    raise AssertionError(f"{name} does not mount {source}")


def mapped(env: dict[str, str], container_path: str, host_path: Path) -> dict[str, str]:
    """``env`` with the container's mount point of a volume replaced by where it lies here."""
    return {key: value.replace(container_path, str(host_path)) for key, value in env.items()}


def public_volume_of(secrets_folder: Path) -> Path:
    """The folder that stands for the ``model-public-key`` volume beside a ``secrets`` one."""
    return secrets_folder.with_name(f"{secrets_folder.name}-{PUBLIC_KEY_VOLUME}")


def image_pythonpath() -> str:
    """The Airflow image's PYTHONPATH, with its copy of serving/ being this repository's."""
    destination, pythonpath = airflow_image_serving_package()
    here = {str(Path(destination).parent): str(ROOT)}
    return os.pathsep.join(here.get(entry, entry) for entry in pythonpath if entry)


def run_init_secrets(folder: Path, overrides: dict[str, str] | None = None):
    """init-secrets with ``folder`` as its ``secrets`` volume (and ``public_volume_of(folder)``
    as ``model-public-key``), in an environment like the image's."""
    public = public_volume_of(folder)
    public.mkdir(exist_ok=True)  # compose creates a named volume before the container starts
    env = received_environment("init-secrets", overrides)
    env = mapped(env, volume_target("init-secrets", SECRETS_VOLUME), folder)
    env = mapped(env, volume_target("init-secrets", PUBLIC_KEY_VOLUME), public)
    env.update(PATH=os.environ["PATH"], PYTHONPATH=image_pythonpath())
    return subprocess.run([sys.executable, str(INIT_SECRETS)], env=env, capture_output=True,
                          text=True, timeout=60)


@pytest.fixture(scope="module")
def first_start(tmp_path_factory) -> tuple[Path, str]:
    """The ``secrets`` volume after a first ``docker compose up`` with no ``.env``, and what
    init-secrets printed."""
    folder = tmp_path_factory.mktemp("secrets-volume")
    first = run_init_secrets(folder)
    assert first.returncode == 0, first.stderr
    return folder, first.stdout


@pytest.fixture(scope="module")
def secrets_volume(first_start) -> Path:
    return first_start[0]


@pytest.fixture(scope="module")
def public_volume(first_start) -> Path:
    return public_volume_of(first_start[0])


def key_file(name: str, variable: str, volumes: dict[str, Path]) -> Path:
    """The host file behind the service ``name``'s ``variable``, through its named volumes."""
    path = received_environment(name)[variable]
    for volume, host in volumes.items():
        with contextlib.suppress(AssertionError):
            target = volume_target(name, volume)
            if path.startswith(target.rstrip("/") + "/"):
                return host / Path(path).relative_to(target)
    raise AssertionError(f"{name}: {variable}={path} is in none of {sorted(volumes)}")


def volume_files(*folders: Path) -> dict[str, bytes]:
    return {f"{folder.name}/{path.name}": path.read_bytes()
            for folder in folders for path in folder.iterdir() if path.is_file()}


def read_in_airflow(name: str, secrets_volume: Path, tmp_path: Path) -> dict[str, Any]:
    """What the Airflow component ``name`` reads: its secrets, options and the connection."""
    env = mapped(received_environment(name), volume_target(name, "secrets"), secrets_volume)
    env.update(PATH=os.environ["PATH"], AIRFLOW_HOME=str(tmp_path))
    script = f"""
import json
from airflow.configuration import conf
from airflow.models.connection import Connection
c = Connection.get_connection_from_secrets({contract.CONN_ID!r})
print(json.dumps({{
    "fernet_key": conf.get("core", "fernet_key"),
    "sql_alchemy_conn": conf.get("database", "sql_alchemy_conn"),
    "jwt_secret": conf.get("api_auth", "jwt_secret"),
    "api_secret_key": conf.get("api", "secret_key"),
    "passwords_file": conf.get("core", "simple_auth_manager_passwords_file"),
    "users": conf.get("core", "simple_auth_manager_users"),
    "connection": {{"host": c.host, "port": c.port, "schema": c.schema, "login": c.login,
                    "password": c.password}},
}}))
"""
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def database_file(name: str, variable: str, secrets_volume: Path) -> Path:
    """The host file behind the database image's ``*_FILE`` variable."""
    path = received_environment(name)[variable]
    return Path(path.replace(volume_target(name, "secrets"), str(secrets_volume)))


def test_compose_needs_no_env_file() -> None:
    for name in services():
        received_environment(name)  # raises where compose would refuse to start


def test_every_airflow_component_reads_the_generated_secrets(secrets_volume, tmp_path) -> None:
    postgres = database_file("postgres", "POSTGRES_PASSWORD_FILE", secrets_volume)
    mysql = database_file("mysql", "MYSQL_PASSWORD_FILE", secrets_volume)
    mysql_env = received_environment("mysql")
    seen = {}
    for name in ("airflow-scheduler", "airflow-apiserver"):
        seen[name] = read_in_airflow(name, secrets_volume, tmp_path)
    assert seen["airflow-scheduler"] == seen["airflow-apiserver"]
    read = seen["airflow-scheduler"]

    Fernet(read["fernet_key"].encode())  # a valid key, or this raises
    assert len(read["jwt_secret"]) >= 32 and len(read["api_secret_key"]) >= 32
    metadata = urlsplit(read["sql_alchemy_conn"])
    assert metadata.hostname == "postgres" and metadata.username == "airflow"
    assert unquote(metadata.password) == postgres.read_text().strip()

    connection = read["connection"]
    assert (connection["host"], connection["port"]) == ("mysql", 3306)
    assert connection["schema"] == mysql_env["MYSQL_DATABASE"]
    assert connection["login"] == mysql_env["MYSQL_USER"]
    assert connection["password"] == mysql.read_text().strip()

    admin = read["users"].split(":")[0]
    passwords = Path(read["passwords_file"])
    assert json.loads(passwords.read_text()) == {
        admin: (secrets_volume / "airflow_admin_password").read_text().strip()}


def test_no_service_receives_a_secret_in_its_environment(secrets_volume) -> None:
    values = {path.read_text().strip() for path in secrets_volume.iterdir()
              if path.is_file() and not path.name.endswith(".json")}
    for name in services():
        for key, value in received_environment(name).items():
            assert not any(secret in value for secret in values), f"{name}: {key}"


@pytest.mark.parametrize(("name", "variables"), [
    ("postgres", ["POSTGRES_PASSWORD_FILE"]),
    ("mysql", ["MYSQL_ROOT_PASSWORD_FILE", "MYSQL_PASSWORD_FILE"]),
])
def test_the_database_images_can_read_their_password_files(name, variables,
                                                            secrets_volume) -> None:
    for variable in variables:
        path = database_file(name, variable, secrets_volume)
        assert len(path.read_text().strip()) >= 24, variable
        # The official images read these as their own user, uid 999; nobody else may.
        assert path.stat().st_mode & 0o777 == 0o600
        if os.geteuid() == 0:
            assert path.stat().st_uid == 999, variable


def test_airflow_files_belong_to_the_airflow_user_only(secrets_volume) -> None:
    uid = int(received_environment("init-secrets")["AIRFLOW_UID"])
    for filename in ("fernet_key", "sql_alchemy_conn", "connections.json",
                     "simple_auth_manager_passwords.json"):
        stat = (secrets_volume / filename).stat()
        assert stat.st_mode & 0o777 == 0o600, filename
        if os.geteuid() == 0:
            assert stat.st_uid == uid, filename


def test_secrets_are_kept_and_the_password_is_printed_only_on_the_first_start(
        first_start) -> None:
    secrets_volume, first_output = first_start
    public_volume = public_volume_of(secrets_volume)
    before = volume_files(secrets_volume, public_volume)
    assert any(name.endswith(".pem") for name in before), "no key pair was made"
    again = run_init_secrets(secrets_volume)
    assert again.returncode == 0, again.stderr
    after = volume_files(secrets_volume, public_volume)
    assert after == before  # the key pair too: models signed with it must keep verifying
    password = (secrets_volume / "airflow_admin_password").read_text().strip()
    assert password in first_output
    assert password not in again.stdout + again.stderr


def test_a_value_given_in_env_is_used(tmp_path) -> None:
    chosen = "a-password-of-my-own-42"
    secrets = tmp_path / "secrets"
    result = run_init_secrets(secrets, {"AIRFLOW_ADMIN_PASSWORD": chosen, "MYSQL_USER": "me"})
    assert result.returncode == 0, result.stderr
    assert json.loads((secrets / "simple_auth_manager_passwords.json").read_text()) == {
        "admin": chosen}
    assert "//me:" in (secrets / "connections.json").read_text()
    assert chosen not in result.stdout  # the user's own password is not echoed


def test_init_secrets_makes_the_key_pair_with_owners_and_modes(secrets_volume,
                                                               public_volume) -> None:
    uid = int(received_environment("init-secrets")["AIRFLOW_UID"])
    private = key_file("init-secrets", "MODEL_SIGNING_KEY_FILE",
                       {SECRETS_VOLUME: secrets_volume, PUBLIC_KEY_VOLUME: public_volume})
    public = key_file("init-secrets", "MODEL_PUBLIC_KEY_FILE",
                      {SECRETS_VOLUME: secrets_volume, PUBLIC_KEY_VOLUME: public_volume})
    assert private.parent == secrets_volume and public.parent == public_volume
    assert private.stat().st_mode & 0o777 == 0o600
    assert public.stat().st_mode & 0o777 == 0o644
    assert public_volume.stat().st_mode & 0o777 == 0o755
    # Beside it, the marks of the manifests the pipeline wrote, which only it may change.
    marks = private.with_name("manifest-marks.json")
    assert marks.read_text() == "{}\n" and marks.stat().st_mode & 0o777 == 0o600
    if os.geteuid() == 0:
        assert private.stat().st_uid == uid
        assert marks.stat().st_uid == uid
        assert public.stat().st_uid == 0
    # A real pair: the public key is the private key's.
    assert signing.key_id(signing.load_private_key(private).public_key()) == signing.key_id(
        signing.load_public_key(public))
    # Nothing but the public key is in the service's volume.
    assert [path.name for path in public_volume.iterdir()] == [public.name]


def test_only_the_key_fingerprint_is_printed(first_start, public_volume) -> None:
    secrets_volume, output = first_start
    private = key_file("init-secrets", "MODEL_SIGNING_KEY_FILE",
                       {SECRETS_VOLUME: secrets_volume, PUBLIC_KEY_VOLUME: public_volume})
    key = signing.load_private_key(private)
    assert signing.key_id(key.public_key()) in output
    assert "KEY-----" not in output
    pem_body = "".join(private.read_text().splitlines()[1:-1])
    assert pem_body not in output.replace("\n", "")


def test_the_pipeline_signs_what_the_service_verifies(secrets_volume, public_volume) -> None:
    """The files init-secrets made, found through each reader's own mounts and variables."""
    from serving.settings import Settings

    volumes = {SECRETS_VOLUME: secrets_volume, PUBLIC_KEY_VOLUME: public_volume}
    document = {"model": "penguins_rf", "version": "20261202T041500.123456Z", "sha256": "ab"}
    for name in airflow_services():
        key = signing.load_private_key(key_file(name, "MODEL_SIGNING_KEY_FILE", volumes))
        signed = signing.sign(document, key)
        serving_env = mapped(received_environment("serving"),
                             volume_target("serving", PUBLIC_KEY_VOLUME), public_volume)
        public = signing.load_public_key(Settings.from_env(serving_env).public_key_file)
        signing.verify(signed, public, "the manifest")  # raises unless it verifies
        with pytest.raises(signing.SignatureError):
            signing.verify({**signed, "sha256": "cd"}, public, "the manifest")
    # The CLI in an Airflow container verifies with the same public key.
    cli = signing.load_public_key(key_file("airflow-scheduler", "MODEL_PUBLIC_KEY_FILE", volumes))
    assert signing.key_id(cli) == signing.key_id(public)


def test_a_missing_or_stale_public_key_is_derived_again(tmp_path) -> None:
    secrets = tmp_path / "secrets"
    assert run_init_secrets(secrets).returncode == 0
    private = secrets / "model_signing_key.pem"
    public = next(public_volume_of(secrets).iterdir())
    kept_private, kept_public = private.read_bytes(), public.read_bytes()

    public.unlink()  # e.g. the model-public-key volume was removed on its own
    result = run_init_secrets(secrets)
    assert result.returncode == 0, result.stderr
    assert (private.read_bytes(), public.read_bytes()) == (kept_private, kept_public)

    # Another pair's public key (a volume that outlived its secrets volume) is replaced.
    other = tmp_path / "other"
    signing.ensure_key_pair(other / "private.pem", other / "public.pem")
    public.chmod(0o644)
    public.write_bytes((other / "public.pem").read_bytes())
    result = run_init_secrets(secrets)
    assert result.returncode == 0, result.stderr
    assert (private.read_bytes(), public.read_bytes()) == (kept_private, kept_public)
    assert public.stat().st_mode & 0o777 == 0o644


def test_a_kept_key_pair_gets_its_modes_back(tmp_path) -> None:
    secrets = tmp_path / "secrets"
    assert run_init_secrets(secrets).returncode == 0
    private = secrets / "model_signing_key.pem"
    public = next(public_volume_of(secrets).iterdir())
    kept = private.read_bytes()
    private.chmod(0o644)  # e.g. restored from a backup, or copied in by hand
    public.chmod(0o600)
    result = run_init_secrets(secrets)
    assert result.returncode == 0, result.stderr
    assert private.read_bytes() == kept
    assert (private.stat().st_mode & 0o777, public.stat().st_mode & 0o777) == (0o600, 0o644)


def test_an_unreadable_private_key_is_refused_not_replaced(tmp_path) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    broken = "not a key, but maybe someone's only copy of one"
    (secrets / "model_signing_key.pem").write_text(broken)
    result = run_init_secrets(secrets)
    assert result.returncode == 1
    assert "MODEL_SIGNING_KEY_FILE" in result.stderr and broken not in result.stderr
    assert (secrets / "model_signing_key.pem").read_text() == broken
    assert list(public_volume_of(secrets).iterdir()) == []


@pytest.mark.parametrize(("variable", "value"), [
    ("MYSQL_PASSWORD", "change-me"),
    ("POSTGRES_PASSWORD", "CHANGE_ME"),
    ("AIRFLOW_ADMIN_PASSWORD", "<your password>"),
    ("AIRFLOW_FERNET_KEY", "not-a-fernet-key-at-all"),
    ("AIRFLOW_JWT_SECRET", "short"),
])
def test_a_placeholder_or_unusable_value_is_refused_by_name(variable, value, tmp_path) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    result = run_init_secrets(secrets, {variable: value})
    assert result.returncode == 1
    assert variable in result.stderr
    assert list(secrets.iterdir()) == [], "nothing may be written when a value is refused"
    assert list(public_volume_of(secrets).iterdir()) == [], "nor a key pair"


def test_both_halves_agree_on_where_models_are(monkeypatch) -> None:
    from penguins.publishing import models_dir
    from serving.settings import Settings

    serving = Settings.from_env(received_environment("serving"))
    assert str(serving.models_dir) == volume_target("serving", "./shared_models")
    for name in airflow_services():
        env = received_environment(name)
        monkeypatch.setenv("MODELS_DIR", env["MODELS_DIR"])
        assert str(models_dir()) == volume_target(name, "./shared_models"), name


@pytest.mark.parametrize("variables", [{}, {"MODEL_HISTORY": "12"}])
def test_both_halves_keep_as_many_versions(variables, monkeypatch) -> None:
    from serving.settings import Settings
    from serving.store.writer import history_limit

    serving = Settings.from_env(received_environment("serving", variables))
    assert serving.model_history == int(variables.get("MODEL_HISTORY", 5))
    for name in airflow_services():
        monkeypatch.setenv("MODEL_HISTORY", received_environment(name, variables)["MODEL_HISTORY"])
        assert history_limit() == serving.model_history, name

