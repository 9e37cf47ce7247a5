"""
### Penguins pipeline

Loads the Palmer penguins data into MySQL and trains several species classifiers in parallel.

1. **check_source** reads the source CSV through once and refuses a bad one, before anything
   in the database is emptied.
2. **truncate** creates `penguins_raw` and `penguins_clean` if they are missing and empties them.
3. **load_raw** bulk-loads the CSV into `penguins_raw` exactly as it ships (`NA` becomes NULL).
4. **preprocess** cleans `penguins_raw` into `penguins_clean`, a chunk of rows at a time.
5. **train** runs once per chosen model, in parallel: it trains and scores the model, scores
   the promoted version of it on the same held-out rows, and exports a new signed version into
   the model store (`MODELS_DIR/<model>/<version>/`) with the promotion gate's decision.
6. **promote** writes one signed `manifest.json`: the versions that passed the gate are
   promoted (the prediction service switches to them by itself), the others held back as
   candidates, with why. A run whose candidates were held back succeeds, and says so.
7. **check_training** fails the run if a model failed to train.

The tables and the models are Airflow Assets: the source CSV is an inlet of `load_raw`, each
table an outlet of the task that writes it, and each model (`penguins_model_<name>`) an outlet
of `promote`, whose asset event says which version it published, its metrics and whether it
was promoted or held back, and why. Only table names, version ids and small dicts travel
between tasks. Trigger it from the UI; the form's Params choose the models, the test size, the
seed, how many rows the costlier models are fitted on, the gate's thresholds and, optionally,
another CSV.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Asset, Param, TriggerRule, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from penguins import contract
from penguins.gate import DEFAULT_MAX_REGRESSION, DEFAULT_MIN_ACCURACY

# The Assets name what the pipeline reads and writes the same way wherever it runs (compose,
# the launcher, the tests): where each run's data really is goes into its asset events' extra.
# "x-" marks a scheme of our own, which Airflow leaves as it is.
SOURCE_ASSET = Asset(name="penguins_source_csv", uri="x-penguins://source/csv")
"""The run's source CSV (the ``source_path`` Param, or the packaged palmerpenguins CSV)."""


def _table_asset(table: str) -> Asset:
    return Asset(name=table, uri=f"x-penguins://mysql/{table}")


# The table names are given here, once: the tasks pass them on through XCom.
RAW_TABLE_ASSET = _table_asset(contract.RAW_TABLE)
CLEAN_TABLE_ASSET = _table_asset(contract.CLEAN_TABLE)
MODEL_ASSETS = {
    name: Asset(name=f"penguins_model_{name}", uri=f"x-penguins://models/{name}")
    for name in contract.MODEL_NAMES
}
"""One Asset per model, whose events are the versions the runs published."""

_PARAMS = {
    "models": Param(
        list(contract.MODEL_NAMES),
        type="array",
        # examples makes the trigger form a multi-select; enum refuses any other name.
        examples=list(contract.MODEL_NAMES),
        items={"type": "string", "enum": list(contract.MODEL_NAMES)},
        minItems=1,
        uniqueItems=True,
        title="Models",
        description="Which models to train; each one trained is published as a new version.",
    ),
    "test_size": Param(
        0.25, type="number", minimum=0.1, maximum=0.5, title="Test size",
        description="Share of the clean rows held out to score each model.",
    ),
    "random_seed": Param(
        42, type="integer", minimum=0, title="Random seed",
        description="Seeds the split and the models: the same seed gives the same metrics.",
    ),
    "max_fit_rows": Param(
        contract.DEFAULT_MAX_FIT_ROWS, type="integer", minimum=100,
        title="Rows fitted (SVM, k-NN, forest)",
        description="The SVM, k-NN and random forest are fitted on a stratified sample of at "
                    "most this many training rows (their cost or size grows faster than the "
                    "rows); the others on all of them. Each version's metadata records the rows "
                    "it was fitted on.",
    ),
    "min_accuracy": Param(
        DEFAULT_MIN_ACCURACY, type="number", minimum=0, maximum=1, title="Minimum accuracy",
        description="The promotion gate: a new version is promoted only if its held-out "
                    "accuracy is at least this.",
    ),
    "max_regression": Param(
        DEFAULT_MAX_REGRESSION, type="number", minimum=0, maximum=1, title="Maximum regression",
        description="The promotion gate: and only if its accuracy is at most this much below "
                    "the promoted version's, scored on the same held-out rows.",
    ),
    "source_path": Param(
        None, type=["null", "string"], title="Source CSV",
        description="A CSV with the palmerpenguins columns, inside the source folder "
                    "(PENGUINS_SOURCE_DIR; default airflow/data/ in the repository): a path "
                    "relative to it, or absolute. Empty: the packaged data.",
    ),
}


