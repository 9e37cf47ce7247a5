"""Helpers that several test modules share."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def stop(process: subprocess.Popen, seconds: float = 10) -> None:
    """SIGTERM, then SIGKILL if ``process`` has not exited within ``seconds``; reaped."""
    process.terminate()
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def processes_with_environment(variable: str) -> list[int]:
    """The processes (other than this one) whose environment holds ``variable``, a
    ``NAME=value`` string such as a test's own AIRFLOW_HOME, which nobody else has."""
    wanted, found = variable.encode(), []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                if wanted in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found
