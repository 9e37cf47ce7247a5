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
)

from tests.mysql_server import Server, mysql_database  # noqa: E402


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
