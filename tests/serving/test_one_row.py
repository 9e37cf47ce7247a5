"""One penguin's own arithmetic path answers what the batch path and the model itself answer,
also where a sum in another order or a rounding could make them part: classes whose fractions
tie in a forest of mixed leaves, and a penguin as far from its k-th nearest training row as
from the next one, of another species.

The models are fitted for real on the packaged data; the rows are built to sit on those ties.
"""

from __future__ import annotations

import msgspec
import numpy as np
import pandas as pd
import pytest
from sklearn.ensemble import RandomForestClassifier
from sklearn.neighbors import KNeighborsClassifier

from penguins import contract, models, training
from serving.compiled import CompiledPredictor, check_rows, export_spec
from serving.schemas import Penguin
from tests.serving.conftest import packaged_clean

N_CLASSES = len(contract.SPECIES)


@pytest.fixture(scope="module")
def clean() -> pd.DataFrame:
    return packaged_clean()


def _fitted(clean: pd.DataFrame, model_name: str, estimator):
    labels, _ = training.encode_labels(clean[contract.LABEL])
    return models.build_model(model_name, 0).set_params(model=estimator).fit(
        clean[list(contract.FEATURES)], labels)


def test_a_forest_of_mixed_leaves_answers_one_row_as_scikit_learn_to_the_bit(clean):
    # Leaves of three rows or more hold class fractions such as 1/3 and 2/3: summed over the
    # trees in another order than scikit-learn's, two classes' totals can tie or stop tying.
    pipeline = _fitted(clean, "random_forest",
                       RandomForestClassifier(n_estimators=10, min_samples_leaf=3, random_state=0))
    predictor = CompiledPredictor.from_pipeline(pipeline, N_CLASSES)
    tied = {"island": "Dream", "sex": "female", "bill_length_mm": 44.41856330692769,
            "bill_depth_mm": 19.535407945697557, "flipper_length_mm": 197.25634295200777,
            "body_mass_g": 3626.346631492845, "year": 2008}
    rows = [tied, *check_rows(predictor.features, per_group=400, seed=1)]
    frame = pd.DataFrame(rows)[list(contract.FEATURES)]
    codes, probabilities = pipeline.predict(frame), pipeline.predict_proba(frame)
    assert sorted(probabilities[0])[-2:] == [0.4999999999999999, 0.5], "the row sits on a tie"

    for row, code, expected in zip(rows, codes.tolist(), probabilities.tolist(), strict=True):
        assert predictor.predict_one(row) == (code, expected)


def _on_the_kth_neighbours_bisector(clean, pipeline, how_many: int) -> list[Penguin]:
    """Penguins as far from their 5th nearest training row as from their 6th, of another
    species: measurements near a real penguin's, moved onto the plane between those two."""
    features, knn = pipeline[0], pipeline[-1]
    train, labels = knn._fit_X, knn._y
    scaling = {n["slot"]: n for n in export_spec(pipeline, N_CLASSES)["features"]["numeric"]}
    numeric = sorted(scaling)
    x = features.transform(clean[list(contract.FEATURES)])
    rng = np.random.default_rng(0)
    made = []
    while len(made) < how_many:
        i = int(rng.integers(len(x)))
        near = x[i].copy()
        near[numeric] += rng.normal(0, 0.4, len(numeric))
        order = np.argsort(((train - near) ** 2).sum(axis=1))
        fifth, sixth = order[4], order[5]
        across = train[fifth] - train[sixth]
        across[[s for s in range(len(across)) if s not in scaling]] = 0
        if labels[fifth] == labels[sixth] or not across.any():
            continue
        moved = near - ((near - (train[fifth] + train[sixth]) / 2) @ across) / (
            across @ across) * across
        row = {scaling[s]["column"]: float(moved[s] * scaling[s]["scale"] + scaling[s]["mean"])
               for s in numeric if scaling[s]["column"] != "year"}
        row.update(island=clean["island"].iloc[i], sex=clean["sex"].iloc[i],
                   year=int(clean["year"].iloc[i]))
        try:
            made.append(msgspec.convert(row, Penguin))
        except msgspec.ValidationError:  # moved out of the plausible ranges
            continue
    return made


def test_k_neighbours_one_row_picks_the_batchs_neighbours_on_a_near_tie(clean):
    pipeline = _fitted(clean, "knn", KNeighborsClassifier(n_neighbors=5))
    predictor = CompiledPredictor.from_pipeline(pipeline, N_CLASSES)
    penguins = _on_the_kth_neighbours_bisector(clean, pipeline, 500)
    codes, probabilities = predictor.predict(penguins)
    assert len({tuple(p) for p in probabilities.tolist()}) > 1

    for penguin, code, expected in zip(penguins, codes.tolist(), probabilities.tolist(),
                                       strict=True):
        assert predictor.predict_one(penguin) == (code, expected)
