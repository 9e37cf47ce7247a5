"""The service's front door: limits on what a connection may send, enforced before Litestar.

uvicorn's httptools protocol buffers a request's line, headers and trailers without bound, never
times out a client that trickles them (any byte cancels its keep-alive timer) or one that never
reads its answers, queues any number of pipelined requests, and takes any number of connections.
``GuardedHttpToolsProtocol`` keeps uvicorn's parser and adds, from ``Settings``:

- the request line (``SERVING_MAX_REQUEST_LINE_BYTES``): beyond it, 414;
- a request's line and headers (``SERVING_MAX_HEADER_BYTES``), counted as they are handed to
  the parser in slices of at most ``_SLICE`` bytes and again as the parser reports them (so
  leading blank lines or a request pipelined behind another count too), and their number
  (``SERVING_MAX_HEADERS``): beyond them, 431; trailers after a chunked body are refused too;
- the bytes after the headers (``MAX_BODY_BYTES``, plus chunk framing): beyond them, 413;
- at most ``_MAX_PIPELINED`` requests waiting behind the one being answered;
- the time from a connection's start, or the end of its previous response, to the end of the
  next request's headers (``SERVING_HEADER_TIMEOUT_SECONDS``): then 408 if part of a request
  came, else the idle connection is closed;
- the time from the end of the headers to the end of the body (``SERVING_BODY_TIMEOUT_SECONDS``)
  and the time an answer may wait for the client to read it (``SERVING_SEND_TIMEOUT_SECONDS``):
  then the connection is dropped;
- the number of open connections (``SERVING_MAX_CONNECTIONS``): one beyond it is dropped at once.

Each refusal answers once and closes the connection: nothing of a refused request reaches the
application, and a client that does not read even that is dropped after ``_GRACE_SECONDS``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from http import HTTPStatus
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serving.settings import Settings

log = logging.getLogger("serving.front_door")

_SLICE = 1024
"""Bytes handed to the parser at a time while it reads a request's headers: what a request's
headers may exceed ``max_header_bytes`` by before they are refused."""
_MAX_PIPELINED = 8
_GRACE_SECONDS = 1.0
_CHUNK_FRAMING_BYTES = 64 * 1024
"""Allowance for chunk-size lines on top of ``max_body_bytes``."""
_WARN_EVERY_SECONDS = 10.0


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the front door's limits (see the module docstring)."""

    _last_connection_warning = 0.0
    """When a refused connection was last logged: a flood of them logs one line per 10 s."""

    def __init__(self, *args: Any, settings: Settings, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._settings = settings
        self._in_headers = True
        self._head_bytes = 0
        """Bytes handed to the parser since the last message ended, while reading headers."""
        self._parsed_head_bytes = 0
        """The request line and headers of the current message, as the parser reports them."""
        self._body_bytes = 0
        self._header_count = 0
        self._refusal: tuple[HTTPStatus, str] | None = None
        self._deadline: tuple[str, float] | None = None
        """What is awaited ("headers" or "body") and by when (the loop's clock), if anything."""
        self._timer: asyncio.TimerHandle | None = None
        self._send_deadline: asyncio.TimerHandle | None = None

    # --- the connection ---

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self._settings.max_connections:
            now = time.monotonic()
            if now - GuardedHttpToolsProtocol._last_connection_warning > _WARN_EVERY_SECONDS:
                GuardedHttpToolsProtocol._last_connection_warning = now
                log.warning("refusing connections: SERVING_MAX_CONNECTIONS (%d) are open",
                            self._settings.max_connections)
            transport.abort()
            return
        self._await("headers", self._settings.header_timeout_seconds)

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._timer, self._send_deadline):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        while data and self._refusal is None and not self.transport.is_closing():
            if self._in_headers:
                if self._head_bytes >= self._settings.max_header_bytes:
                    self._refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                                 f"headers over {self._settings.max_header_bytes} bytes")
                    return
                piece, data = data[:_SLICE], data[_SLICE:]
                self._head_bytes += len(piece)
            else:
                piece, data = data, b""
                self._body_bytes += len(piece)
                if self._body_bytes > self._settings.max_body_bytes + _CHUNK_FRAMING_BYTES:
                    self._refuse(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                 f"a body over {self._settings.max_body_bytes} bytes")
                    return
            super().data_received(piece)
        if self._refusal is not None and not self.transport.is_closing():
            self._answer_refusal()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_deadline is None:
            self._send_deadline = self.loop.call_later(
                self._settings.send_timeout_seconds, self._drop,
                "the client read no answer for", self._settings.send_timeout_seconds)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_deadline is not None:
            self._send_deadline.cancel()
            self._send_deadline = None

    # --- parser callbacks ---

    def on_message_begin(self) -> None:
        if self._refusal is not None:
            return
        super().on_message_begin()
        self._in_headers, self._parsed_head_bytes, self._header_count = True, 0, 0

    def on_url(self, url: bytes) -> None:
        if self._refusal is not None:
            return
        super().on_url(url)
        if len(self.url) > self._settings.max_request_line_bytes:
            self._refusal = (HTTPStatus.REQUEST_URI_TOO_LONG, "a request target over "
                             f"{self._settings.max_request_line_bytes} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._refusal is not None:
            return
        if not self._in_headers:
            self._refusal = (HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "a trailer")
            return
        self._header_count += 1
        self._parsed_head_bytes += len(name) + len(value) + 4  # ": " and CRLF
        if self._header_count > self._settings.max_headers:
            self._refusal = (HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                             f"more than {self._settings.max_headers} headers")
            return
        if len(self.url) + self._parsed_head_bytes > self._settings.max_header_bytes:
            self._refusal = (HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                             f"headers over {self._settings.max_header_bytes} bytes")
            return
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refusal is not None:
            return  # no request cycle: nothing of it reaches the application
        if len(self.pipeline) >= _MAX_PIPELINED:
            self._refusal = (HTTPStatus.TOO_MANY_REQUESTS,
                             f"more than {_MAX_PIPELINED} pipelined requests")
            return
        self._in_headers, self._body_bytes = False, 0
        self._await("body", self._settings.body_timeout_seconds)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._refusal is None:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refusal is not None:
            return
        # The next message's bytes start here.
        self._in_headers, self._head_bytes = True, 0
        self._deadline = None
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Waiting for the next request's headers again (a body still arriving, the rest of an
        # answered request's or a pipelined one's, has its own deadline).
        if (not self.transport.is_closing() and self._in_headers and not self.pipeline
                and self._deadline is None):
            self._await("headers", self._settings.header_timeout_seconds)

    # --- the limits ---

    def _await(self, what: str, seconds: float) -> None:
        """Expect ``what`` within ``seconds``. One timer per connection serves every deadline:
        moving a deadline later is arithmetic, and the timer, when it fires early, sleeps on to
        the current one, so a keep-alive connection does not make and cancel timers for every
        request it carries."""
        due = self.loop.time() + seconds
        self._deadline = (what, due)
        if self._timer is not None and self._timer.when() > due:
            self._timer.cancel()
            self._timer = None
        if self._timer is None:
            self._timer = self.loop.call_at(due, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._deadline is None or self.transport.is_closing():
            return
        what, due = self._deadline
        if self.loop.time() < due:
            self._timer = self.loop.call_at(due, self._on_timer)
            return
        self._deadline = None
        if what == "body":
            self._drop("the request's body took longer than", self._settings.body_timeout_seconds)
        else:
            self._headers_too_slow()

    def _headers_too_slow(self) -> None:
        if not self._in_headers or self._answering():
            return
        if self._head_bytes:
            self._refuse(HTTPStatus.REQUEST_TIMEOUT, "headers took longer than "
                         f"{self._settings.header_timeout_seconds:g} s")
        else:
            self._close()  # an idle connection: nothing to answer

    def _answering(self) -> bool:
        """A request is being answered: the next one may well take its time."""
        return self.cycle is not None and not self.cycle.response_complete

    def _drop(self, why: str, seconds: float) -> None:
        if not self.transport.is_closing():
            log.info("dropped a connection: %s %g s", why, seconds)
        self.transport.abort()

    def _refuse(self, status: HTTPStatus, reason: str) -> None:
        self._refusal = (status, reason)
        self._answer_refusal()

    def _answer_refusal(self) -> None:
        status, reason = self._refusal
        log.info("refused a request with %d: %s", status.value, reason)
        body = f'{{"status_code": {status.value}, "detail": "{status.phrase}"}}'.encode()
        self.transport.write(
            f"HTTP/1.1 {status.value} {status.phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body
        )
        self._close()

    def _close(self) -> None:
        """Close once what was written has gone; drop the connection if it has not gone soon."""
        self.transport.close()
        self.loop.call_later(_GRACE_SECONDS, self.transport.abort)