def _train_and_export(table: str, model_name: str, context) -> dict:
    from penguins.database import read_training_rows
    from penguins.publishing import export, gate, models_dir, score_promoted
    from penguins.training import train

    params = context["params"]
    key = _signing_key()
    with _mysql_connection() as conn:
        frame = read_training_rows(conn, table)
    trained = train(frame, model_name, params["test_size"], params["random_seed"],
                    params["max_fit_rows"])
    baseline = score_promoted(models_dir(), trained, key)
    decision = gate(trained, baseline, min_accuracy=params["min_accuracy"],
                    max_regression=params["max_regression"])
    metadata = export(
        trained, models_dir(), decision=decision, run_id=context["run_id"],
        source=params["source_path"] or str(contract.default_source()),
        test_size=params["test_size"], seed=params["random_seed"], key=key,
    )
    verdict = "passes the gate" if decision.promote else "HELD BACK by the gate"
    print(f"{model_name}: {trained.metrics}; exported version {metadata['version']} to "
          f"{models_dir()}; {verdict}: {decision.reason}")
    return {"model_name": model_name, "version": metadata["version"],
            "metrics": trained.metrics, "gate": decision.as_json()}


def _model_event(name: str, results: list[dict], held: dict[str, str], failures: dict[str, str],
                 *, served: str | None, store: str) -> dict:
    """What a run did with one model, as its asset event's extra; ``served`` is the version
    promoted after the run."""
    event = {"model": name, "version": None, "promoted": False, "served_version": served}
    result = next((r for r in results if r["model_name"] == name), None)
    if result is None:
        event["not_trained"] = (f"failed to train: {failures[name]}" if name in failures
                                else "not among the models chosen for this run")
        return event
    event |= {"version": result["version"], "promoted": name not in held,
              "metrics": result["metrics"], "store": store}
    if name in held:
        event["held_back"] = held[name]
    return event


def _signing_key():
    from penguins.publishing import signing_key
    from serving.store.layout import StoreError

    try:
        return signing_key()
    except StoreError as exc:
        raise AirflowFailException(str(exc)) from exc  # a missing key will not appear by retrying


def _mysql_connection():
    from airflow.providers.mysql.hooks.mysql import MySqlHook

    from penguins.database import ConnectionProblem, open_connection

    # local_infile is a constructor argument: the hook does not read it from the connection.
    hook = MySqlHook(mysql_conn_id=contract.CONN_ID, local_infile=True)
    connection = hook.get_connection(contract.CONN_ID)
    try:
        return open_connection(hook.get_conn, contract.CONN_ID,
                               f"{connection.host}:{connection.port or 3306}")
    except ConnectionProblem as problem:
        if problem.retryable:
            raise  # the task's retries, with back-off, give the server time to come back
        raise AirflowFailException(str(problem)) from problem


