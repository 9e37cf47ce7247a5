"""``python -m serving``: run the service with uvicorn on SERVING_HOST:SERVING_PORT."""

from __future__ import annotations

import uvicorn

from serving.settings import Settings


def main() -> None:
    settings = Settings.from_env()
    uvicorn.run("serving.app:app", host=settings.host, port=settings.port)


if __name__ == "__main__":
    main()
