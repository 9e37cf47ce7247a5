"""The HTTP routes: thin handlers around the registry's current snapshot.

Nothing a caller sends reaches the filesystem: a model name is checked against the name pattern,
then looked up among the models already loaded.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import anyio.to_thread
import msgspec
from litestar import get, post
from litestar.datastructures import State
from litestar.exceptions import NotFoundException, ServiceUnavailableException
from litestar.handlers import HTTPRouteHandler
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import JSONBody, Parameter

from serving.artifacts import LoadedModel
from serving.contract import MODEL_NAME_PATTERN, MODEL_NAMES
from serving.registry import ModelRegistry, Snapshot
from serving.schemas import (
    BatchPrediction,
    Health,
    LoadError,
    ModelInfo,
    ModelList,
    ModelVersion,
    Penguin,
    Prediction,
    Readiness,
    SpeciesPrediction,
    batch_request_type,
)

NO_MODEL_MESSAGE = (
    "No model is loaded: the pipeline has not published a model into MODELS_DIR yet "
    "(run the penguins_pipeline DAG), or none of the published files could be loaded "
    "(see GET /models)."
)

ModelName = Annotated[
    str,
    Parameter(
        pattern=MODEL_NAME_PATTERN,
        description="A model's name: lower-case letters, digits and underscores. "
        f"The pipeline publishes {', '.join(MODEL_NAMES)}.",
    ),
]

_NOT_FOUND = ResponseSpec(data_container=None, description="No model of this name.")
_UNAVAILABLE = ResponseSpec(
    data_container=None, description="No model is loaded yet, or this one could not be loaded."
)
_TOO_LARGE = ResponseSpec(
    data_container=None, description="The request body is larger than MAX_BODY_BYTES."
)
_BEST_RESPONSES: dict[int, ResponseSpec] = {413: _TOO_LARGE, 503: _UNAVAILABLE}
_PREDICT_RESPONSES: dict[int, ResponseSpec] = {404: _NOT_FOUND, **_BEST_RESPONSES}


@get("/health", tags=["service"], sync_to_thread=False)
def health() -> Health:
    """The process is up and answering (whether or not a model is loaded yet)."""
    return Health(status="ok")


@get("/ready", tags=["service"], sync_to_thread=False, responses={503: _UNAVAILABLE})
def ready(state: State) -> Readiness:
    """At least one model is loaded and can answer predictions; 503 until then."""
    snapshot = _registry(state).snapshot
    if not snapshot.models:
        raise ServiceUnavailableException(NO_MODEL_MESSAGE)
    return Readiness(ready=True, models_loaded=len(snapshot.models), best_model=snapshot.best_model)


@get("/metrics", tags=["service"], sync_to_thread=False,
     media_type="text/plain; version=0.0.4")
def metrics(state: State) -> str:
    """Prometheus metrics: requests and latencies per route and per model, reloads, load errors."""
    return state.metrics.render(models_loaded=len(_registry(state).snapshot.models))


@get("/models", tags=["models"], sync_to_thread=False)
def list_models(state: State) -> ModelList:
    """Every model found in MODELS_DIR with its metadata, and which one is the best."""
    snapshot = _registry(state).snapshot
    return ModelList(
        best_model=snapshot.best_model,
        models=[_model_info(snapshot, name) for name in snapshot.names()],
    )


@get("/models/{model_name:str}", tags=["models"], sync_to_thread=False,
     responses={404: _NOT_FOUND})
def get_model(model_name: ModelName, state: State) -> ModelInfo:
    """One model's metadata, the version being served, and its latest load error if any."""
    snapshot = _registry(state).snapshot
    if model_name not in snapshot.names():
        raise NotFoundException(_unknown(model_name, snapshot))
    return _model_info(snapshot, model_name)


@post("/predict", tags=["predict"], status_code=200, responses=_BEST_RESPONSES)
async def predict_best(data: JSONBody[Penguin], state: State) -> Prediction:
    """The species of one penguin, according to the best model."""
    snapshot = _registry(state).snapshot
    return await _predict_one(state, _served(snapshot, snapshot.best_model), data)


@post("/predict/{model_name:str}", tags=["predict"], status_code=200,
      responses=_PREDICT_RESPONSES)
async def predict(model_name: ModelName, data: JSONBody[Penguin], state: State) -> Prediction:
    """The species of one penguin, according to the model ``model_name``."""
    return await _predict_one(state, _served(_registry(state).snapshot, model_name), data)


_CEILING_ANSWER = Prediction(
    species="Adelie", probabilities={"Adelie": 1.0, "Chinstrap": 0.0, "Gentoo": 0.0},
    model=ModelVersion(name="ceiling", version="0" * 12, sha256="0" * 64,
                       trained_at="2000-01-01T00:00:00+00:00", dag_run_id=None),
)


