"""Pipeline: wall time, time per task and peak memory of a whole DAG run through ``dag.test()``.

At the packaged 344 rows and at 100,000 and 1,000,000 synthetic rows (``--quick``: 344 and
5,000). Airflow runs as the tests run it (``tests/conftest.py``): a throwaway ``AIRFLOW_HOME``
with a migrated SQLite metadata database, the penguins data in this run's throwaway MySQL
database. Each DAG run is a process of its own (``dag_run.py``) that runs every task, so its
peak memory is the run's, measured alone. How each task's time grows from one size to the next
is its ratio and its exponent ``log(t2/t1) / log(n2/n1)``: 1 is linear. Last, the service's own
isolated loader, with its default limits, loads each model the largest run published.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.benchmarks.processes import REPO, Finished, run_worker
from tests.benchmarks.section import (
    PACKAGED_ROWS,
    Context,
    SectionResult,
    Table,
    Target,
    progress,
)

FULL_SIZES = (PACKAGED_ROWS, 100_000, 1_000_000)
QUICK_SIZES = (PACKAGED_ROWS, 5_000)
PEAK_RSS_TARGET_MB = 2048.0
GROWTH_TARGET = 1.25
"""The largest exponent allowed between the two largest sizes: about n log n, not n^2."""


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
            # Warmed up first, so that its tasks' times are what every run pays, as the second
            # packaged run's are: they are what the growth table compares.
            args = ["--source", str(context.source(rows)), "--warm-up"]
        progress(f"running the DAG on {rows:,} rows")
        runs[rows] = run_worker(
            "tests.benchmarks.dag_run", args, context.workdir, name=f"dag-{rows}",
            env=env | {"MODELS_DIR": str(context.workdir / f"models-{rows}")},
            timeout=3600,
        )
    largest = max(runs)
    progress(f"loading the {largest:,}-row models as the service does")
    loads = _service_loads(context.workdir / f"models-{largest}", context.public_key_file)
    return _result(runs, migrate_seconds, loads)


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


def _service_loads(models_dir: Path, public_key_file: Path) -> dict[str, dict]:
    """Each model's newest version, read and loaded by the service's own code with its default
    limits (``serving.settings.Settings``): what ``python -m serving`` would do with it."""
    from serving.loader import Limits, Loader
    from serving.settings import Settings
    from serving.store import signing
    from serving.store.reader import Trust, read_metadata, read_version, version_ids

    settings = Settings()
    trust = Trust(signing.load_public_key(public_key_file))
    loader = Loader(Limits(memory_bytes=settings.loader_memory_mb * 1024**2,
                           cpu_seconds=settings.loader_cpu_seconds,
                           wall_seconds=settings.loader_timeout_seconds))
    loads = {}
    try:
        loader.warm_up()
        for name in sorted(p.name for p in models_dir.iterdir() if p.is_dir()):
            version = version_ids(models_dir, name)[-1]
            metadata = read_metadata(models_dir, name, version, trust).metadata
            started = time.perf_counter()
            try:
                files = read_version(models_dir, name, version, trust,
                                     max_pickle_bytes=settings.max_model_bytes)
                kind, problem = loader.load(files).kind, None
            except Exception as exc:  # reported, as the service would refuse it
                kind, problem = None, f"{type(exc).__name__}: {exc}"
            loads[name] = {"rows": metadata["rows"], "pickle_bytes": metadata["pickle_bytes"],
                           "accuracy": metadata["metrics"]["accuracy"],
                           "training_seconds": metadata["training_seconds"],
                           "load_seconds": time.perf_counter() - started, "kind": kind,
                           "problem": problem}
    finally:
        loader.close()
    return loads


def _growth(runs: dict[int, Finished]) -> Table:
    """Each task's time at every size, in a warm process (the packaged data's second run, the
    others' timed run after their warm-up), and how it grows from one size to the next."""
    sizes = sorted(runs)
    pairs = list(zip(sizes, sizes[1:], strict=False))
    times: dict[str, dict[int, float]] = {}
    for rows in sizes:
        warm = runs[rows].result["runs"][-1]
        for task in warm["tasks"]:
            times.setdefault(_label(task), {})[rows] = task["duration"] or 0.0
        times.setdefault("dag.test (whole run)", {})[rows] = warm["seconds"]
    columns = ["task", *(f"s at {n:,}" for n in sizes)]
    for n1, n2 in pairs:
        columns += [f"x {_short(n1)}->{_short(n2)}", f"exponent {_short(n1)}->{_short(n2)}"]
    table = Table("How each task's time grows with the rows (warm process)", columns, [])
    for label, seconds in times.items():
        row: list = [label, *(seconds.get(n) for n in sizes)]
        for n1, n2 in pairs:
            ratio, exponent = _ratio(seconds.get(n1), seconds.get(n2), n1, n2)
            row += [ratio, exponent]
        table.rows.append(row)
    peaks = {n: runs[n].peak_rss_mb for n in sizes}
    row = ["peak RSS MB (the run's process)", *(peaks[n] for n in sizes)]
    for n1, n2 in pairs:
        row += list(_ratio(peaks[n1], peaks[n2], n1, n2))
    table.rows.append(row)
    table.notes.append("exponent: log(t2/t1) / log(n2/n1) over the source rows; 1 is linear, "
                       "n log n shows as a little above 1, n^2 as 2. At 344 rows a task is "
                       "mostly Airflow's fixed cost per task, so the first pair's exponents are "
                       "low; read the last pair.")
    return table


