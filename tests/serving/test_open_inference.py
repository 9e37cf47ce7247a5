"""The Open Inference Protocol (KServe V2) under /v2: the real service under uvicorn, called with
Triton's own client (``tritonclient.http``), gives the answers of ``POST /predict``; and the
protocol's error shape, through Litestar's test client."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import tritonclient.http as triton
from litestar.testing import TestClient
from tritonclient.utils import InferenceServerException

from penguins import contract
from serving.app import create_app
from serving.settings import Settings
from tests.serving.conftest import PENGUIN, PUBLIC_KEY_FILE, export_raw, promote, wait_until

DATATYPES = {"island": "BYTES", "sex": "BYTES", "year": "INT64"}
"""Each feature's tensor datatype; the measurements are FP64."""


@pytest.fixture(scope="module")
def v2(live_service) -> triton.InferenceServerClient:
    client = triton.InferenceServerClient(live_service.url.removeprefix("http://"))
    yield client
    client.close()


def rows_of(published, count: int, start: int = 0) -> list[dict[str, Any]]:
    """``count`` penguins of the data set, as request bodies hold them (every species)."""
    frame = published.clean.sample(frac=1.0, random_state=7).iloc[start:start + count]
    return [{name: (str(row[name]) if name in contract.CATEGORICAL_FEATURES
                    else int(row[name]) if name == "year" else float(row[name]))
             for name in contract.FEATURES} for _, row in frame.iterrows()]


def tensors(rows: list[dict[str, Any]], *, column: bool = False, fp32: bool = False,
            **datatypes: str) -> list[triton.InferInput]:
    """One input tensor per feature, shape [n] (or [n, 1] if ``column``); FP32 measurements if
    ``fp32``; ``datatypes`` overrides a feature's datatype."""
    inputs = []
    for name in contract.FEATURES:
        datatype = datatypes.get(name) or DATATYPES.get(name) or ("FP32" if fp32 else "FP64")
        dtype = {"BYTES": np.object_, "INT64": np.int64, "FP32": np.float32}.get(datatype,
                                                                                 np.float64)
        values = np.array([row[name] for row in rows], dtype=dtype)
        values = values.reshape(-1, 1) if column else values
        tensor = triton.InferInput(name, list(values.shape), datatype)
        inputs.append(tensor.set_data_from_numpy(values, binary_data=False))
    return inputs


def outputs(*names: str) -> list[triton.InferRequestedOutput]:
    return [triton.InferRequestedOutput(name, binary_data=False) for name in names]


def probabilities(answers: list[dict[str, Any]], classes: list[str]) -> np.ndarray:
    return np.array([[answer["probabilities"][c] for c in classes] for answer in answers])


def test_health_and_server_metadata(v2):
    assert v2.is_server_live() and v2.is_server_ready()
    assert v2.get_server_metadata() == {"name": "Penguins species prediction",
                                        "version": "1.0.0", "extensions": []}


@pytest.mark.parametrize("model", contract.MODEL_NAMES)
def test_model_metadata_and_readiness(v2, live_service, published, model):
    metadata = v2.get_model_metadata(model)
    info = requests.get(f"{live_service.url}/models/{model}", timeout=5).json()
    version = published.versions[model]
    assert metadata["name"] == model and version in metadata["versions"]
    assert [(i["name"], i["datatype"], i["shape"]) for i in metadata["inputs"]] == [
        (name, DATATYPES.get(name, "FP64"), [-1]) for name in contract.FEATURES]
    species, probs = metadata["outputs"]
    assert (species["name"], species["datatype"], species["shape"]) == ("species", "BYTES", [-1])
    assert (probs["name"], probs["datatype"], probs["shape"]) == (
        "probabilities", "FP64", [-1, len(info["classes"])])
    assert species["parameters"]["classes"] == probs["parameters"]["classes"] == info["classes"]
    assert v2.get_model_metadata(model, version) == metadata
    assert v2.is_model_ready(model) and v2.is_model_ready(model, version)
    assert not v2.is_model_ready(model, "20000101T000000.000000Z")
    assert not v2.is_model_ready("no_such_model")


