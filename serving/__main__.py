"""``python -m serving``: the service under uvicorn on SERVING_HOST:SERVING_PORT, with the front
door's limits (``serving.front_door``). This is how the service is meant to be started: a bare
``uvicorn --factory serving.app:create_app`` serves the same API without those limits."""

from __future__ import annotations

from functools import partial

import uvicorn

from serving.front_door import GuardedHttpToolsProtocol
from serving.settings import Settings


def main() -> None:
    settings = Settings.from_env()
    uvicorn.run(
        "serving.app:create_app", factory=True, host=settings.host, port=settings.port,
        http=partial(GuardedHttpToolsProtocol, settings=settings),
        timeout_keep_alive=settings.keep_alive_seconds, access_log=settings.access_log,
    )


if __name__ == "__main__":
    main()
