"""The Open Inference Protocol (KServe V2) over REST, under ``/v2``, beside the service's own API.

The same registry answers: a model's default version is its promoted one, and each kept version
has its own paths. An inference request gives the seven features as named input tensors, one
value per penguin; each row is validated as ``POST /predict`` validates a penguin (it becomes a
``Penguin``) and classified by the same code, so both APIs give the same answers. Errors have
the protocol's shape, ``{"error": "..."}``. The server implements no protocol extension: tensors
travel as JSON, and binary tensor data is refused. The shapes are in ``open_inference_schemas``.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Request, Response, Router, get, post
from litestar.exceptions import HTTPException, ServiceUnavailableException, ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import JSONBody, Parameter

from serving.contract import CATEGORICAL_FEATURES, FEATURES
from serving.open_inference_schemas import (
    V2Error,
    V2InferRequest,
    V2InferResponse,
    V2ModelMetadata,
    V2ModelReady,
    V2RequestInput,
    V2RequestOutput,
    V2ServerLive,
    V2ServerMetadata,
    V2ServerReady,
    V2Tensor,
)
from serving.predictions import Predictions, no_model_message
from serving.registry import ServedVersion
from serving.routes import ModelName, PredictionsDependency
from serving.schemas import Penguin
from serving.store.layout import VERSION_ID
from serving.validation import decode_body_strictly, describe

ModelVersionId = Annotated[str, Parameter(
    pattern=VERSION_ID.pattern, description="A kept version of the model (GET its metadata).")]

OUTPUTS = ("species", "probabilities")
_NUMBERS = ("FP32", "FP64", *(f"{u}INT{bits}" for u in ("", "U") for bits in (8, 16, 32, 64)))


def _spec(description: str) -> ResponseSpec:
    return ResponseSpec(data_container=V2Error, description=description)


_MODEL = {400: _spec("A malformed request, or a tensor, row or field that is not valid."),
          404: _spec("No model of this name, or no such kept version."),
          503: _spec("No model is loaded yet, or this one could not be loaded.")}
_INFER = {**_MODEL, 413: _spec("The request body is larger than MAX_BODY_BYTES.")}


@get("/", sync_to_thread=False)
def server_metadata(request: Request[Any, Any, Any]) -> V2ServerMetadata:
    """The server's name and version, and the protocol extensions it implements (none)."""
    config = request.app.openapi_config  # the OpenAPI document's title and version
    return V2ServerMetadata(name=config.title, version=config.version, extensions=[])


@get("/health/live", sync_to_thread=False)
def server_live() -> V2ServerLive:
    """The process is up and answering (whether or not a model is loaded yet)."""
    return V2ServerLive(live=True)


@get("/health/ready", sync_to_thread=False, responses={503: _MODEL[503]})
def server_ready(predictions: PredictionsDependency) -> V2ServerReady:
    """Every promoted model is loaded and answers; 503, saying which is not, until then."""
    snapshot = predictions.registry.snapshot
    waiting = [f"{m.name} ({m.problem or 'loading'})" for m in snapshot.models.values()
               if m.entry.promoted is not None and m.served is None]
    if not snapshot.served() or waiting:
        raise ServiceUnavailableException(f"Not every promoted model is served: "
                                          f"{', '.join(waiting)}." if snapshot.served()
                                          else no_model_message(snapshot))
    return V2ServerReady(ready=True)


@get("/models/{model_name:str}", sync_to_thread=False, responses=_MODEL)
def model_metadata(model_name: ModelName, predictions: PredictionsDependency
                   ) -> V2ModelMetadata:
    """A model's inputs and outputs, the class names of its answers, and its kept versions."""
    return _metadata(predictions, predictions.served(model_name))


@get("/models/{model_name:str}/versions/{model_version:str}", sync_to_thread=False,
     responses=_MODEL)
def version_metadata(model_name: ModelName, model_version: ModelVersionId,
                     predictions: PredictionsDependency) -> V2ModelMetadata:
    """The metadata of one kept version of a model."""
    return _metadata(predictions, predictions.served(model_name, model_version))


