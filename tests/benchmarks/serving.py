"""Serving: requests/s and latency of the prediction service, beside a ceiling on the same server.

Five freshly trained models are published into a scratch store by the pipeline's own code
(``penguins.publishing``, signed with the run's key pair); ``python -m serving`` (one uvicorn
worker behind the front door, no access log) serves them pinned to one core, and ``wrk`` loads
it from another core over loopback, with one thread and 1 or 8 connections, each run a few
seconds long. The ceiling, ``POST /benchmark/ceiling`` (on only with
``SERVING_BENCHMARK_ENDPOINTS=1``), validates the same penguin as ``POST /predict/{model}`` and
answers a fixed prediction: what the framework alone allows. The endpoints take turns, round
after round, and each measure keeps its best round, so that a busy spell on this shared machine
hits them all alike and is then left out.

The service always answers with the compiled NumPy predictors that its isolated loader built
(there is no scikit-learn path in it any more). Also measured: batches of 1,000 penguins per
request (``POST /predict-batch/{model}``), in rows/s.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import requests

from penguins import contract
from tests.benchmarks.section import Context, SectionResult, Table, Target, progress
from tests.benchmarks.store import publish_models, train_models
from tests.serving.conftest import PENGUIN, LiveService, run_uvicorn, wait_until

CEILING = "/benchmark/ceiling"
CONNECTIONS = (1, 8)
BATCH_ROWS = 1000
SINGLE_SHARE_TARGET = 0.5
FOREST_SHARE_TARGET = 0.25
P99_TARGET_MS = 20.0
BATCH_TARGET_ROWS_PER_S = 100_000


@dataclass(frozen=True)
class Scale:
    seconds: int
    """Of one wrk run."""
    rounds: int
    """Runs per endpoint and concurrency, taken in turns; the best counts."""


FULL = Scale(seconds=3, rounds=2)
QUICK = Scale(seconds=1, rounds=1)


@dataclass(frozen=True)
class Run:
    """What one wrk run measured."""

    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    """Non-2xx answers and socket errors; any makes the run worthless."""


def run(context: Context) -> SectionResult:
    cores = sorted(os.sched_getaffinity(0))
    missing = [tool for tool in ("wrk", "taskset") if shutil.which(tool) is None]
    if missing or len(cores) < 2:
        note = (f"{' and '.join(missing)} not installed (Debian: apt-get install wrk util-linux)"
                if missing else "needs two cores: one for the service, one for wrk")
        progress(f"serving: skipped, {note}")
        return SectionResult("serving", [Table("Serving: not measured", [], [], [note])])
    scale = QUICK if context.quick else FULL
    server_cpu, load_cpu = cores[:2]
    folder = context.workdir / "serving"
    models_dir = folder / "models"
    trained, clean = train_models()
    publish_models(models_dir, context.signing_key, trained)
    bodies = _write_scripts(folder, clean)

    runs: dict[tuple[str, int], list[Run]] = {}
    batch: dict[str, Run] = {}
    log = folder / "uvicorn.log"
    with _service(models_dir, log, server_cpu) as service:
        served_by = _predictors(log)
        endpoints = [CEILING, *(f"/predict/{name}" for name in contract.MODEL_NAMES)]
        for turn in range(scale.rounds):
            for connections in CONNECTIONS:
                for endpoint in endpoints:
                    progress(f"serving: {endpoint}, {connections} connection(s), "
                             f"round {turn + 1} of {scale.rounds}")
                    measured = _wrk(service.url + endpoint, bodies["one"], connections,
                                    scale.seconds, load_cpu)
                    runs.setdefault((endpoint, connections), []).append(measured)
        for name in contract.MODEL_NAMES:
            progress(f"serving: batches of {BATCH_ROWS:,} for {name}")
            batch[name] = _wrk(f"{service.url}/predict-batch/{name}", bodies["batch"], 1,
                               scale.seconds, load_cpu)
    single = {key: _best(measured) for key, measured in runs.items()}
    return _result(single, runs, batch, served_by, scale, (server_cpu, load_cpu))


def _write_scripts(folder: Path, clean: pd.DataFrame) -> dict[str, Path]:
    """wrk scripts that POST one penguin, and a batch of ``BATCH_ROWS`` clean rows (repeated)."""
    records = json.loads(clean[list(contract.FEATURES)].to_json(orient="records"))
    penguins = [records[i % len(records)] for i in range(BATCH_ROWS)]
    scripts = {}
    for name, body in (("one", PENGUIN), ("batch", {"penguins": penguins})):
        scripts[name] = folder / f"post-{name}.lua"
        scripts[name].write_text(
            'wrk.method = "POST"\n'
            'wrk.headers["Content-Type"] = "application/json"\n'
            f"wrk.body = {json.dumps(json.dumps(body, separators=(',', ':')))}\n"
        )
    return scripts


@contextlib.contextmanager
def _service(models_dir: Path, log: Path, cpu: int) -> Iterator[LiveService]:
    with run_uvicorn(models_dir, log, cpu=cpu, access_log=False,
                     SERVING_BENCHMARK_ENDPOINTS="1") as service:
        wait_until(lambda: len(_served(service)) == len(contract.MODEL_NAMES), timeout=60)
        for name in contract.MODEL_NAMES:  # Warm up every path once before timing it.
            for endpoint in (CEILING, f"/predict/{name}"):
                for _ in range(20):
                    requests.post(service.url + endpoint, json=PENGUIN, timeout=10)
        yield service


def _served(service: LiveService) -> list[str]:
    models = requests.get(f"{service.url}/models", timeout=10).json()["models"]
    return [model["name"] for model in models if model["serving"]]


def _predictors(log: Path) -> dict[str, str]:
    """What answers for each model, from the registry's log lines ("model X version V loaded:
    a compiled KIND (trained ...")."""
    lines = log.read_text(errors="replace").splitlines()
    found = {}
    for name in contract.MODEL_NAMES:
        said = [m for line in lines if (m := _LOADED.search(line)) and m["model"] == name]
        found[name] = said[-1]["kind"] if said else "unknown"
    return found


_LOADED = re.compile(r"model (?P<model>\S+) version \S+ loaded: a compiled (?P<kind>.+?) \(")


_REQUESTS_PER_S = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_PERCENTILE = re.compile(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
_TOTAL = re.compile(r"^\s+(\d+) requests in", re.MULTILINE)
_ERRORS = re.compile(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)$", re.MULTILINE)
_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _wrk(url: str, script: Path, connections: int, seconds: int, cpu: int) -> Run:
    # A long timeout, so that a stalled answer shows in the latencies rather than as an error.
    command = ["taskset", "--cpu-list", str(cpu), "wrk", "-t1", f"-c{connections}",
               f"-d{seconds}s", "--timeout", "10s", "--latency", "-s", str(script), url]
    output = subprocess.run(command, capture_output=True, text=True, check=True,
                            timeout=seconds + 60).stdout
    percentiles = {p: float(v) * _UNIT_MS[unit] for p, v, unit in _PERCENTILE.findall(output)}
    errors = 0
    for non_2xx, socket in _ERRORS.findall(output):
        errors += int(non_2xx) if non_2xx else sum(int(n) for n in re.findall(r"\d+", socket))
    return Run(float(_REQUESTS_PER_S.search(output)[1]), percentiles["50"], percentiles["99"],
               int(_TOTAL.search(output)[1]), errors)


def _best(runs: list[Run]) -> Run:
    """Each measure at its best over the rounds: another process on the machine only ever slows
    a run down, or stretches its tail."""
    return Run(max(r.requests_per_s for r in runs), min(r.p50_ms for r in runs),
               min(r.p99_ms for r in runs), sum(r.requests for r in runs),
               sum(r.errors for r in runs))


def _result(single: dict[tuple[str, int], Run], runs: dict[tuple[str, int], list[Run]],
            batch: dict[str, Run], served_by: dict[str, str], scale: Scale,
            cores: tuple[int, int]) -> SectionResult:
    table = Table(
        f"Single predictions, POST /predict/{{model}}: one uvicorn worker on core {cores[0]}, "
        f"wrk on core {cores[1]}",
        ["model", "predictor", "connections", "requests/s", "p50 ms", "p99 ms", "vs ceiling"], [],
        notes=[
            f"Each row is the best of {scale.rounds} runs of {scale.seconds} s (the endpoints "
            "take turns), each measure on its own.",
            "ceiling: POST /benchmark/ceiling, the same strictly validated penguin and a fixed "
            "answer, no model; vs ceiling compares with the ceiling of the same server and "
            "concurrency.",
            "predictor: the compiled predictor the isolated loader built, from the service's "
            "log.",
        ],
    )
    for connections in CONNECTIONS:
        ceiling = single[(CEILING, connections)]
        for endpoint in (CEILING, *(f"/predict/{n}" for n in contract.MODEL_NAMES)):
            measured = single[(endpoint, connections)]
            name = "ceiling" if endpoint == CEILING else endpoint.rpartition("/")[2]
            table.rows.append([
                name, "-" if endpoint == CEILING else served_by[name], connections,
                round(measured.requests_per_s), measured.p50_ms, measured.p99_ms,
                f"{measured.requests_per_s / ceiling.requests_per_s:.0%}",
            ])
    batches = Table(
        f"Batches of {BATCH_ROWS:,} penguins, POST /predict-batch/{{model}}, one connection",
        ["model", "predictor", "requests/s", "rows/s", "p50 ms", "p99 ms"],
        [[name, served_by[name], batch[name].requests_per_s,
          round(batch[name].requests_per_s * BATCH_ROWS), batch[name].p50_ms, batch[name].p99_ms]
         for name in contract.MODEL_NAMES],
    )
    errors = sum(r.errors for r in (*single.values(), *batch.values()))
    if errors:
        table.notes.append(f"{errors} answers were errors (non-2xx, or socket errors): these "
                           "numbers are not to be trusted")
    return SectionResult("serving", [table, batches], _targets(single, batch, errors), {
        "single": [{"predictor": "compiled", "endpoint": e, "connections": c,
                    "best": asdict(single[(e, c)]), "runs": [asdict(r) for r in measured]}
                   for (e, c), measured in runs.items()],
        "batch": [{"predictor": "compiled", "model": m, "rows": BATCH_ROWS, **asdict(r)}
                  for m, r in batch.items()],
        "served_by": served_by, "seconds_per_run": scale.seconds, "rounds": scale.rounds,
        "cores": {"service": cores[0], "load generator": cores[1]},
    })


def _targets(single: dict[tuple[str, int], Run], batch: dict[str, Run],
             errors: int) -> list[Target]:
    targets = []
    for connections in CONNECTIONS:
        ceiling = single[(CEILING, connections)].requests_per_s
        for name in contract.MODEL_NAMES:
            wanted = FOREST_SHARE_TARGET if name == "random_forest" else SINGLE_SHARE_TARGET
            share = single[(f"/predict/{name}", connections)].requests_per_s / ceiling
            targets.append(Target(
                f"{name} requests/s vs ceiling, {connections} connection(s)", f">= {wanted:.0%}",
                f"{share:.0%}", share >= wanted and not errors,
            ))
    slowest = max(contract.MODEL_NAMES, key=lambda n: single[(f"/predict/{n}", 8)].p99_ms)
    p99 = single[(f"/predict/{slowest}", 8)].p99_ms
    ceiling_p99 = single[(CEILING, 8)].p99_ms
    targets.append(Target("p99 latency at 8 connections, every model",
                           f"< {P99_TARGET_MS:.0f} ms",
                           f"{p99:.1f} ms ({slowest}; the ceiling's {ceiling_p99:.1f} ms)",
                           p99 < P99_TARGET_MS and not errors))
    rows_per_s = batch["logistic_regression"].requests_per_s * BATCH_ROWS
    targets.append(Target(f"logistic_regression batch rows/s, {BATCH_ROWS:,} per request",
                          f">= {BATCH_TARGET_ROWS_PER_S:,}", f"{rows_per_s:,.0f}",
                          rows_per_s >= BATCH_TARGET_ROWS_PER_S and not errors))
    return targets
