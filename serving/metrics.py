"""Prometheus metrics, written in the text exposition format by hand (no client library needed).

Label values are only ever route templates, HTTP methods and statuses, and names of models that
were loaded: never a raw path or a name a caller made up, so the number of series stays bounded.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

Labels = tuple[tuple[str, str], ...]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""Upper bounds, in seconds, of the latency histograms' buckets."""


class Counter:
    def __init__(self, name: str, help_text: str) -> None:
        self.name, self.help_text = name, help_text
        self._values: dict[Labels, float] = defaultdict(float)

    def inc(self, labels: Labels, amount: float = 1.0) -> None:
        self._values[labels] += amount

    def value(self, labels: Labels) -> float:
        return self._values.get(labels, 0.0)

    def lines(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help_text}"
        yield f"# TYPE {self.name} counter"
        for labels, value in sorted(self._values.items()):
            yield f"{self.name}{_format(labels)} {value:g}"


@dataclass
class _Series:
    counts: list[int]
    """Observations per bucket, not cumulative; the last bucket is +Inf."""
    total: float = 0.0


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.name, self.help_text, self.buckets = name, help_text, buckets
        self._values: dict[Labels, _Series] = {}

    def observe(self, labels: Labels, seconds: float) -> None:
        series = self._values.get(labels)
        if series is None:
            series = self._values[labels] = _Series([0] * (len(self.buckets) + 1))
        series.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        series.total += seconds

    def lines(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help_text}"
        yield f"# TYPE {self.name} histogram"
        for labels, series in sorted(self._values.items()):
            cumulative = 0
            for bound, count in zip((*self.buckets, float("inf")), series.counts, strict=True):
                cumulative += count
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                yield f"{self.name}_bucket{_format((*labels, ('le', le)))} {cumulative}"
            yield f"{self.name}_sum{_format(labels)} {series.total:.6f}"
            yield f"{self.name}_count{_format(labels)} {cumulative}"


class Metrics:
    """Every metric of the service; safe to update from the event loop and from worker threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.http_requests = Counter(
            "penguins_http_requests_total", "HTTP requests answered, per route, method and status.")
        self.http_seconds = Histogram(
            "penguins_http_request_duration_seconds", "Time to answer an HTTP request, per route.")
        self.predictions = Counter(
            "penguins_predictions_total", "Prediction requests answered, per model.")
        self.predicted_rows = Counter(
            "penguins_predicted_rows_total", "Penguins classified, per model.")
        self.prediction_seconds = Histogram(
            "penguins_prediction_duration_seconds", "Time spent in the model, per model.")
        self.reloads = Counter(
            "penguins_model_reloads_total", "Model versions loaded from MODELS_DIR, per model.")
        self.load_errors = Counter(
            "penguins_model_load_errors_total",
            "Model files that could not be loaded (and were not served), per model.")

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            self.http_requests.inc((("method", method), ("route", route), ("status", str(status))))
            self.http_seconds.observe((("route", route),), seconds)

    def observe_prediction(self, model: str, rows: int, seconds: float) -> None:
        labels = (("model", model),)
        with self._lock:
            self.predictions.inc(labels)
            self.predicted_rows.inc(labels, rows)
            self.prediction_seconds.observe(labels, seconds)

    def count_reload(self, model: str) -> None:
        with self._lock:
            self.reloads.inc((("model", model),))

    def count_load_error(self, model: str) -> None:
        with self._lock:
            self.load_errors.inc((("model", model),))

    def render(self, models_loaded: int) -> str:
        """The Prometheus text exposition of every metric, ``models_loaded`` as a gauge."""
        with self._lock:
            lines = [
                "# HELP penguins_models_loaded Models loaded and answering predictions.",
                "# TYPE penguins_models_loaded gauge",
                f"penguins_models_loaded {models_loaded}",
            ]
            for metric in (self.http_requests, self.http_seconds, self.predictions,
                           self.predicted_rows, self.prediction_seconds, self.reloads,
                           self.load_errors):
                lines.extend(metric.lines())
        return "\n".join(lines) + "\n"


def _format(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_escape(value)}"' for key, value in labels) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
