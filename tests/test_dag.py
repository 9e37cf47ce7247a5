"""DAG integrity: the file imports cleanly and the DAG has the promised shape."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import warnings

import pytest

from tests.conftest import DAGS_FOLDER

DAG_FILE = DAGS_FOLDER / "penguins_pipeline.py"


def test_the_dag_file_imports_without_errors_or_warnings():
    # A fresh interpreter, so nothing imported earlier hides a warning the file would raise.
    code = (
        "import warnings, runpy; warnings.simplefilter('error');"
        f"runpy.run_path({str(DAG_FILE)!r})"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=DAGS_FOLDER)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Warning" not in result.stderr


@pytest.fixture(scope="module")
def dag():
    spec = importlib.util.spec_from_file_location("penguins_pipeline_under_test", DAG_FILE)
    module = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec.loader.exec_module(module)
    return module.penguins_pipeline()


def test_the_dag_runs_the_stages_in_order(dag):
    assert dag.dag_id == "penguins_pipeline"
    assert dag.schedule is None or str(dag.timetable.summary) == "None"
    assert set(dag.task_ids) == {
        "check_source", "truncate", "load_raw", "preprocess", "select_models", "train",
        "promote",
    }
    downstream = {t.task_id: {d.task_id for d in t.downstream_list} for t in dag.tasks}
    assert downstream["check_source"] == {"truncate", "load_raw"}
    assert downstream["truncate"] == {"load_raw"}
    assert downstream["load_raw"] == {"preprocess"}
    assert downstream["preprocess"] == {"train"}
    assert downstream["select_models"] == {"train", "promote"}
    assert downstream["train"] == {"promote"}
    assert dag.get_task("promote").trigger_rule == "all_done"


def test_training_is_mapped_and_named_after_each_model(dag):
    from airflow.sdk.definitions.mappedoperator import MappedOperator

    train = dag.get_task("train")
    assert isinstance(train, MappedOperator)
    assert set(train.op_kwargs_expand_input.value) == {"model_name"}
    assert set(train.partial_kwargs["op_kwargs"]) == {"table"}
    assert train.map_index_template == "{{ model_name }}"


def test_the_dag_has_tags_retries_one_active_run_and_validated_params(dag):
    assert {"penguins", "mlops"} <= set(dag.tags)
    assert dag.max_active_runs == 1
    assert all(t.retries >= 1 for t in dag.tasks)
    params = dag.params
    assert set(params.keys()) == {"models", "test_size", "random_seed", "min_accuracy",
                                  "max_regression", "source_path"}
    assert (params["min_accuracy"], params["max_regression"]) == (0.9, 0.01)
    assert params["models"] == ["logistic_regression", "random_forest", "svm", "knn", "xgboost"]
