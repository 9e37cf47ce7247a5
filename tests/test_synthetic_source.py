"""The benchmarks' synthetic source looks like the packaged one and loads like it."""

from __future__ import annotations

import pandas as pd

from penguins import contract
from penguins.database import count_rows, create_and_empty_tables, load_raw, read_table
from penguins.source import check_source
from tests.benchmarks.synthetic import write_synthetic_source
from tests.data import packaged_rows

ROWS = 5_000


def test_synthetic_rows_look_like_the_packaged_ones_and_load_in_full(db, tmp_path):
    path = write_synthetic_source(tmp_path / "synthetic.csv", ROWS, seed=1)

    source = check_source(path)
    assert (source.rows, source.columns) == (ROWS, contract.COLUMNS)

    real, synthetic = packaged_rows(), pd.read_csv(path, dtype=str, keep_default_na=False)
    real_na, synthetic_na = real.isin(contract.NA_MARKERS), synthetic.isin(contract.NA_MARKERS)
    assert abs(synthetic_na.any(axis=1).mean() - real_na.any(axis=1).mean()) < 0.01
    assert synthetic_na.sum().gt(0).tolist() == real_na.sum().gt(0).tolist()
    shares = synthetic["species"].value_counts(normalize=True)
    real_shares = real["species"].value_counts(normalize=True)
    assert (shares - real_shares).abs().max() < 0.03
    assert set(synthetic["island"]) <= set(contract.ISLANDS)

    create_and_empty_tables(db)
    assert load_raw(db, source) == count_rows(db, contract.RAW_TABLE) == ROWS
    assert read_table(db, contract.RAW_TABLE)["sex"].isna().sum() == synthetic_na["sex"].sum()

