"""Cleaning raw penguins rows into rows a model can learn from.

The rule, in the order it is applied (the README states the same):
1. Text is normalised: surrounding white space is dropped, species and islands are title-cased
   (``" dream "`` -> ``"Dream"``), sex is lower-cased.
2. A row is dropped when its species or any feature is missing.
3. A row is dropped when a measurement is not a number (``"heavy"``, ``"12,5"``).
4. A row is dropped when a category is not a known one, or a measurement lies outside its
   plausible range (``contract.PLAUSIBLE_RANGES``): negative, absurd or infinite values.
5. Exact duplicates of an earlier row are dropped.
Each reason is counted, so the task's log and result say what was removed and why.
"""

from __future__ import annotations

import pandas as pd

from penguins.contract import (
    CATEGORICAL_FEATURES,
    COLUMNS,
    FEATURES,
    LABEL,
    NUMERIC_FEATURES,
    PLAUSIBLE_RANGES,
    SPECIES,
)


def clean(raw: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """Return the clean rows (with their ``source_row``) and a count of rows dropped per reason."""
    frame = raw.copy()
    frame[LABEL] = _text(frame[LABEL]).str.title()
    frame["island"] = _text(frame["island"]).str.title()
    frame["sex"] = _text(frame["sex"]).str.lower()

    report = {"raw_rows": len(frame)}
    missing = frame[[LABEL, *FEATURES]].isna().any(axis=1)
    report["dropped_missing_value"] = int(missing.sum())
    frame = frame[~missing].copy()

    not_a_number = pd.Series(False, index=frame.index)
    for column in PLAUSIBLE_RANGES:
        frame[column] = pd.to_numeric(frame[column].astype("string").str.strip(),
                                      errors="coerce")
        not_a_number |= frame[column].isna()
    report["dropped_not_a_number"] = int(not_a_number.sum())
    frame = frame[~not_a_number]

    invalid = ~frame[LABEL].isin(SPECIES)
    for column, allowed in CATEGORICAL_FEATURES.items():
        invalid |= ~frame[column].isin(allowed)
    for column, (low, high) in PLAUSIBLE_RANGES.items():
        invalid |= ~frame[column].between(low, high)
    invalid |= frame["year"] % 1 != 0
    report["dropped_invalid_value"] = int(invalid.sum())
    frame = frame[~invalid]

    duplicated = frame.duplicated(subset=list(COLUMNS), keep="first")
    report["dropped_duplicate"] = int(duplicated.sum())
    frame = frame[~duplicated]

    frame = frame.astype({column: "float64" for column in NUMERIC_FEATURES} | {"year": "int64"})
    report["clean_rows"] = len(frame)
    return frame.reset_index(drop=True), report


def _text(column: pd.Series) -> pd.Series:
    return column.astype("string").str.strip()
