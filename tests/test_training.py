"""Training and scoring each model without Airflow."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import train_test_split

from penguins.cleaning import clean
from penguins.contract import DEFAULT_MAX_FIT_ROWS, FEATURES, LABEL, MODEL_NAMES, SPECIES
from penguins.models import FOREST_MIN_LEAF_SHARE, SAMPLED_MODELS, build_model
from penguins.training import encode_labels, fit_sample, train
from tests.benchmarks.synthetic import write_synthetic_source
from tests.data import raw_frame


@pytest.fixture(scope="module")
def clean_rows():
    return clean(raw_frame())[0]


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_each_model_scores_well_on_held_out_rows_and_is_reproducible(clean_rows, model_name):
    first = train(clean_rows, model_name, test_size=0.25, seed=42)
    again = train(clean_rows, model_name, test_size=0.25, seed=42)

    assert first.metrics["accuracy"] >= 0.97
    assert first.metrics == again.metrics
    assert first.classes == ["Adelie", "Chinstrap", "Gentoo"]
    # The packaged data has fewer training rows than DEFAULT_MAX_FIT_ROWS: every model fits all.
    assert first.rows == {"train": 249, "fit": 249, "test": 84, "total": 333}
    assert first.max_fit_rows == DEFAULT_MAX_FIT_ROWS
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


def _rows_fitted(trained) -> int:
    """How many rows the fitted pipeline saw, as its own scaler counted them."""
    scaler = trained.pipeline.named_steps["preprocess"].named_transformers_["numeric"]
    return int(scaler.n_samples_seen_)


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_the_costlier_models_fit_a_sample_and_are_scored_on_every_held_out_row(clean_rows,
                                                                               model_name):
    trained = train(clean_rows, model_name, test_size=0.25, seed=42, max_fit_rows=100)

    fitted = 100 if model_name in SAMPLED_MODELS else 249
    assert trained.rows == {"train": 249, "fit": fitted, "test": 84, "total": 333}
    assert _rows_fitted(trained) == fitted
    assert len(trained.held_out[0]) == len(trained.held_out[1]) == 84
    assert trained.max_fit_rows == 100
    assert trained.metrics["accuracy"] >= 0.95
    again = train(clean_rows, model_name, test_size=0.25, seed=42, max_fit_rows=100)
    assert again.metrics == trained.metrics, "the same seed draws the same sample"


def test_the_sample_keeps_each_species_share_and_is_the_whole_when_small(clean_rows):
    features = clean_rows[list(FEATURES)]
    labels = clean_rows[LABEL].to_numpy()

    sample, sample_labels = fit_sample(features, labels, 100, seed=3)

    assert len(sample) == len(sample_labels) == 100
    assert sample.index.is_unique and set(sample.index) <= set(features.index)
    assert (clean_rows.loc[sample.index, LABEL].to_numpy() == sample_labels).all()
    counts = pd.Series(sample_labels).value_counts()
    shares = clean_rows[LABEL].value_counts(normalize=True)
    for name in SPECIES:
        assert abs(counts[name] - 100 * shares[name]) <= 1, name
    whole, whole_labels = fit_sample(features, labels, 333, seed=3)
    assert whole is features and whole_labels is labels


def test_a_forest_leaf_holds_a_share_of_the_rows_so_trees_stay_bounded(tmp_path):
    synthetic = pd.read_csv(write_synthetic_source(tmp_path / "s.csv", 10_000, seed=5))
    synthetic.insert(0, "source_row", range(1, len(synthetic) + 1))
    rows = clean(synthetic)[0]

    trained = train(rows, "random_forest", test_size=0.25, seed=0, max_fit_rows=6_000)

    assert trained.rows["fit"] == 6_000
    least = int(np.ceil(FOREST_MIN_LEAF_SHARE * 6_000))
    assert least == 3
    for tree in trained.pipeline[-1].estimators_:
        leaves = tree.tree_.children_left == -1
        assert tree.tree_.n_node_samples[leaves].min() >= least
        assert leaves.sum() <= 6_000 // least


def test_the_forest_leaf_bound_leaves_the_packaged_data_forest_as_it_was(clean_rows):
    """Up to 2,000 fitted rows the share is one row, scikit-learn's default: the same trees."""
    bounded = train(clean_rows, "random_forest", test_size=0.25, seed=42)
    assert bounded.pipeline[-1].min_samples_leaf == FOREST_MIN_LEAF_SHARE
    labels, _ = encode_labels(clean_rows[LABEL])
    x_train, x_test, y_train, _ = train_test_split(
        clean_rows[list(FEATURES)], labels, test_size=0.25, random_state=42, stratify=labels)
    unbounded = build_model("random_forest", 42).set_params(model__min_samples_leaf=1)
    unbounded.fit(x_train, y_train)
    np.testing.assert_array_equal(bounded.pipeline.predict_proba(x_test),
                                  unbounded.predict_proba(x_test))
