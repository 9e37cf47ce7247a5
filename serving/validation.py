"""Strict request bodies, and error messages that name the field at fault.

Litestar converts a JSON body to the handler's type leniently (``"39.1"`` would pass as a number,
``"true"`` as a boolean), whatever its ``Content-Type``, and a JSON object's repeated key quietly
takes its last value. A model must see exactly what the OpenAPI document promises, so a
``before_request`` hook refuses a body that is not declared JSON (415), decodes it strictly
against the handler's ``data`` type, refuses a repeated key, and turns the first problem into a
4xx whose ``extra`` names the field: the same shape as Litestar's own validation errors. The
hook hands its result to ``StrictRequest``, so that Litestar builds ``data`` from it rather
than decoding the body a second time.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from typing import Any

import msgspec
import msgspec.inspect
from litestar import Request
from litestar.exceptions import HTTPException, ValidationException
from litestar.status_codes import HTTP_415_UNSUPPORTED_MEDIA_TYPE
from litestar.types import Empty, Scope

from serving.contract import ISLANDS, SEXES

# msgspec: "<problem> - at `$.penguins[1].sex`" and "Object missing required field `sex`".
_LOCATION = re.compile(r"^(?P<problem>.*?)(?: - at `\$\.?(?P<path>[^`]*)`)?$", re.DOTALL)
_FIELD = re.compile(r"field `(?P<field>[^`]+)`")
_CHOICES = {"island": ISLANDS, "sex": SEXES}


async def decode_body_strictly(request: Request[Any, Any, Any], *,
                               media_type_optional: bool = False) -> None:
    """``before_request`` hook: refuse a body that does not strictly match the ``data`` type,
    or that is not declared JSON (``media_type_optional``: unless it declares nothing)."""
    data_field = request.route_handler.parsed_data_field
    if data_field is None:
        return None
    declared = content_type(request.scope)
    if not (media_type_optional and declared is None):
        _require_json(request, declared or "")
    body = await request.body()  # Raises 413 beyond the route's request_max_body_size.
    decoded = strictly_decoded(body, data_field.annotation, lambda: _where(request))
    if isinstance(request, StrictRequest):
        request.decoded = decoded
    return None


class UnsupportedMediaType(HTTPException):
    """415. A class of its own: Litestar decides whether to log a stack trace by the exception
    class's status code, and a 4xx is the caller's."""

    status_code = HTTP_415_UNSUPPORTED_MEDIA_TYPE


def content_type(scope: Scope) -> str | None:
    """The request's ``Content-Type``, if it has one."""
    return header(scope, b"content-type")


def header(scope: Scope, name: bytes) -> str | None:
    """The request's first header ``name`` (lower-case), if it has one."""
    # From the raw headers: ``request.headers`` builds a mapping of them all, on every request.
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def is_json(content_type: str | None) -> bool:
    """``content_type`` declares JSON: ``application/json`` or an ``application/*+json``."""
    media_type = _media_type(content_type or "")
    return media_type == "application/json" or (media_type.startswith("application/")
                                                 and media_type.endswith("+json"))


def _media_type(content_type: str) -> str:
    return content_type.partition(";")[0].strip().lower()


def _require_json(request: Request[Any, Any, Any], content_type: str) -> None:
    if is_json(content_type):
        return
    media_type = _media_type(content_type)
    shown = f"`{media_type[:64]}`" if media_type else "none"
    raise UnsupportedMediaType(
        detail=f"{_where(request)} takes a JSON body: send Content-Type: application/json "
               f"(got {shown})",
        extra=[{"key": "Content-Type", "message": "Expected application/json",
                "source": "header"}],
    )


def strictly_decoded(body: bytes, annotation: Any, where: Callable[[], str]) -> Any:
    """``body`` decoded strictly into ``annotation``, else the 400 that names what is wrong in
    the request ``where()`` describes (called only then)."""
    if not body.strip():
        raise ValidationException(
            detail=f"Validation failed for {where()}: the request body is empty",
            extra=[{"message": "Expected a JSON object, got an empty body", "source": "body"}],
        )
    try:
        decoded = _decode(body, annotation)
    except msgspec.ValidationError as exc:
        error = describe(str(exc))
        raise ValidationException(
            detail=f"Validation failed for {where()}: {error.get('key', 'body')}: "
                   f"{error['message']}",
            extra=[error],
        ) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ValidationException(
            detail=f"Validation failed for {where()}: the body is not valid JSON ({exc})",
            extra=[{"message": f"Malformed JSON: {exc}", "source": "body"}],
        ) from None
    except RecursionError:
        raise ValidationException(
            detail=f"Validation failed for {where()}: the body nests too deeply",
            extra=[{"message": "JSON nested too deeply", "source": "body"}],
        ) from None
    if (repeated := repeated_key(body, decoded)) is not None:
        raise ValidationException(
            detail=f"Validation failed for {where()}: {repeated}: the key appears more "
                   "than once in one object",
            extra=[{"key": repeated, "message": "Duplicate key", "source": "body"}],
        )
    return decoded


# A JSON key is a string followed by a colon; in a body with no backslash, no string can hold
# a quote, so counting them counts the keys exactly, once msgspec has rewritten the body with the
# same spacing everywhere (``"key": value``): a C pass, cheaper than looking for spaced keys.
_KEY = b'":'


