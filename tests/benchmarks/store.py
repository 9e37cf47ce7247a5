"""Store: how fast a real ``python -m serving`` follows the signed model store.

The five models are trained once on the packaged data and exported by the pipeline's own code
(``penguins.publishing``: score the promoted version, gate, export, record the run) with the
run's key pair (``Context``). The service runs as users start it, not pinned to a core, with the
default ``RELOAD_INTERVAL_SECONDS``; a client asks ``POST /predict/{model}`` every few
milliseconds until the answer names the version it waits for. Measured, several rounds each:

- a promotion or a rollback (a signed manifest written by ``serving.store.writer``, as
  ``python -m serving.store promote`` and ``rollback`` write it) of a kept version the service
  has already loaded, to the first answer from it;
- a new version exported by the pipeline's code, passing the gate and promoted (``export`` then
  ``record_run``, as the DAG's training task and its last task do), to the first answer from it:
  this includes verifying it and the isolated loader's work (a worker forked from the fork
  server unpickles and compiles it; the service rebuilds and checks the predictor);
- the service's start: from the process's start to ``/health`` answering, and to ``/ready``
  with the five promoted models served.

Rounds start at a random moment, so that they fall anywhere in the watcher's polling interval.
"""

from __future__ import annotations

import math
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from penguins import cleaning, contract, publishing, training
from serving.settings import Settings
from serving.store import writer
from serving.store.documents import Manifest, ModelEntry
from serving.store.reader import Trust, read_manifest
from tests.benchmarks.processes import REPO
from tests.benchmarks.section import Context, SectionResult, Table, Target, progress
from tests.serving.conftest import PENGUIN, LiveService, free_port, run_uvicorn, wait_until

RUN_ID = "manual__benchmark"
MIN_ACCURACY, MAX_REGRESSION = 0.9, 0.01
"""The gate's thresholds, as in the serving tests."""
RELOAD_INTERVAL = Settings.reload_interval_seconds
"""The service's default; the figures are for it."""
PROMOTION_P95_TARGET_S = 1.0
"""TensorFlow Serving looks at its model folders every second."""
POLL_SECONDS = 0.005
"""Between two requests of the client waiting for a version."""
WAIT_SECONDS = 60.0
"""A round that has not seen the version by then counts as not seen at all."""


@dataclass(frozen=True)
class Scale:
    promotions: int
    """Promotions and rollbacks, taken in turns: rounds of (a)."""
    exports: int
    """New versions of each model: rounds of (b)."""
    starts: int
    """Service starts: rounds of (c)."""


FULL = Scale(promotions=24, exports=5, starts=5)
QUICK = Scale(promotions=4, exports=1, starts=2)


# --- the pipeline's side, shared with the serving section -----------------------------------


def train_models() -> tuple[dict[str, training.TrainedModel], pd.DataFrame]:
    """The five models trained on the packaged data, as the serving tests train them; and the
    clean rows."""
    progress("training the five models on the packaged data")
    raw = pd.read_csv(contract.default_source())
    raw.insert(0, "source_row", range(1, len(raw) + 1))
    clean, _ = cleaning.clean(raw)
    trained = {name: training.train(clean, name, 0.2, 42) for name in contract.MODEL_NAMES}
    return trained, clean


@dataclass(frozen=True)
class Exported:
    version: str
    promoted: bool
    started: float
    """``time.perf_counter()`` as the export began."""
    seconds: float
    """The export and the manifest write (``export`` + ``record_run``)."""


def publish(directory: Path, trained: training.TrainedModel, key: Ed25519PrivateKey,
            on_export: Callable[[], None] | None = None) -> Exported:
    """Export ``trained`` as a new version and run it through the gate, as the DAG's tasks do
    (``tests/serving/conftest.py``'s ``publish``); timed from the export on."""
    baseline = publishing.score_promoted(directory, trained, key)
    decision = publishing.gate(trained, baseline, min_accuracy=MIN_ACCURACY,
                               max_regression=MAX_REGRESSION)
    started = time.perf_counter()
    metadata = publishing.export(trained, directory, decision=decision, run_id=RUN_ID,
                                 source="palmerpenguins", test_size=0.2, seed=42, key=key)
    result = {"model_name": trained.model_name, "version": metadata["version"],
              "metrics": trained.metrics, "gate": decision.as_json()}
    _, held = publishing.record_run(directory, key, run_id=RUN_ID, results=[result])
    return Exported(metadata["version"], trained.model_name not in held, started,
                    time.perf_counter() - started)


