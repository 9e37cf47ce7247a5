"""The ASGI application factory: ``uvicorn --factory serving.app:create_app --port 8989``.

``create_app`` builds the service for its settings: a model registry that watches ``MODELS_DIR``
for as long as the application runs (started and stopped by the ``lifespan``), handed to the
routes as dependencies with the metrics and the ``Predictions`` made of both, plus the OpenAPI
page, whose JavaScript
and CSS the service serves itself so that it renders with no internet access. Nothing is built
at import.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio.to_thread
from litestar import Litestar, Request, Response
from litestar.di import Provide
from litestar.exceptions.responses import create_exception_response
from litestar.logging import LoggingConfig
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.static_files import create_static_files_router
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from serving import open_inference, open_inference_schemas, routes
from serving.fast_lane import batch_lane, fast_lane
from serving.loader import Limits, Loader
from serving.metrics import Metrics
from serving.predictions import Predictions
from serving.registry import ModelRegistry
from serving.schemas import REQUEST_SCHEMAS
from serving.settings import Settings
from serving.store import signing
from serving.store.layout import StoreError
from serving.store.reader import Trust
from serving.validation import StrictRequest, decode_body_strictly

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
SWAGGER_UI_VERSION = "5.35.0"
"""The vendored ``swagger-ui-dist`` in ``static/swagger-ui`` (see its README)."""

API_DESCRIPTION = """\
Classifies Palmer penguins with the models the Airflow pipeline publishes into `MODELS_DIR`.
Each model answers with its promoted version, picked up within a second of a promotion or a
rollback, without a restart. `POST /predict` uses the best model; `POST /predict/{model_name}`
a given one, and `?version=` a given kept version of it."""


def create_app(settings: Settings | None = None) -> Litestar:
    """The service for ``settings`` (by default read from the environment)."""
    settings = settings or Settings.from_env()
    metrics = Metrics()
    registry = _registry(settings, metrics)
    metrics.follow(lambda: {name: served.version
                            for name, served in registry.snapshot.served().items()})

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        # Load the promoted versions before answering, so /ready is right from the start.
        await anyio.to_thread.run_sync(registry.refresh)
        await anyio.to_thread.run_sync(registry.wait_for_promoted,
                                       settings.loader_timeout_seconds)
        registry.start(settings.reload_interval_seconds)
        # What exists by now (modules, the app and its OpenAPI document, the models) lives as
        # long as the process. Out of the cyclic collector's sight, it is no longer walked by
        # every full collection: that walk stalled whichever request set one off (the p99).
        gc.freeze()
        if metrics.multiprocess_dir:
            log.info("metrics: the workers' counts are summed from %s (PROMETHEUS_MULTIPROC_DIR)",
                     metrics.multiprocess_dir)
        try:
            yield
        finally:
            registry.stop()
            metrics.close()

    predictions = Predictions(registry, metrics, settings.max_batch_rows)
    app = Litestar(
        route_handlers=[
            *routes.routers(settings.max_batch_rows,
                            fast_lane(predictions, settings.max_body_bytes),
                            batch_lane(predictions, settings.max_body_bytes,
                                       settings.max_batch_rows),
                            benchmark_endpoints=settings.benchmark_endpoints),
            open_inference.router(),
            create_static_files_router(
                path="/static", directories=[STATIC_DIR], include_in_schema=False
            ),
        ],
        dependencies={
            "registry": _constant(registry),
            "metrics": _constant(metrics),
            "predictions": _constant(predictions),
        },
        lifespan=[lifespan],
        # The router's 404 and 405 come before any route, so only the app can shape them.
        exception_handlers={404: _routing_error, 405: _routing_error},
        before_request=decode_body_strictly,
        request_class=StrictRequest,
        middleware=[_observe_requests(metrics)],
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="Penguins species prediction",
            version="1.0.0",
            description=API_DESCRIPTION,
            path="/schema",
            render_plugins=[_swagger()],
            use_handler_docstrings=True,
        ),
        # Log the stack of unexpected errors only; a 4xx or 503 is the caller's or expected.
        logging_config=LoggingConfig(
            log_exceptions="always", disable_stack_trace={*range(400, 500), 503},
            exception_logging_handler=_log_exception,
        ),
    )
    _document_refused_fields(app)
    return app


def _routing_error(request: Request[Any, Any, Any], exc: Exception) -> Response:
    """No route for the path or the method: the protocol's error shape under ``/v2``, else
    Litestar's own."""
    if request.url.path == "/v2" or request.url.path.startswith("/v2/"):
        return open_inference.as_v2_error(request, exc)
    return create_exception_response(request, exc)


