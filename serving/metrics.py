"""Prometheus metrics, kept and written by ``prometheus_client``.

Each ``Metrics`` has its own ``CollectorRegistry`` (tests build many apps in one process; the
library's global registry would refuse the second). When ``PROMETHEUS_MULTIPROC_DIR`` is set
(prometheus_client's convention, which ``python -m serving`` follows when it starts several
workers), every worker writes its counts into files of that folder and ``/metrics`` answers the
sum of all of them, whichever worker takes the scrape. The folder must be empty when the first
worker starts (``python -m serving`` sees to it) and set before prometheus_client is imported.

The models loaded and the version each one answers with are not counters: they are read from
the registry's current snapshot when ``/metrics`` is scraped (``follow``), so they are right in
either mode, whichever worker answers.

Label values are only ever route templates, HTTP methods and statuses, and names of models that
were loaded: never a raw path or a name a caller made up, so the number of series stays bounded.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping

import prometheus_client.values
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""prometheus_client's variable: the folder where the workers of one service share counts."""

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""Upper bounds, in seconds, of the latency histograms' buckets."""

ServedVersions = Callable[[], Mapping[str, str]]
"""Each model that answers now, and the version it answers with."""

# A ``*_created`` gauge beside every series doubles their number, and multiprocess mode has none:
# without them the exposition is the same whether one worker or several answer.
disable_created_metrics()


class Metrics:
    """Every metric of the service; safe to update from the event loop and from worker threads.

    In multiprocess mode, one ``Metrics`` per process: two in the same process would write the
    same series of the same file.
    """

    def __init__(self) -> None:
        self._registry = registry = CollectorRegistry()
        self.http_requests = Counter(
            "penguins_http_requests_total", "HTTP requests answered, per route, method and status.",
            ("method", "route", "status"), registry=registry)
        self.http_seconds = Histogram(
            "penguins_http_request_duration_seconds", "Time to answer an HTTP request, per route.",
            ("route",), buckets=LATENCY_BUCKETS, registry=registry)
        self.predictions = Counter(
            "penguins_predictions_total", "Prediction requests answered, per model.",
            ("model",), registry=registry)
        self.predicted_rows = Counter(
            "penguins_predicted_rows_total", "Penguins classified, per model.",
            ("model",), registry=registry)
        self.prediction_seconds = Histogram(
            "penguins_prediction_duration_seconds", "Time spent in the model, per model.",
            ("model",), buckets=LATENCY_BUCKETS, registry=registry)
        self.reloads = Counter(
            "penguins_model_reloads_total",
            "Model versions loaded from MODELS_DIR, per model (by each worker that loaded it).",
            ("model",), registry=registry)
        self.load_errors = Counter(
            "penguins_model_load_errors_total",
            "Model files that could not be loaded (and were not served), per model (by each "
            "worker that tried).", ("model",), registry=registry)
        # The labelled children, looked up once: ``.labels()`` validates and locks every call.
        self._request_series: dict[tuple[str, str, int], tuple] = {}
        self._prediction_series: dict[str, tuple] = {}

        self.multiprocess_dir = os.environ.get(MULTIPROCESS_DIR_ENV) or None
        """The folder the workers share counts through, or None: this process's counts only."""
        if self.multiprocess_dir is None:
            self._exposed = registry
        else:
            if not getattr(prometheus_client.values.ValueClass, "_multiprocess", True):
                raise RuntimeError(f"{MULTIPROCESS_DIR_ENV} was set after prometheus_client "
                                   "was imported: this process's counts would not be shared")
            self._exposed = CollectorRegistry()
            MultiProcessCollector(self._exposed, self.multiprocess_dir)
        self._served: ServedVersions = dict
        self._exposed.register(_ServedCollector(lambda: self._served()))

    def follow(self, served: ServedVersions) -> None:
        """Read the models served, and their versions, from ``served`` at every scrape."""
        self._served = served

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        series = self._request_series.get((route, method, status))
        if series is None:
            series = self._request_series[(route, method, status)] = (
                self.http_requests.labels(method, route, str(status)),
                self.http_seconds.labels(route))
        series[0].inc()
        series[1].observe(seconds)

    def observe_prediction(self, model: str, rows: int, seconds: float) -> None:
        series = self._prediction_series.get(model)
        if series is None:
            series = self._prediction_series[model] = (
                self.predictions.labels(model), self.predicted_rows.labels(model),
                self.prediction_seconds.labels(model))
        series[0].inc()
        series[1].inc(rows)
        series[2].observe(seconds)

    def count_reload(self, model: str) -> None:
        self.reloads.labels(model).inc()

    def count_load_error(self, model: str) -> None:
        self.load_errors.labels(model).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric (of every worker, in multiprocess
        mode), to be sent as ``prometheus_client.CONTENT_TYPE_LATEST``."""
        return generate_latest(self._exposed)

    def close(self) -> None:
        """This worker is stopping: prometheus_client's bookkeeping for a dead process (its
        counts stay in the sums: they happened)."""
        if self.multiprocess_dir is not None:
            mark_process_dead(os.getpid(), self.multiprocess_dir)


class _ServedCollector:
    """``penguins_models_loaded`` and ``penguins_model_info{model, version}``, from what is
    served at the moment of the scrape."""

    def __init__(self, served: ServedVersions) -> None:
        self._served = served

    def collect(self) -> Iterable[Metric]:
        served = self._served()
        yield GaugeMetricFamily("penguins_models_loaded",
                                "Models loaded and answering predictions.", value=len(served))
        info = InfoMetricFamily("penguins_model", "The version each model answers with.",
                                labels=("model",))
        for name, version in sorted(served.items()):
            info.add_metric((name,), {"version": version})
        yield info
