"""The fast lane of ``POST /predict`` and ``POST /predict/{model_name}``: a middleware of these
two routes that answers a well-formed request itself, and hands every other one to the route.

For one penguin, Litestar's own work around a handler - its parameters parsed and checked, its
dependency resolved, the ``before_request`` hook, the handler's answer made into a response -
costs more than any of the models (the benchmark's serving section shows by how much). The lane
does only what a well-formed request needs, with the pieces the route itself uses: the body
decoded and checked by ``serving.validation`` into the route's ``Penguin``, the model found and
run by ``Predictions``, the ``Prediction`` encoded as Litestar encodes it. It runs after
Litestar's routing and inside its exception handling and the service's metrics middleware, so
the request is counted and timed as any other.

A request the lane is not sure of goes on to the route, its body replayed exactly as it came:
another method than POST (Litestar's OPTIONS), a query string (``?version=``), a body not
declared JSON, larger than ``MAX_BODY_BYTES`` (or declared so by its ``Content-Length``, before
any of it is read), empty, malformed, off the schema or with a repeated key, a model name the
route's pattern refuses, a model that is unknown, not served or too slow for the event loop, or
any error. So the route, and only the route, answers every error, as the OpenAPI document says.
"""

from __future__ import annotations

import re

import msgspec
from litestar.types import ASGIApp, Message, Middleware, Receive, Scope, Send

from serving import validation
from serving.contract import MODEL_NAME_PATTERN
from serving.predictions import Predictions
from serving.schemas import Penguin

# The route parameter's pattern, matched as msgspec matches a ``Meta(pattern=...)``.
_MODEL_NAME = re.compile(MODEL_NAME_PATTERN)
_JSON = [(b"content-type", b"application/json")]
"""Litestar's header for a JSON answer."""


def fast_lane(predictions: Predictions, max_body_bytes: int) -> Middleware:
    """The lane, for the routes' ``middleware``; ``max_body_bytes`` is the app's
    ``request_max_body_size``, beyond which the route answers 413. (A function, not an object:
    Litestar deep-copies what it registers, and a function is copied as itself.)"""

    def middleware(app: ASGIApp) -> ASGIApp:
        async def lane(scope: Scope, receive: Receive, send: Send) -> None:
            received: list[Message] = []
            answer = await _answer(scope, receive, received)
            if answer is None:
                await app(scope, _replaying(received, receive), send)
                return
            await send({"type": "http.response.start", "status": 200,
                        "headers": [*_JSON, (b"content-length", b"%d" % len(answer))]})
            await send({"type": "http.response.body", "body": answer, "more_body": False})

        return lane

    async def _answer(scope: Scope, receive: Receive, received: list[Message]) -> bytes | None:
        """The encoded answer, or None for the route to answer; ``received`` collects the
        messages read."""
        # The routes' own router also answers OPTIONS: only a POST is a prediction.
        if (scope["method"] != "POST" or scope["query_string"]
                or not validation.is_json(validation.content_type(scope))):
            return None
        name = scope["path_params"].get("model_name")
        if name is not None and not _MODEL_NAME.search(name):
            return None
        declared = validation.header(scope, b"content-length")
        if declared is not None and not (declared.isdigit() and int(declared) <= max_body_bytes):
            return None  # The route refuses it at once, before any of the body comes.
        body = await _body(receive, received, max_body_bytes)
        if body is None:
            return None
        try:
            penguin = validation.strictly_decoded(body, Penguin, _unnamed)
            model = predictions.served(name)
            if not model.predictor.fast:
                return None  # The route runs it in a worker thread.
            return msgspec.json.encode(predictions.answer(model, penguin))
        except Exception:  # noqa: BLE001 - a 4xx, a 503, or a fault: the route meets it too
            return None

    return middleware


async def _body(receive: Receive, received: list[Message], max_bytes: int) -> bytes | None:
    """The whole body, or None if it is larger than ``max_bytes`` or the client went away;
    ``received`` collects the messages read."""
    size, chunks = 0, []
    while True:
        message = await receive()
        received.append(message)
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _unnamed() -> str:
    # The lane drops the error, and the route names the request in its own.
    return ""


def _replaying(received: list[Message], receive: Receive) -> Receive:
    """``receive``, giving first the messages already read from it."""
    if not received:
        return receive
    pending = iter(received)

    async def replay() -> Message:
        return next(pending, None) or await receive()

    return replay

