"""What a model takes and what the service accepts: features, categories, ranges, model names.

Defined here, on the service's side, once: the pipeline's ``penguins.contract`` imports these
(the Airflow image carries ``serving``'s store and contract), so the two halves cannot disagree.
"""

from __future__ import annotations

ISLANDS = ("Biscoe", "Dream", "Torgersen")
SEXES = ("female", "male")

FEATURES = ("island", "bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g",
            "sex", "year")
"""The columns a model takes, in the order a caller gives them."""
NUMERIC_FEATURES = ("bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g", "year")
CATEGORICAL_FEATURES = {"island": ISLANDS, "sex": SEXES}

PLAUSIBLE_RANGES = {
    "bill_length_mm": (10.0, 100.0),
    "bill_depth_mm": (5.0, 40.0),
    "flipper_length_mm": (100.0, 300.0),
    "body_mass_g": (1000.0, 10000.0),
    "year": (2000, 2100),
}
"""Inclusive bounds outside which a measurement is a data error, not a big penguin."""

MODEL_NAMES = ("logistic_regression", "random_forest", "svm", "knn", "xgboost")
"""The model zoo, by the name used in Params, folders, API paths and the README. The service
serves any validly named model in the store."""

MODEL_NAME_PATTERN = r"^[a-z0-9_]{1,64}$"
"""What a model name may look like: no dots or slashes, so a name can never leave MODELS_DIR."""
