"""The pipeline's data contract, as much of it as the service needs.

These restate constants of ``penguins.contract`` (the pipeline's package, which the service's
image does not contain); ``tests/serving/test_contract.py`` checks that the two agree.
"""

from __future__ import annotations

ISLANDS = ("Biscoe", "Dream", "Torgersen")
SEXES = ("female", "male")

FEATURES = ("island", "bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g",
            "sex", "year")
"""The columns a model takes, in the order a caller gives them."""

PLAUSIBLE_RANGES = {
    "bill_length_mm": (10.0, 100.0),
    "bill_depth_mm": (5.0, 40.0),
    "flipper_length_mm": (100.0, 300.0),
    "body_mass_g": (1000.0, 10000.0),
    "year": (2000, 2100),
}
"""Inclusive bounds outside which a measurement is a data error, not a big penguin."""

MODEL_NAMES = ("logistic_regression", "random_forest", "svm", "knn", "xgboost")
"""The models the pipeline trains. The service serves any validly named model it finds."""

MODEL_NAME_PATTERN = r"^[a-z0-9_]{1,64}$"
"""What a model name may look like: no dots or slashes, so a name can never leave MODELS_DIR."""

FORMAT_VERSION = 1
"""The version of the published metadata format (``penguins.publishing.FORMAT_VERSION``)."""

MANIFEST_FILE = "manifest.json"