@pytest.mark.parametrize("model", contract.MODEL_NAMES)
def test_one_penguin_gets_the_answer_of_predict(v2, live_service, published, model):
    (row,) = rows_of(published, 1)
    expected = requests.post(f"{live_service.url}/predict/{model}", json=row, timeout=10).json()
    result = v2.infer(model, tensors([row]), outputs=outputs("species", "probabilities"),
                      request_id="penguin-1")
    classes = result.get_output("probabilities")["parameters"]["classes"]
    assert result.as_numpy("species").tolist() == [expected["species"]]
    assert np.array_equal(result.as_numpy("probabilities"), probabilities([expected], classes))
    response = result.get_response()
    assert response["id"] == "penguin-1" and response["model_name"] == model
    assert response["model_version"] == expected["model"]["version"] == published.versions[model]


@pytest.mark.parametrize("model", contract.MODEL_NAMES)
@pytest.mark.parametrize("column", [False, True], ids=["shape [n]", "shape [n, 1]"])
def test_many_penguins_get_the_answers_of_predict_batch(v2, live_service, published, model,
                                                        column):
    rows = rows_of(published, 40)
    expected = requests.post(f"{live_service.url}/predict-batch/{model}",
                             json={"penguins": rows}, timeout=10).json()["predictions"]
    # Asked for no output in particular: all of them (tritonclient asks for binary data then;
    # the service answers in JSON, which the client reads as well).
    result = v2.infer(model, tensors(rows, column=column))
    classes = result.get_output("species")["parameters"]["classes"]
    species = result.as_numpy("species").tolist()
    assert species == [answer["species"] for answer in expected]
    assert len(set(species)) == 3, "the rows cover every species"
    assert result.as_numpy("probabilities").shape == (40, 3)
    assert np.array_equal(result.as_numpy("probabilities"), probabilities(expected, classes))
    assert "id" not in result.get_response()


def test_fp32_measurements_are_taken_as_the_float32_values_they_are(v2, live_service,
                                                                    published):
    rows = rows_of(published, 10, start=40)
    as_float32 = [{k: float(np.float32(v)) if isinstance(v, float) else v for k, v in r.items()}
                  for r in rows]
    expected = requests.post(f"{live_service.url}/predict-batch/knn",
                             json={"penguins": as_float32}, timeout=10).json()["predictions"]
    result = v2.infer("knn", tensors(rows, fp32=True, year="FP64"), outputs=outputs("species"))
    assert result.as_numpy("species").tolist() == [answer["species"] for answer in expected]
    assert result.as_numpy("probabilities") is None, "only the output asked for"


def test_a_kept_version_answers_at_its_own_path(v2, published):
    version = published.versions["svm"]
    result = v2.infer("svm", tensors([PENGUIN]), model_version=version)
    assert result.get_response()["model_version"] == version
    with pytest.raises(InferenceServerException) as error:
        v2.infer("svm", tensors([PENGUIN]), model_version="20000101T000000.000000Z")
    assert error.value.status() == "404" and "20000101T000000.000000Z" in error.value.message()


BAD_ROW = [PENGUIN, {**PENGUIN, "bill_length_mm": 250.0}]


@pytest.mark.parametrize(("inputs", "requested", "expected"), [
    (tensors(BAD_ROW), None, "'bill_length_mm', row 1: Expected `float` <= 100.0"),
    (tensors([{**PENGUIN, "island": "Atlantis"}]), None,
     "'island', row 0: Invalid enum value 'Atlantis'; expected one of Biscoe, Dream, Torgersen"),
    (tensors([{**PENGUIN, "year": 1850}]), None, "'year', row 0: Expected `int` >= 2000"),
    (tensors([PENGUIN])[:-2] + tensors([PENGUIN])[-1:], None, "Missing input tensors: sex"),
    (tensors([PENGUIN]) + tensors([PENGUIN])[:1], None, "'island' is given more than once"),
    (tensors([PENGUIN]) + [triton.InferInput("wingspan_mm", [1], "FP64").set_data_from_numpy(
        np.array([1.0]), binary_data=False)], None, "Unknown input tensor 'wingspan_mm'"),
    (tensors([PENGUIN], body_mass_g="BYTES"), None,
     "'body_mass_g' has datatype 'BYTES'; expected one of FP32, FP64, INT8"),
    (tensors([{**PENGUIN, "sex": 1.0}], sex="FP64"), None,
     "'sex' has datatype 'FP64'; expected BYTES"),
    (tensors([PENGUIN, PENGUIN])[:3] + tensors([PENGUIN])[3:], None,
     "different numbers of rows: island 2, bill_length_mm 2, bill_depth_mm 2, "
     "flipper_length_mm 1"),
    (tensors([PENGUIN]), ["species", "logits"], "Unknown output 'logits'"),
], ids=["out of range", "unknown island", "year out of range", "missing tensor",
        "duplicate tensor", "unknown tensor", "numbers as bytes", "sex as numbers",
        "rows disagree", "unknown output"])
