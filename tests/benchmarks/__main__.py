"""Run the benchmarks and write their results.

    uv run python -m tests.benchmarks                    # every available section
    uv run python -m tests.benchmarks loading pipeline   # some of them
    uv run python -m tests.benchmarks --quick loading    # small sizes, to try a change out
    uv run python -m tests.benchmarks store serving      # the prediction service only

Writes ``benchmarks-results/latest.json`` and ``latest.md`` at the repository root (git-ignored)
and prints the Markdown. A missed target is reported, never an error: the machines are shared
and noisy, so only ratios measured within one run are worth comparing.

A section is a module with ``run(context) -> SectionResult`` (see ``section.py``); add it to
``SECTIONS`` to plug it in.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from tests.benchmarks import machine, report
from tests.benchmarks.processes import REPO
from tests.benchmarks.section import Context, progress

SECTIONS = {
    "loading": "tests.benchmarks.loading",
    "pipeline": "tests.benchmarks.pipeline",
    "serving": "tests.benchmarks.serving",
    "store": "tests.benchmarks.store",
}
"""Section name -> module, in the order they run by default."""


def available() -> list[str]:
    """The registered sections whose module exists in this checkout."""
    return [name for name, module in SECTIONS.items() if importlib.util.find_spec(module)]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sections", nargs="*", metavar="section",
                        help=f"any of {', '.join(available())} (default: all of them)")
    parser.add_argument("--quick", action="store_true", help="small sizes, not for reporting")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks-results",
                        help="folder for latest.json and latest.md (default: %(default)s)")
    args = parser.parse_args(argv)
    names = args.sections or available()
    if unknown := [name for name in names if name not in available()]:
        parser.error(f"unknown section {', '.join(unknown)}; available: {', '.join(available())}")

    run = {"command": " ".join(["python -m tests.benchmarks", *argv]),
           "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
           "quick": args.quick, "machine": machine.describe()}
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="penguins-benchmarks-"))
    context = Context(workdir, quick=args.quick)
    results = []
    try:
        for name in names:
            progress(f"section {name}")
            results.append(importlib.import_module(SECTIONS[name]).run(context))
    finally:
        context.close()
        shutil.rmtree(workdir, ignore_errors=True)
    run["machine"]["database server"] = context.server_version or "not used"
    run["seconds"] = time.perf_counter() - started

    print(report.write(args.output, run, results))
    progress(f"results written to {args.output}/latest.json and latest.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
