"""Writing a run's results: ``latest.json`` for machines, ``latest.md`` (printed too) for people."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tests.benchmarks.section import SectionResult, Table


def write(folder: Path, run: dict[str, Any], sections: list[SectionResult]) -> str:
    """Write both files into ``folder``; return the Markdown."""
    folder.mkdir(parents=True, exist_ok=True)
    document = {**run, "sections": {s.name: asdict(s) for s in sections}}
    (folder / "latest.json").write_text(json.dumps(document, indent=2, default=str) + "\n")
    markdown = render(run, sections)
    (folder / "latest.md").write_text(markdown)
    return markdown


def render(run: dict[str, Any], sections: list[SectionResult]) -> str:
    lines = ["# Benchmarks", "", f"`{run['command']}`, started {run['started_at']}, "
             f"took {run['seconds']:.0f} s.", ""]
    lines += [f"- **{key}**: {value}" for key, value in run["machine"].items()]
    for section in sections:
        lines += ["", f"## {section.name}"]
        for table in section.tables:
            lines += ["", *_table(table)]
    targets = [(s.name, t) for s in sections for t in s.targets]
    if targets:
        lines += ["", "## Targets", "", "| section | target | wanted | measured | result |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [
            f"| {name} | {t.name} | {t.wanted} | {t.measured} | {'pass' if t.passed else 'MISS'} |"
            for name, t in targets
        ]
    return "\n".join(lines) + "\n"


def _table(table: Table) -> list[str]:
    lines = [f"### {table.title}", "", "| " + " | ".join(table.columns) + " |",
             "|" + "|".join(" --- " for _ in table.columns) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in table.rows]
    if table.notes:
        lines += ["", *(f"- {note}" for note in table.notes)]
    return lines


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