def test_a_bad_inference_request_is_a_400_naming_the_problem(v2, inputs, requested, expected):
    with pytest.raises(InferenceServerException) as error:
        v2.infer("logistic_regression", inputs,
                 outputs=outputs(*requested) if requested else None)
    assert error.value.status() == "400"
    assert expected in error.value.message()


def test_an_unknown_model_is_a_404_in_the_protocols_error_shape(v2, live_service):
    with pytest.raises(InferenceServerException) as error:
        v2.infer("no_such_model", tensors([PENGUIN]))
    assert error.value.status() == "404" and "no_such_model" in error.value.message()
    for path in ("/v2/models/no_such_model", "/v2/models/no_such_model/ready"):
        answer = requests.get(f"{live_service.url}{path}", timeout=5)
        assert answer.status_code == 404
        assert list(answer.json()) == ["error"] and "'no_such_model'" in answer.json()["error"]


def _predicted_rows(url: str, model: str) -> float:
    text = requests.get(f"{url}/metrics", timeout=5).text
    return sum(float(value) for labels, value in re.findall(
        r"^penguins_predicted_rows_total\{([^}]*)\} (\S+)$", text, re.MULTILINE)
        if f'model="{model}"' in labels)


def test_inferences_are_counted_as_predictions(v2, live_service):
    before = _predicted_rows(live_service.url, "xgboost")
    v2.infer("xgboost", tensors([PENGUIN] * 3))
    assert _predicted_rows(live_service.url, "xgboost") == before + 3


# --- The protocol's error shape, through the test client ---------------------------------------

MAX_BODY_BYTES = 2048
MAX_ROWS = 4


def _request(rows: int = 1, **tensor: Any) -> bytes:
    inputs = [{"name": name, "shape": [rows], "datatype": DATATYPES.get(name, "FP64"),
               "data": [PENGUIN[name]] * rows} for name in contract.FEATURES]
    inputs[0].update(tensor)
    return json.dumps({"inputs": inputs}).encode()


@pytest.fixture(scope="module")
def small_client(published, tmp_path_factory) -> TestClient:
    directory = Path(shutil.copytree(published.store, tmp_path_factory.mktemp("v2") / "models"))
    settings = Settings(models_dir=directory, public_key_file=PUBLIC_KEY_FILE,
                        max_body_bytes=MAX_BODY_BYTES, max_batch_rows=MAX_ROWS)
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.mark.parametrize(("body", "headers", "status", "expected"), [
    (b'{"inputs": [', {}, 400, "the body is not valid JSON"),
    (b"", {}, 400, "the request body is empty"),
    (b'{"inputs": [], "inputs": []}', {}, 400, "inputs: the key appears more than once"),
    (b'{"inputs": [], "input": []}', {}, 400, "Object contains unknown field `input`"),
    (b" " * MAX_BODY_BYTES + _request(), {}, 413, "Request Entity Too Large"),
    (_request(), {"content-type": "text/plain"}, 415, "takes a JSON body"),
    (_request(), {"content-type": "application/json"}, 200, None),
    (_request(MAX_ROWS + 1), {}, 400, f"a request holds 1 to {MAX_ROWS} penguins"),
    (_request(0), {}, 400, "has 0 rows"),
    (_request(shape=[1, 2]), {}, 400, "shape [1, 2]; expected [n] or [n, 1]"),
    (_request(shape=[2]), {}, 400, "'island' has shape [2], which its data does not have"),
    (_request(shape=[1, 1], data=[["Biscoe"]]), {}, 200, None),
    (_request(shape=[1, 1, 1]), {}, 400, "inputs[0].shape: Expected `array` of length <= 2"),
    (_request(), {"Inference-Header-Content-Length": "10"}, 400, "binary_data=False"),
    # As many repeats as the optional fields the body leaves out: a count of keys against the
    # fields decoded would balance.
    (_request().replace(b'"data": ["Biscoe"]', b'"data": ["Dream"], ' * 10
                        + b'"data": ["Biscoe"]', 1),
     {}, 400, "data: the key appears more than once"),
], ids=["malformed JSON", "empty body", "repeated key", "unknown field", "too large",
        "not JSON", "declared JSON", "too many rows", "no rows", "two columns",
        "shape and data disagree", "nested data", "three dimensions", "binary body",
        "repeats balancing the optional fields"])
