"""Loading: rows/s and peak memory of the pipeline's loader beside the usual alternatives.

At the packaged 344 rows and at synthetic 100,000 and 1,000,000 rows, each method loads the
same file into the same empty ``penguins_raw``, each run in a fresh process (``loaders.py``).
The methods take turns run by run, so a noisy spell on the machine hits all of them alike; the
best run counts for time, the worst for memory. The two ``to_sql`` variants are compared on the
packaged file; only the faster one runs on the large files (``"multi"`` took a minute for
100,000 rows).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from tests.benchmarks.processes import Finished, run_worker
from tests.benchmarks.section import (
    PACKAGED_ROWS,
    Context,
    SectionResult,
    Table,
    Target,
    progress,
)

FULL_SIZES = (PACKAGED_ROWS, 100_000, 1_000_000)
QUICK_SIZES = (PACKAGED_ROWS, 20_000)
FAST_METHODS = ("loader", "load_data")
"""Repeated at every size: best of 3, of 2 at 1M rows."""
SLOW_METHODS = ("to_sql", "to_sql_multi", "executemany")
"""Best of 3 on the packaged file, one run above it: over a minute each at 1M rows."""

LOAD_DATA_SHARE_TARGET = 0.5
TO_SQL_MULTIPLE_TARGET = 3.0
PEAK_RSS_TARGET_MB = 500.0

DESCRIPTIONS = {
    "loader": "the pipeline's: `create_and_empty_tables` + `check_source` + `load_raw` "
              "(LOAD DATA LOCAL INFILE, `NA`/empty -> NULL)",
    "load_data": "bare LOAD DATA LOCAL INFILE of the same file, no check, no NULL handling",
    "to_sql": "`pd.read_csv` + `DataFrame.to_sql`, SQLAlchemy `mysql+mysqldb`, "
              "chunksize 10,000, method=None",
    "to_sql_multi": "the same with method=\"multi\" (one multi-row INSERT per chunk)",
    "executemany": "`csv.reader` + `cursor.executemany` per 10,000 rows",
}


@dataclass
class Measured:
    rows: int
    method: str
    runs: list[Finished]

    @property
    def best(self) -> Finished:
        return min(self.runs, key=lambda run: run.result["seconds"])

    @property
    def seconds(self) -> float:
        return self.best.result["seconds"]

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds

    @property
    def peak_rss_mb(self) -> float:
        return max(run.peak_rss_mb for run in self.runs)


def run(context: Context) -> SectionResult:
    server = context.server
    server_json = json.dumps({"host": server.host, "port": server.port, "user": server.user,
                              "password": server.password, "database": server.database})
    sizes = QUICK_SIZES if context.quick else FULL_SIZES
    measured: dict[tuple[int, str], Measured] = {}
    for rows in sizes:
        path = context.source(rows)
        if rows == PACKAGED_ROWS:
            repeats = dict.fromkeys(FAST_METHODS + SLOW_METHODS, 3)
        else:
            repeats = dict.fromkeys(FAST_METHODS, 3 if rows < FULL_SIZES[-1] else 2)
            repeats |= dict.fromkeys([_faster_to_sql(measured), "executemany"], 1)
        for turn in range(max(repeats.values())):
            for method, times in repeats.items():
                if turn >= times:
                    continue
                progress(f"loading {rows:,} rows: {method}, run {turn + 1} of {times}")
                finished = run_worker(
                    "tests.benchmarks.loaders", [method, str(path), server_json], context.workdir,
                    name=f"load-{rows}-{method}-{turn}",
                )
                if finished.result["rows_loaded"] != rows:
                    raise RuntimeError(f"{method} left {finished.result['rows_loaded']} rows of "
                                       f"{rows} in penguins_raw")
                measured.setdefault((rows, method), Measured(rows, method, [])).runs.append(
                    finished)
    return _result(sizes, measured, chosen_to_sql=_faster_to_sql(measured))


def _faster_to_sql(measured: dict[tuple[int, str], Measured]) -> str:
    return min(("to_sql", "to_sql_multi"), key=lambda m: measured[(PACKAGED_ROWS, m)].seconds)


def _result(sizes: tuple[int, ...], measured: dict[tuple[int, str], Measured],
            chosen_to_sql: str) -> SectionResult:
    table = Table(
        "Loading a CSV into penguins_raw (best run; memory of the worst)",
        ["rows", "method", "runs", "best s", "rows/s", "vs LOAD DATA", "RSS before MB",
         "peak RSS MB", "phases of the best run (s)"],
        [],
        notes=[f"`{method}`: {text}" for method, text in DESCRIPTIONS.items()],
    )
    for (rows, method), m in measured.items():
        baseline = measured[(rows, "load_data")]
        phases = ", ".join(f"{k} {v:.3f}" for k, v in m.best.result["phases"].items())
        table.rows.append([rows, method, len(m.runs), m.seconds, round(m.rows_per_second),
                           f"{m.rows_per_second / baseline.rows_per_second:.0%}",
                           m.best.result["rss_before_mb"], m.peak_rss_mb, phases])
    table.rows.sort(key=lambda row: (row[0], list(DESCRIPTIONS).index(row[1])))

    variants = {m: measured[(PACKAGED_ROWS, m)].seconds for m in ("to_sql", "to_sql_multi")}
    table.notes.append(
        f"to_sql at {PACKAGED_ROWS} rows: method=None {variants['to_sql']:.3f} s, "
        f"method=\"multi\" {variants['to_sql_multi']:.3f} s; the faster, `{chosen_to_sql}`, "
        "is the one run on the larger files and compared below."
    )

    ratios = Table("Loader ratios (same run)",
                   ["rows", "loader / LOAD DATA (rows/s)", "loader / to_sql (rows/s)",
                    "loader / executemany (rows/s)", "loader peak RSS MB"], [])
    for rows in sizes:
        loader = measured[(rows, "loader")]
        ratios.rows.append([
            rows,
            f"{loader.rows_per_second / measured[(rows, 'load_data')].rows_per_second:.2f}",
            f"{loader.rows_per_second / measured[(rows, chosen_to_sql)].rows_per_second:.1f}x",
            f"{loader.rows_per_second / measured[(rows, 'executemany')].rows_per_second:.1f}x",
            loader.peak_rss_mb,
        ])

    largest = sizes[-1]
    loader = measured[(largest, "loader")]
    share = loader.rows_per_second / measured[(largest, "load_data")].rows_per_second
    multiple = loader.rows_per_second / measured[(largest, chosen_to_sql)].rows_per_second
    targets = [
        Target(f"loader rows/s vs bare LOAD DATA at {largest:,} rows",
               f">= {LOAD_DATA_SHARE_TARGET:.0%}", f"{share:.0%}",
               share >= LOAD_DATA_SHARE_TARGET),
        Target(f"loader rows/s vs to_sql at {largest:,} rows",
               f">= {TO_SQL_MULTIPLE_TARGET:.0f}x", f"{multiple:.1f}x",
               multiple >= TO_SQL_MULTIPLE_TARGET),
        Target(f"loader peak RSS at {largest:,} rows", f"< {PEAK_RSS_TARGET_MB:.0f} MB",
               f"{loader.peak_rss_mb:.0f} MB", loader.peak_rss_mb < PEAK_RSS_TARGET_MB),
    ]
    data = {
        f"{rows}/{method}": {
            "rows": rows, "method": method, "best_seconds": m.seconds,
            "rows_per_second": m.rows_per_second, "peak_rss_mb": m.peak_rss_mb,
            "runs": [{**run.result, "process_seconds": run.seconds} for run in m.runs],
        }
        for (rows, method), m in measured.items()
    }
    data["to_sql_method"] = chosen_to_sql
    return SectionResult("loading", [table, ratios], targets, data)
