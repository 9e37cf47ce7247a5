"""A batch's answer written from the predictor's arrays (``serving.batch_answers``): the very bytes
msgspec writes for the ``BatchPrediction`` of the same arrays."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from serving.batch_answers import encoded
from serving.schemas import BatchPrediction, ModelVersion, SpeciesPrediction

MODEL = ModelVersion(name="logistic_regression", version="20261207T040000.123456Z",
                     sha256="ab" * 32, trained_at="2026-12-07T04:00:00+00:00", dag_run_id=None)

# Probabilities msgspec writes in every form it has: exponents both ways, the extremes, a
# negative zero, and what a broken model could give (NaN and infinities are written null).
AWKWARD = [0.0, 1.0, -0.0, 1e-05, 0.1 + 0.2, 5e-324, 1e-300, 1.7976931348623157e308,
           1 - 1e-16, 123456789.0, 1e16, float("nan"), float("inf"), -float("inf")]


def _by_structs(model: ModelVersion, classes: tuple[str, ...], codes: np.ndarray,
                probabilities: np.ndarray) -> bytes:
    return msgspec.json.encode(BatchPrediction(model=model, predictions=[
        SpeciesPrediction(species=classes[code], probabilities=dict(zip(classes, row,
                                                                        strict=True)))
        for code, row in zip(codes.tolist(), probabilities.tolist(), strict=True)
    ]))


@pytest.mark.parametrize("classes", [
    ("Adelie", "Chinstrap", "Gentoo"),
    ("only",),
    ("yes", "no"),
    ('a "quoted" name', "back\\slash", "tab\tand\nnewline", "ünïcødé 🐧", "<script>", ""),
])
@pytest.mark.parametrize("rows", [1, 2, 997])
def test_the_answer_is_msgspec_s_encoding_of_its_structs(classes, rows):
    rng = np.random.default_rng(rows * 31 + len(classes))
    probabilities = rng.dirichlet([0.3] * len(classes), size=rows)
    awkward = rng.choice(AWKWARD, size=probabilities.shape)
    probabilities = np.where(rng.random(probabilities.shape) < 0.2, awkward, probabilities)
    codes = rng.integers(0, len(classes), size=rows)

    answer = encoded(MODEL, list(classes), codes, probabilities)

    assert answer == _by_structs(MODEL, classes, codes, probabilities)
    decoded = msgspec.json.decode(answer)  # NaN is written null: not a BatchPrediction's float
    assert [p["species"] for p in decoded["predictions"]] == [classes[c] for c in codes]
    assert [list(p["probabilities"]) for p in decoded["predictions"]] == [list(classes)] * rows


def test_a_model_that_ran_a_dag_run_is_named_with_it():
    model = msgspec.structs.replace(MODEL, dag_run_id='manual__2026-12-07T04:00:00+00:00 "x"')
    codes, probabilities = np.array([2, 0]), np.array([[0.1, 0.2, 0.7], [0.5, 0.25, 0.25]])
    classes = ("Adelie", "Chinstrap", "Gentoo")
    assert (encoded(model, classes, codes, probabilities)
            == _by_structs(model, classes, codes, probabilities))


def test_the_probabilities_may_come_in_any_memory_layout():
    """A predictor's arrays may be views: transposed (Fortran order) or strided."""
    rng = np.random.default_rng(7)
    classes = ("Adelie", "Chinstrap", "Gentoo")
    codes = rng.integers(0, 3, size=50)
    base = rng.random((3, 100))
    for probabilities in (base.T[::2], np.asfortranarray(base.T[:50])):
        assert (encoded(MODEL, classes, codes, probabilities)
                == _by_structs(MODEL, classes, codes, probabilities))
