"""The front door, against the real service under uvicorn (``python -m serving``).

Each attack is sent over a raw socket, bounded in size and time, while a monitor asks
``/health`` ten times a second: it must answer within 1 s throughout. The service runs with
small limits (set through its settings) so that the slow cases take seconds.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.serving.conftest import PENGUIN, LiveService, run_uvicorn, sample

LIMITS = {
    "SERVING_HEADER_TIMEOUT_SECONDS": "1", "SERVING_BODY_TIMEOUT_SECONDS": "1",
    "SERVING_KEEP_ALIVE_SECONDS": "1", "SERVING_SEND_TIMEOUT_SECONDS": "1",
    "SERVING_MAX_CONNECTIONS": "20",
    "SERVING_MAX_HEADER_BYTES": "16384", "SERVING_MAX_HEADERS": "64",
    "SERVING_MAX_REQUEST_LINE_BYTES": "8192",
}


class HealthMonitor:
    """Asks ``/health`` every 0.1 s from its own thread; records the slowest answer."""

    def __init__(self, url: str) -> None:
        self.url, self.slowest, self.failures = url, 0.0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with requests.Session() as session:
            while not self._stop.wait(0.1):
                started = time.perf_counter()
                try:
                    session.get(f"{self.url}/health", timeout=5).raise_for_status()
                except requests.RequestException as exc:
                    self.failures.append(repr(exc))
                self.slowest = max(self.slowest, time.perf_counter() - started)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def guarded(published, tmp_path_factory) -> Iterator[tuple[LiveService, Path]]:
    folder = tmp_path_factory.mktemp("front-door")
    models = Path(shutil.copytree(published.store, folder / "models"))
    log = folder / "service.log"
    with run_uvicorn(models, log, **LIMITS) as service:
        yield service, log


@pytest.fixture
def service(guarded) -> Iterator[LiveService]:
    """The guarded service, with ``/health`` watched for the length of one test."""
    live, _ = guarded
    monitor = HealthMonitor(live.url)
    yield live
    monitor.stop()
    assert monitor.failures == []
    assert monitor.slowest < 1.0, f"/health took {monitor.slowest:.2f} s"


def connect(service: LiveService) -> socket.socket:
    host, port = service.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def read_all(sock: socket.socket, seconds: float = 10) -> bytes:
    """Everything the server sends until it closes the connection (or ``seconds`` pass)."""
    sock.settimeout(seconds)
    chunks = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def status_of(answer: bytes) -> int | None:
    match = re.match(rb"HTTP/1\.1 (\d{3})", answer)
    return int(match.group(1)) if match else None


def rss_kib(service: LiveService) -> int:
    status = Path(f"/proc/{service.process.pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))


def test_an_endless_header_is_refused_before_it_is_buffered(service):
    before = rss_kib(service)
    with connect(service) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Padding: ")
        sent = 0
        try:
            while sent < 64 * 1024 * 1024:  # 64 MiB at most; the server should stop it far sooner
                sock.sendall(b"a" * 65536)
                sent += 65536
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = read_all(sock)
    assert status_of(answer) in (431, None), answer[:200]
    assert sent < 4 * 1024 * 1024, f"the server took {sent} bytes of one header"
    assert rss_kib(service) - before < 20 * 1024


def test_too_many_headers_or_too_long_a_request_line_are_refused(service):
    with connect(service) as sock:
        headers = "".join(f"X-{i}: {i}\r\n" for i in range(100))
        sock.sendall(f"GET /health HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
        assert status_of(read_all(sock)) == 431
    with connect(service) as sock:
        sock.sendall(b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(read_all(sock)) == 414


def statuses(answer: bytes) -> list[int]:
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)]


def send_until_refused(sock: socket.socket, start: bytes, limit: int) -> int:
    """Send ``start``, then padding, until the server stops reading or ``limit`` bytes went."""
    sock.sendall(start)
    sent = 0
    try:
        while sent < limit:
            sock.sendall(b"a" * 65536)
            sent += 65536
    except (BrokenPipeError, ConnectionResetError):
        pass
    return sent


def test_an_endless_trailer_is_refused(service):
    before = rss_kib(service)
    with connect(service) as sock:
        sent = send_until_refused(sock, b"POST /predict/svm HTTP/1.1\r\nHost: x\r\nContent-Type: "
                                  b"application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                                  b"2\r\n{}\r\n0\r\nX-Trailer: ", 64 * 1024 * 1024)
        answer = read_all(sock)
    # Refused at MAX_BODY_BYTES (1 MB); what more went out filled the sockets' buffers.
    assert sent < 16 * 1024 * 1024, f"the server took {sent} bytes of trailer"
    assert statuses(answer) in ([431], [413], []), answer[:200]
    assert rss_kib(service) - before < 20 * 1024


@pytest.mark.parametrize("prefix", [b"\r\n\r\n", b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"],
                         ids=["after-blank-lines", "pipelined-behind-a-small-request"])
def test_a_large_header_cannot_hide_behind_another_request(service, prefix):
    with connect(service) as sock:
        sock.sendall(prefix + b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000
                     + b"\r\nConnection: close\r\n\r\n")
        answer = read_all(sock)
    assert statuses(answer)[-1:] == [431], answer[:300]


def test_a_flood_of_pipelined_requests_is_cut_short(service):
    before = rss_kib(service)
    flood = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" * 6000
    socks = [connect(service) for _ in range(10)]
    try:
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.sendall(flood)
        answers = [read_all(sock) for sock in socks]
    finally:
        for sock in socks:
            sock.close()
    for answer in answers:
        assert len(statuses(answer)) < 50, "the server answered the whole flood"
    assert rss_kib(service) - before < 40 * 1024


def test_pipelined_requests_within_the_limits_are_all_answered(service):
    headers = "".join(f"X-{i}: {i}\r\n" for i in range(40))
    request = f"GET /health HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode()
    with connect(service) as sock:
        sock.sendall(request + request[:-2] + b"Connection: close\r\n\r\n")
        assert statuses(read_all(sock)) == [200, 200]


def test_a_body_the_application_did_not_read_is_not_taken_for_a_request(service):
    with connect(service) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
                     + b"a" * 100_000)
        assert statuses(read_all(sock, seconds=4)) == [200]


def test_clients_that_never_read_their_answers_do_not_keep_their_connections(service):
    request = b"GET /static/swagger-ui/swagger-ui-bundle.js HTTP/1.1\r\nHost: x\r\n\r\n" * 3
    readers = []
    for _ in range(19):  # with the monitor's, every connection the service takes
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        host, port = service.url.removeprefix("http://").split(":")
        sock.connect((host, int(port)))
        sock.sendall(request)
        readers.append(sock)
    try:
        time.sleep(4)  # the send timeout is 1 s
        assert requests.get(f"{service.url}/health", timeout=5).ok
    finally:
        for sock in readers:
            sock.close()


def test_headers_trickled_byte_by_byte_are_timed_out(service):
    with connect(service) as sock:
        started = time.monotonic()
        request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
        closed = False
        for byte in request:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            time.sleep(0.05)
            if time.monotonic() - started > 3:
                break
        answer = read_all(sock, seconds=5)
    assert closed or status_of(answer) == 408, answer[:200]
    assert time.monotonic() - started < 5


def test_an_idle_connection_is_closed(service):
    with connect(service) as sock:
        started = time.monotonic()
        assert read_all(sock, seconds=5) == b""
        assert time.monotonic() - started < 3


def test_a_keep_alive_connection_is_closed_when_idle(service):
    with connect(service) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        started = time.monotonic()
        answer = read_all(sock, seconds=5)
    assert status_of(answer) == 200
    assert time.monotonic() - started < 3, "the idle keep-alive connection stayed open"


def _counted(service: LiveService, route: str, status: str) -> float:
    text = requests.get(f"{service.url}/metrics", timeout=5).text
    return sample(text, "penguins_http_requests_total", method="POST", route=route,
                  status=status) or 0.0


def test_a_client_that_goes_away_mid_body_is_an_abort_not_an_error(service, guarded):
    _, log = guarded
    route = "/predict/{model_name}"
    aborts, errors = _counted(service, route, "499"), _counted(service, route, "500")
    log_before = log.read_text(errors="replace")
    body = json.dumps(PENGUIN).encode()
    for _ in range(30):
        with connect(service) as sock:
            sock.sendall(b"POST /predict/svm HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
                         + body[:20])
    # And one that trickles its body past the body timeout: closed by the server.
    with connect(service) as sock:
        sock.sendall(b"POST /predict/svm HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:5])
        started = time.monotonic()
        assert read_all(sock, seconds=5) == b""
        assert time.monotonic() - started < 3

    def all_counted() -> bool:
        return _counted(service, route, "499") - aborts == 31

    deadline = time.monotonic() + 10
    while not all_counted() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _counted(service, route, "499") - aborts == 31
    assert _counted(service, route, "500") == errors
    new_lines = log.read_text(errors="replace")[len(log_before):]
    assert "Traceback" not in new_lines
    assert new_lines.count("client went away during POST") == 31


def test_connections_beyond_the_limit_are_closed(service):
    held = [connect(service) for _ in range(19)]  # the monitor's session holds the 20th
    try:
        time.sleep(0.2)
        with connect(service) as extra:
            assert read_all(extra, seconds=3) == b""
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    assert requests.get(f"{service.url}/health", timeout=5).ok


@pytest.mark.parametrize("content_type", [
    "text/plain", "application/x-www-form-urlencoded", None,
])
def test_a_body_that_is_not_declared_json_is_refused(service, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    session = requests.Session()
    request = requests.Request("POST", f"{service.url}/predict/svm",
                               data=json.dumps(PENGUIN), headers=headers).prepare()
    if content_type is None:
        request.headers.pop("Content-Type", None)
    answer = session.send(request, timeout=10)
    assert answer.status_code == 415, answer.text
    assert answer.json()["extra"][0]["key"] == "Content-Type"


def test_a_refused_content_type_logs_no_traceback(service, guarded):
    _, log = guarded
    before = len(log.read_text(errors="replace"))
    answer = requests.post(f"{service.url}/predict/svm", data="{}", timeout=10,
                           headers={"Content-Type": "text/plain"})
    assert answer.status_code == 415
    time.sleep(0.2)
    assert "Traceback" not in log.read_text(errors="replace")[before:]


def test_json_with_a_charset_is_json(service):
    answer = requests.post(f"{service.url}/predict/svm", data=json.dumps(PENGUIN),
                           headers={"Content-Type": "application/json; charset=utf-8"},
                           timeout=10)
    assert answer.status_code == 200, answer.text


_ONE = json.dumps(PENGUIN)
_RELOCATED = _ONE[:-1] + ', "island": "Dream"}'


@pytest.mark.parametrize(("path", "body", "key"), [
    ("/predict/svm", json.dumps(PENGUIN)[:-1] + ', "sex": "female"}', "sex"),
    ("/predict/svm", json.dumps(PENGUIN)[:-1] + ', "s\\u0065x": "female"}', "sex"),
    ("/predict/svm", json.dumps(PENGUIN)[:-1] + ', "year" : 2008}', "year"),
    ("/predict/svm", json.dumps(PENGUIN)[:-1] + ',\n"year"\t\r\n:2008}', "year"),
    ("/predict/svm", json.dumps({**PENGUIN, "year": 2007}, indent=4)[:-1] + ',"sex"\n : "female"}',
     "sex"),
    ("/predict-batch/svm", f'{{"penguins": [{_ONE}, {_RELOCATED}]}}', "island"),
    ("/predict-batch/svm", f'{{"penguins": [{_ONE}], "penguins": [{_ONE}]}}', "penguins"),
])
def test_a_repeated_key_is_refused_by_name(service, path, body, key):
    answer = requests.post(f"{service.url}{path}", data=body,
                           headers={"Content-Type": "application/json"}, timeout=10)
    assert answer.status_code == 400, answer.text
    assert answer.json()["extra"][0]["key"] == key


def test_a_batch_without_repeats_is_answered(service):
    answer = requests.post(f"{service.url}/predict-batch/svm",
                           json={"penguins": [PENGUIN] * 500}, timeout=10)
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["predictions"]) == 500


def test_answers_name_no_server_path(service):
    models = service.models_dir
    linked = models / "intruder" / "20260101T000000.000000Z"
    linked.mkdir(parents=True)
    (linked / "model.pkl").write_bytes(b"not a pickle")
    (linked / "metadata.json").symlink_to("/etc/passwd")
    unsigned = models / "intruder" / "20260101T000001.000000Z"
    unsigned.mkdir()
    (unsigned / "model.pkl").write_bytes(b"not a pickle")
    (unsigned / "metadata.json").write_text("{}")
    try:
        def refused() -> list | None:
            listed = requests.get(f"{service.url}/models/intruder/versions", timeout=5)
            versions = listed.json()["versions"] if listed.status_code == 200 else []
            states = [v["state"] for v in versions]
            return versions if states == ["refused", "refused"] else None

        deadline = time.monotonic() + 10
        while (found := refused()) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert found is not None
        texts = [requests.get(f"{service.url}{path}", timeout=5).text
                 for path in ("/models", "/models/intruder", "/models/intruder/versions")]
        unavailable = requests.post(f"{service.url}/predict/intruder", json=PENGUIN, timeout=5)
        assert unavailable.status_code == 503
        for text in (*texts, unavailable.text):
            assert str(models) not in text and str(models.resolve()) not in text
            assert "/etc" not in text
    finally:
        shutil.rmtree(models / "intruder")
