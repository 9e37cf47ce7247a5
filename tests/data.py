"""Small helpers that make source files for the tests."""

from __future__ import annotations

from pathlib import Path

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
