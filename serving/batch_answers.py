"""A batch's answer as JSON, written straight from the predictor's arrays.

``BatchPrediction`` holds one ``SpeciesPrediction`` struct, and one dict of probabilities, per
penguin: for a batch of a thousand, building them cost more than the model did. ``encoded``
writes the very bytes that ``msgspec.json.encode(BatchPrediction(...))`` writes without them:
every probability is still encoded by msgspec (in one call, as a flat list), and every other
piece is encoded by msgspec once per model and class; the pieces are then interleaved in one
list and joined.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import msgspec
import numpy as np

from serving.schemas import ModelVersion


def encoded(model: ModelVersion, classes: Sequence[str], codes: np.ndarray,
            probabilities: np.ndarray) -> bytes:
    """``msgspec.json.encode(BatchPrediction(model=model, predictions=[...]))`` for the
    predictor's ``codes`` ``(n,)`` and ``probabilities`` ``(n, len(classes))``, n >= 1; the
    classes' names distinct (the store's documents refuse others)."""
    pieces = _Pieces.of(tuple(classes))
    rows, width = len(codes), len(pieces.separators) + 1
    numbers = msgspec.json.encode(probabilities.ravel().tolist())[1:-1].split(b",")
    # Per penguin: its species' opening, a probability, a separator, a probability, ... the end.
    stride = 2 * width + 1
    parts: list[bytes] = [b""] * (rows * stride)
    parts[0::stride] = [pieces.openings[code] for code in codes.tolist()]
    for column in range(width):
        parts[2 * column + 1::stride] = numbers[column::width]
    for column, separator in enumerate(pieces.separators):
        parts[2 * column + 2::stride] = [separator] * rows
    parts[stride - 1::stride] = [pieces.end] * rows
    parts[-1] = pieces.last_end
    return b"".join([b'{"model":', msgspec.json.encode(model), b',"predictions":[', *parts,
                     b"]}"])


class _Pieces(msgspec.Struct, frozen=True):
    """The JSON around one penguin's probabilities, for the classes of a model."""

    openings: list[bytes]
    """By class code: ``{"species":"<class>","probabilities":{"<first class>":``."""
    separators: list[bytes]
    """Before each further class's probability: ``,"<class>":``."""
    end: bytes
    """After a penguin that another follows."""
    last_end: bytes

    @staticmethod
    @functools.cache
    def of(classes: tuple[str, ...]) -> _Pieces:
        names = [msgspec.json.encode(name) for name in classes]
        return _Pieces(
            openings=[b'{"species":%s,"probabilities":{%s:' % (name, names[0]) for name in names],
            separators=[b",%s:" % name for name in names[1:]],
            end=b"}},", last_end=b"}}",
        )
