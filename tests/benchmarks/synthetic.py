"""Synthetic penguins sources of any size, drawn from the packaged data's distribution.

The file looks like the packaged CSV: the same columns in the same order, ``NA`` for a missing
value, measurements rounded as the source rounds them. Rows are drawn per species, so the
cleaning rule and the models see data much like the real one, only more of it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from penguins.contract import COLUMNS, LABEL, default_source

MEASUREMENTS = ("bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g")
ROUNDING = {"bill_length_mm": 0.1, "bill_depth_mm": 0.1, "flipper_length_mm": 1.0,
            "body_mass_g": 25.0}
"""The source's resolution: bills to 0.1 mm, flippers to 1 mm, body mass to 25 g."""


def write_synthetic_source(path: str | Path, rows: int, seed: int = 0) -> Path:
    """Write ``rows`` synthetic penguins to the CSV ``path``; the same seed gives the same file.

    Species are drawn with the real shares; island, sex and year together from a real penguin
    of that species; the four measurements from a normal fitted per species (with their
    covariance, so a long bill still goes with a heavy bird). Missing values copy the real
    rows' patterns (about 3% of rows: mostly sex alone, sometimes every measurement).
    """
    real = pd.read_csv(default_source())
    rng = np.random.default_rng(seed)
    complete = real.dropna()
    shares = real[LABEL].value_counts(normalize=True)
    species = rng.choice(shares.index.to_numpy(), size=rows, p=shares.to_numpy())

    frame = pd.DataFrame({LABEL: species})
    frame[list(MEASUREMENTS)] = np.nan
    frame[["island", "sex"]] = ""
    frame["year"] = 0
    for name, group in complete.groupby(LABEL):
        at = np.flatnonzero(species == name)
        donors = group.iloc[rng.integers(len(group), size=len(at))]
        frame.loc[at, ["island", "sex", "year"]] = donors[["island", "sex", "year"]].to_numpy()
        fitted = group[list(MEASUREMENTS)]
        drawn = rng.multivariate_normal(fitted.mean(), fitted.cov(), size=len(at))
        frame.loc[at, list(MEASUREMENTS)] = drawn
    for column, step in ROUNDING.items():
        frame[column] = _as_written(frame[column], step)

    # A real row's missing-value pattern per synthetic row: same share, same shapes.
    patterns = real[list(COLUMNS)].isna().to_numpy()[rng.integers(len(real), size=rows)]
    for position, column in enumerate(COLUMNS):
        if patterns[:, position].any():
            frame.loc[patterns[:, position], column] = np.nan

    path = Path(path)
    frame[list(COLUMNS)].to_csv(path, index=False, na_rep="NA")
    return path


def _as_written(values: pd.Series, step: float) -> pd.Series:
    """Round to the source's resolution and write numbers as it does: ``18``, ``18.5``, ``3750``.

    Whole numbers become integers and tenths become text without a trailing ``.0`` (pandas's
    ``float_format`` would do the same, but formats value by value, ten times slower).
    """
    rounded = (values / step).round() * step
    if step >= 1:
        return rounded.astype("Int64")
    text = rounded.round(1).astype(str).str.removesuffix(".0")
    return text.where(rounded.notna())
