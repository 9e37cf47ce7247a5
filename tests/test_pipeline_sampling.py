"""The DAG's ``max_fit_rows`` Param, run through Airflow's ``dag.test()`` on a real MySQL server:
the costlier models fit a sample of that size, and each version's metadata says so."""

from __future__ import annotations

import pytest

from penguins import contract
from serving.store import signing
from serving.store.reader import Trust, read_manifest, read_metadata

pytestmark = pytest.mark.airflow


@pytest.fixture(scope="module")
def dag():
    from airflow.dag_processing.dagbag import DagBag

    from tests.conftest import DAGS_FOLDER

    bag = DagBag(dag_folder=str(DAGS_FOLDER))
    assert bag.import_errors == {}
    return bag.get_dag("penguins_pipeline")


def _conf(**changes) -> dict:
    # Every Param, every time: a run's conf stays in the DAG's params for the next run.
    return {"models": ["logistic_regression", "svm"], "test_size": 0.25, "random_seed": 42,
            "max_fit_rows": contract.DEFAULT_MAX_FIT_ROWS, "min_accuracy": 0.9,
            "max_regression": 0.01, "source_path": None} | changes


def test_the_costlier_models_fit_the_rows_the_param_allows_and_record_it(
        dag, mysql, airflow_db, monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFLOW_CONN_MYSQL_AIRFLOW_CONN", mysql.url)
    monkeypatch.setenv("MODELS_DIR", str(tmp_path))

    dag_run = dag.test(run_conf=_conf(max_fit_rows=120))

    assert dag_run.state == "success"
    trust = Trust(signing.load_public_key(signing.public_key_file()))
    metadata = {name: read_metadata(tmp_path, name, entry.promoted, trust).metadata
                for name, entry in read_manifest(tmp_path, trust).models.items()}
    assert {name: meta["rows"] for name, meta in metadata.items()} == {
        "logistic_regression": {"train": 249, "fit": 249, "test": 84, "total": 333},
        "svm": {"train": 249, "fit": 120, "test": 84, "total": 333},
    }
    assert {meta["max_fit_rows"] for meta in metadata.values()} == {120}
    assert all(meta["metrics"]["accuracy"] >= 0.95 for meta in metadata.values())


def test_a_sample_too_small_to_learn_from_is_refused_naming_the_param(
        dag, mysql, airflow_db, monkeypatch, tmp_path):
    from airflow.sdk.exceptions import ParamValidationError

    monkeypatch.setenv("AIRFLOW_CONN_MYSQL_AIRFLOW_CONN", mysql.url)
    monkeypatch.setenv("MODELS_DIR", str(tmp_path))
    with pytest.raises(ParamValidationError, match="Invalid input for param max_fit_rows: 99"):
        dag.test(run_conf=_conf(max_fit_rows=99))
    assert list(tmp_path.iterdir()) == []
