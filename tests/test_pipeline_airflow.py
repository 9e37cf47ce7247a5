"""The real DAG, run through Airflow's ``dag.test()`` against a real MySQL server."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from penguins import contract
from penguins.database import count_rows, read_table
from serving.store import signing
from serving.store.reader import Trust, read_manifest, read_metadata, version_ids
from tests.data import packaged_rows, write_csv
from tests.tcp_proxy import tcp_proxy

pytestmark = pytest.mark.airflow

DEFAULT_CONF = {"models": list(contract.MODEL_NAMES), "test_size": 0.25, "random_seed": 42,
                "min_accuracy": 0.9, "max_regression": 0.01, "source_path": None}


@pytest.fixture(scope="module")
def dag():
    from airflow.dag_processing.dagbag import DagBag

    from tests.conftest import DAGS_FOLDER

    bag = DagBag(dag_folder=str(DAGS_FOLDER))
    assert bag.import_errors == {}
    return bag.get_dag("penguins_pipeline")


@pytest.fixture
def run_dag(dag, mysql, airflow_db, monkeypatch, tmp_path):
    """Run the DAG once with a run conf into a models folder; return the finished DagRun."""
    # The tests write their source CSVs into tmp_path: it is their source folder.
    monkeypatch.setenv("PENGUINS_SOURCE_DIR", str(tmp_path))

    def run(models_dir: Path, conn_url: str = mysql.url, **conf):
        monkeypatch.setenv("AIRFLOW_CONN_MYSQL_AIRFLOW_CONN", conn_url)
        monkeypatch.setenv("MODELS_DIR", str(models_dir))
        # Every Param, every time: dag.test() runs tasks in this process on the one DAG object,
        # and a run's conf stays in its params for the next run.
        return dag.test(run_conf=DEFAULT_CONF | conf)

    return run


def _task_states(dag_run) -> dict[str, list[str]]:
    states: dict[str, list[str]] = {}
    for ti in dag_run.get_task_instances():
        states.setdefault(ti.task_id, []).append(ti.state)
    return states


def _trust() -> Trust:
    return Trust(signing.load_public_key(signing.public_key_file()))


def _manifest(models_dir: Path):
    return read_manifest(models_dir, _trust())


def _promoted(models_dir: Path) -> dict[str, dict]:
    """The signed metadata of each model's promoted version, verified as the service does."""
    return {name: read_metadata(models_dir, name, entry.promoted, _trust()).metadata
            for name, entry in _manifest(models_dir).models.items() if entry.promoted}


def _asset_events(dag_run) -> dict[str, list[tuple[str, dict]]]:
    """The asset events the run recorded in Airflow's metadata database: per asset's name, the
    task that emitted each and its extra."""
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session
    from sqlalchemy import select

    events: dict[str, list[tuple[str, dict]]] = {}
    with create_session() as session:
        for event in session.scalars(
            select(AssetEvent)
            .where(AssetEvent.source_dag_id == dag_run.dag_id,
                   AssetEvent.source_run_id == dag_run.run_id)
            .order_by(AssetEvent.id)
        ):
            events.setdefault(event.name, []).append((event.source_task_id, event.extra))
    return events


def _model_events(dag_run) -> dict[str, dict]:
    """Each model's one asset event in the run, by model name: its extra."""
    events = _asset_events(dag_run)
    found = {}
    for name in contract.MODEL_NAMES:
        ((task_id, extra),) = events[f"penguins_model_{name}"]
        assert task_id == "promote"
        found[name] = extra
    return found


def _result(dag_run, task_id: str, key: str = "return_value"):
    ti = next(ti for ti in dag_run.get_task_instances() if ti.task_id == task_id)
    return ti.xcom_pull(task_ids=task_id, key=key)


