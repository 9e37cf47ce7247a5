"""The HTTP routes: thin handlers around the registry's current snapshot, grouped in one
``Router`` per OpenAPI tag. Handlers receive what they use as dependencies (``registry``,
``metrics``; the prediction routes ``predictions`` alone: see ``serving.predictions``).

Nothing a caller sends reaches the filesystem: a model name is checked against the name pattern,
then looked up among the models already loaded.
"""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Response, Router, get, post
from litestar.di import NamedDependency
from litestar.exceptions import ServiceUnavailableException
from litestar.handlers import HTTPRouteHandler
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import JSONBody, Parameter
from litestar.types import Middleware
from prometheus_client import CONTENT_TYPE_LATEST

from serving.contract import MODEL_NAME_PATTERN, MODEL_NAMES
from serving.metrics import Metrics
from serving.predictions import Predictions, find_model, no_model_message
from serving.registry import ModelRegistry, ModelState, Snapshot
from serving.schemas import (
    BatchPrediction,
    Health,
    ModelInfo,
    ModelList,
    ModelVersion,
    ModelVersions,
    Penguin,
    Prediction,
    Readiness,
    VersionEntry,
    batch_request_type,
)
from serving.store.layout import VERSION_ID

Registry = NamedDependency[ModelRegistry]
"""The service's model registry, a dependency (``serving.app``)."""
MetricsRecorder = NamedDependency[Metrics]
"""The service's metrics, a dependency (``serving.app``)."""
PredictionsDependency = NamedDependency[Predictions]
"""The prediction routes' one dependency (``serving.app``)."""

ModelName = Annotated[
    str,
    Parameter(
        pattern=MODEL_NAME_PATTERN,
        description="A model's name: lower-case letters, digits and underscores. "
        f"The pipeline publishes {', '.join(MODEL_NAMES)}.",
    ),
]

Version = Annotated[
    str | None,
    Parameter(
        pattern=VERSION_ID.pattern, required=False,
        description="A kept version of the model (GET /models/{model_name}/versions), instead "
        "of its promoted one.",
    ),
]

_NOT_FOUND = ResponseSpec(data_container=None,
                          description="No model of this name, or no such kept version.")
_UNAVAILABLE = ResponseSpec(
    data_container=None, description="No model is loaded yet, or this one could not be loaded."
)
_TOO_LARGE = ResponseSpec(
    data_container=None, description="The request body is larger than MAX_BODY_BYTES."
)
_BEST_RESPONSES: dict[int, ResponseSpec] = {413: _TOO_LARGE, 503: _UNAVAILABLE}
_PREDICT_RESPONSES: dict[int, ResponseSpec] = {404: _NOT_FOUND, **_BEST_RESPONSES}


@get("/health", sync_to_thread=False)
def health() -> Health:
    """The process is up and answering (whether or not a model is loaded yet)."""
    return Health(status="ok")


@get("/ready", sync_to_thread=False, responses={503: _UNAVAILABLE})
def ready(registry: Registry) -> Readiness:
    """At least one model is loaded and can answer predictions; 503 until then."""
    snapshot = registry.snapshot
    served = snapshot.served()
    if not served:
        raise ServiceUnavailableException(no_model_message(snapshot))
    return Readiness(ready=True, models_loaded=len(served), best_model=snapshot.best_model)


@get("/metrics", sync_to_thread=False, media_type=CONTENT_TYPE_LATEST)
def metrics(metrics: MetricsRecorder) -> Response[bytes]:
    """Prometheus metrics: requests and latencies per route and per model, rows classified,
    reloads, load errors, and the version each model answers with (of every worker)."""
    # The header as given: for a text/ media type Litestar would add a second charset.
    return Response(metrics.render(), headers={"content-type": CONTENT_TYPE_LATEST})


@get("/", sync_to_thread=False)
def list_models(registry: Registry) -> ModelList:
    """Every model in the store, the version each one answers with, and which is the best."""
    snapshot = registry.snapshot
    return ModelList(
        best_model=snapshot.best_model,
        models=[_model_info(snapshot, model) for model in snapshot.models.values()],
        store_problem=snapshot.store_problem,
    )


@get("/{model_name:str}", sync_to_thread=False,
     responses={404: _NOT_FOUND})
def get_model(model_name: ModelName, registry: Registry) -> ModelInfo:
    """One model: the version it answers with, its metadata, and what is wrong, if anything."""
    snapshot = registry.snapshot
    return _model_info(snapshot, find_model(snapshot, model_name))


@get("/{model_name:str}/versions", sync_to_thread=False,
     responses={404: _NOT_FOUND})
def list_versions(model_name: ModelName, registry: Registry) -> ModelVersions:
    """Every kept version of a model, newest first: its metrics, training time, run id, and
    state (promoted, previous, held back by the gate, candidate, or refused, with why)."""
    model = find_model(registry.snapshot, model_name)
    return ModelVersions(
        name=model.name, promoted=model.entry.promoted,
        served=model.served.version if model.served else None,
        versions=[_version_entry(model, version)
                  for version in sorted({*model.found, *model.loaded, *model.refused},
                                        reverse=True)],
    )


