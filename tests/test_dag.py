"""DAG integrity: the file imports cleanly and the DAG has the promised shape."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import warnings

import pytest

from penguins import contract
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
        "promote", "check_training",
    }
    downstream = {t.task_id: {d.task_id for d in t.downstream_list} for t in dag.tasks}
    assert downstream["check_source"] == {"truncate", "load_raw"}
    # truncate hands both table names on: the raw one to load_raw, the clean one to preprocess.
    assert downstream["truncate"] == {"load_raw", "preprocess"}
    assert downstream["load_raw"] == {"preprocess"}
    assert downstream["preprocess"] == {"train"}
    assert downstream["select_models"] == {"train", "promote"}
    assert downstream["train"] == {"promote"}
    assert downstream["promote"] == {"check_training"}
    assert dag.get_task("promote").trigger_rule == "all_done"


def test_the_source_the_tables_and_the_models_are_assets(dag):
    from airflow.sdk import Asset

    source = Asset(name="penguins_source_csv", uri="x-penguins://source/csv")
    raw = Asset(name="penguins_raw", uri="x-penguins://mysql/penguins_raw")
    clean = Asset(name="penguins_clean", uri="x-penguins://mysql/penguins_clean")
    models = [Asset(name=f"penguins_model_{name}", uri=f"x-penguins://models/{name}")
              for name in contract.MODEL_NAMES]
    lineage = {t.task_id: (t.inlets, t.outlets) for t in dag.tasks}
    assert lineage == {
        "check_source": ([], []),
        "truncate": ([], []),
        "load_raw": ([source], [raw]),
        "preprocess": ([raw], [clean]),
        "select_models": ([], []),
        # No outlets on the mapped copies: every copy would emit an event for each of them.
        "train": ([clean], []),
        "promote": ([clean], models),
        "check_training": ([], []),
    }


def test_the_table_names_are_given_once_in_the_wiring(dag):
    """The DAG names the tables once, as truncate's arguments; what each task then does with
    the names it receives is run in ``test_pipeline_airflow``."""
    assert dag.get_task("truncate").op_kwargs == {"raw_table": contract.RAW_TABLE,
                                                  "clean_table": contract.CLEAN_TABLE}


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
    assert set(params.keys()) == {"models", "test_size", "random_seed", "max_fit_rows",
                                  "min_accuracy", "max_regression", "source_path"}
    assert params["max_fit_rows"] == contract.DEFAULT_MAX_FIT_ROWS == 20_000
    assert (params["min_accuracy"], params["max_regression"]) == (0.9, 0.01)
    assert params["models"] == ["logistic_regression", "random_forest", "svm", "knn", "xgboost"]


def test_the_models_param_is_a_multi_select_of_the_five_names(dag):
    schema = dag.params.get_param("models").schema
    names = list(contract.MODEL_NAMES)
    # The trigger form draws a multi-select from examples; enum refuses anything else.
    assert schema["type"] == "array"
    assert schema["examples"] == names
    assert schema["items"] == {"type": "string", "enum": names}
    assert (schema["minItems"], schema["uniqueItems"]) == (1, True)
    assert dag.params["models"] == names


def test_every_param_has_a_title_and_a_description(dag):
    for key in dag.params:
        param = dag.params.get_param(key)
        assert param.schema.get("title"), key
        assert param.description, key


def test_every_task_has_a_doc(dag):
    for task in dag.tasks:
        assert task.doc_md and task.doc_md.strip(), task.task_id
        assert task.doc_md == task.python_callable.__doc__, task.task_id
