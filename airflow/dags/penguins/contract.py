"""The data contract: the one place that names tables, columns, categories and models.

The DAG, the SQL, the tests and the README all use these constants, so a name is spelled once.
"""

from __future__ import annotations

from pathlib import Path

CONN_ID = "mysql_airflow_conn"
"""The Airflow connection to the penguins database (from ``AIRFLOW_CONN_MYSQL_AIRFLOW_CONN``)."""

RAW_TABLE = "penguins_raw"
CLEAN_TABLE = "penguins_clean"
TABLES = (RAW_TABLE, CLEAN_TABLE)
"""Every table the pipeline touches. SQL only ever names a table from this fixed set."""

LABEL = "species"
SPECIES = ("Adelie", "Chinstrap", "Gentoo")
ISLANDS = ("Biscoe", "Dream", "Torgersen")
SEXES = ("female", "male")

NUMERIC_FEATURES = ("bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g", "year")
CATEGORICAL_FEATURES = {"island": ISLANDS, "sex": SEXES}
FEATURES = ("island", "bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g",
            "sex", "year")
"""The columns a model takes, in the order a caller gives them."""

COLUMNS = ("species", *FEATURES)
"""The source file's columns: the label, then the features, as ``palmerpenguins`` ships them."""

PLAUSIBLE_RANGES = {
    "bill_length_mm": (10.0, 100.0),
    "bill_depth_mm": (5.0, 40.0),
    "flipper_length_mm": (100.0, 300.0),
    "body_mass_g": (1000.0, 10000.0),
    "year": (2000, 2100),
}
"""Inclusive bounds outside which a measurement is a data error, not a big penguin."""

MODEL_NAMES = ("logistic_regression", "random_forest", "svm", "knn", "xgboost")
"""The model zoo, by the name used in Params, file names, API paths and the README."""

NA_MARKERS = ("NA", "")
"""How a source CSV writes a missing value (``palmerpenguins`` writes ``NA``)."""


def default_source() -> Path:
    """The CSV that ships inside the ``palmerpenguins`` package: no network at run time."""
    import palmerpenguins

    return Path(palmerpenguins.__file__).parent / "data" / "penguins.csv"
