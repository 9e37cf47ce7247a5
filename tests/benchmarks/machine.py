"""What the benchmark ran on: numbers from another machine are not comparable without it."""

from __future__ import annotations

import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

LIBRARIES = ("pandas", "numpy", "SQLAlchemy", "mysqlclient", "apache-airflow", "scikit-learn",
             "xgboost-cpu")


def describe() -> dict[str, str]:
    """The machine and the software versions; the database server is added by whoever used it."""
    return {
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
        "ram": f"{_mem_total_gib():.1f} GiB",
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "os": platform.platform(),
        "python": platform.python_version(),
        "bytecode cache": "off (PYTHONDONTWRITEBYTECODE): each process compiles all it imports, "
                          "so import times are high" if sys.dont_write_bytecode else "on",
        "libraries": ", ".join(f"{name} {_version(name)}" for name in LIBRARIES),
    }


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _mem_total_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024**2
    return float("nan")


def _version(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "absent"
