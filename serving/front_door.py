"""The service's front door: limits on what a connection may send, enforced before Litestar.

uvicorn's httptools protocol buffers a request's line and headers without bound, never times
out a client that trickles them (any byte cancels its keep-alive timer), and takes any number
of connections. ``GuardedHttpToolsProtocol`` keeps uvicorn's parser and adds, from ``Settings``:

- the request line (``SERVING_MAX_REQUEST_LINE_BYTES``): beyond it, 414;
- the bytes of the request line and headers (``SERVING_MAX_HEADER_BYTES``), counted as they
  arrive, before the parser buffers them, and the number of headers (``SERVING_MAX_HEADERS``):
  beyond them, 431;
- the time from a connection's start, or the end of its previous response, to the end of the
  next request's headers (``SERVING_HEADER_TIMEOUT_SECONDS``): then 408 if part of a request
  came, else the idle connection is closed;
- the time from the end of the headers to the end of the body (``SERVING_BODY_TIMEOUT_SECONDS``):
  then the connection is closed, and the application sees the client go away;
- the number of open connections (``SERVING_MAX_CONNECTIONS``): a connection beyond it is
  closed at once.

Each refusal closes the connection: nothing of a refused request reaches the application.
"""

from __future__ import annotations

import asyncio
import logging
import re
from http import HTTPStatus
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serving.settings import Settings

log = logging.getLogger("serving.front_door")

_END_OF_HEADERS = re.compile(rb"\r?\n\r?\n")


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the front door's limits (see the module docstring)."""

    def __init__(self, *args: Any, settings: Settings, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._settings = settings
        self._in_headers = True
        self._head_bytes = 0
        self._header_count = 0
        self._refusal: HTTPStatus | None = None
        self._reason = ""
        self._deadline: asyncio.TimerHandle | None = None

    # --- connections ---

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self._settings.max_connections:
            log.warning("refused a connection: %d open, SERVING_MAX_CONNECTIONS is %d",
                        len(self.connections) - 1, self._settings.max_connections)
            transport.abort()
            return
        self._await_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None or self.transport.is_closing():
            return
        if self._in_headers:
            end = _END_OF_HEADERS.search(data)
            self._head_bytes += end.end() if end else len(data)
            if self._head_bytes > self._settings.max_header_bytes:
                self._refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                             f"the request line and headers exceed "
                             f"{self._settings.max_header_bytes} bytes")
                return
        super().data_received(data)
        if self._refusal is not None:
            self._refuse(self._refusal, self._reason)

    # --- parser callbacks ---

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self._settings.max_request_line_bytes and self._refusal is None:
            self._refusal = HTTPStatus.REQUEST_URI_TOO_LONG
            self._reason = (f"the request target is longer than "
                            f"{self._settings.max_request_line_bytes} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self._settings.max_headers:
            if self._refusal is None:
                self._refusal = HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
                self._reason = f"more than {self._settings.max_headers} headers"
            return
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refusal is not None:
            return  # no request cycle: nothing of it reaches the application
        self._in_headers = False
        self._cancel_deadline()
        self._deadline = self.loop.call_later(self._settings.body_timeout_seconds,
                                              self._body_too_slow)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._refusal is None:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refusal is not None:
            return
        self._cancel_deadline()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._await_request()

    # --- the limits ---

    def _await_request(self) -> None:
        self._in_headers, self._head_bytes, self._header_count = True, 0, 0
        self._cancel_deadline()
        self._deadline = self.loop.call_later(self._settings.header_timeout_seconds,
                                              self._headers_too_slow)

    def _headers_too_slow(self) -> None:
        if self._in_headers and not self.transport.is_closing():
            if self._head_bytes:
                self._refuse(HTTPStatus.REQUEST_TIMEOUT, "the request's headers took longer "
                             f"than {self._settings.header_timeout_seconds:g} s")
            else:
                self.transport.close()  # an idle connection: nothing to answer

    def _body_too_slow(self) -> None:
        if not self.transport.is_closing():
            log.info("closed a connection whose request body took longer than %g s",
                     self._settings.body_timeout_seconds)
            self.transport.close()

    def _refuse(self, status: HTTPStatus, reason: str) -> None:
        """Answer ``status`` and close: nothing more of this connection is read."""
        self._refusal = status
        log.info("refused a request with %d: %s", status.value, reason)
        body = f'{{"status_code": {status.value}, "detail": "{status.phrase}"}}'.encode()
        self.transport.write(
            f"HTTP/1.1 {status.value} {status.phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body
        )
        self.transport.close()
        self._cancel_deadline()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
