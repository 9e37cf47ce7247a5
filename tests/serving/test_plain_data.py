"""Plain data: every allowed tree survives the trip as bytes, and nothing else is ever decoded."""

from __future__ import annotations

import json
import math
import tracemalloc
from typing import Any

import numpy as np
import pytest

from serving.plain_data import DTYPES, MAX_DEPTH, PlainDataError, decode, encode

ALLOWED = [np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
           np.uint64, np.float32, np.float64]


def _round_trip(tree: Any) -> Any:
    data = encode(tree)
    return decode(data, max_bytes=len(data))


def _blob(header: Any, body: bytes = b"") -> bytes:
    """Bytes in the format, by hand: ``header`` (JSON-encoded unless bytes), then ``body``."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + bytes(-len(text) % 8) + body


def _array_header(dtype: Any = "<f8", shape: Any = (2,), index: Any = 0) -> dict[str, Any]:
    return {"__array__": index, "dtype": dtype, "shape": list(shape)}


def _assert_same_tree(got: Any, want: Any) -> None:
    if isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
        assert not got.flags.writeable
    elif isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want)
        for key in want:
            _assert_same_tree(got[key], want[key])
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            _assert_same_tree(g, w)
    elif isinstance(want, float) and math.isnan(want):
        assert isinstance(got, float) and math.isnan(got)
    else:
        assert type(got) is type(want) and got == want


@pytest.mark.parametrize("dtype", ALLOWED, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(), (0,), (1,), (7,), (3, 5), (2, 0, 4), (2, 3, 4)])
def test_every_allowed_dtype_and_shape_survives(dtype, shape):
    rng = np.random.default_rng(0)
    array = np.asarray(rng.normal(size=shape) * 100).astype(dtype)
    got = _round_trip({"array": array})["array"]
    _assert_same_tree(got, array)
    assert got.flags.c_contiguous


def test_extreme_values_survive_to_the_bit():
    tree = {
        "float64": np.array([np.nan, np.inf, -np.inf, -0.0, 5e-324, np.finfo(np.float64).max]),
        "float32": np.array([np.nan, -0.0, np.finfo(np.float32).tiny], dtype=np.float32),
        "int64": np.array([np.iinfo(np.int64).min, np.iinfo(np.int64).max]),
        "uint64": np.array([np.iinfo(np.uint64).max], dtype=np.uint64),
        "numbers": [0.1, 1e308, -0.0, float("inf"), float("nan"), 2**70, -(2**63)],
    }
    got = _round_trip(tree)
    for name in ("float64", "float32", "int64", "uint64"):
        assert got[name].tobytes() == tree[name].tobytes()
    _assert_same_tree(got["numbers"], tree["numbers"])
    assert math.copysign(1, got["numbers"][2]) == -1


def test_nested_trees_survive_with_their_types_and_order():
    tree = {
        "none": None, "true": True, "zero": 0, "one": 1, "half": 0.5, "text": "Ådélie 🐧",
        "empty": {"list": [], "dict": {}, "string": ""},
        "mixed": [1, 1.0, True, None, "1", [np.arange(3)], {"z": np.zeros((2, 2))}],
        "later": np.array([True, False]),
    }
    _assert_same_tree(_round_trip(tree), tree)
    deepest: Any = np.arange(2)
    for depth in range(MAX_DEPTH):
        deepest = [deepest] if depth % 2 else {"next": deepest}
    _assert_same_tree(_round_trip(deepest), deepest)


def test_arrays_are_laid_out_little_endian_contiguous_and_aligned():
    strided = np.arange(20.0).reshape(4, 5)[::2, ::-2]
    big_endian = np.arange(6, dtype=">i4")
    data = encode([np.arange(3, dtype=np.int8), strided, big_endian, np.ones(1)])
    got = decode(data, max_bytes=len(data))
    np.testing.assert_array_equal(got[1], strided)
    np.testing.assert_array_equal(got[2], big_endian)
    assert got[2].dtype == np.dtype("<i4")
    assert len(data) % 8 == 0
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    assert [a["dtype"] for a in header] == ["|i1", "<f8", "<i4", "<f8"]


def test_decoded_arrays_are_their_own_memory():
    data = bytearray(encode({"a": np.arange(4.0)}))
    got = decode(bytes(data), max_bytes=len(data))["a"]
    data[-8:] = bytes(8)  # Changing the bytes afterwards does not change the array.
    np.testing.assert_array_equal(got, np.arange(4.0))
    with pytest.raises(ValueError, match="read-only"):
        got[0] = 1.0


@pytest.mark.parametrize(("tree", "complaint"), [
    (np.array([object()]), "array of object"),
    (np.array(["text"]), "not of plain numbers"),
    (np.array([np.datetime64("2024-01-01")]), "not of plain numbers"),
    (np.zeros(2, dtype=[("a", "<f8")]), "not of plain numbers"),
    (np.zeros(2, dtype=np.complex128), "not of plain numbers"),
    (np.zeros(2, dtype=np.float16), "not of plain numbers"),
    ((1, 2), "tuple, not plain data"),
    ({1, 2}, "set, not plain data"),
    (np.int64(3), "int64, not plain data"),
    (b"bytes", "bytes, not plain data"),
    ({1: "one"}, "key 1, not a string"),
    ({"__array__": 0}, "marks an array"),
])
def test_encode_refuses_what_is_not_plain_data(tree, complaint):
    with pytest.raises(PlainDataError, match=complaint):
        encode({"part": [tree]})


def test_encode_refuses_nesting_too_deep():
    tree: Any = 1
    for _ in range(MAX_DEPTH + 1):
        tree = [tree]
    with pytest.raises(PlainDataError, match="more than 32 deep"):
        encode(tree)


GOOD = _blob(_array_header(), np.arange(2.0).tobytes())


@pytest.mark.parametrize(("data", "complaint"), [
    (b"", "too short"),
    (b"\x01\x00\x00", "too short"),
    ((10**6).to_bytes(8, "little") + b"{}", "the header claims 1000000 bytes"),
    ((2**64 - 1).to_bytes(8, "little") + b"{}", "the header claims"),
    (_blob(b"\xff\xfe"), "not UTF-8"),
    (_blob(b"{'single': 'quotes'}"), "not JSON"),
    (_blob(b'{"a": 1} trailing'), "not JSON"),
    (_blob(b"1" * 5000), "not JSON"),  # More digits than Python converts.
    (_blob(b'{"a": 1, "a": 2}'), "repeated key"),
    (_blob(b"[" * 100_000 + b"]" * 100_000), "nests too deeply|more than 32 deep"),
    (_blob(json.loads("[" * 33 + "]" * 33)), "more than 32 deep"),
    (GOOD + bytes(8), "8 bytes follow the last array"),
    (GOOD + b"\x00", "1 bytes follow the last array"),
    (GOOD[:-1], "needs 16 bytes; only 15 remain"),
    (_blob({"a": 1}) + bytes(8), "8 bytes follow"),
    (_blob(b'{"a":1}')[:-1] + b"\x01", "padding at byte 15 is not zero"),
    (_blob(_array_header("|O"), bytes(16)), "dtype '|O'"),
    (_blob(_array_header("<M8[ns]"), bytes(16)), "dtype '<M8\\[ns\\]'"),
    (_blob(_array_header("|V8"), bytes(16)), "dtype '\\|V8'"),
    (_blob(_array_header(">f8"), bytes(16)), "dtype '>f8'"),
    (_blob(_array_header("<c16"), bytes(32)), "dtype '<c16'"),
    (_blob(_array_header("float64"), bytes(16)), "dtype 'float64'"),
    (_blob(_array_header(8), bytes(16)), "dtype 8"),
    (_blob(_array_header(shape=[-2]), bytes(16)), "shape \\[-2\\]"),
    (_blob(_array_header(shape=[2.0]), bytes(16)), "shape \\[2.0\\]"),
    (_blob(_array_header(shape=[True, True]), bytes(8)), "shape \\[true, true\\]|shape"),
    (_blob({**_array_header(), "shape": "2"}, bytes(16)), "shape '2'"),
    (_blob({**_array_header(), "shape": None}, bytes(16)), "shape None"),
    (_blob(_array_header(shape=[1] * 33), bytes(8)), "at most 32 sizes"),
    (_blob(_array_header(shape=[0, 2**41]), b""), "shape"),
    (_blob(_array_header(shape=[0, 2**40, 2**40]), b""), "too big for NumPy"),
    (_blob(_array_header(index=1), bytes(16)), "array 1; the next array is 0"),
    (_blob(_array_header(index="0"), bytes(16)), "array '0'"),
    (_blob([_array_header(), _array_header()], bytes(16)), "array 0; the next array is 1"),
    (_blob({**_array_header(), "extra": 1}, bytes(16)), "not those of an array"),
    (_blob({"__array__": 0, "dtype": "<f8"}, bytes(16)), "not those of an array"),
    (_blob({"__array__": None}), "not those of an array"),
])
def test_decode_refuses_malformed_data(data, complaint):
    with pytest.raises(PlainDataError, match=complaint):
        decode(data, max_bytes=10**6)


def test_decode_refuses_data_longer_than_allowed():
    with pytest.raises(PlainDataError, match=f"{len(GOOD)} bytes, more than the 16 allowed"):
        decode(GOOD, max_bytes=16)
    assert decode(GOOD, max_bytes=len(GOOD)).tolist() == [0.0, 1.0]


@pytest.mark.parametrize("shape", [[10**30], [10**10, 10**10, 10**10], [2**40] * 32])
def test_a_huge_array_in_a_small_blob_is_refused_without_allocating_it(shape):
    data = _blob(_array_header("<f8", shape))
    data += bytes(-len(data) % 100)
    assert len(data) <= 600  # 100 bytes, but for the 32 dimensions written out
    tracemalloc.start()
    try:
        with pytest.raises(PlainDataError, match="shape|needs"):
            decode(data, max_bytes=10**6)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


def test_the_dtypes_are_exactly_the_plain_numeric_ones():
    assert sorted(DTYPES) == sorted(np.dtype(d).str for d in ALLOWED)