@get("/models/{model_name:str}/ready", sync_to_thread=False, responses=_MODEL)
def model_ready(model_name: ModelName, predictions: PredictionsDependency) -> V2ModelReady:
    """The model answers inferences; 503, saying why, if it does not."""
    return V2ModelReady(name=predictions.served(model_name).name, ready=True)


@get("/models/{model_name:str}/versions/{model_version:str}/ready", sync_to_thread=False,
     responses=_MODEL)
def version_ready(model_name: ModelName, model_version: ModelVersionId,
                  predictions: PredictionsDependency) -> V2ModelReady:
    """The kept version is loaded and answers inferences; 404 if it is not."""
    served = predictions.served(model_name, model_version)
    return V2ModelReady(name=served.name, ready=True)


@post("/models/{model_name:str}/infer", status_code=200, sync_to_thread=True, responses=_INFER)
def infer(model_name: ModelName, data: JSONBody[V2InferRequest],
          predictions: PredictionsDependency) -> V2InferResponse:
    """The species of each penguin of the input tensors, and the probability of each class,
    according to the model's promoted version."""
    return _infer(predictions, predictions.served(model_name), data)


@post("/models/{model_name:str}/versions/{model_version:str}/infer", status_code=200,
      sync_to_thread=True, responses=_INFER)
def infer_version(model_name: ModelName, model_version: ModelVersionId,
                  data: JSONBody[V2InferRequest], predictions: PredictionsDependency
                  ) -> V2InferResponse:
    """The same inference, according to one kept version of the model."""
    return _infer(predictions, predictions.served(model_name, model_version), data)


def router() -> Router:
    """Every V2 route, with the protocol's error shape and its own reading of bodies."""
    return Router(
        path="/v2", tags=["open inference protocol (KServe V2)"],
        route_handlers=[server_metadata, server_live, server_ready, model_metadata,
                        version_metadata, model_ready, version_ready, infer, infer_version],
        before_request=_decode_body, exception_handlers={Exception: as_v2_error},
    )


async def _decode_body(request: Request[Any, Any, Any]) -> None:
    if "inference-header-content-length" in request.headers:
        raise ValidationException("Binary tensor data (Inference-Header-Content-Length) is not "
                                  "supported: send the tensors as JSON (tritonclient: "
                                  "set_data_from_numpy(..., binary_data=False)).")
    # tritonclient sends no Content-Type: by the protocol, the body is JSON.
    await decode_body_strictly(request, media_type_optional=True)


def as_v2_error(request: Request[Any, Any, Any], exc: Exception) -> Response[V2Error]:
    """Any error as ``{"error": message}``; an unexpected one says no more than that it was.
    (Also the app's answer to a ``/v2`` path or method that no route has: see ``serving.app``.)"""
    if not isinstance(exc, HTTPException) or exc.status_code == 500:
        return Response(V2Error("Internal server error"), status_code=500)
    message = exc.detail
    # Litestar's own validation errors name the field only in ``extra``; the body's, in both.
    for item in exc.extra if isinstance(exc.extra, list) else []:
        if isinstance(item, dict) and item.get("key") and f"{item['key']}:" not in message:
            message += f": {item['key']}: {item.get('message')}"
    return Response(V2Error(message), status_code=exc.status_code, headers=exc.headers)


def _metadata(predictions: Predictions, model: ServedVersion) -> V2ModelMetadata:
    classes = {"classes": list(model.classes)}
    return V2ModelMetadata(
        name=model.name,
        versions=sorted(predictions.registry.snapshot.models[model.name].loaded, reverse=True),
        platform=f"compiled_{model.predictor.kind}",
        inputs=[V2Tensor(name, "BYTES" if name in CATEGORICAL_FEATURES
                         else "INT64" if name == "year" else "FP64", [-1]) for name in FEATURES],
        outputs=[V2Tensor("species", "BYTES", [-1], classes),
                 V2Tensor("probabilities", "FP64", [-1, len(model.classes)], classes)],
    )


