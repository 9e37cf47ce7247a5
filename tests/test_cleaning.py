"""The cleaning rule, on the real data and on dirty rows."""

from __future__ import annotations

import pandas as pd
import pytest

from penguins.cleaning import Cleaner, clean
from penguins.contract import COLUMNS, FEATURES, ISLANDS, SEXES, SPECIES
from tests.data import as_raw_table, raw_frame, rows_with_repeats


def test_the_packaged_data_cleans_to_333_complete_rows():
    cleaned, report = clean(raw_frame())
    assert report == {
        "raw_rows": 344,
        "dropped_missing_value": 11,
        "dropped_not_a_number": 0,
        "dropped_invalid_value": 0,
        "dropped_duplicate": 0,
        "clean_rows": 333,
    }
    assert len(cleaned) == 333
    assert not cleaned[list(FEATURES)].isna().any().any()
    assert set(cleaned["species"]) == set(SPECIES)
    assert set(cleaned["island"]) <= set(ISLANDS)
    assert set(cleaned["sex"]) <= set(SEXES)
    assert cleaned["source_row"].is_monotonic_increasing


def _row(**changes):
    # As the raw table holds it: every value the text the source shipped.
    row = {
        "source_row": 1, "species": "Adelie", "island": "Dream", "bill_length_mm": "39.1",
        "bill_depth_mm": "18.7", "flipper_length_mm": "181", "body_mass_g": "3750",
        "sex": "male", "year": "2007",
    }
    return row | changes


def test_dirty_rows_are_normalised_or_dropped_and_counted():
    raw = pd.DataFrame([
        _row(source_row=1, species=" adelie ", island="DREAM ", sex=" Male"),
        _row(source_row=2, island="Atlantis"),
        _row(source_row=3, body_mass_g=-5.0),
        _row(source_row=4, flipper_length_mm=9999.0),
        _row(source_row=5, bill_length_mm=None),
        _row(source_row=6, species=" adelie ", island="DREAM ", sex=" Male"),
        _row(source_row=7, sex="unknown"),
        _row(source_row=8, bill_depth_mm=18.8),
        _row(source_row=9, body_mass_g="heavy"),
        _row(source_row=10, bill_depth_mm=" 19.5 "),
        _row(source_row=11, year="2007.5"),
        _row(source_row=12, flipper_length_mm="inf"),
    ])

    cleaned, report = clean(raw)

    assert list(cleaned["source_row"]) == [1, 8, 10]
    assert cleaned["bill_depth_mm"].tolist() == [18.7, 18.8, 19.5]
    assert cleaned.loc[0, ["species", "island", "sex"]].tolist() == ["Adelie", "Dream", "male"]
    assert report == {
        "raw_rows": 12,
        "dropped_missing_value": 1,
        "dropped_not_a_number": 1,
        "dropped_invalid_value": 6,
        "dropped_duplicate": 1,
        "clean_rows": 3,
    }


@pytest.mark.parametrize("chunk_rows", [7, 64, 1_000])
def test_cleaning_in_chunks_keeps_the_same_rows_and_counts_as_cleaning_the_whole(chunk_rows):
    """Repeats spread through the file, many of them in another chunk than the row they
    repeat: each is dropped once, whichever chunk it falls in, and the first one is kept."""
    raw, expected = rows_with_repeats()
    raw = as_raw_table(raw)
    whole, report = clean(raw)
    assert report == expected

    cleaner = Cleaner()
    parts = [cleaner.clean(raw.iloc[start:start + chunk_rows])
             for start in range(0, len(raw), chunk_rows)]

    assert cleaner.report == expected
    pd.testing.assert_frame_equal(pd.concat(parts, ignore_index=True), whole)


def test_of_two_repeated_rows_the_first_is_kept_and_a_near_repeat_stays():
    raw, _ = rows_with_repeats()
    raw = as_raw_table(raw)
    cleaned, _ = clean(raw)
    normalised = raw.assign(species=raw["species"].str.strip().str.title(),
                            island=raw["island"].str.title(),
                            bill_length_mm=pd.to_numeric(raw["bill_length_mm"]))
    repeated = normalised.dropna().duplicated(subset=list(COLUMNS), keep="first")
    assert repeated.sum() == 30
    assert set(cleaned["source_row"]) == set(normalised.dropna()[~repeated]["source_row"])
    assert cleaned["source_row"].is_monotonic_increasing
    assert (cleaned["body_mass_g"] % 25 != 0).sum() == 5, "the near repeats are kept"