def publish_models(directory: Path, key: Ed25519PrivateKey,
                   trained: dict[str, training.TrainedModel]) -> dict[str, str]:
    """Publish one promoted version of every model into a new store; return the versions."""
    progress(f"publishing the five models into {directory.name}/")
    versions = {}
    for name, model in trained.items():
        exported = publish(directory, model, key)
        if not exported.promoted:
            raise RuntimeError(f"the gate held back the first version of {name}")
        versions[name] = exported.version
    return versions


# --- the section ----------------------------------------------------------------------------


def run(context: Context) -> SectionResult:
    scale = QUICK if context.quick else FULL
    folder = context.workdir / "store"
    folder.mkdir()
    models_dir = folder / "models"
    key = context.signing_key
    trained, _ = train_models()
    publish_models(models_dir, key, trained)
    env = {"RELOAD_INTERVAL_SECONDS": str(RELOAD_INTERVAL)}

    starts = {cache: [_start(models_dir, folder / f"start-{cache}-{i}.log",
                             env | _bytecode(cache, folder), i, scale.starts, cache)
                      for i in range(scale.starts)]
              for cache in BYTECODE_CACHES}
    with run_uvicorn(models_dir, folder / "uvicorn.log", access_log=False, **env) as service:
        wait_until(lambda: _ready(service.url) == len(contract.MODEL_NAMES), timeout=120)
        with requests.Session() as session:
            exports = _new_versions(service, session, models_dir, key, trained, scale.exports)
            promotions = _promotions(service, session, models_dir, key, scale.promotions)
    return _result(promotions, exports, starts, scale)


@dataclass(frozen=True)
class Seen:
    """How long until the service answered with the version waited for."""

    seconds: float | None
    """None: not within ``WAIT_SECONDS``."""
    other_answers: int
    """Answers other than 200 meanwhile (an answer from the old version is a 200)."""


def _wait_for_version(session: requests.Session, url: str, version: str,
                      since: float) -> Seen:
    others = 0
    while True:
        try:
            response = session.post(url, json=PENGUIN, timeout=10)
        except requests.RequestException:
            response = None
        now = time.perf_counter()
        if response is not None and response.status_code == 200:
            if response.json()["model"]["version"] == version:
                return Seen(now - since, others)
        else:
            others += 1
        if now - since > WAIT_SECONDS:
            return Seen(None, others)
        time.sleep(POLL_SECONDS)


def _new_versions(service: LiveService, session: requests.Session, models_dir: Path,
                  key: Ed25519PrivateKey, trained: dict[str, training.TrainedModel],
                  rounds: int) -> dict[str, list[dict[str, Any]]]:
    """(b): per model, ``rounds`` new versions exported and promoted, each to its first answer."""
    measured: dict[str, list[dict[str, Any]]] = {name: [] for name in contract.MODEL_NAMES}
    for turn in range(rounds):
        for name in contract.MODEL_NAMES:
            progress(f"store: a new version of {name}, round {turn + 1} of {rounds}")
            time.sleep(random.uniform(0, RELOAD_INTERVAL))
            exported = publish(models_dir, trained[name], key)
            if not exported.promoted:
                measured[name].append({"version": exported.version, "promoted": False,
                                       "seconds": None, "export_seconds": exported.seconds,
                                       "other_answers": 0})
                continue
            seen = _wait_for_version(session, f"{service.url}/predict/{name}", exported.version,
                                     exported.started)
            measured[name].append({"version": exported.version, "promoted": True,
                                   "seconds": seen.seconds, "export_seconds": exported.seconds,
                                   "other_answers": seen.other_answers})
    return measured


