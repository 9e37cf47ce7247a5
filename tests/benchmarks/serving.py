"""Serving: requests/s and latency of the prediction service, against a bare Litestar echo.

Five freshly trained models are published into a scratch store by the pipeline's own code
(``penguins.publishing``, signed with the run's key pair); ``python -m serving`` (one uvicorn
worker behind the front door, no access log) serves them pinned to one core, and ``wrk`` loads
it from another core over loopback, with one thread and 8 connections, each run a few seconds
long.

The reference is a bare echo (``tests/benchmarks/bare_echo.py``): Litestar with none of the
service's layers (front door, middleware, strict request class and hook, dependencies, metrics),
a body with the same fields and constraints as ``Penguin`` and a constant answer shaped like a
``Prediction``, under uvicorn with the same options in a process of its own on the same core.
Each subject, ``POST /predict/{model}`` and the in-server ceiling ``POST /benchmark/ceiling``
(on only with ``SERVING_BENCHMARK_ENDPOINTS=1``: the service's own layers validating the same
penguin, answering a fixed prediction without a model), is measured back to back with the echo,
round after round, which of the two goes first alternating; what counts is the median of the
per-pair ratios, with their spread, so that a busy spell on this shared machine cancels out
within a pair.

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
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import requests

from penguins import contract, training
from serving.settings import Settings
from tests.benchmarks.processes import REPO
from tests.benchmarks.section import Context, SectionResult, Table, Target, progress
from tests.benchmarks.store import publish_models, train_models
from tests.serving.conftest import PENGUIN, LiveService, free_port, run_uvicorn, wait_until
from tests.support import stop

CEILING = "/benchmark/ceiling"
CONNECTIONS = 8
BATCH_ROWS = 1000
SINGLE_SHARE_TARGET = 0.8
FOREST_SHARE_TARGET = 0.7
P99_TARGET_MS = 5.0
BATCH_TARGET_ROWS_PER_S = 500_000


@dataclass(frozen=True)
class Scale:
    seconds: int
    """Of one wrk run."""
    rounds: int
    """Pairs (subject and bare echo, back to back) per subject, the subjects taking turns."""


FULL = Scale(seconds=3, rounds=5)
QUICK = Scale(seconds=1, rounds=3)


@dataclass(frozen=True)
class Run:
    """What one wrk run measured."""

    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    """Non-2xx answers and socket errors; any makes the run worthless."""


@dataclass(frozen=True)
class Pair:
    """A subject and the bare echo, measured one right after the other."""

    subject: Run
    echo: Run

    @property
    def ratio(self) -> float:
        return self.subject.requests_per_s / self.echo.requests_per_s

    @property
    def extra_us(self) -> float:
        """What the subject costs per request beyond the echo: the one core is saturated, so
        a request takes the core for 1 / (requests/s)."""
        return 1e6 / self.subject.requests_per_s - 1e6 / self.echo.requests_per_s


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
    progress("serving: each model's scikit-learn pipeline on a batch, in this process")
    pipeline_rows_per_s = _pipeline_rows_per_s(trained, clean)

    pairs: dict[str, list[Pair]] = {}
    batch: dict[str, Run] = {}
    log = folder / "uvicorn.log"
    with (_service(models_dir, log, server_cpu) as service,
          _bare_echo(folder / "bare-echo.log", server_cpu) as echo_url):
        served_by = _predictors(log)
        for turn in range(scale.rounds):
            for endpoint in _subjects():
                progress(f"serving: {endpoint} and the bare echo, round {turn + 1} of "
                         f"{scale.rounds}")
                # The echo answers at the model's path, so that both parse as long a request.
                echo = f"{echo_url}/predict/{_name(endpoint)}"
                runs = {}
                for which in (("subject", "echo") if turn % 2 else ("echo", "subject")):
                    url = service.url + endpoint if which == "subject" else echo
                    runs[which] = _wrk(url, bodies["one"], CONNECTIONS, scale.seconds, load_cpu)
                pairs.setdefault(endpoint, []).append(Pair(**runs))
        for name in contract.MODEL_NAMES:
            progress(f"serving: batches of {BATCH_ROWS:,} for {name}")
            batch[name] = _wrk(f"{service.url}/predict-batch/{name}", bodies["batch"], 1,
                               scale.seconds, load_cpu)
    return _result(pairs, batch, pipeline_rows_per_s, served_by, scale, (server_cpu, load_cpu))


def _subjects() -> list[str]:
    return [CEILING, *(f"/predict/{name}" for name in contract.MODEL_NAMES)]


def _name(endpoint: str) -> str:
    return "ceiling" if endpoint == CEILING else endpoint.rpartition("/")[2]


def _batch_rows(clean: pd.DataFrame) -> pd.DataFrame:
    """The batch's ``BATCH_ROWS`` penguins: the clean rows, repeated."""
    features = clean[list(contract.FEATURES)]
    return features.iloc[[i % len(features) for i in range(BATCH_ROWS)]].reset_index(drop=True)


