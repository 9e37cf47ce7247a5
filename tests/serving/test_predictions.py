"""No train/serve skew: the service answers what each model itself answers, on every clean row."""

from __future__ import annotations

import numpy as np
import pytest

from penguins import contract

BATCH = 1000


@pytest.fixture(scope="module")
def rows(published) -> list[dict]:
    frame = published.clean[list(contract.FEATURES)]
    return [
        {name: (value.item() if hasattr(value, "item") else value) for name, value in row.items()}
        for row in frame.to_dict(orient="records")
    ]


@pytest.mark.parametrize("model_name", contract.MODEL_NAMES)
def test_batch_predictions_equal_the_models_own(client, published, rows, model_name):
    trained = published.trained[model_name]
    frame = published.clean[list(contract.FEATURES)]
    expected_codes = trained.pipeline.predict(frame)
    expected_probabilities = trained.pipeline.predict_proba(frame)

    answers = []
    for start in range(0, len(rows), BATCH):
        response = client.post(f"/predict-batch/{model_name}",
                               json={"penguins": rows[start:start + BATCH]})
        assert response.status_code == 200, response.text
        answers.extend(response.json()["predictions"])

    assert [a["species"] for a in answers] == [trained.classes[c] for c in expected_codes]
    served = np.array([[a["probabilities"][c] for c in trained.classes] for a in answers])
    np.testing.assert_allclose(served, expected_probabilities, rtol=0, atol=1e-12)


@pytest.mark.parametrize("model_name", contract.MODEL_NAMES)
def test_single_predictions_equal_the_models_own(client, published, rows, model_name):
    trained = published.trained[model_name]
    sample = published.clean[list(contract.FEATURES)].iloc[::25]
    expected = [trained.classes[c] for c in trained.pipeline.predict(sample)]
    served = [
        client.post(f"/predict/{model_name}", json=rows[i]).json()["species"]
        for i in range(0, len(rows), 25)
    ]
    assert served == expected
