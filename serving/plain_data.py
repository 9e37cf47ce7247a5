"""Plain data as bytes: what a model worker may send the serving process, and nothing else.

The serving process never unpickles: a worker process unpickles a model and sends back only
plain data, a tree of None, bools, ints, floats, strings, lists, dicts with string keys, and
numeric NumPy arrays. ``encode`` writes such a tree as

- 8 bytes: the header's length, a little-endian unsigned integer;
- the header: UTF-8 JSON of the tree, each array replaced by
  ``{"__array__": index, "dtype": "<f8", "shape": [...]}``, the indices 0, 1, 2... in the order
  the arrays appear;
- the arrays' raw bytes, in that order, each starting at a multiple of 8 bytes from the start
  (zero bytes pad the header and every array up to the next one).

The worker may have been subverted, so ``decode`` trusts nothing it reads: anything but exactly
this format raises ``PlainDataError``, and it allocates nothing much larger than the data it
was given (an array's size is checked against the bytes actually there before it is made).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

DTYPES = {np.dtype(t).str: np.dtype(t) for t in (
    np.bool_, np.int8, np.int16, np.int32, np.int64,
    np.uint8, np.uint16, np.uint32, np.uint64, np.float32, np.float64,
)}
"""The arrays plain data may hold, by their little-endian dtype strings ("<f8", "|b1"...)."""

MAX_DEPTH = 32
"""How deeply lists and dicts may nest."""
MAX_DIMENSIONS = 32
MAX_DIMENSION = 2**40
"""A bound on each dimension, so that even an empty array's shape fits NumPy's integers."""

ARRAY = "__array__"
_HEADER_LENGTH = 8
_ALIGNMENT = 8


class PlainDataError(ValueError):
    """The bytes are not plain data in this module's format; the message says where."""


def encode(tree: Any) -> bytes:
    """``tree`` as bytes; PlainDataError if it holds anything but plain data."""
    arrays: list[np.ndarray] = []
    header = json.dumps(_to_header(tree, arrays, "the tree", 0), separators=(",", ":")).encode()
    parts = [len(header).to_bytes(_HEADER_LENGTH, "little"), header, _padding(len(header))]
    for array in arrays:
        data = array.tobytes()
        parts += [data, _padding(len(data))]
    return b"".join(parts)


MAX_HEADER_BYTES = 16 * 1024**2
"""A compiled model's header holds a few hundred numbers and its check rows: some 100 kB."""


def decode(data: bytes, *, max_bytes: int) -> Any:
    """The tree ``encode`` made ``data`` from; PlainDataError if ``data`` is anything else, or
    longer than ``max_bytes``."""
    view = memoryview(data).cast("B")
    if len(view) > max_bytes:
        raise PlainDataError(f"the data is {len(view)} bytes, more than the {max_bytes} allowed")
    if len(view) < _HEADER_LENGTH:
        raise PlainDataError(f"the data is {len(view)} bytes, too short for its header's length")
    length = int.from_bytes(view[:_HEADER_LENGTH], "little")
    if length > MAX_HEADER_BYTES:
        # Parsed JSON takes tens of times its text: the header is bounded on its own.
        raise PlainDataError(f"the header claims {length} bytes, more than the "
                             f"{MAX_HEADER_BYTES} allowed")
    end = _HEADER_LENGTH + length
    if end > len(view):
        raise PlainDataError(f"the header claims {length} bytes; only "
                             f"{len(view) - _HEADER_LENGTH} follow its length")
    header = _parse_header(bytes(view[_HEADER_LENGTH:end]))
    reader = _Buffers(view, end)
    tree = _from_header(header, reader, "the tree", 0)
    reader.finish()
    return tree


