"""The pipeline's data contract: tables, the label, the source's columns, the connection, the
rows the costlier models fit.

What a model takes (features, categories, ranges) and the model names are the service's
(``serving.contract``), imported here so that both halves use one definition. The DAG, the SQL,
the tests and the README all use these constants, so a name is spelled once.
"""

from __future__ import annotations

from pathlib import Path

from serving.contract import (
    CATEGORICAL_FEATURES,
    FEATURES,
    ISLANDS,
    MODEL_NAMES,
    NUMERIC_FEATURES,
    PLAUSIBLE_RANGES,
    SEXES,
)

CONN_ID = "mysql_airflow_conn"
"""The Airflow connection to the penguins database (from ``AIRFLOW_CONN_MYSQL_AIRFLOW_CONN``)."""

RAW_TABLE = "penguins_raw"
"""The source as it ships, every value as text."""
CLEAN_TABLE = "penguins_clean"
"""The cleaned, typed rows the models train on."""

LABEL = "species"
SPECIES = ("Adelie", "Chinstrap", "Gentoo")

COLUMNS = ("species", *FEATURES)
"""The source file's columns: the label, then the features, as ``palmerpenguins`` ships them."""

DEFAULT_MAX_FIT_ROWS = 20_000
"""The most training rows the SVM, k-NN and random forest are fitted on (``models.SAMPLED_MODELS``),
unless the ``max_fit_rows`` Param says otherwise."""

NA_MARKERS = ("NA", "")
"""How a source CSV writes a missing value (``palmerpenguins`` writes ``NA``)."""


def default_source() -> Path:
    """The CSV that ships inside the ``palmerpenguins`` package: no network at run time."""
    import palmerpenguins

    return Path(palmerpenguins.__file__).parent / "data" / "penguins.csv"


__all__ = ["CATEGORICAL_FEATURES", "CLEAN_TABLE", "COLUMNS", "CONN_ID", "DEFAULT_MAX_FIT_ROWS",
           "FEATURES", "ISLANDS", "LABEL", "MODEL_NAMES", "NA_MARKERS", "NUMERIC_FEATURES",
           "PLAUSIBLE_RANGES", "RAW_TABLE", "SEXES", "SPECIES", "default_source"]
