"""The ``source_path`` Param through the real DAG (``dag.test()``, real MySQL): what a user who
may trigger a run can read with it, and what the run's log shows of a file it refuses."""

from __future__ import annotations

import pytest

import tests.test_pipeline_airflow as pipeline_tests
from penguins import contract
from penguins.database import count_rows, create_and_empty_tables, load_raw, read_table
from penguins.source import check_source
from penguins.source_location import SOURCE_DIR_VARIABLE

pytestmark = pytest.mark.airflow

# The DAG and the way to run it, as the pipeline's own tests have them.
dag = pipeline_tests.dag
run_dag = pipeline_tests.run_dag

CANARY = "canary-signing-key-5b0e6d1f"


def _states(dag_run) -> dict[str, str]:
    return {ti.task_id: ti.state for ti in dag_run.get_task_instances() if ti.map_index < 0}


def test_a_source_inside_the_folder_is_checked_and_loaded_by_the_dag(run_dag, db, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setenv(SOURCE_DIR_VARIABLE, str(tmp_path))
    text = contract.default_source().read_text().replace("Torgersen", "Torgersen\\", 1)
    (tmp_path / "june.csv").write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())

    dag_run = run_dag(tmp_path / "models", models=["logistic_regression"],
                      source_path="june.csv")

    assert dag_run.state == "success", _states(dag_run)
    raw = read_table(db, contract.RAW_TABLE)
    assert len(raw) == 344
    assert raw.loc[0, "island"] == "Torgersen\\"
    assert raw["sex"].isna().sum() == 11


@pytest.mark.parametrize("inside", [False, True], ids=["outside_the_folder", "inside_it"])
def test_a_secret_file_fails_check_source_and_none_of_it_reaches_the_log(
    run_dag, db, tmp_path, monkeypatch, capfd, inside
):
    create_and_empty_tables(db)
    load_raw(db, check_source(contract.default_source()))
    secrets, sources = tmp_path / "secrets", tmp_path / "sources"
    secrets.mkdir()
    sources.mkdir()
    (secrets / "signing.env").write_text(f"MODEL_SIGNING_KEY={CANARY}\n{CANARY}\n")
    monkeypatch.setenv(SOURCE_DIR_VARIABLE, str(secrets if inside else sources))
    capfd.readouterr()

    dag_run = run_dag(tmp_path / "models", models=["logistic_regression"],
                      source_path=str(secrets / "signing.env"))

    logged = "".join(capfd.readouterr())
    states = _states(dag_run)
    assert (dag_run.state, states["check_source"], states["truncate"]) == (
        "failed", "failed", "upstream_failed")
    refusal = "its first line is not a penguins header" if inside else "outside the source folder"
    assert refusal in logged, "the refusal itself is in the log"
    assert CANARY not in logged
    assert count_rows(db, contract.RAW_TABLE) == 344, "nothing was emptied"