def test_full_run_loads_cleans_and_trains_every_model(run_dag, db, tmp_path):
    dag_run = run_dag(tmp_path)

    assert dag_run.state == "success", _task_states(dag_run)
    assert count_rows(db, contract.RAW_TABLE) == 344
    raw = read_table(db, contract.RAW_TABLE)
    assert raw["bill_length_mm"].isna().sum() == 2
    assert raw["sex"].isna().sum() == 11
    with db.cursor() as cursor:
        cursor.execute(
            f"SELECT COUNT(*) FROM {contract.RAW_TABLE} WHERE sex IN ('NA', 'nan', '<NA>', '')"
        )
        assert cursor.fetchone() == (0,)
    assert count_rows(db, contract.CLEAN_TABLE) == 333

    metadata = _promoted(tmp_path)
    assert sorted(metadata) == sorted(contract.MODEL_NAMES)
    for name, meta in metadata.items():
        assert meta["metrics"]["accuracy"] >= 0.95, name
        assert meta["dag_run_id"] == dag_run.run_id
        assert meta["rows"]["total"] == 333
        assert meta["gate"]["promote"] and meta["gate"]["baseline_version"] is None
        assert version_ids(tmp_path, name) == [meta["version"]]
    manifest = _manifest(tmp_path)
    assert manifest.best_model in contract.MODEL_NAMES
    assert _result(dag_run, "promote")["held_back"] == {}
    assert not [p for p in tmp_path.rglob(".*") if p.name != ".store.lock"], \
        "temporary files were left behind"

    # The lineage, as asset events: the tables each got one from the task that wrote them
    # (the source CSV is only read: an inlet has none), each model one from promote.
    events = _asset_events(dag_run)
    assert sorted(events) == sorted(["penguins_raw", "penguins_clean",
                                     *(f"penguins_model_{n}" for n in contract.MODEL_NAMES)])
    source = contract.default_source()
    (raw_event,) = events["penguins_raw"]
    assert raw_event == ("load_raw", {"table": contract.RAW_TABLE, "rows": 344,
                                      "source": str(source),
                                      "sha256": hashlib.sha256(source.read_bytes()).hexdigest()})
    ((task_id, clean_extra),) = events["penguins_clean"]
    assert task_id == "preprocess"
    assert clean_extra == {"table": contract.CLEAN_TABLE, "rows": 333,
                           "from_table": contract.RAW_TABLE,
                           "report": _result(dag_run, "preprocess", "cleaning_report")}
    assert _model_events(dag_run) == {
        name: {"model": name, "version": meta["version"], "promoted": True,
               "served_version": meta["version"], "metrics": meta["metrics"],
               "store": str(tmp_path)}
        for name, meta in metadata.items()
    }

    second = run_dag(tmp_path)
    assert second.state == "success"
    assert count_rows(db, contract.RAW_TABLE) == 344
    assert count_rows(db, contract.CLEAN_TABLE) == 333
    rerun = _promoted(tmp_path)
    assert {n: m["metrics"] for n, m in rerun.items()} == {
        n: m["metrics"] for n, m in metadata.items()
    }
    # The same data and seed: no regression against the first run's versions, on the same rows.
    for name, meta in rerun.items():
        assert meta["dag_run_id"] == second.run_id
        assert meta["gate"]["baseline_version"] == metadata[name]["version"]
        assert meta["gate"]["baseline_accuracy"] == meta["metrics"]["accuracy"]
        assert _manifest(tmp_path).models[name].history == (metadata[name]["version"],)
    assert _manifest(tmp_path).sequence > manifest.sequence
    assert {n: (e["version"], e["promoted"]) for n, e in _model_events(second).items()} == {
        n: (m["version"], True) for n, m in rerun.items()
    }


def test_a_run_on_corrupted_labels_succeeds_and_holds_its_versions_back(run_dag, tmp_path):
    """The served versions stay; the run says why in its log, its XCom and the manifest; the
    next good run promotes."""
    assert run_dag(tmp_path / "models", models=["logistic_regression"]).state == "success"
    good = _manifest(tmp_path / "models").models["logistic_regression"].promoted
    rows = packaged_rows()
    rows["species"] = rows["species"].sample(frac=1, random_state=0).to_numpy()
    source = write_csv(tmp_path / "shuffled.csv", rows)

    dag_run = run_dag(tmp_path / "models", models=["logistic_regression"],
                      source_path=str(source))

    assert dag_run.state == "success", _task_states(dag_run)
    held = _result(dag_run, "promote")["held_back"]
    assert "is below min_accuracy 0.9" in held["logistic_regression"]
    assert _result(dag_run, "promote", "held_back") == held
    entry = _manifest(tmp_path / "models").models["logistic_regression"]
    assert entry.promoted == good
    (candidate,) = entry.held_back
    assert entry.held_back[candidate] == held["logistic_regression"]

    events = _model_events(dag_run)
    assert events.pop("logistic_regression") == {
        "model": "logistic_regression", "version": candidate, "promoted": False,
        "held_back": held["logistic_regression"], "served_version": good,
        "metrics": read_metadata(tmp_path / "models", "logistic_regression", candidate,
                                 _trust()).metadata["metrics"],
        "store": str(tmp_path / "models"),
    }
    # promote's other outlets get an event too when it succeeds: each says why it holds nothing.
    assert events == {
        name: {"model": name, "version": None, "promoted": False, "served_version": None,
               "not_trained": "not among the models chosen for this run"}
        for name in contract.MODEL_NAMES if name != "logistic_regression"
    }

    assert run_dag(tmp_path / "models", models=["logistic_regression"]).state == "success"
    assert _manifest(tmp_path / "models").models["logistic_regression"].promoted not in (
        good, candidate)


