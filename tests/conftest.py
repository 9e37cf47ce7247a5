"""Shared fixtures: a real MySQL database, and Airflow on a throwaway SQLite metadata database."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DAGS_FOLDER = REPO / "airflow" / "dags"

# Airflow reads its configuration when it is first imported, so this must come before any test
# module imports it. Its own metadata lives in SQLite here; the penguins data never does.
_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="penguins-airflow-home-"))
os.environ.update(
    AIRFLOW_HOME=str(_AIRFLOW_HOME),
    AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{_AIRFLOW_HOME}/airflow.db",
    AIRFLOW__CORE__DAGS_FOLDER=str(DAGS_FOLDER),
    AIRFLOW__CORE__LOAD_EXAMPLES="False",
    AIRFLOW__CORE__UNIT_TEST_MODE="False",
    # Subprocesses (`airflow dags test`, `python -m serving.store`) import the store's format
    # from the repository root, as the launcher and the Airflow image arrange.
    PYTHONPATH=os.pathsep.join(p for p in [str(REPO), os.environ.get("PYTHONPATH")] if p),
)

# The test setup makes its own model signing key pair, as the launcher and compose do on a
# first start; the pipeline and the service find it through these variables.
os.environ.update(
    MODEL_SIGNING_KEY_FILE=str(_AIRFLOW_HOME / "model-signing" / "private.pem"),
    MODEL_PUBLIC_KEY_FILE=str(_AIRFLOW_HOME / "model-signing" / "public.pem"),
)

from serving.store.signing import ensure_key_pair  # noqa: E402
from tests.mysql_server import Server, mysql_database  # noqa: E402

ensure_key_pair(Path(os.environ["MODEL_SIGNING_KEY_FILE"]),
                Path(os.environ["MODEL_PUBLIC_KEY_FILE"]))


@pytest.fixture(scope="session")
def mysql() -> Server:
    """An empty database of this test session's own, on a real MySQL-compatible server."""
    with mysql_database() as server:
        yield server


@pytest.fixture
def db(mysql: Server):
    """An open connection to the session's database (with LOAD DATA LOCAL allowed).

    Autocommit, so that a test's reads hold no table locks while the DAG truncates the tables.
    """
    conn = mysql.connect(autocommit=True)
    yield conn
    conn.close()


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated Airflow metadata database (SQLite) for ``dag.test()``."""
    subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True,
        env=os.environ,
    )
    return _AIRFLOW_HOME
