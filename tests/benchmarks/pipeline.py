"""Pipeline: wall time, time per task and peak memory of a whole DAG run through ``dag.test()``.

At the packaged 344 rows and at 100,000 synthetic rows. Airflow runs as the tests run it
(``tests/conftest.py``): a throwaway ``AIRFLOW_HOME`` with a migrated SQLite metadata database,
the penguins data in this run's throwaway MySQL database. Each DAG run is a process of its own
(``dag_run.py``), so its peak memory is measured alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from tests.benchmarks.processes import REPO, Finished, run_worker
from tests.benchmarks.section import (
    PACKAGED_ROWS,
    Context,
    SectionResult,
    Table,
    Target,
    progress,
)

FULL_SIZES = (PACKAGED_ROWS, 100_000)
QUICK_SIZES = (PACKAGED_ROWS, 5_000)
PEAK_RSS_TARGET_MB = 2048.0


def run(context: Context) -> SectionResult:
    home = context.workdir / "airflow-home"
    home.mkdir()
    env = os.environ | {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "airflow" / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW_CONN_MYSQL_AIRFLOW_CONN": context.server.url,
        # The synthetic sources are written there: it is the run's source folder.
        "PENGUINS_SOURCE_DIR": str(context.workdir),
    }
    progress("migrating a throwaway Airflow metadata database")
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True,
                   capture_output=True)
    migrate_seconds = time.perf_counter() - started

    runs: dict[int, Finished] = {}
    for rows in QUICK_SIZES if context.quick else FULL_SIZES:
        if rows == PACKAGED_ROWS:
            # source_path null: the DAG's own default. A second run in the same process is cheap
            # here and tells the one-time start-up (imports, Airflow's in-process API server)
            # from what every run costs.
            args = ["--repeat", "2"]
        else:
            args = ["--source", str(context.source(rows))]
        progress(f"running the DAG on {rows:,} rows")
        runs[rows] = run_worker(
            "tests.benchmarks.dag_run", args, context.workdir, name=f"dag-{rows}",
            env=env | {"MODELS_DIR": str(context.workdir / f"models-{rows}")},
        )
    return _result(runs, migrate_seconds)


def _label(task: dict) -> str:
    return f"train [{task['model_name']}]" if task["model_name"] else task["task_id"]


def _task_seconds(run: dict) -> float:
    return sum(task["duration"] or 0.0 for task in run["tasks"])


def _start_up(rows: int, first: dict, again: dict) -> str:
    """Which tasks paid the one-time costs, from a first and a second run in one process."""
    again_seconds = {_label(task): task["duration"] or 0.0 for task in again["tasks"]}
    extra = [(_label(task), (task["duration"] or 0.0) - again_seconds.get(_label(task), 0.0))
             for task in first["tasks"]]
    paid = ", ".join(f"{label} +{seconds:.1f} s" for label, seconds in extra if seconds > 1)
    return (f"At {rows:,} rows the first run took {first['seconds'] - again['seconds']:.1f} s "
            f"more than the second: {paid}. The first task starts Airflow's in-process "
            "Execution API server; the first train task imports scikit-learn and XGBoost.")


def _result(runs: dict[int, Finished], migrate_seconds: float) -> SectionResult:
    summary = Table(
        "A whole DAG run (dag.test(): every task in one process, one after another)",
        ["rows", "state", "clean rows", "process s", "Airflow import s", "DAG parse s",
         "dag.test s", "sum of tasks s", "Airflow between tasks s", "peak RSS MB",
         "dag.test again s"],
        [],
        notes=[f"Not counted: `airflow db migrate` of the throwaway home, {migrate_seconds:.1f} s.",
               "process s: the worker process from interpreter start to exit; peak RSS: its "
               "high-water mark (VmHWM), the peak of the whole run.",
               "dag.test again: a second run in the same process, Airflow and the libraries "
               "already loaded."],
    )
    tasks = Table("Time and memory per task (first run)",
                  ["rows", "task", "state", "seconds", "share of dag.test",
                   "seconds again", "peak RSS MB (sampled)"], [])
    for rows, finished in runs.items():
        result = finished.result
        first, again = result["runs"][0], result["runs"][1:]
        summary.rows.append([
            rows, first["state"], result["clean_rows"], finished.seconds,
            result["import_seconds"], result["parse_seconds"], first["seconds"],
            _task_seconds(first), first["seconds"] - _task_seconds(first),
            finished.peak_rss_mb, again[0]["seconds"] if again else None,
        ])
        repeated = {_label(task): task["duration"] for task in again[0]["tasks"]} if again else {}
        for task in first["tasks"]:
            share = (task["duration"] or 0.0) / first["seconds"]
            tasks.rows.append([rows, _label(task), task["state"], task["duration"],
                               f"{share:.0%}", repeated.get(_label(task)), task["peak_rss_mb"]])

    for rows, finished in runs.items():
        if len(finished.result["runs"]) > 1:
            tasks.notes.append(_start_up(rows, *finished.result["runs"][:2]))
    largest = max(runs)
    first = runs[largest].result["runs"][0]
    ranked = sorted(first["tasks"], key=lambda task: task["duration"] or 0.0, reverse=True)
    tasks.notes.append(
        f"At {largest:,} rows the slowest tasks are "
        + ", ".join(f"{_label(task)} {task['duration']:.1f} s" for task in ranked[:4])
        + f", of {first['seconds']:.1f} s in dag.test()."
    )
    peak = runs[largest].peak_rss_mb
    targets = [Target(f"DAG run at {largest:,} rows succeeds, peak memory",
                      f"success, < {PEAK_RSS_TARGET_MB:.0f} MB",
                      f"{first['state']}, {peak:.0f} MB",
                      first["state"] == "success" and peak < PEAK_RSS_TARGET_MB)]
    data = {
        str(rows): {**f.result, "process_seconds": f.seconds}
        for rows, f in runs.items()
    }
    data["migrate_seconds"] = migrate_seconds
    return SectionResult("pipeline", [summary, tasks], targets, data)