def test_params_from_the_cli_choose_which_models_train(mysql, airflow_db, tmp_path):
    conf = {"models": ["knn", "xgboost"], "test_size": 0.3, "random_seed": 7}
    env = os.environ | {"AIRFLOW_CONN_MYSQL_AIRFLOW_CONN": mysql.url, "MODELS_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "airflow", "dags", "test", "penguins_pipeline", "-c",
         json.dumps(conf)],
        env=env, capture_output=True, text=True, timeout=300,
    )

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    meta = _promoted(tmp_path)["knn"]
    assert (meta["test_size"], meta["random_seed"]) == (0.3, 7)
    assert sorted(_manifest(tmp_path).models) == ["knn", "xgboost"]


@pytest.mark.parametrize(
    ("conf", "param"),
    [
        ({"models": ["knn", "gradient_magic"]}, "models"),
        ({"models": ["xgbost"]}, "models"),
        ({"models": []}, "models"),
        ({"test_size": 0.9}, "test_size"),
        ({"random_seed": "seven"}, "random_seed"),
    ],
)
def test_an_invalid_param_fails_the_run_at_once_naming_it(run_dag, tmp_path, conf, param):
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError, match=f"Invalid input for param {param}:") as error:
        run_dag(tmp_path, **conf)
    assert list(tmp_path.iterdir()) == []
    for value in conf[param] if isinstance(conf[param], list) else [conf[param]]:
        if value not in contract.MODEL_NAMES:
            assert repr(value) in str(error.value)


def test_bad_source_fails_the_run_and_leaves_models_untouched(run_dag, db, tmp_path):
    assert run_dag(tmp_path, models=["logistic_regression"]).state == "success"
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    bad = tmp_path / "bad.csv"
    bad.write_text("species,island,bill_length_mm\nAdelie,Dream,abc\n")

    dag_run = run_dag(tmp_path, models=["logistic_regression"], source_path=str(bad))

    assert dag_run.state == "failed"
    states = _task_states(dag_run)
    assert states["check_source"] == ["failed"]
    assert states["truncate"] == ["upstream_failed"]
    assert states["train"] == ["upstream_failed"]
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p != bad}
    assert after == before
    # Nothing was emptied: the previous run's rows are still there.
    assert count_rows(db, contract.RAW_TABLE) == 344


def test_wrong_credentials_fail_the_run_at_once_and_publish_nothing(run_dag, mysql, tmp_path):
    wrong = mysql.url.replace(f"{mysql.user}:{mysql.password}@", "penguins_nobody:wrong@")

    dag_run = run_dag(tmp_path, conn_url=wrong)

    assert dag_run.state == "failed"
    truncate = next(ti for ti in dag_run.get_task_instances() if ti.task_id == "truncate")
    assert truncate.state == "failed"
    assert truncate.try_number == 1, "a refused login is not retried"
    assert list(tmp_path.iterdir()) == []


def test_a_model_that_cannot_fit_fails_alone_and_the_run_says_why(run_dag, tmp_path):
    # Two penguins per species: with half held out, k-NN has 3 training rows for its 5
    # neighbours and cannot predict, while logistic regression fits.
    rows = packaged_rows().dropna()
    rows = rows[~rows.eq("NA").any(axis=1)].groupby("species").head(2)
    source = write_csv(tmp_path / "six_penguins.csv", rows)
    models_dir = tmp_path / "models"

    dag_run = run_dag(models_dir, models=["logistic_regression", "knn"], test_size=0.5,
                      source_path=str(source))

    assert dag_run.state == "failed"
    states = {ti.rendered_map_index: ti.state for ti in dag_run.get_task_instances()
              if ti.task_id == "train"}
    assert states == {"logistic_regression": "success", "knn": "failed"}
    # promote publishes what trained; the run fails after it, in check_training.
    assert _task_states(dag_run)["promote"] == ["success"]
    assert _task_states(dag_run)["check_training"] == ["failed"]
    # The model that trained went through the gate; the one that failed has no version at all.
    assert list(_manifest(models_dir).models) == ["logistic_regression"]
    assert version_ids(models_dir, "knn") == []
    promote = next(ti for ti in dag_run.get_task_instances() if ti.task_id == "promote")
    error = promote.xcom_pull(task_ids="train", key="error", map_indexes=1)
    assert "n_neighbors" in error
    assert _result(dag_run, "promote")["failed"] == {"knn": error}
    events = _model_events(dag_run)
    assert events["logistic_regression"]["version"] == (
        _manifest(models_dir).models["logistic_regression"].promoted)
    assert events["knn"]["version"] is None
    assert events["knn"]["not_trained"] == f"failed to train: {error}"


