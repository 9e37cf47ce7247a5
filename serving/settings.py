"""The service's settings: every knob, read from the environment in this one place."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from serving.store import signing
from serving.store.documents import MAX_PICKLE_BYTES

_T = TypeVar("_T", int, float)

DEFAULT_MODELS_DIR = Path(__file__).resolve().parents[1] / "shared_models"


@dataclass(frozen=True)
class Settings:
    """What the service reads from its environment; every field has a usable default."""

    models_dir: Path = DEFAULT_MODELS_DIR
    """``MODELS_DIR``: the folder the pipeline publishes into (default: the repository's
    ``shared_models/``, where the DAG writes). The service only ever reads it."""

    public_key_file: Path = signing.KEYS_DIR / "public.pem"
    """``MODEL_PUBLIC_KEY_FILE``: the public half of the pipeline's signing key pair (default
    ``airflow/home/model-signing/public.pem``, where the launcher creates it). Only manifests and
    versions it verifies are served."""

    allow_unsigned: bool = False
    """``SERVING_ALLOW_UNSIGNED``: ``1`` also serves unsigned manifests and versions, for models
    exported by hand during development. Never in production: anyone who can write MODELS_DIR
    could then choose what is served (the isolated loader still limits what a pickle can do)."""

    model_history: int = 5
    """``MODEL_HISTORY``: how many versions of each model are kept and loaded (the promoted one
    and the one a rollback returns to are kept besides); the pipeline prunes to the same number."""

    max_model_bytes: int = 200_000_000
    """``SERVING_MAX_MODEL_BYTES``: a larger pickle is refused before it is read."""

    loader_memory_mb: int = 2048
    """``SERVING_LOADER_MEMORY_MB``: the memory a loader worker may use beyond the model
    libraries it starts with; above it, the version is refused."""

    loader_cpu_seconds: int = 60
    """``SERVING_LOADER_CPU_SECONDS``: the CPU time a loader worker may use."""

    loader_timeout_seconds: float = 90.0
    """``SERVING_LOADER_TIMEOUT_SECONDS``: a loader worker still busy after this is stopped."""

    host: str = "127.0.0.1"
    """``SERVING_HOST``: the address ``python -m serving`` listens on."""

    port: int = 8989
    """``SERVING_PORT``: the port ``python -m serving`` listens on."""

    workers: int = 1
    """``SERVING_WORKERS``: the uvicorn worker processes ``python -m serving`` starts, each with
    its own copy of the models (and its own ``SERVING_MAX_CONNECTIONS``). With more than one,
    the workers share their metrics' counts through ``PROMETHEUS_MULTIPROC_DIR`` (a private
    temporary folder unless it is set), so ``/metrics`` answers for all of them."""

    max_batch_rows: int = 1000
    """``MAX_BATCH_ROWS``: the most penguins one batch request may hold."""

    max_body_bytes: int = 1_000_000
    """``MAX_BODY_BYTES``: the largest request body accepted; a larger one is a 413. The default
    fits a full batch with room to spare (a penguin is ~200 bytes of JSON)."""

    reload_interval_seconds: float = 0.2
    """``RELOAD_INTERVAL_SECONDS``: how often ``MODELS_DIR`` is checked for new, changed or removed
    models. Polling, rather than inotify, also works on bind mounts and network filesystems."""

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
        return cls(
            models_dir=Path(env.get("MODELS_DIR") or DEFAULT_MODELS_DIR),
            public_key_file=Path(env.get(signing.PUBLIC_KEY_ENV) or signing.KEYS_DIR
                                 / "public.pem"),
            allow_unsigned=_flag(env, "SERVING_ALLOW_UNSIGNED", cls.allow_unsigned),
            model_history=_number(env, "MODEL_HISTORY", int, cls.model_history, low=1,
                                  high=1000),
            max_model_bytes=_number(env, "SERVING_MAX_MODEL_BYTES", int, cls.max_model_bytes,
                                    low=1000, high=MAX_PICKLE_BYTES),
            loader_memory_mb=_number(env, "SERVING_LOADER_MEMORY_MB", int, cls.loader_memory_mb,
                                     low=64),
            loader_cpu_seconds=_number(env, "SERVING_LOADER_CPU_SECONDS", int,
                                       cls.loader_cpu_seconds, low=1, high=3600),
            loader_timeout_seconds=_number(env, "SERVING_LOADER_TIMEOUT_SECONDS", float,
                                           cls.loader_timeout_seconds, low=1.0, high=3600.0),
            host=env.get("SERVING_HOST") or cls.host,
            port=_number(env, "SERVING_PORT", int, cls.port, low=1, high=65535),
            workers=_number(env, "SERVING_WORKERS", int, cls.workers, low=1, high=128),
            max_batch_rows=_number(env, "MAX_BATCH_ROWS", int, cls.max_batch_rows, low=1),
            max_body_bytes=_number(env, "MAX_BODY_BYTES", int, cls.max_body_bytes, low=1024),
            reload_interval_seconds=_number(
                env, "RELOAD_INTERVAL_SECONDS", float, cls.reload_interval_seconds,
                low=0.01, high=60.0,
            ),
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
