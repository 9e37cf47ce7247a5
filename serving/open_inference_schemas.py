"""The request and response shapes of the Open Inference Protocol (KServe V2), typed as
``serving.schemas`` types the service's own, so that the OpenAPI document describes them.

A request refuses unknown fields, so that a misspelt one (``output``) is an error, not ignored.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec


class V2Error(msgspec.Struct):
    error: str


class V2ServerMetadata(msgspec.Struct):
    name: str
    version: str
    extensions: list[str]


class V2ServerLive(msgspec.Struct):
    live: bool


class V2ServerReady(msgspec.Struct):
    ready: bool


class V2ModelReady(msgspec.Struct):
    name: str
    ready: bool


class V2Tensor(msgspec.Struct, omit_defaults=True):
    """An output tensor, or the description of a tensor (no ``data``; -1: any number of rows)."""

    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = None
    data: list[str | float] | None = None
    """Flat, row after row."""


class V2ModelMetadata(msgspec.Struct):
    name: str
    versions: list[str]
    """The kept versions that answer at ``versions/{model_version}``, newest first."""
    platform: str
    inputs: list[V2Tensor]
    outputs: list[V2Tensor]


Element = str | int | float | bool
Shape = Annotated[list[Annotated[int, msgspec.Meta(ge=0)]],
                  msgspec.Meta(min_length=1, max_length=2)]


class V2RequestInput(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: str
    shape: Shape
    """``[n]`` or ``[n, 1]``: one value per penguin."""
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Element | list[Element]]
    """Flat, or nested as ``shape`` is."""


class V2RequestOutput(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: str
    parameters: dict[str, Any] | None = None


class V2InferRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[V2RequestInput]
    outputs: list[V2RequestOutput] | None = None
    """The outputs to answer with; all of them by default."""


REQUEST_SCHEMAS = ("V2InferRequest", "V2RequestInput", "V2RequestOutput")
"""The request bodies, by their name in the OpenAPI document (they refuse unknown fields)."""


class V2InferResponse(msgspec.Struct, omit_defaults=True):
    model_name: str
    model_version: str
    outputs: list[V2Tensor]
    id: str | None = None