def _pipeline_rows_per_s(trained: dict[str, training.TrainedModel], clean: pd.DataFrame
                         ) -> dict[str, float]:
    """Rows/s of each model's own scikit-learn pipeline, ``predict_proba`` on the batch's rows
    as a DataFrame in this process (no HTTP, no JSON): the median of seven calls."""
    frame = _batch_rows(clean)
    rows_per_s = {}
    for name, model in trained.items():
        seconds = []
        for _ in range(7):
            started = time.perf_counter()
            model.pipeline.predict_proba(frame)
            seconds.append(time.perf_counter() - started)
        rows_per_s[name] = BATCH_ROWS / statistics.median(seconds)
    return rows_per_s


def _write_scripts(folder: Path, clean: pd.DataFrame) -> dict[str, Path]:
    """wrk scripts that POST one penguin, and a batch of ``BATCH_ROWS`` clean rows (repeated)."""
    penguins = json.loads(_batch_rows(clean).to_json(orient="records"))
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
        for endpoint in _subjects():  # Warm up every path once before timing it.
            _warm_up(service.url + endpoint)
        yield service


@contextlib.contextmanager
def _bare_echo(log_file: Path, cpu: int) -> Iterator[str]:
    """``tests/benchmarks/bare_echo.py`` under uvicorn on ``cpu``; its base URL, warmed up."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = ["taskset", "--cpu-list", str(cpu), sys.executable, "-m",
               "tests.benchmarks.bare_echo", "--port", str(port),
               "--keep-alive", str(Settings.from_env().keep_alive_seconds)]
    with log_file.open("wb") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: _echo_answers(process, url), timeout=60, interval=0.1)
        for endpoint in _subjects():
            _warm_up(f"{url}/predict/{_name(endpoint)}")
        yield url
    finally:
        stop(process)


def _echo_answers(process: subprocess.Popen, url: str) -> bool:
    if process.poll() is not None:
        raise RuntimeError(f"the bare echo exited with status {process.returncode}")
    try:
        return requests.post(f"{url}/predict/ceiling", json=PENGUIN, timeout=1).ok
    except requests.ConnectionError:
        return False


def _warm_up(url: str) -> None:
    for _ in range(20):
        requests.post(url, json=PENGUIN, timeout=10).raise_for_status()


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


@dataclass(frozen=True)
class Summary:
    """A subject's pairs, each measure as its median over the rounds."""

    ratio: float
    ratio_min: float
    ratio_max: float
    extra_us: float
    subject: Run
    echo: Run


def _summary(pairs: list[Pair]) -> Summary:
    ratios = [pair.ratio for pair in pairs]
    return Summary(statistics.median(ratios), min(ratios), max(ratios),
                   statistics.median(pair.extra_us for pair in pairs),
                   _median([pair.subject for pair in pairs]),
                   _median([pair.echo for pair in pairs]))


def _median(runs: list[Run]) -> Run:
    return Run(statistics.median(r.requests_per_s for r in runs),
               statistics.median(r.p50_ms for r in runs),
               statistics.median(r.p99_ms for r in runs),
               sum(r.requests for r in runs), sum(r.errors for r in runs))