@post("/predict", status_code=200, responses=_BEST_RESPONSES)
async def predict_best(data: JSONBody[Penguin], predictions: PredictionsDependency
                       ) -> Prediction:
    """The species of one penguin, according to the best model."""
    return await predictions.one(predictions.served(), data)


@post("/predict/{model_name:str}", status_code=200,
      responses=_PREDICT_RESPONSES)
async def predict(model_name: ModelName, data: JSONBody[Penguin],
                  predictions: PredictionsDependency, version: Version = None) -> Prediction:
    """The species of one penguin, according to the model ``model_name`` (its promoted
    version, or the kept ``version``)."""
    return await predictions.one(predictions.served(model_name, version), data)


_CEILING_ANSWER = Prediction(
    species="Adelie", probabilities={"Adelie": 1.0, "Chinstrap": 0.0, "Gentoo": 0.0},
    model=ModelVersion(name="ceiling", version="20000101T000000.000000Z", sha256="0" * 64,
                       trained_at="2000-01-01T00:00:00+00:00", dag_run_id=None),
)


@post("/benchmark/ceiling", status_code=200, include_in_schema=False)
async def ceiling(data: JSONBody[Penguin]) -> Prediction:
    """A fixed answer to a penguin validated as ``/predict`` validates it, with no model: what
    the framework alone costs (only with SERVING_BENCHMARK_ENDPOINTS=1)."""
    return _CEILING_ANSWER


def routers(max_batch_rows: int, fast_lane: Middleware, batch_lane: Middleware, *,
            benchmark_endpoints: bool = False) -> list[Router]:
    """Every route, in ``Router``s by OpenAPI tag; the single predictions behind
    ``fast_lane``, the batch routes taking at most ``max_batch_rows`` penguins behind
    ``batch_lane`` (``serving.fast_lane``), and ``/benchmark/ceiling`` there only if asked
    for."""
    return [
        Router("/", tags=["service"], route_handlers=[health, ready, metrics]),
        Router("/models", tags=["models"], route_handlers=[list_models, get_model, list_versions]),
        Router("/", tags=["predict"], route_handlers=[predict_best, predict],
               middleware=[fast_lane]),
        Router("/", tags=["predict"], route_handlers=_batch_routes(max_batch_rows),
               middleware=[batch_lane]),
        *([Router("/", tags=["predict"], route_handlers=[ceiling])] if benchmark_endpoints
          else []),
    ]


def _batch_routes(max_rows: int) -> list[HTTPRouteHandler]:
    """The batch routes, whose request type carries the configured limit of ``max_rows``."""
    BatchRequest = batch_request_type(max_rows)  # noqa: N806 - a type, named as one
    namespace = {"BatchRequest": BatchRequest}
    limit = f"A batch holds 1 to {max_rows} penguins (setting MAX_BATCH_ROWS)."

    @post("/predict-batch", status_code=200, sync_to_thread=True,
          signature_namespace=namespace, responses=_BEST_RESPONSES,
          description=f"The species of each penguin, according to the best model. {limit}")
    def predict_batch_best(data: JSONBody[BatchRequest], predictions: PredictionsDependency
                           ) -> BatchPrediction:
        return predictions.batch(predictions.served(), data.penguins)

    @post("/predict-batch/{model_name:str}", status_code=200,
          sync_to_thread=True, signature_namespace=namespace, responses=_PREDICT_RESPONSES,
          description=f"The species of each penguin, according to ``model_name``. {limit}")
    def predict_batch(
        model_name: ModelName, data: JSONBody[BatchRequest],
        predictions: PredictionsDependency, version: Version = None,
    ) -> BatchPrediction:
        return predictions.batch(predictions.served(model_name, version), data.penguins)

    return [predict_batch_best, predict_batch]


def _model_info(snapshot: Snapshot, model: ModelState) -> ModelInfo:
    info: dict[str, Any] = {"name": model.name, "serving": model.served is not None,
                            "best": model.name == snapshot.best_model,
                            "promoted": model.entry.promoted, "problem": model.problem}
    if (served := model.served) is not None:
        info.update(
            version=served.answered_by,
            classes=list(served.classes),
            metrics=_numbers(served.metadata.get("metrics")),
            library_versions=_texts(served.metadata.get("versions")),
            loaded_at=served.loaded_at,
        )
    return ModelInfo(**info)


def _version_entry(model: ModelState, version: str) -> VersionEntry:
    state, reason = model.state_of(version)
    loaded = model.loaded.get(version)
    metadata = loaded.metadata if loaded else {}
    return VersionEntry(
        version=version, state=state, reason=reason, loaded=loaded is not None,
        metrics=_numbers(metadata.get("metrics")),
        trained_at=_text_or_none(metadata.get("trained_at")),
        training_seconds=_numbers({"s": metadata.get("training_seconds")}).get("s"),
        dag_run_id=_text_or_none(metadata.get("dag_run_id")),
        gate=metadata.get("gate") if isinstance(metadata.get("gate"), dict) else None,
    )


# A signed document still gets shown only as the types the API promises.
def _numbers(value: Any) -> dict[str, float]:
    if not isinstance(value, dict):
        return {}
    return {k: float(v) for k, v in value.items()
            if isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
            and -1e300 < v < 1e300}  # finite, and not an integer too large for a float


def _texts(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}


def _text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None
