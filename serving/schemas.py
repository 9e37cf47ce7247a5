"""The request and response shapes, typed so that the OpenAPI document describes them exactly.

A request field's constraints (allowed islands and sexes, each measurement's plausible range) are
``Literal`` and ``Meta`` annotations: msgspec enforces them and Litestar documents them, from the
same line. Unknown fields are refused rather than ignored, so a misspelt field is an error.
"""

from __future__ import annotations

import functools
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from serving.contract import PLAUSIBLE_RANGES


def _measurement(name: str, unit: str, example: float) -> Any:
    low, high = PLAUSIBLE_RANGES[name]
    return Annotated[
        float,
        Meta(ge=low, le=high, examples=[example],
             description=f"{unit}; plausible range {low:g} to {high:g}, inclusive."),
    ]


Island = Literal["Biscoe", "Dream", "Torgersen"]
Sex = Literal["female", "male"]
BillLength = _measurement("bill_length_mm", "Bill length in millimetres", 39.1)
BillDepth = _measurement("bill_depth_mm", "Bill depth in millimetres", 18.7)
FlipperLength = _measurement("flipper_length_mm", "Flipper length in millimetres", 181.0)
BodyMass = _measurement("body_mass_g", "Body mass in grams", 3750.0)
Year = Annotated[
    int,
    Meta(ge=PLAUSIBLE_RANGES["year"][0], le=PLAUSIBLE_RANGES["year"][1], examples=[2007],
         description="The year the penguin was measured."),
]


class Penguin(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One penguin's raw measurements, as the Palmer penguins data records them."""

    island: Island
    bill_length_mm: BillLength
    bill_depth_mm: BillDepth
    flipper_length_mm: FlipperLength
    body_mass_g: BodyMass
    sex: Sex
    year: Year


@functools.cache
def batch_request_type(max_rows: int) -> type[msgspec.Struct]:
    """The batch request's type, with the size limit of this service's settings built in: one
    type for each limit, so that the route and its lane decode into the same one."""
    penguins = Annotated[
        list[Penguin],
        Meta(min_length=1, max_length=max_rows,
             description=f"The penguins to classify: 1 to {max_rows} of them."),
    ]
    return msgspec.defstruct(
        "BatchRequest", [("penguins", penguins)], kw_only=True, forbid_unknown_fields=True,
        module=__name__,
    )


REQUEST_SCHEMAS = ("Penguin", "BatchRequest")
"""The request bodies, by their name in the OpenAPI document."""


class ModelVersion(msgspec.Struct, kw_only=True):
    """Which version of which model answered."""

    name: str
    version: str
    """The version id: the UTC time it was exported, ``YYYYMMDDTHHMMSS.ffffffZ``."""
    sha256: str
    """The sha256 of the version's pickle, as its signed metadata records it."""
    trained_at: str
    dag_run_id: str | None


class SpeciesPrediction(msgspec.Struct, kw_only=True):
    species: str
    probabilities: dict[str, float]
    """The probability of each species; they sum to 1."""


class Prediction(SpeciesPrediction, kw_only=True):
    """The species of one penguin, and the model that said so."""

    model: ModelVersion


class BatchPrediction(msgspec.Struct, kw_only=True):
    """One prediction per penguin of the request, in its order, all from the same model."""

    model: ModelVersion
    predictions: list[SpeciesPrediction]


VersionState = Literal["promoted", "previous", "held back", "candidate", "refused", "loading"]


class ModelInfo(msgspec.Struct, kw_only=True):
    """A model found in the store: the version it answers with, and what is wrong, if anything."""

    name: str
    serving: bool
    """Whether a version of this model is loaded and answers predictions."""
    best: bool
    promoted: str | None
    """The version the signed manifest promotes; ``version`` is it once it has loaded."""
    version: ModelVersion | None = None
    classes: list[str] | None = None
    metrics: dict[str, float] | None = None
    library_versions: dict[str, str] | None = None
    """The library versions that trained the model (python, scikit-learn, xgboost, ...)."""
    loaded_at: datetime | None = None
    problem: str | None = None
    """Why the promoted version is not the one answering (refused, missing, not promoted yet);
    the last good version, if any, keeps answering."""


class VersionEntry(msgspec.Struct, kw_only=True):
    """One kept version of a model."""

    version: str
    state: VersionState
    """``promoted``: served by default; ``previous``: promoted before (``rollback`` returns to
    the last one); ``held back``: the promotion gate, or a rollback, kept it from being served;
    ``candidate``: not promoted; ``refused``: did not verify or load; ``loading``: being loaded."""
    reason: str | None = None
    loaded: bool
    """Whether it answers ``POST /predict/{name}?version=...``."""
    metrics: dict[str, float] | None = None
    trained_at: str | None = None
    training_seconds: float | None = None
    dag_run_id: str | None = None
    gate: dict[str, Any] | None = None
    """The promotion gate's decision when the pipeline exported it."""


class ModelVersions(msgspec.Struct, kw_only=True):
    name: str
    promoted: str | None
    served: str | None
    versions: list[VersionEntry]
    """Newest first."""


class ModelList(msgspec.Struct, kw_only=True):
    best_model: str | None
    """The model ``POST /predict`` uses: the pipeline's choice if it is loaded, else the loaded
    model with the highest held-out accuracy."""
    models: list[ModelInfo]
    store_problem: str | None = None
    """Why the store's current manifest, or MODELS_DIR itself, is not being followed (a refused
    manifest, a missing folder); the models answer as before meanwhile."""


class Health(msgspec.Struct, kw_only=True):
    status: Literal["ok"]


class Readiness(msgspec.Struct, kw_only=True):
    ready: bool
    models_loaded: int
    best_model: str | None