def _result(pairs: dict[str, list[Pair]], batch: dict[str, Run],
            pipeline_rows_per_s: dict[str, float], served_by: dict[str, str], scale: Scale,
            cores: tuple[int, int]) -> SectionResult:
    summaries = {endpoint: _summary(measured) for endpoint, measured in pairs.items()}
    table = Table(
        f"Single predictions, {CONNECTIONS} connections, each subject against a bare Litestar "
        f"echo: both one uvicorn worker on core {cores[0]}, wrk on core {cores[1]}",
        ["subject", "predictor", "vs echo", "vs echo min-max", "+µs/request", "req/s",
         "p50 ms", "p99 ms", "echo req/s", "echo p50 ms", "echo p99 ms"], [],
        notes=[
            f"{scale.rounds} pairs of {scale.seconds} s runs per subject, the subjects taking "
            "turns; in a pair the subject and the echo run back to back, which goes first "
            "alternating. vs echo: the median of the pairs' requests/s ratios (subject / echo), "
            "and their spread; every other figure is a median over the pairs.",
            "+µs/request: 1/(subject's requests/s) - 1/(echo's), what the subject costs per "
            "request on its saturated core beyond Litestar's and uvicorn's own work.",
            "bare echo (tests/benchmarks/bare_echo.py): Litestar with no middleware, the default "
            "request class, no dependencies or metrics, the same penguin fields and constraints, "
            "a constant Prediction-shaped answer; uvicorn with httptools, no access log, no "
            "front door.",
            "in-server ceiling: POST /benchmark/ceiling on the service, the same strictly "
            "validated penguin and a fixed answer, no model: the service's own layers alone.",
            "predictor: the compiled predictor the isolated loader built, from the service's "
            "log.",
        ],
    )
    for endpoint in _subjects():
        summary, name = summaries[endpoint], _name(endpoint)
        table.rows.append([
            "in-server ceiling (reference)" if endpoint == CEILING else name,
            "-" if endpoint == CEILING else served_by[name],
            f"{summary.ratio:.0%}", f"{summary.ratio_min:.0%}-{summary.ratio_max:.0%}",
            round(summary.extra_us), round(summary.subject.requests_per_s),
            summary.subject.p50_ms, summary.subject.p99_ms, round(summary.echo.requests_per_s),
            summary.echo.p50_ms, summary.echo.p99_ms,
        ])
    batches = Table(
        f"Batches of {BATCH_ROWS:,} penguins, POST /predict-batch/{{model}}, one connection",
        ["model", "predictor", "requests/s", "rows/s", "p50 ms", "p99 ms",
         "scikit-learn pipeline rows/s", "service / pipeline"],
        [[name, served_by[name], batch[name].requests_per_s,
          round(batch[name].requests_per_s * BATCH_ROWS), batch[name].p50_ms, batch[name].p99_ms,
          round(pipeline_rows_per_s[name]),
          f"{batch[name].requests_per_s * BATCH_ROWS / pipeline_rows_per_s[name]:.2f}"]
         for name in contract.MODEL_NAMES],
        notes=["scikit-learn pipeline rows/s: the model's own pipeline, predict_proba of the "
               "same rows as a DataFrame, in the benchmark's process: no HTTP, no JSON; the "
               "service's rows/s include both."],
    )
    errors = (sum(p.subject.errors + p.echo.errors for ps in pairs.values() for p in ps)
              + sum(r.errors for r in batch.values()))
    if errors:
        table.notes.append(f"{errors} answers were errors (non-2xx, or socket errors): these "
                           "numbers are not to be trusted")
    return SectionResult("serving", [table, batches], _targets(summaries, batch, errors), {
        "single": [{"predictor": "compiled", "endpoint": endpoint, "connections": CONNECTIONS,
                    "reference": "bare echo", "median": asdict(summaries[endpoint]),
                    "pairs": [{"subject": asdict(p.subject), "echo": asdict(p.echo),
                               "ratio": p.ratio} for p in measured]}
                   for endpoint, measured in pairs.items()],
        "batch": [{"predictor": "compiled", "model": m, "rows": BATCH_ROWS, **asdict(r),
                   "pipeline_rows_per_s": pipeline_rows_per_s[m]} for m, r in batch.items()],
        "served_by": served_by, "seconds_per_run": scale.seconds, "rounds": scale.rounds,
        "cores": {"service and bare echo": cores[0], "load generator": cores[1]},
    })


def _targets(summaries: dict[str, Summary], batch: dict[str, Run],
             errors: int) -> list[Target]:
    targets = []
    for name in contract.MODEL_NAMES:
        wanted = FOREST_SHARE_TARGET if name == "random_forest" else SINGLE_SHARE_TARGET
        summary = summaries[f"/predict/{name}"]
        targets.append(Target(
            f"{name} requests/s vs the bare echo, {CONNECTIONS} connections", f">= {wanted:.0%}",
            f"{summary.ratio:.0%} ({summary.ratio_min:.0%}-{summary.ratio_max:.0%})",
            summary.ratio >= wanted and not errors,
        ))
    slowest = max(contract.MODEL_NAMES, key=lambda n: summaries[f"/predict/{n}"].subject.p99_ms)
    p99 = summaries[f"/predict/{slowest}"].subject.p99_ms
    ceiling = summaries[CEILING]
    targets.append(Target(f"p99 latency at {CONNECTIONS} connections, every model (median of "
                          "the rounds)", f"< {P99_TARGET_MS:.0f} ms",
                          f"{p99:.1f} ms ({slowest}; the in-server ceiling's "
                          f"{ceiling.subject.p99_ms:.1f} ms, the bare echo's "
                          f"{ceiling.echo.p99_ms:.1f} ms)",
                          p99 < P99_TARGET_MS and not errors))
    rows_per_s = batch["logistic_regression"].requests_per_s * BATCH_ROWS
    targets.append(Target(f"logistic_regression batch rows/s, {BATCH_ROWS:,} per request",
                          f">= {BATCH_TARGET_ROWS_PER_S:,}", f"{rows_per_s:,.0f}",
                          rows_per_s >= BATCH_TARGET_ROWS_PER_S and not errors))
    return targets