def _infer(predictions: Predictions, model: ServedVersion, request: V2InferRequest
           ) -> V2InferResponse:
    wanted = _requested_outputs(request.outputs)
    answers = predictions.classify(model, _penguins(request.inputs, predictions.max_batch_rows))
    classes, rows = {"classes": list(model.classes)}, len(answers)
    outputs = {
        "species": V2Tensor("species", "BYTES", [rows], classes, [a.species for a in answers]),
        # A prediction's probabilities are in the order of the model's classes.
        "probabilities": V2Tensor("probabilities", "FP64", [rows, len(model.classes)], classes,
                                  [p for a in answers for p in a.probabilities.values()]),
    }
    return V2InferResponse(model_name=model.name, model_version=model.version,
                           outputs=[outputs[name] for name in wanted], id=request.id)


def _requested_outputs(requested: list[V2RequestOutput] | None) -> list[str]:
    # Output parameters (tritonclient's binary_data) are ignored: the answer is JSON, which
    # clients read as well.
    names = list(OUTPUTS) if requested is None else [output.name for output in requested]
    if unknown := [name for name in names if name not in OUTPUTS]:
        raise ValidationException(f"Unknown output {unknown[0]!r}; the outputs are: "
                                  f"{', '.join(OUTPUTS)}.")
    if len(set(names)) != len(names):
        raise ValidationException("An output is requested more than once.")
    return names


def _penguins(inputs: list[V2RequestInput], max_rows: int) -> list[Penguin]:
    """One ``Penguin`` per row of the input tensors, validated as ``POST /predict`` does."""
    columns: dict[str, list[Any]] = {}
    for tensor in inputs:
        if tensor.name not in FEATURES:
            raise ValidationException(f"Unknown input tensor {tensor.name!r}; the inputs are: "
                                      f"{', '.join(FEATURES)}.")
        if tensor.name in columns:
            raise ValidationException(f"Input tensor {tensor.name!r} is given more than once.")
        columns[tensor.name] = _column(tensor, max_rows)
    if missing := [name for name in FEATURES if name not in columns]:
        raise ValidationException(f"Missing input tensors: {', '.join(missing)}.")
    if len(rows := {len(column) for column in columns.values()}) > 1:
        raise ValidationException(f"The input tensors have different numbers of rows: "
                                  f"{', '.join(f'{k} {len(v)}' for k, v in columns.items())}.")
    penguins = []
    for row in range(rows.pop()):
        try:
            penguins.append(msgspec.convert({name: columns[name][row] for name in FEATURES},
                                            Penguin, strict=True))
        except msgspec.ValidationError as exc:
            error = describe(str(exc))
            raise ValidationException(f"Input tensor {error.get('key')!r}, row {row}: "
                                      f"{error['message']}") from None
    return penguins


def _column(tensor: V2RequestInput, max_rows: int) -> list[Any]:
    """The tensor's values, one per row, once its datatype and shape are checked."""
    name, shape = tensor.name, tensor.shape
    allowed = ("BYTES",) if name in CATEGORICAL_FEATURES else _NUMBERS
    if tensor.datatype not in allowed:
        expected = allowed[0] if len(allowed) == 1 else f"one of {', '.join(allowed)}"
        raise ValidationException(f"Input tensor {name!r} has datatype {tensor.datatype!r}; "
                                  f"expected {expected}.")
    if len(shape) == 2 and shape[1] != 1:
        raise ValidationException(f"Input tensor {name!r} has shape {shape}; expected [n] or "
                                  "[n, 1], one value per penguin.")
    if not 1 <= shape[0] <= max_rows:
        raise ValidationException(f"Input tensor {name!r} has {shape[0]} rows; a request holds "
                                  f"1 to {max_rows} penguins (setting MAX_BATCH_ROWS).")
    # The data may be flat, or nested as the shape is: [[v], [v], ...] for [n, 1].
    nested = len(shape) == 2 and all(isinstance(v, list) and len(v) == 1 for v in tensor.data)
    values = [v[0] for v in tensor.data] if nested else tensor.data
    if len(values) != shape[0] or any(isinstance(v, list) for v in values):
        raise ValidationException(f"Input tensor {name!r} has shape {shape}, which its data "
                                  f"does not have ({len(tensor.data)} elements).")
    if name == "year":
        # As for POST /predict: a whole number written with a fraction (a float year) is one.
        return [int(v) if type(v) is float and v.is_integer() else v for v in values]
    return values
