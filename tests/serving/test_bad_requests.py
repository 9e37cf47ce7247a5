"""A table of bad requests: each gets a 4xx, with a JSON body naming the field and the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from litestar.testing import TestClient

from serving.app import create_app
from serving.settings import Settings
from tests.serving.conftest import PENGUIN, PUBLIC_KEY_FILE

MAX_BODY_BYTES = 10_000
MAX_BATCH_ROWS = 5


def _without(field: str) -> dict:
    return {k: v for k, v in PENGUIN.items() if k != field}


JSON = {"content-type": "application/json"}


def _body(**changes) -> bytes:
    return json.dumps({**PENGUIN, **changes}).encode()


# (id, method, path, raw body or None, status, text the error must contain)
CASES = [
    ("missing field", "POST", "/predict/svm", json.dumps(_without("sex")).encode(), 400, "sex"),
    ("extra field", "POST", "/predict/svm", _body(wingspan_mm=80), 400, "wingspan_mm"),
    ("number as text", "POST", "/predict/svm", _body(bill_length_mm="39.1"), 400,
     "bill_length_mm"),
    ("number as boolean", "POST", "/predict/svm", _body(bill_depth_mm=True), 400,
     "bill_depth_mm"),
    ("null measurement", "POST", "/predict/svm", _body(body_mass_g=None), 400, "body_mass_g"),
    ("fractional year", "POST", "/predict/svm", _body(year=2007.5), 400, "year"),
    ("year as text", "POST", "/predict/svm", _body(year="2007"), 400, "year"),
    ("unknown island", "POST", "/predict/svm", _body(island="Atlantis"), 400, "island"),
    ("island in lower case", "POST", "/predict/svm", _body(island="biscoe"), 400,
     "Biscoe, Dream, Torgersen"),
    ("unknown sex", "POST", "/predict/svm", _body(sex="M"), 400, "female, male"),
    ("too small", "POST", "/predict/svm", _body(bill_length_mm=5), 400, "bill_length_mm"),
    ("too large", "POST", "/predict/svm", _body(body_mass_g=20000), 400, "<= 10000.0"),
    ("negative", "POST", "/predict/svm", _body(flipper_length_mm=-181), 400,
     "flipper_length_mm"),
    ("year out of range", "POST", "/predict/svm", _body(year=1850), 400, "year"),
    ("huge integer", "POST", "/predict/svm", _body(year=10**30), 400, "year"),
    ("infinite number", "POST", "/predict/svm",
     _body().replace(b"39.1", b"1e999"), 400, "bill_length_mm"),
    ("NaN", "POST", "/predict/svm", _body().replace(b"39.1", b"NaN"), 400, "not valid JSON"),
    ("malformed JSON", "POST", "/predict/svm", b'{"island": "Biscoe",', 400, "not valid JSON"),
    ("not UTF-8", "POST", "/predict/svm", b'{"island": "\xff"}', 400, "not valid JSON"),
    ("empty body", "POST", "/predict/svm", b"", 400, "empty"),
    ("blank body", "POST", "/predict", b"  \n", 400, "empty"),
    ("array instead of object", "POST", "/predict/svm", json.dumps([PENGUIN]).encode(), 400,
     "Expected `object`, got `array`"),
    ("deeply nested", "POST", "/predict/svm", b"[" * 5000 + b"]" * 5000, 400, "body"),
    ("deeply nested field", "POST", "/predict/svm",
     b'{"island": ' + b"[" * 4000 + b"]" * 4000 + b"}", 400, "island"),
    ("oversized body", "POST", "/predict/svm", b" " * (MAX_BODY_BYTES + 1) + _body(), 413,
     "Request Entity Too Large"),
    ("empty batch", "POST", "/predict-batch/svm", b'{"penguins": []}', 400, "penguins"),
    ("oversized batch", "POST", "/predict-batch",
     json.dumps({"penguins": [PENGUIN] * (MAX_BATCH_ROWS + 1)}).encode(), 400,
     f"length <= {MAX_BATCH_ROWS}"),
    ("bad row in a batch", "POST", "/predict-batch/svm",
     json.dumps({"penguins": [PENGUIN, {**PENGUIN, "sex": "x"}]}).encode(), 400,
     "penguins[1].sex"),
    ("batch as a bare list", "POST", "/predict-batch", json.dumps([PENGUIN]).encode(), 400,
     "object"),
    ("unknown model", "POST", "/predict/no_such_model", _body(), 404, "no_such_model"),
    ("unknown model, batch", "POST", "/predict-batch/nope",
     json.dumps({"penguins": [PENGUIN]}).encode(), 404, "nope"),
    ("unknown model's metadata", "GET", "/models/nope", None, 404, "nope"),
    ("upper-case model name", "POST", "/predict/SVM", _body(), 400, "model_name"),
    ("model name with a dot", "GET", "/models/svm.pkl", None, 400, "model_name"),
    ("dot-dot model name", "POST", "/predict/..", _body(), 404, ""),
    ("encoded dot-dot", "POST", "/predict/%2E%2E", _body(), 400, "model_name"),
    ("encoded slash", "POST", "/predict/..%2Fmanifest", _body(), 404, ""),
    ("encoded absolute path", "GET", "/models/%2Fetc%2Fpasswd", None, 404, ""),
    ("overlong model name", "GET", "/models/" + "a" * 65, None, 400, "model_name"),
    ("wrong method", "GET", "/predict/svm", None, 405, ""),
]


@pytest.fixture(scope="module")
def client(published, tmp_path_factory) -> TestClient:
    directory = Path(shutil.copytree(published.store, tmp_path_factory.mktemp("bad") / "m"))
    settings = Settings(models_dir=directory, public_key_file=PUBLIC_KEY_FILE,
                        max_body_bytes=MAX_BODY_BYTES, max_batch_rows=MAX_BATCH_ROWS)
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "expected"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_a_bad_request_gets_a_clear_4xx(client, method, path, body, status, expected):
    response = client.request(method, path, content=body, headers=JSON)
    assert response.status_code == status, response.text
    error = response.json()
    assert error["status_code"] == status
    assert expected in json.dumps(error), error


def test_a_field_error_names_the_field_in_extra(client):
    error = client.post("/predict/svm", content=_body(bill_length_mm=5), headers=JSON).json()
    assert error["extra"] == [
        {"message": "Expected `float` >= 10.0", "key": "bill_length_mm", "source": "body"}
    ]
    assert "bill_length_mm" in error["detail"]


def test_the_good_request_of_the_table_passes(client):
    assert client.post("/predict/svm", content=_body(), headers=JSON).status_code == 200
