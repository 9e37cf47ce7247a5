"""``python -m serving``: the service under uvicorn on SERVING_HOST:SERVING_PORT, with the front
door's limits (``serving.front_door``) and ``SERVING_WORKERS`` worker processes. This is how the
service is meant to be started: a bare ``uvicorn --factory serving.app:create_app`` serves the
same API without those limits.

Several workers share their metrics through ``PROMETHEUS_MULTIPROC_DIR`` (``serving.metrics``),
prepared here before any worker starts: a private temporary folder, removed at exit, unless the
variable is set, in which case the counts a previous run left there are deleted first. One
worker without the variable keeps its counts in memory: cheaper on every request.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import uvicorn

from serving.front_door import GuardedHttpToolsProtocol
from serving.settings import Settings

MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""As ``serving.metrics.MULTIPROCESS_DIR_ENV``, which is not imported: prometheus_client reads
the variable when it is imported, so it must not be before the variable is set."""


def main() -> None:
    settings = Settings.from_env()
    with shared_metrics(settings.workers):
        uvicorn.run(
            "serving.app:create_app", factory=True, host=settings.host, port=settings.port,
            http=partial(GuardedHttpToolsProtocol, settings=settings),
            timeout_keep_alive=settings.keep_alive_seconds, access_log=settings.access_log,
            workers=settings.workers,
        )


@contextlib.contextmanager
def shared_metrics(workers: int) -> Iterator[Path | None]:
    """The folder the workers' metrics are shared through, ready for them (None: one worker,
    counts in memory). prometheus_client requires it to be empty of a previous run's files."""
    folder = os.environ.get(MULTIPROCESS_DIR_ENV)
    if folder:
        path = Path(folder)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            if not stale.is_dir():
                stale.unlink(missing_ok=True)
        yield path
    elif workers == 1:
        yield None
    else:
        path = Path(tempfile.mkdtemp(prefix="penguins-metrics-"))
        os.environ[MULTIPROCESS_DIR_ENV] = str(path)
        try:
            yield path
        finally:
            del os.environ[MULTIPROCESS_DIR_ENV]
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
