"""Strict request bodies, and error messages that name the field at fault.

Litestar converts a JSON body to the handler's type leniently (``"39.1"`` would pass as a number,
``"true"`` as a boolean). A model must see exactly the types the OpenAPI document promises, so a
``before_request`` hook decodes each body strictly against the handler's ``data`` type first,
and turns the first problem into a 400 whose ``extra`` names the field: the same shape as
Litestar's own validation errors.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
from litestar import Request
from litestar.exceptions import ValidationException

from serving.contract import ISLANDS, SEXES

# msgspec: "<problem> - at `$.penguins[1].sex`" and "Object missing required field `sex`".
_LOCATION = re.compile(r"^(?P<problem>.*?)(?: - at `\$\.?(?P<path>[^`]*)`)?$", re.DOTALL)
_FIELD = re.compile(r"field `(?P<field>[^`]+)`")
_CHOICES = {"island": ISLANDS, "sex": SEXES}


async def decode_body_strictly(request: Request[Any, Any, Any]) -> None:
    """``before_request`` hook: refuse a body that does not strictly match the ``data`` type."""
    data_field = request.route_handler.parsed_data_field
    if data_field is None:
        return None
    body = await request.body()  # Raises 413 beyond the route's request_max_body_size.
    where = f"{request.method} {request.url.path}"
    if not body.strip():
        raise ValidationException(
            detail=f"Validation failed for {where}: the request body is empty",
            extra=[{"message": "Expected a JSON object, got an empty body", "source": "body"}],
        )
    try:
        msgspec.json.decode(body, type=data_field.annotation, strict=True)
    except msgspec.ValidationError as exc:
        error = describe(str(exc))
        raise ValidationException(
            detail=f"Validation failed for {where}: {error.get('key', 'body')}: {error['message']}",
            extra=[error],
        ) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ValidationException(
            detail=f"Validation failed for {where}: the body is not valid JSON ({exc})",
            extra=[{"message": f"Malformed JSON: {exc}", "source": "body"}],
        ) from None
    return None


def describe(message: str) -> dict[str, str]:
    """msgspec's validation message as ``{"message", "key", "source"}``; ``key`` is the field's path
    (``bill_length_mm``, ``penguins[1].sex``), left out when the body as a whole is wrong."""
    match = _LOCATION.match(message)
    problem, path = (match["problem"], match["path"] or "") if match else (message, "")
    if named := _FIELD.search(problem):
        path = f"{path}.{named['field']}" if path else named["field"]
    leaf = path.rpartition(".")[2]
    if problem.startswith("Invalid enum value") and leaf in _CHOICES:
        problem += f"; expected one of {', '.join(_CHOICES[leaf])}"
    error = {"message": problem, "source": "body"}
    if path:
        error["key"] = path
    return error
