"""Small helpers that make source files for the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from penguins.contract import default_source


def packaged_rows() -> pd.DataFrame:
    """The packaged source as text, exactly as it ships (``NA`` kept as the text ``NA``)."""
    return pd.read_csv(default_source(), dtype=str, keep_default_na=False)


def raw_frame() -> pd.DataFrame:
    """The packaged source as the raw table holds it: typed, NULL as missing, ``source_row``."""
    frame = pd.read_csv(default_source())
    frame.insert(0, "source_row", range(1, len(frame) + 1))
    return frame


def write_csv(path: Path, rows: pd.DataFrame) -> Path:
    rows.to_csv(path, index=False)
    return path


def rows_with_repeats(seed: int = 0) -> tuple[pd.DataFrame, dict[str, int]]:
    """The packaged source as text with repeated rows spread through it; and what cleaning it
    must count.

    30 complete rows are repeated at random places, before or after the row they repeat, 10 of
    them written differently (case, spaces, a trailing zero) so that they are repeats only once
    normalised; 5 more rows differ from a real one by a single gram and repeat nothing.
    """
    rows = packaged_rows()
    complete = rows[~rows.isin(["NA"]).any(axis=1)]
    repeats = complete.iloc[::10].head(30).copy()
    written = repeats.index[:10]
    repeats.loc[written, "species"] = " " + repeats.loc[written, "species"].str.lower() + " "
    repeats.loc[written, "island"] = repeats.loc[written, "island"].str.upper()
    bills = repeats.loc[written, "bill_length_mm"]  # "39.1" -> "39.10", "40" -> "40.0"
    decimal = bills.str.contains(".", regex=False)
    repeats.loc[written, "bill_length_mm"] = bills.where(decimal, bills + ".") + "0"
    near = complete.iloc[5::50].head(5).copy()
    near["body_mass_g"] = (near["body_mass_g"].astype(int) + 1).astype(str)
    extra = pd.concat([repeats, near])
    positions = np.random.default_rng(seed).integers(0, len(rows), size=len(extra))
    order = np.concatenate([np.arange(len(rows)), positions]).argsort(kind="stable")
    mixed = pd.concat([rows, extra], ignore_index=True).iloc[order].reset_index(drop=True)
    expected = {"raw_rows": 344 + 35, "dropped_missing_value": 11, "dropped_not_a_number": 0,
                "dropped_invalid_value": 0, "dropped_duplicate": 30, "clean_rows": 333 + 5}
    return mixed, expected


def as_raw_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Source rows as text, as the raw table holds them: ``NA`` as missing, ``source_row`` first."""
    frame = rows.mask(rows == "NA")
    frame.insert(0, "source_row", range(1, len(frame) + 1))
    return frame