def repeated_key(body: bytes, decoded: Any) -> str | None:
    """A key that appears twice in one object of ``body``, which decoded to ``decoded``; None if
    there is none. ``decoded`` holds one value per key, so a body with more keys than it has
    fields repeats one. Only then, or when escapes could hide a key, is the body parsed again."""
    expected = _fields_in(decoded)
    if expected is not None and b"\\" not in body and _keys_in(body, type(decoded)) == expected:
        return None
    repeated: list[str] = []

    def note_repeats(pairs: list[tuple[str, Any]]) -> None:
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen and not repeated:
                repeated.append(key)
            seen.add(key)

    json.loads(body, object_pairs_hook=note_repeats)
    return repeated[0] if repeated else None


def _keys_in(body: bytes, kind: type) -> int:
    """How many keys ``body`` (with no backslash, decoded into a ``kind``) holds."""
    if _without_colons(kind):
        # Every string of the body is a field's name or one of a Literal's values: outside
        # strings, a colon only ever ends a key.
        return body.count(b":")
    return msgspec.json.format(body, indent=0).count(_KEY)


@functools.cache
def _without_colons(kind: type) -> bool:
    """No string a body decoded into a ``kind`` may hold has a colon: its objects are structs
    that refuse unknown fields, and its strings Literals."""
    return _colon_free(msgspec.inspect.type_info(kind))


def _colon_free(kind: msgspec.inspect.Type) -> bool:
    kind = _unwrapped(kind)
    if isinstance(kind, msgspec.inspect.StructType):
        return kind.forbid_unknown_fields and all(
            ":" not in field.encode_name and _colon_free(field.type) for field in kind.fields)
    if isinstance(kind, msgspec.inspect.ListType):
        return _colon_free(kind.item_type)
    if isinstance(kind, msgspec.inspect.LiteralType):
        return all(not isinstance(value, str) or ":" not in value for value in kind.values)
    return isinstance(kind, msgspec.inspect.IntType | msgspec.inspect.FloatType
                      | msgspec.inspect.BoolType | msgspec.inspect.NoneType)


def _fields_in(value: Any) -> int | None:
    """How many keys the JSON of ``value`` holds; None when that cannot be told from ``value``
    (a struct with optional fields, which a body may leave out or give)."""
    if isinstance(value, msgspec.Struct):
        kind = type(value)
        if kind.__struct_defaults__:
            return None
        if _is_flat(kind):  # a penguin
            return len(kind.__struct_fields__)
        counts = [_fields_in(getattr(value, name)) for name in kind.__struct_fields__]
        return None if None in counts else len(counts) + sum(counts)
    if isinstance(value, list) and value:
        first = type(value[0])
        if (issubclass(first, msgspec.Struct) and not first.__struct_defaults__
                and _is_flat(first)):
            return len(value) * len(first.__struct_fields__)  # a batch: cheap to count
        counts = [_fields_in(item) for item in value]
        return None if None in counts else sum(counts)
    return 0


@functools.cache
def _is_flat(struct: type[msgspec.Struct]) -> bool:
    """No field of ``struct`` holds a struct or a list."""
    return all(not isinstance(_unwrapped(field.type),
                              msgspec.inspect.StructType | msgspec.inspect.ListType)
               for field in msgspec.inspect.type_info(struct).fields)


def _unwrapped(kind: msgspec.inspect.Type) -> msgspec.inspect.Type:
    # A field documented with ``Meta(description=...)`` is its type wrapped in Metadata.
    while isinstance(kind, msgspec.inspect.Metadata):
        kind = kind.type
    return kind


class StrictRequest(Request[Any, Any, Any]):
    """A request whose ``json()`` is what ``decode_body_strictly`` decoded, once it has.

    Litestar builds a handler's ``data`` from ``json()``: by default it decodes the body again,
    leniently, into dicts and lists, then converts them to the handler's type (1.8 ms for a batch
    of 1,000 penguins, a fifth of the request). Converting a value that already has that type
    costs nothing.
    """

    decoded: Any = Empty

    async def json(self) -> Any:
        if self.decoded is not Empty:
            return self.decoded
        return await super().json()


def _decode(body: bytes, annotation: Any) -> Any:
    """Decode ``body`` strictly, except that a whole number written with a fraction (``2007.0``,
    as Python and pandas write a float year) is an integer: JSON Schema, and so the OpenAPI
    document, says it is one."""
    try:
        return msgspec.json.decode(body, type=annotation, strict=True)
    except msgspec.ValidationError as exc:
        if "Expected `int`, got `float`" not in str(exc):
            raise
        try:
            document = msgspec.json.decode(body)
        except RecursionError:
            raise exc from None
        return msgspec.convert(_whole_numbers_as_int(document), type=annotation, strict=True)


def _whole_numbers_as_int(document: Any) -> Any:
    """``document`` with every float that has no fractional part made an int (iteratively: the
    body may nest as deep as its size allows)."""
    root = [document]
    stack: list[list[Any] | dict[str, Any]] = [root]
    while stack:
        container = stack.pop()
        for key, value in (container.items() if isinstance(container, dict)
                           else enumerate(container)):
            if isinstance(value, float) and value.is_integer():
                container[key] = int(value)
            elif isinstance(value, list | dict):
                stack.append(value)
    return root[0]


def _where(request: Request[Any, Any, Any]) -> str:
    # Only on failure: building the URL costs more than decoding a valid penguin.
    return f"{request.method} {request.url.path}"


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
