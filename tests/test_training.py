"""Training and scoring each model without Airflow."""

from __future__ import annotations

import numpy as np
import pytest

from penguins.cleaning import clean
from penguins.contract import FEATURES, MODEL_NAMES
from penguins.models import build_model
from penguins.training import train
from tests.data import raw_frame


@pytest.fixture(scope="module")
def clean_rows():
    return clean(raw_frame())[0]


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_each_model_scores_well_on_held_out_rows_and_is_reproducible(clean_rows, model_name):
    first = train(clean_rows, model_name, test_size=0.25, seed=42)
    again = train(clean_rows, model_name, test_size=0.25, seed=42)

    assert first.metrics["accuracy"] >= 0.95
    assert first.metrics == again.metrics
    assert first.classes == ["Adelie", "Chinstrap", "Gentoo"]
    assert first.rows == {"train": 249, "test": 84, "total": 333}
    probabilities = first.pipeline.predict_proba(clean_rows[list(FEATURES)].head(5))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)


def test_the_pipeline_takes_raw_measurements_and_ignores_an_unseen_category(clean_rows):
    trained = train(clean_rows, "logistic_regression", test_size=0.25, seed=1)
    penguin = clean_rows[list(FEATURES)].head(1).copy()
    penguin["island"] = "Atlantis"
    assert trained.pipeline.predict(penguin).shape == (1,)


def test_an_unknown_model_name_is_refused():
    with pytest.raises(ValueError, match="unknown model 'gradient_magic'"):
        build_model("gradient_magic", seed=0)