@dag(
    dag_id="penguins_pipeline",
    schedule=None,
    start_date=datetime(2024, 1, 1),
    catchup=False,
    max_active_runs=1,  # two runs must not interleave their truncate and load
    params=_PARAMS,
    tags=["penguins", "mlops"],
    default_args={"retries": 2, "retry_delay": timedelta(seconds=10),
                  "retry_exponential_backoff": True},
    doc_md=__doc__,
)
def penguins_pipeline():
    @task
    def check_source() -> dict:
        """Refuse a bad source before anything is emptied; return what the load must find again."""
        from penguins.source import check_source
        from penguins.source_location import SourceError, locate

        try:
            source = check_source(locate(get_current_context()["params"]["source_path"]))
        except SourceError as exc:
            raise AirflowFailException(str(exc)) from exc  # a bad file will not fix itself
        print(f"source {source.path}: {source.rows} rows, columns {', '.join(source.columns)}")
        return {"path": str(source.path), "columns": list(source.columns), "rows": source.rows,
                "sha256": source.sha256}

    @task(multiple_outputs=True)
    def truncate(raw_table: str, clean_table: str) -> dict[str, str]:
        """Create the raw and the clean table if they are missing, and empty them."""
        from penguins.database import create_and_empty_tables

        with _mysql_connection() as conn:
            create_and_empty_tables(conn, raw_table, clean_table)
        return {"raw": raw_table, "clean": clean_table}

    @task(inlets=[SOURCE_ASSET], outlets=[RAW_TABLE_ASSET])
    def load_raw(table: str, source: dict) -> str:
        """Load the checked CSV into the raw table exactly as it ships (NA becomes NULL)."""
        from penguins.database import load_raw
        from penguins.source import Source
        from penguins.source_location import SourceError, locate

        try:
            # The path is confined again: the load opens it afresh, as the check did.
            checked = Source(locate(source["path"]), tuple(source["columns"]), source["rows"],
                             source["sha256"])
            with _mysql_connection() as conn:
                rows = load_raw(conn, checked, table)
        except SourceError as exc:
            raise AirflowFailException(str(exc)) from exc  # the file changed: only a new run helps
        print(f"loaded {rows} rows into {table}")
        get_current_context()["outlet_events"][RAW_TABLE_ASSET].extra = {
            "table": table, "rows": rows, "source": source["path"], "sha256": source["sha256"],
        }
        return table

    @task(inlets=[RAW_TABLE_ASSET], outlets=[CLEAN_TABLE_ASSET])
    def preprocess(table: str, clean_table: str) -> str:
        """Clean the raw table into the clean table, a chunk at a time; log and push what was
        dropped, and why."""
        from penguins.cleaning import preprocess

        context = get_current_context()
        with _mysql_connection() as conn:
            report = preprocess(conn, table, clean_table)
        rows = report["clean_rows"]
        print(f"cleaned {table} into {clean_table}: {report}")
        context["ti"].xcom_push(key="cleaning_report", value=report)
        context["outlet_events"][CLEAN_TABLE_ASSET].extra = {
            "table": clean_table, "rows": rows, "from_table": table, "report": report,
        }
        return clean_table

    @task
    def select_models() -> list[str]:
        """The models the run's `models` Param chose, one training copy each."""
        return list(get_current_context()["params"]["models"])

    @task(map_index_template="{{ model_name }}", inlets=[CLEAN_TABLE_ASSET])
    def train(table: str, model_name: str) -> dict:
        """Train and score one model, score its promoted version on the same rows, and export
        a new signed version with the gate's decision."""
        context = get_current_context()
        context["model_name"] = model_name
        try:
            return _train_and_export(table, model_name, context)
        except Exception as exc:
            # Kept for promote, which records why this model is missing.
            context["ti"].xcom_push(key="error", value=f"{type(exc).__name__}: {exc}")
            if isinstance(exc, ValueError):
                # The estimator cannot fit these rows: the same data would fail again.
                raise AirflowFailException(f"{model_name} cannot be trained: {exc}") from exc
            raise

    # The inlet is the models' lineage: their versions were trained on the clean table. Airflow
    # emits an event for every outlet of a task that succeeds, so each says what the run did
    # with its model, trained or not.
    @task(trigger_rule=TriggerRule.ALL_DONE, inlets=[CLEAN_TABLE_ASSET],
          outlets=list(MODEL_ASSETS.values()))
    def promote(models: list[str], results: list[dict]) -> dict:
        """Promote what passed the gate and hold back the rest, in one signed manifest; publish
        an asset event per model."""
        from penguins.publishing import models_dir, record_run

        context = get_current_context()
        results = list(results)
        trained = {r["model_name"] for r in results}
        errors = {
            name: context["ti"].xcom_pull(task_ids="train", key="error", map_indexes=index)
            for index, name in enumerate(models)
            if name not in trained
        }
        if not results and not any(errors.values()):
            # Training never started (an earlier task failed): keep the manifest as it is.
            raise AirflowFailException("no model was trained: an earlier task failed")
        failures = {
            name: error or "the task stopped without recording an error; see its log"
            for name, error in errors.items()
        }
        manifest, held = record_run(models_dir(), _signing_key(),
                                    run_id=context["run_id"], results=results)
        promoted = sorted(r["model_name"] for r in results if r["model_name"] not in held)
        print(f"manifest sequence {manifest.sequence}: promoted {', '.join(promoted) or 'none'}; "
              f"best model {manifest.best_model}")
        for name, reason in held.items():
            print(f"{name}: held back, not served: {reason}")
        context["ti"].xcom_push(key="held_back", value=held)
        for name, asset in MODEL_ASSETS.items():
            entry = manifest.models.get(name)
            context["outlet_events"][asset].extra = _model_event(
                name, results, held, failures, served=entry.promoted if entry else None,
                store=str(models_dir()))
        return {"best_model": manifest.best_model, "promoted": promoted, "held_back": held,
                "failed": failures}

    @task
    def check_training(summary: dict) -> None:
        """Fail the run if a model failed to train (the others are published all the same)."""
        if summary["failed"]:
            raise AirflowFailException(f"models failed to train: {summary['failed']}")

    source = check_source()
    tables = truncate(raw_table=RAW_TABLE_ASSET.name, clean_table=CLEAN_TABLE_ASSET.name)
    source >> tables
    clean_table = preprocess(load_raw(tables["raw"], source), tables["clean"])
    models = select_models()
    # A mapped task does not take its docstring as its doc (Airflow 3.3) unless given it.
    results = (train.override(doc_md=train.function.__doc__)
               .partial(table=clean_table).expand(model_name=models))
    check_training(promote(models, results))


penguins_pipeline()