def test_every_v2_error_has_the_protocols_shape(small_client, body, headers, status, expected):
    answer = small_client.post("/v2/models/svm/infer", content=body, headers=headers)
    assert answer.status_code == status, answer.text
    if expected is not None:
        assert list(answer.json()) == ["error"], answer.json()
        assert expected in answer.json()["error"]


def test_a_body_nested_too_deeply_is_a_400_not_a_crash(client):
    document = json.loads(_request())
    body = json.dumps(document)[:-1] + ', "parameters": {"x": ' + "[" * 5000 + "]" * 5000 + "}}"
    answer = client.post("/v2/models/svm/infer", content=body,
                         headers={"content-type": "application/json"})
    assert answer.status_code == 400, answer.text
    assert answer.json() == {"error": "Validation failed for POST /v2/models/svm/infer: the "
                                      "body nests too deeply"}


def test_litestars_own_validation_errors_have_the_protocols_shape(small_client):
    answer = small_client.get("/v2/models/SVM")
    assert answer.status_code == 400
    assert answer.json() == {"error": "Validation failed for GET /v2/models/SVM: model_name: "
                                      "Expected `str` matching regex '^[a-z0-9_]{1,64}$'"}
    answer = small_client.get("/v2/models/svm/versions/1")
    assert answer.status_code == 400 and "model_version: Expected" in answer.json()["error"]


def test_without_models_nothing_is_ready(make_client, tmp_path):
    client = make_client(tmp_path)
    assert client.get("/v2/health/live").json() == {"live": True}
    for path in ("/v2/health/ready", "/v2/models/svm/ready", "/v2/models/svm"):
        answer = client.get(path)
        assert answer.status_code == 503
        assert "pipeline has not promoted a model" in answer.json()["error"]


def test_the_server_is_ready_only_when_every_promoted_model_is_served(make_client,
                                                                      models_dir: Path):
    client = make_client(models_dir)
    assert client.get("/v2/health/ready").json() == {"ready": True}
    promote(models_dir, "broken", export_raw(models_dir, "broken", b"not a pickle"))
    # Not ready while the promoted version loads, nor once it is refused.
    wait_until(lambda: "refused" in client.get("/v2/health/ready").text)
    answer = client.get("/v2/health/ready")
    assert answer.status_code == 503
    assert answer.json()["error"].startswith(
        "Not every promoted model is served: broken (the promoted version")
    assert client.get("/ready").status_code == 200, "the other models still answer"
    assert client.get("/v2/models/broken/ready").status_code == 503
    assert client.get("/v2/models/svm/ready").json() == {"name": "svm", "ready": True}


def test_the_openapi_document_describes_the_v2_paths(small_client):
    schema = small_client.get("/schema/openapi.json").json()
    model, version = "/v2/models/{model_name}", "/v2/models/{model_name}/versions/{model_version}"
    assert {path for path in schema["paths"] if path.startswith("/v2")} == {
        "/v2", "/v2/health/live", "/v2/health/ready", model, f"{model}/ready", f"{model}/infer",
        version, f"{version}/ready", f"{version}/infer"}
    infer = schema["paths"][f"{version}/infer"]["post"]
    assert infer["tags"] == ["open inference protocol (KServe V2)"]
    assert set(infer["responses"]) == {"200", "400", "404", "413", "503"}
    assert infer["responses"]["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/V2Error"}
    for name in ("V2InferRequest", "V2RequestInput", "V2RequestOutput"):
        assert schema["components"]["schemas"][name]["additionalProperties"] is False


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/v2/no/such/path", 404), ("GET", "/v2/models", 404),
    ("DELETE", "/v2/health/live", 405), ("GET", "/v2/models/knn/infer", 405),
])
def test_a_v2_path_or_method_no_route_has_gets_the_protocols_error_shape(
        client, method, path, status):
    response = client.request(method, path)
    assert response.status_code == status
    assert set(response.json()) == {"error"} and response.json()["error"]


def test_outside_v2_a_missing_route_keeps_litestars_error_shape(client):
    response = client.get("/no/such/path")
    assert response.status_code == 404
    assert response.json() == {"status_code": 404, "detail": "Not Found"}
