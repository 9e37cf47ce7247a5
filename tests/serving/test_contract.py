"""The service restates part of the pipeline's contract; here the two are held together."""

from __future__ import annotations

from penguins import contract, publishing
from serving import artifacts
from serving import contract as served
from serving.schemas import Penguin


def test_the_service_restates_the_pipeline_contract():
    assert served.ISLANDS == contract.ISLANDS
    assert served.SEXES == contract.SEXES
    assert served.FEATURES == contract.FEATURES
    assert served.PLAUSIBLE_RANGES == contract.PLAUSIBLE_RANGES
    assert served.MODEL_NAMES == contract.MODEL_NAMES
    assert served.FORMAT_VERSION == publishing.FORMAT_VERSION
    assert served.MANIFEST_FILE == publishing.MANIFEST_FILE


def test_the_request_takes_exactly_the_model_features_in_order():
    assert Penguin.__struct_fields__ == contract.FEATURES


def test_every_pipeline_model_name_is_a_valid_service_name():
    import re

    assert all(re.match(served.MODEL_NAME_PATTERN, name) for name in contract.MODEL_NAMES)


def test_the_service_checks_signatures_as_the_pipeline_makes_them():
    metadata = {"model_name": "svm", "sha256": "ab" * 32, "nested": {"b": 1, "a": [1.5]},
                "signature": "ignored"}
    assert artifacts.signature_of(metadata, b"k") == publishing.sign(metadata, b"k")
    assert artifacts.signature_of(metadata, b"k") != publishing.sign(metadata, b"other")
