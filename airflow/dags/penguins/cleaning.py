"""Cleaning raw penguins rows into rows a model can learn from, and the raw table into the clean
one, chunk by chunk.

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

import numpy as np
import pandas as pd

from penguins.contract import (
    CATEGORICAL_FEATURES,
    CLEAN_TABLE,
    FEATURES,
    LABEL,
    NUMERIC_FEATURES,
    PLAUSIBLE_RANGES,
    RAW_TABLE,
    SPECIES,
)

CHUNK_ROWS = 50_000
"""Raw rows ``preprocess`` reads, cleans and writes at a time: its memory does not grow with the
table (only the duplicate rule's keys do, about 100 bytes per clean row)."""

_CATEGORIES = {LABEL: SPECIES, **CATEGORICAL_FEATURES}

# A clean row as one fixed-width record: each category's position in its known values, then the
# numbers as float64. Two clean rows are equal exactly when their records' bytes are (no NaN or
# -0.0 survives the rule), so the records stand for the rows in the duplicate rule.
_KEY = np.dtype([(column, "u1") for column in _CATEGORIES]
                + [(column, "<f8") for column in NUMERIC_FEATURES])


class Cleaner:
    """The rule, applied to a table's rows one chunk after another, in source order.

    Each chunk's clean rows come back at once; a row repeating one of an earlier chunk is a
    duplicate as much as one repeating a row of its own chunk, so cleaning in chunks keeps the
    same rows and counts the same reasons as cleaning the whole (``clean``). ``report`` adds up
    the chunks so far.
    """

    def __init__(self) -> None:
        self.report = {"raw_rows": 0, "dropped_missing_value": 0, "dropped_not_a_number": 0,
                       "dropped_invalid_value": 0, "dropped_duplicate": 0, "clean_rows": 0}
        self._seen: set[bytes] = set()

    def clean(self, raw: pd.DataFrame) -> pd.DataFrame:
        """The clean rows of ``raw`` (with their ``source_row``), in its order."""
        frame = raw.copy()
        frame[LABEL] = _text(frame[LABEL]).str.title()
        frame["island"] = _text(frame["island"]).str.title()
        frame["sex"] = _text(frame["sex"]).str.lower()
        self.report["raw_rows"] += len(frame)

        missing = frame[[LABEL, *FEATURES]].isna().any(axis=1)
        self.report["dropped_missing_value"] += int(missing.sum())
        frame = frame[~missing].copy()

        not_a_number = pd.Series(False, index=frame.index)
        for column in PLAUSIBLE_RANGES:
            frame[column] = pd.to_numeric(frame[column].astype("string").str.strip(),
                                          errors="coerce")
            not_a_number |= frame[column].isna()
        self.report["dropped_not_a_number"] += int(not_a_number.sum())
        frame = frame[~not_a_number]

        invalid = ~frame[LABEL].isin(SPECIES)
        for column, allowed in CATEGORICAL_FEATURES.items():
            invalid |= ~frame[column].isin(allowed)
        for column, (low, high) in PLAUSIBLE_RANGES.items():
            invalid |= ~frame[column].between(low, high)
        invalid |= frame["year"] % 1 != 0
        self.report["dropped_invalid_value"] += int(invalid.sum())
        frame = frame[~invalid]

        frame = frame.astype({column: "float64" for column in NUMERIC_FEATURES})
        duplicated = self._repeats(frame)
        self.report["dropped_duplicate"] += int(duplicated.sum())
        frame = frame[~duplicated]

        frame = frame.astype({"year": "int64"})
        self.report["clean_rows"] += len(frame)
        return frame.reset_index(drop=True)

    def _repeats(self, frame: pd.DataFrame) -> np.ndarray:
        """Which rows repeat an earlier one, of this chunk or of an earlier chunk."""
        keys = np.empty(len(frame), dtype=_KEY)
        for column, allowed in _CATEGORIES.items():
            keys[column] = pd.Index(allowed).get_indexer(frame[column])
        for column in NUMERIC_FEATURES:
            keys[column] = frame[column].to_numpy()
        repeats = np.zeros(len(frame), dtype=bool)
        for position, key in enumerate(keys.view(f"V{_KEY.itemsize}").tolist()):
            if key in self._seen:
                repeats[position] = True
            else:
                self._seen.add(key)
        return repeats


def clean(raw: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """Return the clean rows (with their ``source_row``) and a count of rows dropped per reason."""
    cleaner = Cleaner()
    frame = cleaner.clean(raw)
    return frame, cleaner.report


def preprocess(conn, raw_table: str = RAW_TABLE, clean_table: str = CLEAN_TABLE, *,
               chunk_rows: int = CHUNK_ROWS) -> dict[str, int]:
    """Clean the raw table into the clean table, ``chunk_rows`` raw rows at a time; return the
    report, the same as ``clean`` gives for the whole table.

    The clean table is emptied first, so a retried task starts over, and the rows are committed
    together at the end: a failure keeps none of them.
    """
    from penguins.database import empty_table, read_chunks, write_clean

    empty_table(conn, clean_table)
    cleaner = Cleaner()
    try:
        for chunk in read_chunks(conn, raw_table, chunk_rows):
            write_clean(conn, cleaner.clean(chunk), clean_table)
    except BaseException:
        conn.rollback()
        raise
    conn.commit()
    return cleaner.report


def _text(column: pd.Series) -> pd.Series:
    return column.astype("string").str.strip()
