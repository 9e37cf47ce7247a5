"""Running a measurement in a process of its own, and its peak memory.

Each measurement runs in a fresh interpreter, so one method's memory (or its warmed caches)
never counts against the next, and the benchmark's own memory never counts at all.

The peak is the worker's ``VmHWM`` (``/proc/self/status``), read by the worker as it finishes.
Not ``ru_maxrss``: Linux carries the parent's high-water mark across fork and exec into the
child's, so ``wait4``, ``RUSAGE_CHILDREN`` and even the child's own ``RUSAGE_SELF`` report at
least the parent's peak (a parent that once held 500 MB makes ``python -c pass`` "use" 510 MB,
while its ``VmHWM`` says 9 MB).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Finished:
    result: dict[str, Any]
    """What the worker wrote to its result file."""
    peak_rss_mb: float
    seconds: float
    """Wall time of the whole process, interpreter start and imports included."""


def run_worker(module: str, args: list[str], workdir: Path, *, name: str,
               env: dict[str, str] | None = None, timeout: float = 1800) -> Finished:
    """Run ``python -m module *args --result FILE``; return what it wrote there.

    The worker's output goes to ``workdir/<name>.log``, quoted when it fails.
    """
    result_file, log_file = workdir / f"{name}.json", workdir / f"{name}.log"
    result_file.unlink(missing_ok=True)
    started = time.perf_counter()
    with log_file.open("wb") as log:
        returncode = subprocess.run(
            [sys.executable, "-m", module, *args, "--result", str(result_file)],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, timeout=timeout,
        ).returncode
    seconds = time.perf_counter() - started
    if returncode != 0 or not result_file.exists():
        tail = log_file.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{name} exited with {returncode}:\n{tail}")
    result = json.loads(result_file.read_text())
    return Finished(result, result["peak_rss_mb"], seconds)


def current_rss_mb() -> float:
    """This process's resident set size now (``/proc/self/statm``, in pages)."""
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 1024**2


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def write_result(path: str, result: dict[str, Any]) -> None:
    """Write a worker's result, with its peak memory, for ``run_worker`` to read."""
    result = {**result, "peak_rss_mb": peak_rss_mb()}
    Path(path).write_text(json.dumps(result, indent=2, default=str))
