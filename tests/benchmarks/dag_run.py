"""One run of the real DAG through ``dag.test()``, timed from inside its own process::

    python -m tests.benchmarks.dag_run --result FILE [--source CSV] [--repeat N] [--warm-up]

The pipeline section starts it with the environment Airflow needs (``AIRFLOW_HOME``, the
connection, ``MODELS_DIR``). ``dag.test()`` runs every task inside this process, one after
another, so this process's peak memory is the run's. A thread samples the resident set size
all along, to tell which task the peak belongs to.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

from serving.store.layout import METADATA_FILE, MODEL_NAME, PICKLE_FILE
from serving.store.reader import version_ids
from tests.benchmarks.processes import current_rss_mb, write_result

SAMPLE_SECONDS = 0.05


class RssSampler(threading.Thread):
    """Records (wall clock, RSS MB) every ``SAMPLE_SECONDS`` until the process ends."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[tuple[float, float]] = []

    def run(self) -> None:
        while True:
            self.samples.append((time.time(), current_rss_mb()))
            time.sleep(SAMPLE_SECONDS)

    def peak_between(self, start: float, end: float) -> float | None:
        inside = [rss for at, rss in self.samples if start <= at <= end]
        return max(inside) if inside else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", help="source_path for the run conf; default: packaged data")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the DAG this many times in this process: the runs after the "
                             "first show the cost once Airflow and the libraries are loaded")
    parser.add_argument("--warm-up", action="store_true",
                        help="first run the DAG once on the packaged data, untimed and into "
                             "another models folder, so that no task of the timed runs pays for "
                             "starting Airflow's in-process API server or importing the libraries")
    parser.add_argument("--result", required=True)
    args = parser.parse_args()

    sampler = RssSampler()
    sampler.start()
    started = time.perf_counter()
    # Airflow reads its configuration when first imported: only now, with the section's env.
    from airflow.dag_processing.dagbag import DagBag

    imported = time.perf_counter()
    bag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
    if bag.import_errors:
        raise RuntimeError(f"the DAG does not import: {bag.import_errors}")
    dag = bag.get_dag("penguins_pipeline")
    parsed = time.perf_counter()
    if args.warm_up:
        models_dir = os.environ["MODELS_DIR"]
        os.environ["MODELS_DIR"] = f"{models_dir}-warm-up"
        if dag.test(run_conf={"source_path": None}).state != "success":
            raise RuntimeError("the warm-up run failed")
        os.environ["MODELS_DIR"] = models_dir
    runs = []
    for _ in range(args.repeat):
        run_started = time.perf_counter()
        dag_run = dag.test(run_conf={"source_path": args.source})
        runs.append({"state": dag_run.state, "seconds": time.perf_counter() - run_started,
                     "tasks": _tasks(dag_run, sampler)})

    newest = _newest_versions(Path(os.environ["MODELS_DIR"]))
    metadata = [json.loads((folder / METADATA_FILE).read_text()) for folder in newest.values()]
    write_result(args.result, {
        "import_seconds": imported - started,
        "parse_seconds": parsed - imported,
        "runs": runs,
        "clean_rows": metadata[0]["rows"]["total"] if metadata else None,
        "model_bytes": {name: (folder / PICKLE_FILE).stat().st_size
                        for name, folder in newest.items()},
    })


def _newest_versions(models_dir: Path) -> dict[str, Path]:
    """Each model's newest version folder in the store (``<model>/<version>/``): the last run's
    export, whether the gate promoted it or held it back."""
    models = sorted(p.name for p in models_dir.iterdir() if p.is_dir() and MODEL_NAME.fullmatch(
        p.name)) if models_dir.is_dir() else []
    return {name: models_dir / name / versions[-1]
            for name in models if (versions := version_ids(models_dir, name))}


def _tasks(dag_run, sampler: RssSampler) -> list[dict]:
    """Each task instance, mapped copies by model name, in the order they ran."""
    tasks = []
    for ti in dag_run.get_task_instances():
        ran = ti.start_date is not None and ti.end_date is not None  # not so when upstream failed
        tasks.append({
            "task_id": ti.task_id,
            "map_index": ti.map_index,
            "model_name": ti.rendered_map_index if ti.map_index >= 0 else None,
            "state": ti.state,
            "start_date": ti.start_date.isoformat() if ran else None,
            "end_date": ti.end_date.isoformat() if ran else None,
            "duration": ti.duration,
            "peak_rss_mb": sampler.peak_between(ti.start_date.timestamp(),
                                                ti.end_date.timestamp()) if ran else None,
        })
    return sorted(tasks, key=lambda task: (task["start_date"] or "~", task["map_index"]))


if __name__ == "__main__":
    main()
