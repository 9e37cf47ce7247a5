"""The fast lanes of the single and the batch predictions (``serving.fast_lane``): each answers
what its route would, byte for byte, and hands every request it is not sure of to the route,
body and all."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import requests

from penguins import contract
from serving.fast_lane import batch_lane, fast_lane
from serving.predictions import Predictions
from tests.serving.conftest import PENGUIN

BODY = json.dumps(PENGUIN).encode()
MAX_BODY_BYTES = 4096
MAX_ROWS = 5
BATCH = json.dumps({"penguins": [PENGUIN, {**PENGUIN, "island": "Biscoe", "sex": "female",
                                           "bill_depth_mm": 14.1}]}).encode()


def _answer(response: requests.Response) -> tuple[int, str | None, str | None, bytes]:
    return (response.status_code, response.headers.get("content-type"),
            response.headers.get("content-length"), response.content)


@pytest.mark.parametrize("model_name", contract.MODEL_NAMES)
def test_the_lane_answers_as_the_route_does(live_service, model_name):
    """``?version=`` always takes the route: asked for the promoted version, the route must
    give the very bytes and headers the lane gives."""
    url = f"{live_service.url}/predict/{model_name}"
    served = requests.get(f"{live_service.url}/models/{model_name}", timeout=10).json()
    version = served["version"]["version"]

    by_lane = _answer(requests.post(url, json=PENGUIN, timeout=10))
    by_route = _answer(requests.post(url, params={"version": version}, json=PENGUIN,
                                     timeout=10))

    assert by_lane[0] == 200
    assert by_lane == by_route
    assert json.loads(by_lane[3])["model"]["version"] == version


def test_the_best_model_through_the_lane_is_the_route_s_answer(live_service):
    best = requests.get(f"{live_service.url}/models", timeout=10).json()["best_model"]
    version = requests.get(f"{live_service.url}/models/{best}",
                           timeout=10).json()["version"]["version"]
    by_lane = _answer(requests.post(f"{live_service.url}/predict", json=PENGUIN, timeout=10))
    by_route = _answer(requests.post(f"{live_service.url}/predict/{best}",
                                     params={"version": version}, json=PENGUIN, timeout=10))
    assert by_lane[0] == 200
    assert by_lane == by_route


@pytest.fixture(scope="module")
def every_clean_row(published) -> dict[str, list[dict[str, Any]]]:
    """A batch of every clean row of the packaged data (as JSON writes them: floats)."""
    return {"penguins": json.loads(
        published.clean[list(contract.FEATURES)].to_json(orient="records"))}


@pytest.mark.parametrize("model_name", contract.MODEL_NAMES)
def test_the_batch_lane_answers_as_the_route_does(live_service, every_clean_row, model_name):
    """The lane writes a batch's answer from the predictor's arrays (``serving.batch_answers``),
    the route from one struct per penguin: the same bytes."""
    url = f"{live_service.url}/predict-batch/{model_name}"
    served = requests.get(f"{live_service.url}/models/{model_name}", timeout=10).json()
    version = served["version"]["version"]

    by_lane = _answer(requests.post(url, json=every_clean_row, timeout=30))
    by_route = _answer(requests.post(url, params={"version": version}, json=every_clean_row,
                                     timeout=30))

    assert by_lane[0] == 200
    assert by_lane == by_route
    answer = json.loads(by_lane[3])
    assert answer["model"]["version"] == version
    assert len(answer["predictions"]) == len(every_clean_row["penguins"])


def test_the_best_model_s_batch_through_the_lane_is_the_route_s_answer(live_service,
                                                                        every_clean_row):
    best = requests.get(f"{live_service.url}/models", timeout=10).json()["best_model"]
    version = requests.get(f"{live_service.url}/models/{best}",
                           timeout=10).json()["version"]["version"]
    by_lane = _answer(requests.post(f"{live_service.url}/predict-batch", json=every_clean_row,
                                    timeout=30))
    by_route = _answer(requests.post(f"{live_service.url}/predict-batch/{best}",
                                     params={"version": version}, json=every_clean_row,
                                     timeout=30))
    assert by_lane[0] == 200
    assert by_lane == by_route


class Route:
    """The ASGI app behind the lane: records what reaches it, reading the body as Litestar
    does (every message until the last), and answers 204."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []

    async def __call__(self, scope, receive, send) -> None:
        messages = [await receive()]
        while messages[-1]["type"] == "http.request" and messages[-1].get("more_body"):
            messages.append(await receive())
        self.calls.append((scope, messages))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def _call(predictions: Predictions, *, path_params: dict[str, str] | None = None,
          chunks: list[bytes] | None = None, query: bytes = b"",
          content_type: bytes | None = b"application/json", disconnect: bool = False,
          batch: bool = False) -> tuple[Route, list[dict[str, Any]]]:
    """One request through the single predictions' lane (``batch``: the batches' lane, which
    takes ``MAX_ROWS``) in front of a ``Route``; the route and what was sent."""
    route, sent = Route(), []
    chunks = [BATCH if batch else BODY] if chunks is None else chunks
    incoming = [{"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
                for i, chunk in enumerate(chunks)]
    if disconnect:
        incoming = [{"type": "http.disconnect"}]
    pending = iter(incoming)
    headers = [(b"content-type", content_type)] if content_type is not None else []
    scope = {"type": "http", "method": "POST", "path": "/predict/x", "query_string": query,
             "headers": headers, "path_params": path_params or {}}

    async def receive() -> dict[str, Any]:
        return next(pending, {"type": "http.disconnect"})

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    lane = (batch_lane(predictions, MAX_BODY_BYTES, MAX_ROWS) if batch
            else fast_lane(predictions, MAX_BODY_BYTES))
    asyncio.run(lane(route)(scope, receive, send))
    return route, sent


@pytest.fixture
def predictions(client) -> Predictions:
    """The service's ``Predictions``, as its routes receive them (a dependency)."""
    return client.app.dependencies["predictions"].dependency()


def test_a_well_formed_request_never_reaches_the_route(predictions, published):
    for params in ({}, {"model_name": "knn"}):
        # A body in three parts, as a client may send it.
        route, sent = _call(predictions, path_params=params,
                            chunks=[BODY[:10], BODY[10:50], BODY[50:]])
        assert route.calls == []
        start, body = sent
        assert start["status"] == 200
        assert dict(start["headers"]) == {b"content-type": b"application/json",
                                          b"content-length": str(len(body["body"])).encode()}
        answer = json.loads(body["body"])
        name = params.get("model_name") or predictions.registry.snapshot.best_model
        assert answer["model"] == {"name": name, "version": published.versions[name],
                                   "sha256": answer["model"]["sha256"],
                                   "trained_at": answer["model"]["trained_at"],
                                   "dag_run_id": answer["model"]["dag_run_id"]}
        assert answer["species"] in published.trained[name].classes


def test_a_well_formed_batch_never_reaches_the_route(predictions, published):
    for params in ({}, {"model_name": "random_forest"}):
        route, sent = _call(predictions, path_params=params, batch=True,
                            chunks=[BATCH[:100], BATCH[100:]])
        assert route.calls == []
        start, body = sent
        assert start["status"] == 200
        assert dict(start["headers"]) == {b"content-type": b"application/json",
                                          b"content-length": str(len(body["body"])).encode()}
        answer = json.loads(body["body"])
        name = params.get("model_name") or predictions.registry.snapshot.best_model
        assert answer["model"]["name"] == name
        assert answer["model"]["version"] == published.versions[name]
        assert len(answer["predictions"]) == 2
        for prediction in answer["predictions"]:
            assert prediction["species"] in published.trained[name].classes
            assert list(prediction["probabilities"]) == list(published.trained[name].classes)


REPEATED = BODY[:-1] + b', "sex": "female"}'


@pytest.mark.parametrize(("case", "request_parts"), [
    ("a version asked for", {"query": b"version=20000101T000000.000000Z"}),
    ("not declared JSON", {"content_type": b"text/plain"}),
    ("no content type", {"content_type": None}),
    ("an empty body", {"chunks": [b""]}),
    ("malformed JSON", {"chunks": [b'{"island": "Biscoe",']}),
    ("a number as a string", {"chunks": [BODY.replace(b"39.1", b'"39.1"')]}),
    ("a repeated key", {"chunks": [REPEATED]}),
    ("an unknown field", {"chunks": [BODY[:-1] + b', "colour": "grey"}']}),
    ("too large", {"chunks": [BODY, b" " * MAX_BODY_BYTES, b" " * 100]}),
    ("a name the pattern refuses", {"path_params": {"model_name": "../svm"}}),
    ("an unknown model", {"path_params": {"model_name": "no_such_model"}}),
])
def test_anything_else_reaches_the_route_with_its_body_as_it_came(predictions, case,
                                                                  request_parts):
    route, sent = _call(predictions, **request_parts)
    (scope, messages), = route.calls
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [204]
    chunks = request_parts.get("chunks", [BODY])
    assert [m.get("body") for m in messages] == chunks, case
    assert [m.get("more_body") for m in messages][-1] is False
    assert scope["query_string"] == request_parts.get("query", b"")


def _batch_of(*penguins: Any) -> bytes:
    return json.dumps({"penguins": list(penguins)}).encode()


@pytest.mark.parametrize(("case", "request_parts"), [
    ("a version asked for", {"query": b"version=20000101T000000.000000Z"}),
    ("not declared JSON", {"content_type": b"text/plain"}),
    ("no penguins", {"chunks": [_batch_of()]}),
    ("one penguin too many", {"chunks": [_batch_of(*[PENGUIN] * (MAX_ROWS + 1))]}),
    ("a bare list", {"chunks": [json.dumps([PENGUIN]).encode()]}),
    ("a bad second penguin", {"chunks": [_batch_of(PENGUIN, {**PENGUIN, "sex": "other"})]}),
    ("a repeated key in a penguin", {"chunks": [b'{"penguins": [' + REPEATED + b"]}"]}),
    ("penguins twice", {"chunks": [b'{"penguins": [' + BODY + b'], "penguins": []}']}),
    ("too large", {"chunks": [BATCH, b" " * MAX_BODY_BYTES]}),
    ("an unknown model", {"path_params": {"model_name": "no_such_model"}}),
])
def test_any_other_batch_reaches_the_route_with_its_body_as_it_came(predictions, case,
                                                                    request_parts):
    route, sent = _call(predictions, batch=True, **request_parts)
    (scope, messages), = route.calls
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [204]
    assert [m.get("body") for m in messages] == request_parts.get("chunks", [BATCH]), case
    assert scope["query_string"] == request_parts.get("query", b"")


def test_a_client_gone_before_its_body_reaches_the_route(predictions):
    route, sent = _call(predictions, disconnect=True)
    (_, messages), = route.calls
    assert messages == [{"type": "http.disconnect"}]



def test_a_body_declared_too_large_reaches_the_route_before_any_of_it_is_read(predictions):
    """The route refuses it (413) from its Content-Length alone: the lane must not wait for a
    body that may never come."""
    reads = []

    class Counting(Route):
        async def __call__(self, scope, receive, send) -> None:
            reads.append("route")
            await super().__call__(scope, receive, send)

    route = Counting()
    scope = {"type": "http", "method": "POST", "path": "/predict", "query_string": b"",
             "path_params": {}, "headers": [(b"content-type", b"application/json"),
                                            (b"content-length", b"%d" % (MAX_BODY_BYTES + 1))]}

    async def receive() -> dict[str, Any]:
        reads.append("body")
        return {"type": "http.request", "body": BODY, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        pass

    asyncio.run(fast_lane(predictions, MAX_BODY_BYTES)(route)(scope, receive, send))
    assert reads == ["route", "body"]


@pytest.mark.parametrize("path", ["/predict", "/predict/svm"])
def test_options_with_a_body_is_answered_as_options(client, path):
    answer = client.request("OPTIONS", path, content=BODY,
                            headers={"content-type": "application/json"})
    assert answer.status_code == 204, answer.text
    assert answer.content == b""
    assert "POST" in answer.headers["allow"]
