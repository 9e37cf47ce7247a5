"""The service's settings: every knob, read from the environment in this one place."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

_T = TypeVar("_T", int, float)

DEFAULT_MODELS_DIR = Path(__file__).resolve().parents[1] / "shared_models"


@dataclass(frozen=True)
class Settings:
    """What the service reads from its environment; every field has a usable default."""

    models_dir: Path = DEFAULT_MODELS_DIR
    """``MODELS_DIR``: the folder the pipeline publishes into (default: the repository's
    ``shared_models/``, where the DAG writes). The service only ever reads it."""

    signing_key: bytes | None = None
    """``MODEL_SIGNING_KEY``: when set (non-empty), a model is served only if its metadata
    carries a matching HMAC-SHA256 signature under this key. Empty or unset: no signature needed."""

    host: str = "127.0.0.1"
    """``SERVING_HOST``: the address ``python -m serving`` listens on."""

    port: int = 8989
    """``SERVING_PORT``: the port ``python -m serving`` listens on."""

    max_batch_rows: int = 1000
    """``MAX_BATCH_ROWS``: the most penguins one batch request may hold."""

    max_body_bytes: int = 1_000_000
    """``MAX_BODY_BYTES``: the largest request body accepted; a larger one is a 413. The default
    fits a full batch with room to spare (a penguin is ~200 bytes of JSON)."""

    reload_interval_seconds: float = 0.2
    """``RELOAD_INTERVAL_SECONDS``: how often ``MODELS_DIR`` is checked for new, changed or removed
    models. Polling, rather than inotify, also works on bind mounts and network filesystems."""

    fast_predictors: bool = True
    """``SERVING_FAST_PREDICTORS``: serve each model by a compiled predictor that has matched
    its pipeline on check rows (``serving.compiled``); ``0`` serves every model by its pipeline
    (a pandas DataFrame per request, 30 to 150 times fewer requests/s). For comparison only."""

    benchmark_endpoints: bool = False
    """``SERVING_BENCHMARK_ENDPOINTS``: ``1`` adds ``POST /benchmark/ceiling``, which validates a
    penguin as ``/predict`` does and answers a fixed prediction without a model: the ceiling a
    prediction's throughput is measured against. Off by default, and never in the OpenAPI page."""

    access_log: bool = True
    """``SERVING_ACCESS_LOG``: ``0`` turns off uvicorn's line per request."""

    max_connections: int = 1000
    """``SERVING_MAX_CONNECTIONS``: open connections beyond this are closed at once."""

    max_request_line_bytes: int = 8192
    """``SERVING_MAX_REQUEST_LINE_BYTES``: a longer request target is refused with 414."""

    max_header_bytes: int = 16384
    """``SERVING_MAX_HEADER_BYTES``: request line and headers together; beyond, 431."""

    max_headers: int = 64
    """``SERVING_MAX_HEADERS``: more headers than this are refused with 431."""

    header_timeout_seconds: float = 10.0
    """``SERVING_HEADER_TIMEOUT_SECONDS``: the time a connection has, from its start or the end
    of its previous response, to send a request's headers; then 408, or closed if idle."""

    body_timeout_seconds: float = 30.0
    """``SERVING_BODY_TIMEOUT_SECONDS``: the time from the end of the headers to the end of the
    body; then the connection is closed."""

    send_timeout_seconds: float = 30.0
    """``SERVING_SEND_TIMEOUT_SECONDS``: how long an answer may wait for a client that does not
    read it; then the connection is dropped."""

    keep_alive_seconds: float = 5.0
    """``SERVING_KEEP_ALIVE_SECONDS``: an idle keep-alive connection is closed after this."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``environ`` (default ``os.environ``); a bad value raises ValueError."""
        env = os.environ if environ is None else environ
        key = env.get("MODEL_SIGNING_KEY", "")
        return cls(
            models_dir=Path(env.get("MODELS_DIR") or DEFAULT_MODELS_DIR),
            signing_key=key.encode() if key else None,
            host=env.get("SERVING_HOST") or cls.host,
            port=_number(env, "SERVING_PORT", int, cls.port, low=1, high=65535),
            max_batch_rows=_number(env, "MAX_BATCH_ROWS", int, cls.max_batch_rows, low=1),
            max_body_bytes=_number(env, "MAX_BODY_BYTES", int, cls.max_body_bytes, low=1024),
            reload_interval_seconds=_number(
                env, "RELOAD_INTERVAL_SECONDS", float, cls.reload_interval_seconds,
                low=0.01, high=60.0,
            ),
            fast_predictors=_flag(env, "SERVING_FAST_PREDICTORS", cls.fast_predictors),
            benchmark_endpoints=_flag(env, "SERVING_BENCHMARK_ENDPOINTS",
                                      cls.benchmark_endpoints),
            access_log=_flag(env, "SERVING_ACCESS_LOG", cls.access_log),
            max_connections=_number(env, "SERVING_MAX_CONNECTIONS", int, cls.max_connections,
                                    low=1),
            max_request_line_bytes=_number(env, "SERVING_MAX_REQUEST_LINE_BYTES", int,
                                           cls.max_request_line_bytes, low=256),
            max_header_bytes=_number(env, "SERVING_MAX_HEADER_BYTES", int, cls.max_header_bytes,
                                     low=1024),
            max_headers=_number(env, "SERVING_MAX_HEADERS", int, cls.max_headers, low=8),
            header_timeout_seconds=_number(env, "SERVING_HEADER_TIMEOUT_SECONDS", float,
                                           cls.header_timeout_seconds, low=0.1, high=3600.0),
            body_timeout_seconds=_number(env, "SERVING_BODY_TIMEOUT_SECONDS", float,
                                         cls.body_timeout_seconds, low=0.1, high=3600.0),
            send_timeout_seconds=_number(env, "SERVING_SEND_TIMEOUT_SECONDS", float,
                                         cls.send_timeout_seconds, low=0.1, high=3600.0),
            keep_alive_seconds=_number(env, "SERVING_KEEP_ALIVE_SECONDS", float,
                                       cls.keep_alive_seconds, low=0.1, high=3600.0),
        )


def _number(env: Mapping[str, str], name: str, kind: Callable[[str], _T], default: _T, *,
            low: _T, high: _T | None = None) -> _T:
    text = env.get(name)
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a valid {kind.__name__}") from None
    in_range = low <= value and (high is None or value <= high)  # False for NaN, too
    if not in_range:
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ValueError(f"{name}={text!r} must be {bounds}")
    return value


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    text = env.get(name)
    if not text:
        return default
    if text not in ("0", "1"):
        raise ValueError(f"{name}={text!r} must be 0 or 1")
    return text == "1"
