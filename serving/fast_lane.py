"""The fast lanes of the predictions: a middleware of ``POST /predict`` and
``POST /predict/{model_name}``, and one of ``POST /predict-batch`` and
``POST /predict-batch/{model_name}``, each answering a well-formed request itself and handing
every other one to the route.

For one penguin, Litestar's own work around a handler - its parameters parsed and checked, its
dependency resolved, the ``before_request`` hook, the handler's answer made into a response -
costs more than any of the models (the benchmark's serving section shows by how much); for a
batch, building and encoding one answer struct per penguin cost more than the model. A lane
does only what a well-formed request needs, with the pieces the route itself uses: the body
decoded and checked by ``serving.validation`` into the route's type, the model found and run by
``Predictions``, the answer encoded as Litestar encodes it (a batch's written straight from the
predictor's arrays, ``serving.batch_answers``). It runs after Litestar's routing and inside its
exception handling and the service's metrics middleware, so the request is counted and timed as
any other.

A request a lane is not sure of goes on to the route, its body replayed exactly as it came:
another method than POST (Litestar's OPTIONS), a query string (``?version=``), a body not
declared JSON, larger than ``MAX_BODY_BYTES`` (or declared so by its ``Content-Length``, before
any of it is read), empty, malformed, off the schema (a batch of more than ``MAX_BATCH_ROWS``
penguins too) or with a repeated key, a model name the route's pattern refuses, a model that is
unknown, not served or, for one penguin, too slow for the event loop, or any error. So the
route, and only the route, answers every error, as the OpenAPI document says.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

import anyio.to_thread
import msgspec
from litestar.types import ASGIApp, Message, Middleware, Receive, Scope, Send

from serving import validation
from serving.contract import MODEL_NAME_PATTERN
from serving.predictions import Predictions
from serving.schemas import Penguin, batch_request_type

# The route parameter's pattern, matched as msgspec matches a ``Meta(pattern=...)``.
_MODEL_NAME = re.compile(MODEL_NAME_PATTERN)
_JSON = [(b"content-type", b"application/json")]
"""Litestar's header for a JSON answer."""


def fast_lane(predictions: Predictions, max_body_bytes: int) -> Middleware:
    """The lane of the single predictions, for their routes' ``middleware``; ``max_body_bytes``
    is the app's ``request_max_body_size``, beyond which the route answers 413. (A function, not
    an object: Litestar deep-copies what it registers, and a function is copied as itself.)"""

    async def answer(name: str | None, body: bytes) -> bytes | None:
        penguin = validation.strictly_decoded(body, Penguin, _unnamed)
        model = predictions.served(name)
        if not model.predictor.fast:
            return None  # The route runs it in a worker thread.
        return msgspec.json.encode(predictions.answer(model, penguin))

    return _lane(answer, max_body_bytes)


def batch_lane(predictions: Predictions, max_body_bytes: int, max_rows: int) -> Middleware:
    """The lane of the batch routes, which take at most ``max_rows`` penguins. The model runs
    in a worker thread, as the route's; the answer is encoded without its structs
    (``serving.batch_answers``)."""
    request_type = batch_request_type(max_rows)

    async def answer(name: str | None, body: bytes) -> bytes | None:
        batch = validation.strictly_decoded(body, request_type, _unnamed)
        model = predictions.served(name)
        return await anyio.to_thread.run_sync(predictions.encoded_batch, model, batch.penguins)

    return _lane(answer, max_body_bytes)


Answer = Callable[[str | None, bytes], Awaitable[bytes | None]]
"""A lane's answer to a body for the model named (None: the best), or None for the route to
answer; any exception also hands the request on."""


def _lane(answer: Answer, max_body_bytes: int) -> Middleware:
    def middleware(app: ASGIApp) -> ASGIApp:
        async def lane(scope: Scope, receive: Receive, send: Send) -> None:
            received: list[Message] = []
            encoded = await _answered(scope, receive, received)
            if encoded is None:
                await app(scope, _replaying(received, receive), send)
                return
            await send({"type": "http.response.start", "status": 200,
                        "headers": [*_JSON, (b"content-length", b"%d" % len(encoded))]})
            await send({"type": "http.response.body", "body": encoded, "more_body": False})

        return lane

    async def _answered(scope: Scope, receive: Receive, received: list[Message]
                        ) -> bytes | None:
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
            return await answer(name, body)
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

