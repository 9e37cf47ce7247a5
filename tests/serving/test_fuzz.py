"""A property-based fuzz of the whole API, generated from its own OpenAPI document.

Schemathesis reads ``/schema/openapi.json`` from the real service under uvicorn (the session's
``live_service``, serving the five published models) and Hypothesis generates requests for every
operation: schema-valid ones (which must be answered as documented, and accepted) and invalid
ones (which must be refused with a documented 4xx). No request may get a 5xx, and every response
must match the status codes, content types and schemas the document declares.

The run is bounded twice: a fixed number of examples per operation, and a wall-clock budget that
fails the test rather than let it run on. ``FUZZ_SEED`` replays a run; the seed is in the report.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from penguins import contract
from tests.serving.conftest import PENGUIN

BUDGET_SECONDS = 90.0
"""The whole fuzz must finish within this; it took 30 to 55 s on a busy 2-core machine."""
MIN_REQUESTS = 1000
EXAMPLES = {GenerationMode.POSITIVE: 150, GenerationMode.NEGATIVE: 70}
"""Examples per operation that takes input, per mode (an operation without input has one)."""
V2_SHARE = 3
"""The /v2 operations (Open Inference Protocol) get a third as many: they share the lookups and
the validation of the others, and the budget."""

CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance,
          content_type_conformance, response_headers_conformance]
MODE_CHECKS = {GenerationMode.POSITIVE: [positive_data_acceptance],
               GenerationMode.NEGATIVE: [negative_data_rejection]}
SCHEMA_CANNOT_SAY = ("/infer",)
"""Operations whose valid requests a JSON Schema cannot describe (Open Inference Protocol: the
tensors' names and datatypes, shapes that match their data), so that a schema-valid request is
often rightly a 400: everything is checked of them but that such a request is accepted."""


class BudgetExceeded(Exception):
    pass


@dataclass
class FuzzRun:
    url: str
    deadline: float
    session: requests.Session = field(default_factory=requests.Session)
    requests_made: int = 0
    statuses: dict[str, dict[int, int]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def exercise(self, case: schemathesis.Case, mode: GenerationMode) -> None:
        if time.monotonic() > self.deadline:
            raise BudgetExceeded(f"over {BUDGET_SECONDS} s after {self.requests_made} requests")
        response = case.call(base_url=self.url, session=self.session, timeout=30)
        self.requests_made += 1
        seen = self.statuses.setdefault(f"{mode.value} {case.operation.label}", {})
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        try:
            lenient = mode is GenerationMode.POSITIVE and case.operation.path.endswith(
                SCHEMA_CANNOT_SAY)
            case.validate_response(response, checks=CHECKS + ([] if lenient
                                                             else MODE_CHECKS[mode]))
        except (AssertionError, BaseExceptionGroup) as failure:
            # Recorded, not raised: Hypothesis would stop at the first and spend the budget
            # shrinking it; the report lists every distinct failure instead.
            self.failures.append(f"{case.operation.label} ({mode.value}): {failure}\n"
                                 f"  {case.as_curl_command(base_url=self.url)}")


def _strategies(operation, mode: GenerationMode) -> st.SearchStrategy:
    """Cases for ``operation``; a ``model_name`` is often one that is served, so that predictions
    are made, and otherwise whatever the document allows."""
    strategy = operation.as_strategy(generation_mode=mode)
    if "{model_name}" not in operation.path:
        return strategy
    if mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET":
        return strategy  # the name is its only input: that is what the negative cases vary
    served = [operation.as_strategy(generation_mode=mode, path_parameters={"model_name": name})
              for name in contract.MODEL_NAMES]
    return st.one_of(strategy, *served)


def _takes_input(operation) -> bool:
    return bool(operation.body) or any(True for _ in operation.path_parameters)


def _fuzz(run: FuzzRun, operation, mode: GenerationMode, seed: int) -> None:
    @hypothesis.seed(seed)
    @hypothesis.settings(
        max_examples=(EXAMPLES[mode] // (V2_SHARE if operation.path.startswith("/v2/") else 1)
                      if _takes_input(operation) else 1),
        deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=_strategies(operation, mode))
    def fuzz(case: schemathesis.Case) -> None:
        run.exercise(case, mode)

    fuzz()


def test_the_api_survives_a_fuzz_of_its_own_openapi_document(live_service):
    seed = int(os.environ.get("FUZZ_SEED") or random.randrange(2**32))
    schema = schemathesis.openapi.from_url(f"{live_service.url}/schema/openapi.json", timeout=30)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 19, [op.label for op in operations]
    run = FuzzRun(live_service.url, time.monotonic() + BUDGET_SECONDS)
    started = time.monotonic()
    with run.session:
        for operation in operations:
            for mode in GenerationMode:
                if mode is GenerationMode.POSITIVE or _takes_input(operation):
                    _fuzz(run, operation, mode, seed)

    elapsed = time.monotonic() - started
    print(f"\nfuzz: {run.requests_made} requests in {elapsed:.1f} s (FUZZ_SEED={seed})")
    for label, statuses in sorted(run.statuses.items()):
        print(f"  {label}: {dict(sorted(statuses.items()))}")
    assert not run.failures, (f"{len(run.failures)} failures (FUZZ_SEED={seed}):\n"
                              + "\n".join(run.failures[:10]))
    assert run.requests_made >= MIN_REQUESTS, run.requests_made
    # The fuzz reached the models, and was refused too: it exercised both sides of validation.
    predictions = sum(statuses.get(200, 0) for label, statuses in run.statuses.items()
                      if label.startswith("positive POST /predict"))
    refusals = sum(statuses.get(400, 0) for label, statuses in run.statuses.items()
                   if label.startswith("negative POST"))
    assert predictions >= 300 and refusals >= 100, run.statuses
    assert requests.get(f"{live_service.url}/health", timeout=5).status_code == 200


# --- What the fuzz found ------------------------------------------------------------------------


@pytest.mark.parametrize("year", [2007.0, 2.007e3, 2007.000])
def test_a_whole_number_written_with_a_fraction_is_an_integer(live_service, year):
    """JSON Schema counts 2007.0 as an ``integer``, as Python and pandas write a float year; the
    service refused it until the fuzz's ``positive_data_acceptance`` check found it."""
    body = json.dumps({**PENGUIN, "year": year})
    batch = f'{{"penguins": [{body}]}}'
    for path, content in (("/predict/svm", body), ("/predict-batch/svm", batch)):
        answer = requests.post(f"{live_service.url}{path}", data=content, timeout=10,
                               headers={"content-type": "application/json"})
        assert answer.status_code == 200, answer.text


@pytest.mark.parametrize(("year", "message"), [
    (2007.5, "Expected `int`, got `float`"),
    (1e300, "Expected `int` <= 2100"),
    ("2007.0", "Expected `int`, got `str`"),
])
def test_a_year_that_is_not_a_whole_number_is_still_refused(live_service, year, message):
    answer = requests.post(f"{live_service.url}/predict/svm", json={**PENGUIN, "year": year},
                           timeout=10)
    assert answer.status_code == 400
    assert answer.json()["extra"] == [{"message": message, "source": "body", "key": "year"}]


def test_only_the_failing_field_is_named_when_a_whole_number_has_a_fraction(live_service):
    body = {"penguins": [{**PENGUIN, "year": 2007.0}, {**PENGUIN, "year": 2008.0, "sex": "x"}]}
    answer = requests.post(f"{live_service.url}/predict-batch", json=body, timeout=10)
    assert answer.status_code == 400
    assert answer.json()["extra"][0]["key"] == "penguins[1].sex"


def test_a_deeply_nested_body_after_a_whole_number_is_a_400(live_service):
    body = b'{"year": 2007.0, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    answer = requests.post(f"{live_service.url}/predict/svm", data=body, timeout=10,
                           headers={"content-type": "application/json"})
    assert answer.status_code == 400, answer.text