def _promotions(service: LiveService, session: requests.Session, models_dir: Path,
                key: Ed25519PrivateKey, rounds: int) -> list[dict[str, Any]]:
    """(a): promote a kept, loaded version of a model, then roll back to the one before; the
    models take turns."""
    trust = Trust(key.public_key())
    measured = []
    other: dict[str, str] = {}
    for turn in range(rounds):
        name = contract.MODEL_NAMES[(turn // 2) % len(contract.MODEL_NAMES)]
        entry = read_manifest(models_dir, trust).models[name]
        if turn % 2 == 0:
            # The newest kept version but the promoted one: loaded, as every kept version is.
            if name not in other:
                kept = sorted({*entry.history, *entry.held_back} - {entry.promoted})
                other[name] = kept[-1]
            change, target = "promote", other[name]
            new_entry = writer.promoted(entry, target)
        else:
            change, new_entry = "rollback", writer.rolled_back(entry, name)
            target = new_entry.promoted
        progress(f"store: {change} {name} to {target}, round {turn + 1} of {rounds}")
        wait_until(lambda n=name, v=target: _answers_with(service.url, n, v), timeout=60)
        time.sleep(random.uniform(0, RELOAD_INTERVAL))
        started = time.perf_counter()
        _write_manifest(models_dir, key, name, new_entry, change)
        written = time.perf_counter() - started
        seen = _wait_for_version(session, f"{service.url}/predict/{name}", target, started)
        measured.append({"model": name, "change": change, "version": target,
                         "seconds": seen.seconds, "write_seconds": written,
                         "other_answers": seen.other_answers})
    return measured


def _write_manifest(models_dir: Path, key: Ed25519PrivateKey, name: str, entry: ModelEntry,
                    change: str) -> Manifest:
    """The same signed manifest write as ``python -m serving.store promote`` or ``rollback``."""
    return writer.change_manifest(models_dir, key, lambda m: {**m.models, name: entry},
                                  written_by=f"benchmark {change}")


def _answers_with(url: str, name: str, version: str) -> bool:
    """Whether the kept ``version`` of ``name`` is loaded and answers."""
    response = requests.post(f"{url}/predict/{name}", params={"version": version}, json=PENGUIN,
                             timeout=10)
    return response.status_code == 200


def _ready(url: str) -> int:
    """``/ready``'s models_loaded, 0 while it answers 503 or not at all."""
    try:
        response = requests.get(f"{url}/ready", timeout=1)
    except requests.RequestException:
        return 0
    return response.json()["models_loaded"] if response.status_code == 200 else 0


BYTECODE_CACHES = ("as run", "warm")
"""The service's start as this machine runs Python (its bytecode cache may be off), and with a
bytecode cache of the run's own, warmed by one start first."""


def _bytecode(cache: str, folder: Path) -> dict[str, str]:
    """The environment for ``cache``: "warm" writes and reads compiled bytecode in a folder of
    the run's own (``PYTHONPYCACHEPREFIX``), never beside the sources or in the virtualenv."""
    if cache == "as run":
        return {}
    prefix = folder / "pycache"
    environment = {"PYTHONDONTWRITEBYTECODE": "", "PYTHONPYCACHEPREFIX": str(prefix)}
    if not prefix.exists():
        progress("store: warming a bytecode cache of the run's own")
        subprocess.run([sys.executable, "-c", "import serving.app, serving.loader_worker"],
                       cwd=REPO, env={**os.environ, **environment}, check=True)
    return environment


def _start(models_dir: Path, log_file: Path, env: dict[str, str], turn: int,
           rounds: int, cache: str) -> dict[str, float | None]:
    """(c): ``python -m serving`` from the process's start to /health, and to /ready with the
    five models; then to its exit after SIGTERM. Polled every 10 ms."""
    progress(f"store: starting the service (bytecode cache {cache}), round {turn + 1} of "
             f"{rounds}")
    port = free_port()
    environment = {**os.environ, "MODELS_DIR": str(models_dir), "SERVING_HOST": "127.0.0.1",
                   "SERVING_PORT": str(port), "SERVING_ACCESS_LOG": "0", **env}
    url = f"http://127.0.0.1:{port}"
    health = ready = stopped = None
    with log_file.open("wb") as log:
        started = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-m", "serving"], cwd=REPO, env=environment,
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        while ready is None and time.perf_counter() - started < 120 and process.poll() is None:
            if health is None:
                try:
                    if requests.get(f"{url}/health", timeout=1).status_code == 200:
                        health = time.perf_counter() - started
                except requests.RequestException:
                    pass
            if health is not None and _ready(url) == len(contract.MODEL_NAMES):
                ready = time.perf_counter() - started
            else:
                time.sleep(0.01)
    finally:
        stopping = time.perf_counter()
        process.terminate()
        try:
            process.wait(timeout=30)
            stopped = time.perf_counter() - stopping
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return {"health_seconds": health, "ready_seconds": ready, "stop_seconds": stopped}


# --- the figures ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    rounds: int
    median: float
    p95: float
    max: float
    missing: int
    """Rounds that never saw what they waited for: counted as infinitely slow."""


def summarize(values: list[float | None]) -> Summary:
    """Median, 95th percentile (nearest rank) and maximum; a missing value counts as infinite."""
    ordered = sorted(math.inf if v is None else v for v in values)
    if not ordered:
        return Summary(0, math.nan, math.nan, math.nan, 0)
    p95 = ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]
    return Summary(len(ordered), statistics.median(ordered), p95, ordered[-1],
                   sum(v is None for v in values))


def _ms(seconds: float) -> float | str:
    return "never" if math.isinf(seconds) else seconds * 1000


def _s(seconds: float) -> float | str:
    return "never" if math.isinf(seconds) else seconds


def _result(promotions: list[dict[str, Any]], exports: dict[str, list[dict[str, Any]]],
            starts: dict[str, list[dict[str, float | None]]], scale: Scale) -> SectionResult:
    interval = f"RELOAD_INTERVAL_SECONDS={RELOAD_INTERVAL:g} (the default)"
    promotion_table = Table(
        "A promotion or rollback of a kept, loaded version, to the first answer from it; "
        + interval,
        ["change", "rounds", "median ms", "p95 ms", "max ms", "manifest write ms (median)",
         "non-200 answers meanwhile"], [],
        notes=["From the start of the signed manifest write (serving.store.writer, as "
               "`python -m serving.store promote` / `rollback`) to the first POST "
               "/predict/{model} answer naming the version; the models take turns.",
               f"The client asks every {POLL_SECONDS * 1000:g} ms; p95 is the nearest rank."],
    )
    groups = [("promote", [p for p in promotions if p["change"] == "promote"]),
              ("rollback", [p for p in promotions if p["change"] == "rollback"]),
              ("both", promotions)]
    for label, rows in groups:
        summary = summarize([r["seconds"] for r in rows])
        promotion_table.rows.append([
            label, summary.rounds, _ms(summary.median), _ms(summary.p95), _ms(summary.max),
            statistics.median(r["write_seconds"] for r in rows) * 1000 if rows else None,
            sum(r["other_answers"] for r in rows),
        ])

    export_table = Table(
        f"A new version exported, gated and promoted by the pipeline's code, to the first answer "
        f"from it; {interval}",
        ["model", "rounds", "median ms", "p95 ms", "max ms", "export + record_run ms (median)",
         "non-200 answers meanwhile"], [],
        notes=["From the start of penguins.publishing.export (after score_promoted and gate) to "
               "the first POST /predict/{model} answer naming the new version: the export, the "
               "signed manifest, the watcher noticing both, verifying the version, the isolated "
               "loader (unpickling and compiling in a forked worker), rebuilding and checking "
               "the predictor.",
               "The same trained model is exported again each round: a new version with the "
               "same pickle; the service loads each version afresh."],
    )
    every = [r for per_model in exports.values() for r in per_model]
    held = [r for r in every if not r["promoted"]]
    for name, rows in (*exports.items(), ("all", every)):
        promoted = [r for r in rows if r["promoted"]]
        summary = summarize([r["seconds"] for r in promoted])
        export_table.rows.append([
            name, summary.rounds, _ms(summary.median), _ms(summary.p95), _ms(summary.max),
            statistics.median(r["export_seconds"] for r in rows) * 1000 if rows else None,
            sum(r["other_answers"] for r in promoted),
        ])
    if held:
        export_table.notes.append(f"{len(held)} new versions were held back by the gate and "
                                  "not timed")

    start_table = Table(
        "Starting the service (`python -m serving`, five promoted models, one version each)",
        ["from the process's start to", "bytecode cache", "rounds", "median s", "p95 s",
         "max s"], [],
        notes=["Not pinned to a core; includes the interpreter's start, imports, the loader's "
               "fork server (which imports scikit-learn and XGBoost) and the five isolated "
               "loads. Polled every 10 ms.",
               "bytecode cache: \"as run\" is Python as this benchmark runs (see bytecode "
               "cache above: when off, every start compiles all it imports); \"warm\" is a "
               "bytecode cache of the run's own (PYTHONPYCACHEPREFIX), warmed first.",
               "The service answers nothing until its promoted versions have loaded (so that "
               "/ready is right from the first request): /health and /ready come together."],
    )
    for label, field in (("/health answering", "health_seconds"),
                         ("/ready, models_loaded = 5", "ready_seconds"),
                         ("its exit, after SIGTERM", "stop_seconds")):
        for cache, rounds in starts.items():
            summary = summarize([s[field] for s in rounds])
            start_table.rows.append([label, cache, summary.rounds, _s(summary.median),
                                     _s(summary.p95), _s(summary.max)])

    both = summarize([p["seconds"] for p in promotions])
    measured = (f"{both.p95 * 1000:.0f} ms (median {both.median * 1000:.0f} ms)"
                if not math.isinf(both.p95) else f"not seen within {WAIT_SECONDS:.0f} s "
                f"in {both.missing} of {both.rounds} rounds")
    targets = [Target(
        f"promotion or rollback to the first answer, p95 of {both.rounds} rounds, "
        f"RELOAD_INTERVAL_SECONDS={RELOAD_INTERVAL:g}",
        f"< {PROMOTION_P95_TARGET_S * 1000:.0f} ms", measured, both.p95 < PROMOTION_P95_TARGET_S,
    )]
    data = {"reload_interval_seconds": RELOAD_INTERVAL, "poll_seconds": POLL_SECONDS,
            "promotions": promotions, "new_versions": exports, "starts": starts,
            "scale": {"promotions": scale.promotions, "exports": scale.exports,
                      "starts": scale.starts}}
    return SectionResult("store", [promotion_table, export_table, start_table], targets, data)