@post("/benchmark/ceiling", status_code=200, include_in_schema=False)
async def ceiling(data: JSONBody[Penguin]) -> Prediction:
    """A fixed answer to a penguin validated as ``/predict`` validates it, with no model: what
    the framework alone costs (only with SERVING_BENCHMARK_ENDPOINTS=1)."""
    return _CEILING_ANSWER


def batch_routes(max_rows: int) -> list[HTTPRouteHandler]:
    """The batch routes, whose request type carries the configured limit of ``max_rows``."""
    BatchRequest = batch_request_type(max_rows)  # noqa: N806 - a type, named as one
    namespace = {"BatchRequest": BatchRequest}
    limit = f"A batch holds 1 to {max_rows} penguins (setting MAX_BATCH_ROWS)."

    @post("/predict-batch", tags=["predict"], status_code=200, sync_to_thread=True,
          signature_namespace=namespace, responses=_BEST_RESPONSES,
          description=f"The species of each penguin, according to the best model. {limit}")
    def predict_batch_best(data: JSONBody[BatchRequest], state: State) -> BatchPrediction:
        snapshot = _registry(state).snapshot
        return _predict_batch(state, _served(snapshot, snapshot.best_model), data.penguins)

    @post("/predict-batch/{model_name:str}", tags=["predict"], status_code=200,
          sync_to_thread=True, signature_namespace=namespace, responses=_PREDICT_RESPONSES,
          description=f"The species of each penguin, according to ``model_name``. {limit}")
    def predict_batch(
        model_name: ModelName, data: JSONBody[BatchRequest], state: State
    ) -> BatchPrediction:
        return _predict_batch(state, _served(_registry(state).snapshot, model_name), data.penguins)

    return [predict_batch_best, predict_batch]


def _registry(state: State) -> ModelRegistry:
    return state.registry


def _served(snapshot: Snapshot, name: str | None) -> LoadedModel:
    """The loaded model ``name``, or the HTTP error that explains why there is none."""
    if not snapshot.models or name is None:
        raise ServiceUnavailableException(NO_MODEL_MESSAGE)
    if (model := snapshot.models.get(name)) is not None:
        return model
    if (failure := snapshot.failures.get(name)) is not None:
        raise ServiceUnavailableException(f"Model {name!r} could not be loaded: {failure.message}")
    raise NotFoundException(_unknown(name, snapshot))


def _unknown(name: str, snapshot: Snapshot) -> str:
    return f"No model named {name!r}; the models are: {', '.join(snapshot.names()) or 'none'}."


async def _predict_one(state: State, model: LoadedModel, penguin: Penguin) -> Prediction:
    if model.predictor.fast:
        # Tens of microseconds: less than handing the row to a worker thread and back.
        (answer,) = _classify(state, model, [penguin])
    else:
        (answer,) = await anyio.to_thread.run_sync(_classify, state, model, [penguin])
    return Prediction(
        species=answer.species, probabilities=answer.probabilities, model=_version(model)
    )


def _predict_batch(state: State, model: LoadedModel, penguins: list[Penguin]) -> BatchPrediction:
    return BatchPrediction(model=_version(model), predictions=_classify(state, model, penguins))


def _classify(state: State, model: LoadedModel, penguins: list[Penguin]) -> list[SpeciesPrediction]:
    rows = [msgspec.structs.asdict(penguin) for penguin in penguins]
    started = time.perf_counter()
    codes, probabilities = model.predictor.predict(rows)
    state.metrics.observe_prediction(model.name, len(rows), time.perf_counter() - started)
    classes = model.classes
    # Python numbers first (`tolist`): iterating NumPy arrays makes a NumPy scalar per value.
    # Not `strict` zips, a third of the time on a batch: the shapes are checked at load time.
    return [
        SpeciesPrediction(species=classes[code],
                          probabilities=dict(zip(classes, row, strict=False)))
        for code, row in zip(codes.tolist(), probabilities.tolist(), strict=False)
    ]


def _version(model: LoadedModel) -> ModelVersion:
    return ModelVersion(
        name=model.name,
        version=model.version,
        sha256=model.sha256,
        trained_at=str(model.metadata.get("trained_at")),
        dag_run_id=model.metadata.get("dag_run_id"),
    )


def _model_info(snapshot: Snapshot, name: str) -> ModelInfo:
    model, failure = snapshot.models.get(name), snapshot.failures.get(name)
    info: dict[str, Any] = {"name": name, "serving": model is not None,
                            "best": name == snapshot.best_model}
    if model is not None:
        info.update(
            version=_version(model),
            classes=list(model.classes),
            metrics=model.metadata.get("metrics"),
            library_versions=model.metadata.get("versions"),
            loaded_at=model.loaded_at,
        )
    if failure is not None:
        info["load_error"] = LoadError(message=failure.message, at=failure.at)
    return ModelInfo(**info)