def _ratio(t1: float | None, t2: float | None, n1: int, n2: int) -> tuple[float | None,
                                                                         float | None]:
    if not t1 or not t2:
        return None, None
    return t2 / t1, math.log(t2 / t1) / math.log(n2 / n1)


def _short(rows: int) -> str:
    if rows >= 1_000_000:
        return f"{rows / 1_000_000:g}M"
    return f"{rows / 1_000:g}k" if rows >= 1_000 else str(rows)


def _models(largest: int, loads: dict[str, dict]) -> Table:
    table = Table(f"The models of the {largest:,}-row run, loaded by the service's loader",
                  ["model", "rows fitted", "of training rows", "training s", "held-out accuracy",
                   "pickle MB", "loads in the service", "load s"], [])
    for name, load in loads.items():
        table.rows.append([name, load["rows"]["fit"], load["rows"]["train"],
                           load["training_seconds"], load["accuracy"],
                           load["pickle_bytes"] / 1e6, load["kind"] or load["problem"],
                           load["load_seconds"]])
    table.notes.append("The service's default limits: pickles up to SERVING_MAX_MODEL_BYTES "
                       "(200 MB), a loader worker within SERVING_LOADER_MEMORY_MB (2048), "
                       "SERVING_LOADER_CPU_SECONDS (60) and SERVING_LOADER_TIMEOUT_SECONDS (90).")
    return table


def _result(runs: dict[int, Finished], migrate_seconds: float,
            loads: dict[str, dict]) -> SectionResult:
    summary = Table(
        "A whole DAG run (dag.test(): every task in one process, one after another)",
        ["rows", "state", "clean rows", "process s", "Airflow import s", "DAG parse s",
         "dag.test s", "sum of tasks s", "Airflow between tasks s", "peak RSS MB",
         "dag.test again s"],
        [],
        notes=[f"Not counted: `airflow db migrate` of the throwaway home, {migrate_seconds:.1f} s.",
               "process s: the worker process from interpreter start to exit (above 344 rows "
               "with its warm-up run on the packaged data); peak RSS: its high-water mark "
               "(VmHWM), the peak of the whole run: dag.test() runs every task in this one "
               "process.",
               "dag.test again: a second run in the same process, Airflow and the libraries "
               "already loaded."],
    )
    tasks = Table("Time and memory per task (the first timed run; above 344 rows, after a "
                  "warm-up run)",
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
    growth = _growth(runs)
    sizes = sorted(runs)
    if len(sizes) > 2:
        exponent_column = len(growth.columns) - 1
        steepest = max((row for row in growth.rows if row[0].startswith("train")),
                       key=lambda row: row[exponent_column] or 0.0)
        exponent = steepest[exponent_column] or 0.0
        targets.append(Target(
            f"the steepest training task from {sizes[-2]:,} to {sizes[-1]:,} rows",
            f"exponent <= {GROWTH_TARGET}", f"{steepest[0]}: {exponent:.2f}",
            exponent <= GROWTH_TARGET))
    refused = {name: load["problem"] for name, load in loads.items() if load["problem"]}
    targets.append(Target(f"the service loads every model of the {largest:,}-row run",
                          "all load", "all load" if not refused else f"refused: {refused}",
                          not refused and len(loads) == len(_trained_models(runs[largest]))))
    data = {
        str(rows): {**f.result, "process_seconds": f.seconds}
        for rows, f in runs.items()
    }
    data["migrate_seconds"] = migrate_seconds
    data["service_loads"] = loads
    return SectionResult("pipeline", [summary, tasks, growth, _models(largest, loads)], targets,
                         data)


def _trained_models(run: Finished) -> list[str]:
    """The models the run's first DAG run trained."""
    return [task["model_name"] for task in run.result["runs"][0]["tasks"] if task["model_name"]]
