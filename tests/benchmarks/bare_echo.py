"""The serving benchmark's reference: a bare Litestar echo of ``POST /predict/{model_name}``.

What Litestar and uvicorn alone cost for one prediction's request and answer: the same route
shape, a body struct with the same fields and constraints as ``serving.schemas.Penguin``, and a
constant answer shaped like ``serving.schemas.Prediction``, with none of the service's own
layers (no front door, middleware, strict request class, ``before_request`` hook, dependencies
or metrics). It imports nothing of the service but its contract's constants, so that a change
to the service never moves the reference.

    python -m tests.benchmarks.bare_echo --port 8990

uvicorn runs it as ``python -m serving`` runs the service: one worker, httptools, no access
log, the same keep-alive; the benchmark pins it to the service's core.
"""

from __future__ import annotations

import argparse
from typing import Annotated, Any, Literal

import msgspec
import uvicorn
from litestar import Litestar, post
from msgspec import Meta

from serving.contract import PLAUSIBLE_RANGES


def _bounded(name: str, kind: type) -> Any:
    low, high = PLAUSIBLE_RANGES[name]
    return Annotated[kind, Meta(ge=low, le=high)]


BillLength = _bounded("bill_length_mm", float)
BillDepth = _bounded("bill_depth_mm", float)
FlipperLength = _bounded("flipper_length_mm", float)
BodyMass = _bounded("body_mass_g", float)
Year = _bounded("year", int)


class Penguin(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``serving.schemas.Penguin``'s fields and constraints, without its documentation."""

    island: Literal["Biscoe", "Dream", "Torgersen"]
    bill_length_mm: BillLength
    bill_depth_mm: BillDepth
    flipper_length_mm: FlipperLength
    body_mass_g: BodyMass
    sex: Literal["female", "male"]
    year: Year


class ModelVersion(msgspec.Struct, kw_only=True):
    name: str
    version: str
    sha256: str
    trained_at: str
    dag_run_id: str | None


class Prediction(msgspec.Struct, kw_only=True):
    species: str
    probabilities: dict[str, float]
    model: ModelVersion


ANSWER = Prediction(
    species="Adelie", probabilities={"Adelie": 1.0, "Chinstrap": 0.0, "Gentoo": 0.0},
    model=ModelVersion(name="bare_echo", version="20000101T000000.000000Z", sha256="0" * 64,
                       trained_at="2000-01-01T00:00:00+00:00", dag_run_id=None),
)


@post("/predict/{model_name:str}", status_code=200)
async def predict(model_name: str, data: Penguin) -> Prediction:
    """The constant answer to a validated penguin."""
    return ANSWER


def create_app() -> Litestar:
    return Litestar(route_handlers=[predict])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.bare_echo",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--keep-alive", type=float, default=5.0,
                        help="seconds, as the service's SERVING_KEEP_ALIVE_SECONDS")
    args = parser.parse_args(argv)
    uvicorn.run("tests.benchmarks.bare_echo:create_app", factory=True, host=args.host,
                port=args.port, http="httptools", timeout_keep_alive=args.keep_alive,
                access_log=False)


if __name__ == "__main__":
    main()