def _constant(value: object) -> Provide:
    """A dependency that is the same object for every request."""
    return Provide(lambda: value, use_cache=True, sync_to_thread=False)


def _registry(settings: Settings, metrics: Metrics) -> ModelRegistry:
    """The registry of the store, trusting what the public key verifies."""
    problem = None
    try:
        public_key = signing.load_public_key(settings.public_key_file)
    except StoreError as exc:
        public_key = None
        if not settings.allow_unsigned:
            # The API says which setting; only the log names the file.
            problem = ("no model is served: the public key (MODEL_PUBLIC_KEY_FILE) cannot be "
                       "read; see the service's log")
            log.error("no model is served: %s", exc)
    if settings.allow_unsigned:
        log.warning("SERVING_ALLOW_UNSIGNED=1: serving UNSIGNED models too. Anyone who can "
                    "write to %s can choose what this service answers. For development only.",
                    settings.models_dir)
    loader = Loader(Limits(memory_bytes=settings.loader_memory_mb * 1024**2,
                           cpu_seconds=settings.loader_cpu_seconds,
                           wall_seconds=settings.loader_timeout_seconds))
    return ModelRegistry(settings.models_dir, Trust(public_key, settings.allow_unsigned), loader,
                         keep=settings.model_history, max_pickle_bytes=settings.max_model_bytes,
                         metrics=metrics, problem=problem)


def _document_refused_fields(app: Litestar) -> None:
    """Say in the OpenAPI document that request bodies refuse unknown fields, as msgspec does
    (``forbid_unknown_fields``); Litestar leaves ``additionalProperties`` out."""
    schemas = app.openapi_schema.components.schemas or {}
    for name in (*REQUEST_SCHEMAS, *open_inference_schemas.REQUEST_SCHEMAS):
        schemas[name].additional_properties = False


def _swagger() -> SwaggerRenderPlugin:
    """Swagger UI at /schema and /schema/swagger, from the vendored assets under /static."""
    base = "/static/swagger-ui"
    return SwaggerRenderPlugin(
        version=SWAGGER_UI_VERSION,
        js_url=f"{base}/swagger-ui-bundle.js",
        css_url=f"{base}/swagger-ui.css",
        standalone_preset_js_url=f"{base}/swagger-ui-standalone-preset.js",
        # The default favicon is fetched from a CDN.
        favicon=f"<link rel='icon' type='image/png' href='{base}/favicon-32x32.png'>",
        path=["/", "/swagger"],
    )


CLIENT_ABORTED = "penguins.client_aborted"
"""Set in a request's scope when its client went away before its body had arrived."""
CLIENT_ABORT_STATUS = 499
"""The status a client abort is counted under (nginx's "client closed request"): not a 5xx."""


def _observe_requests(metrics: Metrics) -> Callable[[ASGIApp], ASGIApp]:
    """Middleware that counts each request by route template and status, and times it; a client
    that goes away mid-request is counted as an abort and logged in one line."""

    def middleware(app: ASGIApp) -> ASGIApp:
        async def observe(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            status: int | None = None
            started = time.perf_counter()

            async def receive_and_note_abort() -> Message:
                message = await receive()
                if message["type"] == "http.disconnect" and status is None:
                    scope[CLIENT_ABORTED] = True  # type: ignore[literal-required]
                return message

            async def send_and_note_status(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            try:
                await app(scope, receive_and_note_abort, send_and_note_status)
            finally:
                route = scope.get("path_template") or "unmatched"
                if scope.get(CLIENT_ABORTED):
                    status = CLIENT_ABORT_STATUS
                    log.info("client went away during %s %s", scope["method"], route)
                metrics.observe_request(route, scope["method"], status or 500,
                                        time.perf_counter() - started)

        return observe

    return middleware


def _log_exception(logger: logging.Logger, scope: Scope, tb: list[str]) -> None:
    """Litestar's exception logging, except for a client that went away: its request's reading
    fails by design, and the middleware has logged it in one line."""
    if scope.get(CLIENT_ABORTED):
        return
    logger.exception("Uncaught exception (connection_type=%s, path=%r):", scope["type"],
                     scope.get("path_template") or scope["path"])