def _to_header(value: Any, arrays: list[np.ndarray], where: str, depth: int) -> Any:
    """``value`` with every array replaced by its description (appended to ``arrays``)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, np.ndarray):
        little_endian = value.dtype.newbyteorder("<")
        if little_endian.str not in DTYPES:
            raise PlainDataError(f"{where} is an array of {value.dtype}, not of plain numbers")
        array = value.astype(little_endian, order="C", copy=False)
        arrays.append(array)
        return {ARRAY: len(arrays) - 1, "dtype": array.dtype.str, "shape": list(array.shape)}
    if isinstance(value, (list, dict)) and depth >= MAX_DEPTH:
        raise PlainDataError(f"{where} nests lists and dicts more than {MAX_DEPTH} deep")
    if isinstance(value, list):
        return [_to_header(v, arrays, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise PlainDataError(f"{where} has the key {key!r}, not a string")
        if ARRAY in value:
            raise PlainDataError(f"{where} has the key {ARRAY!r}, which marks an array")
        return {k: _to_header(v, arrays, f"{where}[{k!r}]", depth + 1) for k, v in value.items()}
    raise PlainDataError(f"{where} is a {type(value).__qualname__}, not plain data")


def _padding(length: int) -> bytes:
    return bytes(-length % _ALIGNMENT)


def _parse_header(header: bytes) -> Any:
    try:
        return json.loads(header.decode("utf-8"), object_pairs_hook=_unique_keys)
    except PlainDataError:
        raise
    except UnicodeDecodeError as exc:
        raise PlainDataError(f"the header is not UTF-8 ({exc.reason})") from None
    except RecursionError:
        raise PlainDataError("the header nests too deeply to parse") from None
    except ValueError as exc:  # JSONDecodeError, and integers with too many digits
        raise PlainDataError(f"the header is not JSON ({exc})") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        raise PlainDataError("the header has a dict with a repeated key")
    return found


class _Buffers:
    """The arrays' bytes after the header, handed out in order, each checked before use."""

    def __init__(self, view: memoryview, header_end: int) -> None:
        self._view = view
        self._at = header_end
        self._count = 0
        self._skip_padding()

    def next_array(self, index: Any, dtype: Any, shape: Any, where: str) -> np.ndarray:
        if type(index) is not int or index != self._count:
            raise PlainDataError(f"{where} is array {index!r}; the next array is {self._count}")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise PlainDataError(f"{where} has the dtype {dtype!r}; plain data's are "
                                 f"{', '.join(DTYPES)}")
        if not (isinstance(shape, list) and len(shape) <= MAX_DIMENSIONS and all(
                type(n) is int and 0 <= n <= MAX_DIMENSION for n in shape)):
            raise PlainDataError(f"{where} has the shape {shape!r}, not a list of at most "
                                 f"{MAX_DIMENSIONS} sizes from 0 to {MAX_DIMENSION}")
        size = math.prod(shape) * DTYPES[dtype].itemsize  # A Python int: it cannot overflow.
        remaining = len(self._view) - self._at
        if size > remaining:
            raise PlainDataError(f"{where} needs {size} bytes; only {remaining} remain")
        data = self._view[self._at:self._at + size].tobytes()
        self._at += size
        self._count += 1
        self._skip_padding()
        try:
            return np.frombuffer(data, dtype=DTYPES[dtype]).reshape(shape)
        except ValueError as exc:  # An empty array whose other dimensions overflow NumPy's.
            raise PlainDataError(f"{where} has the shape {shape!r}, too big for NumPy") from exc

    def finish(self) -> None:
        if self._at != len(self._view):
            raise PlainDataError(f"{len(self._view) - self._at} bytes follow the last array")

    def _skip_padding(self) -> None:
        padding = self._view[self._at:self._at + -self._at % _ALIGNMENT]
        if any(padding):
            raise PlainDataError(f"the padding at byte {self._at} is not zero bytes")
        self._at += len(padding)


def _from_header(value: Any, buffers: _Buffers, where: str, depth: int) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict) and ARRAY in value:  # An array, not a level of nesting.
        if set(value) != {ARRAY, "dtype", "shape"}:
            raise PlainDataError(f"{where} has the key {ARRAY!r} but the keys {sorted(value)}, "
                                 f"not those of an array ({ARRAY!r}, 'dtype', 'shape')")
        return buffers.next_array(value[ARRAY], value["dtype"], value["shape"], where)
    if depth >= MAX_DEPTH:
        raise PlainDataError(f"{where} nests lists and dicts more than {MAX_DEPTH} deep")
    if isinstance(value, list):
        return [_from_header(v, buffers, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    return {k: _from_header(v, buffers, f"{where}[{k!r}]", depth + 1) for k, v in value.items()}
