"""The Python client's retries, timeouts and typed answers, against real servers: the service
itself, behind a connection-dropping proxy, and a stand-in that fails on purpose."""

from __future__ import annotations

import contextlib
import http.server
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
import requests

from serving.client import PenguinsClient, ServiceError
from serving.schemas import Health, Prediction
from tests.serving.conftest import PENGUIN
from tests.tcp_proxy import tcp_proxy

ANSWERS = {"/health": b'{"status": "ok"}',
           "/ready": b'{"ready": true, "models_loaded": 5, "best_model": "svm"}'}


@contextlib.contextmanager
def failing_server(failures: int, status: int = 503, retry_after: str | None = None,
                   stall_seconds: float = 0.0) -> Iterator[tuple[str, list[float]]]:
    """A stand-in service that answers ``status`` to its first ``failures`` requests and then
    as the service would; yields its URL and when each request arrived."""
    arrivals: list[float] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            arrivals.append(time.monotonic())
            time.sleep(stall_seconds)
            failing = len(arrivals) <= failures
            body = b'{"status_code": %d, "detail": "not now"}' % status if failing \
                else ANSWERS[self.path]
            self.send_response(status if failing else 200)
            if failing and retry_after is not None:
                self.send_header("Retry-After", retry_after)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", arrivals
    finally:
        server.shutdown()
        server.server_close()


def _gaps(arrivals: list[float]) -> list[float]:
    return [later - earlier for earlier, later in zip(arrivals[:-1], arrivals[1:], strict=True)]


def test_answers_are_the_services_own_types(live_service):
    with PenguinsClient(live_service.url) as client:
        answer = client.predict(PENGUIN, model="knn")
        assert isinstance(answer, Prediction)
        assert answer.model.name == "knn"
        assert set(answer.probabilities) == {"Adelie", "Chinstrap", "Gentoo"}
        assert client.versions("knn").versions[0].state == "promoted"


@pytest.mark.parametrize("status", [502, 503, 504])
def test_a_passing_failure_is_tried_again_with_growing_pauses(status):
    with failing_server(failures=3, status=status) as (url, arrivals), \
            PenguinsClient(url, retries=3, backoff_seconds=0.1) as client:
        assert client.health() == Health(status="ok")
    assert len(arrivals) == 4
    gaps = _gaps(arrivals)
    assert gaps[1] >= 0.18 and gaps[2] >= 0.38 and gaps[2] > gaps[1] * 1.5, gaps


def test_the_pause_is_the_one_retry_after_asks_for():
    with failing_server(failures=1, status=503, retry_after="1") as (url, arrivals), \
            PenguinsClient(url, backoff_seconds=0.01) as client:
        assert client.health().status == "ok"
    assert _gaps(arrivals)[0] >= 0.95


def test_a_failure_that_stays_is_reported_after_the_last_try():
    with failing_server(failures=10, status=503) as (url, arrivals), \
            PenguinsClient(url, retries=2, backoff_seconds=0.01) as client, \
            pytest.raises(ServiceError) as error:
        client.health()
    assert len(arrivals) == 3
    assert error.value.status_code == 503 and error.value.detail == "not now"


@pytest.mark.parametrize("status", [400, 404, 500])
def test_a_refusal_or_a_bug_is_not_tried_again(status):
    with failing_server(failures=1, status=status) as (url, arrivals), \
            PenguinsClient(url, backoff_seconds=0.01) as client, \
            pytest.raises(ServiceError, match=str(status)):
        client.health()
    assert len(arrivals) == 1


def test_readiness_is_asked_once_so_that_it_answers_promptly():
    with failing_server(failures=1, status=503) as (url, arrivals), \
            PenguinsClient(url, backoff_seconds=1.0) as client:
        with pytest.raises(ServiceError, match="503"):
            client.ready()
        assert len(arrivals) == 1
        assert client.ready().ready is True


def test_an_answer_that_does_not_come_in_time_gives_up():
    with failing_server(failures=0, stall_seconds=3) as (url, arrivals), \
            PenguinsClient(url, timeout=(1.0, 0.3), retries=1, backoff_seconds=0.01) as client:
        started = time.monotonic()
        with pytest.raises(requests.RequestException, match="timed out"):
            client.health()
        assert time.monotonic() - started < 2.0
    assert len(arrivals) == 2


def test_a_dropped_connection_to_the_service_is_tried_again(live_service):
    port = urlsplit(live_service.url).port
    with tcp_proxy(("127.0.0.1", port), drop_first=2) as proxied, \
            PenguinsClient(f"http://127.0.0.1:{proxied}", backoff_seconds=0.01) as client:
        assert client.predict(PENGUIN, model="svm").model.name == "svm"
    with tcp_proxy(("127.0.0.1", port), drop_first=1) as proxied, \
            PenguinsClient(f"http://127.0.0.1:{proxied}", retries=0) as client, \
            pytest.raises(requests.ConnectionError):
        client.predict(PENGUIN, model="svm")