def test_every_task_uses_the_table_names_it_receives(dag, run_dag, db, monkeypatch,
                                                     tmp_path):
    """Given other names where the DAG first names the tables, the whole run works on those:
    nothing in the tasks falls back on the default names."""
    raw_table, clean_table = "scratch_raw", "scratch_clean"
    with db.cursor() as cursor:
        cursor.execute(f"DROP TABLE IF EXISTS {contract.RAW_TABLE}, {contract.CLEAN_TABLE}, "
                       f"{raw_table}, {clean_table}")
    monkeypatch.setattr(dag.get_task("truncate"), "op_kwargs",
                        {"raw_table": raw_table, "clean_table": clean_table})

    dag_run = run_dag(tmp_path, models=["knn"])

    assert dag_run.state == "success", _task_states(dag_run)
    assert count_rows(db, raw_table) == 344
    assert count_rows(db, clean_table) == 333
    with db.cursor() as cursor:
        cursor.execute("SHOW TABLES")
        tables = {name for (name,) in cursor.fetchall()}
    assert {contract.RAW_TABLE, contract.CLEAN_TABLE}.isdisjoint(tables)
    events = _asset_events(dag_run)
    assert [extra["table"] for _, extra in events["penguins_raw"]] == [raw_table]
    assert [extra["table"] for _, extra in events["penguins_clean"]] == [clean_table]
    assert _promoted(tmp_path)["knn"]["rows"]["total"] == 333


def test_dirty_rows_are_loaded_as_shipped_then_dropped_by_preprocess(run_dag, db, tmp_path):
    rows = packaged_rows()
    rows.loc[0, "body_mass_g"] = "heavy"  # not a number
    rows.loc[1, "island"] = " torgersen "  # stray space and case: kept, normalised
    rows.loc[2, "flipper_length_mm"] = "-181"  # absurd
    rows.loc[4, "island"] = "Atlantis"  # unknown
    rows = pd.concat([rows, rows.iloc[[5]]])  # a duplicate
    source = write_csv(tmp_path / "dirty.csv", rows)

    dag_run = run_dag(tmp_path / "models", models=["logistic_regression"],
                      source_path=str(source))

    assert dag_run.state == "success", _task_states(dag_run)
    raw = read_table(db, contract.RAW_TABLE)
    assert len(raw) == 345
    assert raw.loc[0, "body_mass_g"] == "heavy"
    assert raw.loc[1, "island"] == " torgersen "
    clean = read_table(db, contract.CLEAN_TABLE)
    # 11 rows miss a value; 4 dirty rows and the duplicate go too.
    assert len(clean) == 345 - 11 - 4
    assert set(clean["source_row"]) & {1, 3, 5, 345} == set()
    assert clean.loc[clean["source_row"] == 2, "island"].item() == "Torgersen"


def test_a_mysql_that_drops_the_first_connection_is_retried_and_the_run_completes(
    run_dag, mysql, tmp_path
):
    # As a server that is restarting: the first connection is cut before its greeting.
    with tcp_proxy((mysql.host, mysql.port), drop_first=1) as port:
        url = mysql.url.replace(f"@{mysql.host}:{mysql.port}/", f"@127.0.0.1:{port}/")
        dag_run = run_dag(tmp_path, conn_url=url, models=["logistic_regression"])

    assert dag_run.state == "success", _task_states(dag_run)
    truncate = next(ti for ti in dag_run.get_task_instances() if ti.task_id == "truncate")
    assert truncate.try_number == 2, "the first try met the dropped connection and was retried"
    assert "logistic_regression" in _promoted(tmp_path)
