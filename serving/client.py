"""A small client for the prediction service, as a library and from the command line.

As a library::

    from serving.client import PenguinsClient

    with PenguinsClient("http://127.0.0.1:8989") as client:
        answer = client.predict(island="Biscoe", bill_length_mm=39.1, bill_depth_mm=18.7,
                                flipper_length_mm=181, body_mass_g=3750, sex="male", year=2007)
        print(answer.species, answer.probabilities, answer.model.version)

Answers are typed: the service's own response structs (``serving.schemas``), decoded and checked
by msgspec. Every call has a connect and a read timeout, and is tried again, with exponential
back-off, when the connection fails or the service answers 502, 503 or 504 (honouring a
``Retry-After``): every call of this service is idempotent, its POSTs included, which only
compute predictions. ``ready()`` is asked once, so that it says promptly what it finds.

From the command line (``--url`` defaults to ``$PENGUINS_SERVICE_URL`` or
``http://127.0.0.1:8989``)::

    python -m serving.client models
    python -m serving.client predict --model svm --island Biscoe --bill-length-mm 39.1 \\
        --bill-depth-mm 18.7 --flipper-length-mm 181 --body-mass-g 3750 --sex male --year 2007
    python -m serving.client batch penguins.json      # a JSON list of penguins; '-' for stdin
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import quote

import msgspec
import requests
from requests.adapters import HTTPAdapter
from urllib3.util import Retry

from serving.contract import FEATURES, ISLANDS, PLAUSIBLE_RANGES, SEXES
from serving.schemas import (
    BatchPrediction,
    Health,
    ModelInfo,
    ModelList,
    ModelVersions,
    Prediction,
    Readiness,
)

DEFAULT_URL = os.environ.get("PENGUINS_SERVICE_URL") or "http://127.0.0.1:8989"
DEFAULT_TIMEOUT = (3.05, 10.0)
"""Seconds to connect, and to wait for the answer once connected."""
RETRIED_STATUSES = (502, 503, 504)
"""A proxy that lost the service, a service not ready yet or restarting, a gateway timeout."""

Answer = TypeVar("Answer")


class ServiceError(Exception):
    """The service answered with an error; ``detail`` says why, ``extra`` names the field."""

    def __init__(self, status_code: int, detail: str, extra: Any = None) -> None:
        super().__init__(f"HTTP {status_code}: {detail}")
        self.status_code, self.detail, self.extra = status_code, detail, extra


def retry_policy(retries: int = 3, backoff_seconds: float = 0.25) -> Retry:
    """Up to ``retries`` more tries of any call: the first at once, the next after
    ``backoff_seconds`` x 2, 4, 8, ... (or what ``Retry-After`` asks); after the last, its
    answer is returned, for ServiceError to report."""
    return Retry(total=retries, backoff_factor=backoff_seconds,
                 status_forcelist=RETRIED_STATUSES, allowed_methods={"GET", "HEAD", "POST"},
                 respect_retry_after_header=True, raise_on_status=False)


class PenguinsClient:
    """Calls the service's endpoints and returns typed answers; raises ServiceError on a 4xx or
    5xx that is still there after the retries, and ``requests.RequestException`` when the
    service cannot be reached."""

    def __init__(self, base_url: str = DEFAULT_URL, *,
                 timeout: float | tuple[float, float] = DEFAULT_TIMEOUT,
                 retries: int = 3, backoff_seconds: float = 0.25,
                 session: requests.Session | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session = session or requests.Session()
        # requests picks the adapter with the longest matching prefix: /ready is asked once.
        self.session.mount(self.base_url + "/", HTTPAdapter(
            max_retries=retry_policy(retries, backoff_seconds)))
        self.session.mount(self.base_url + "/ready", HTTPAdapter(max_retries=Retry(
            total=retries, status=0, backoff_factor=backoff_seconds, raise_on_status=False)))

    def health(self) -> Health:
        return self._call("GET", "/health", Health)

    def ready(self) -> Readiness:
        """The readiness report; raises ServiceError (503) while no model is loaded."""
        return self._call("GET", "/ready", Readiness)

    def models(self) -> ModelList:
        """Every model with its metadata, and ``best_model``."""
        return self._call("GET", "/models", ModelList)

    def model(self, name: str) -> ModelInfo:
        return self._call("GET", f"/models/{quote(name, safe='')}", ModelInfo)

    def versions(self, name: str) -> ModelVersions:
        """Every kept version of ``name``, newest first, with its state and metrics."""
        return self._call("GET", f"/models/{quote(name, safe='')}/versions", ModelVersions)

    def predict(self, penguin: Mapping[str, Any] | None = None, *, model: str | None = None,
                version: str | None = None, **features: Any) -> Prediction:
        """The species of one penguin, given as a mapping or as keyword arguments.

        ``model`` names the model (by default the service's best one answers), and ``version``
        one of its kept versions (by default its promoted one).
        """
        body = {**(penguin or {}), **features}
        return self._call("POST", "/predict" + _model_path(model, version), Prediction, body)

    def predict_batch(self, penguins: Sequence[Mapping[str, Any]], *,
                      model: str | None = None, version: str | None = None) -> BatchPrediction:
        """One prediction per penguin, in order (up to the service's MAX_BATCH_ROWS)."""
        return self._call("POST", "/predict-batch" + _model_path(model, version),
                          BatchPrediction, {"penguins": list(penguins)})

    def metrics(self) -> str:
        """The Prometheus exposition text."""
        return self._request("GET", "/metrics").text

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> PenguinsClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call(self, method: str, path: str, answer: type[Answer], body: Any = None) -> Answer:
        return msgspec.json.decode(self._request(method, path, body).content, type=answer)

    def _request(self, method: str, path: str, body: Any = None) -> requests.Response:
        response = self.session.request(
            method, f"{self.base_url}{path}", json=body, timeout=self.timeout
        )
        _raise_for_error(response)
        return response


def _model_path(model: str | None, version: str | None = None) -> str:
    if version is not None and not model:
        raise ValueError("a version is one of a model's: name the model too")
    path = f"/{quote(model, safe='')}" if model else ""
    return f"{path}?version={quote(version, safe='')}" if version else path


def _raise_for_error(response: requests.Response) -> None:
    if response.ok:
        return
    try:
        error = response.json()
        detail, extra = error.get("detail", response.reason), error.get("extra")
    except ValueError:
        detail, extra = response.text or response.reason, None
    raise ServiceError(response.status_code, detail, extra)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (0 ok, 1 the service or network said no)."""
    args = _parser().parse_args(argv)
    client = PenguinsClient(args.url, timeout=(DEFAULT_TIMEOUT[0], args.timeout))
    try:
        result: Any
        if args.command == "predict":
            penguin = json.loads(args.json) if args.json else {}
            penguin.update({f: getattr(args, f) for f in FEATURES if getattr(args, f) is not None})
            result = client.predict(penguin, model=args.model)
        elif args.command == "batch":
            source = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")  # noqa: SIM115
            with source:
                penguins = json.load(source)
            if isinstance(penguins, dict):  # also accept the request's own {"penguins": [...]}
                penguins = penguins.get("penguins", [])
            result = client.predict_batch(penguins, model=args.model)
        elif args.command == "model":
            result = client.model(args.name)
        elif args.command == "metrics":
            print(client.metrics(), end="")
            return 0
        else:
            result = getattr(client, args.command)()
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if exc.extra:
            print(json.dumps(exc.extra, indent=2), file=sys.stderr)
        return 1
    except requests.RequestException as exc:
        print(f"error: cannot reach the service at {args.url}: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print(json.dumps(msgspec.to_builtins(result), indent=2))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serving.client",
                                     description="Ask the penguins prediction service.")
    parser.add_argument("--url", default=DEFAULT_URL,
                        help="the service's base URL (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT[1],
                        help="seconds to wait for each answer (default: %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("health", help="is the service up")
    commands.add_parser("ready", help="is a model loaded")
    commands.add_parser("models", help="every model and its metadata")
    commands.add_parser("metrics", help="the Prometheus metrics")
    commands.add_parser("model", help="one model's metadata").add_argument("name")

    predict = commands.add_parser("predict", help="the species of one penguin")
    predict.add_argument("--model", help="the model to ask (default: the best)")
    predict.add_argument("--json", help="the penguin as a JSON object; flags override its fields")
    for name in FEATURES:
        flag = "--" + name.replace("_", "-")
        if name == "island":
            predict.add_argument(flag, choices=ISLANDS)
        elif name == "sex":
            predict.add_argument(flag, choices=SEXES)
        else:
            low, high = PLAUSIBLE_RANGES[name]
            kind = int if name == "year" else float
            predict.add_argument(flag, type=kind, metavar=f"{low:g}..{high:g}")

    batch = commands.add_parser("batch", help="the species of many penguins")
    batch.add_argument("--model", help="the model to ask (default: the best)")
    batch.add_argument("file", help="a JSON list of penguins, or '-' for standard input")
    return parser


if __name__ == "__main__":
    sys.exit(main())
