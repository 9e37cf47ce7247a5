"""Hot reload under load: the pipeline republishes every model while predictions pour in.

The real service runs under uvicorn. Eight threads, each with its own ``requests.Session``, send
at least ``REQUESTS`` predictions to ``POST /predict/{model}`` over every model; meanwhile the
pipeline's own publishing step (``publishing.publish_model``) replaces every model ``ROUNDS``
times, alternating two trainings with different seeds so that each publish changes the version.
The rounds are spread over the load by request count, not by time, so they land in the middle of
it however fast the machine is.

Every request must succeed, and every answer must come from a complete model: the version it
names is one that was published for that model, and its species and probabilities are what that
version's own pipeline says for the body sent (a torn or mixed model would answer another).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd
import pytest
import requests

from penguins import contract, publishing, training
from tests.serving.conftest import run_uvicorn, wait_until

WORKERS = 8
REQUESTS = 10_000
ROUNDS = 12
"""Times every model is republished (the issue asks for at least 10)."""
DEADLINE_SECONDS = 90.0
BODIES = 40
TOLERANCE = 1e-5
"""How far an answer's probabilities may be from its version's pipeline: the service may serve a
compiled copy of the pipeline, which itself must agree within 1e-6."""


@dataclasses.dataclass(frozen=True)
class Variant:
    trained: training.TrainedModel
    test_size: float
    seed: int
    expected: tuple[np.ndarray, np.ndarray]
    """The pipeline's own (codes, probabilities) for each of the bodies."""


def _bodies(clean: pd.DataFrame) -> list[dict[str, Any]]:
    """Penguins made of the measurements of several real ones: between the species, where two
    trainings of a model disagree (on real rows, k-NN's two versions mostly answer alike)."""
    features = clean[list(contract.FEATURES)]
    rng = np.random.default_rng(0)
    picked = {name: features[name].to_numpy()[rng.integers(0, len(features), BODIES)]
              for name in contract.FEATURES}
    return [
        {name: (int(values[i]) if name == "year" else values[i] if isinstance(values[i], str)
                else float(values[i])) for name, values in picked.items()}
        for i in range(BODIES)
    ]


@pytest.fixture(scope="module")
def variants(published) -> dict[str, list[Variant]]:
    """Two trainings of every model: the session's (seed 42, test size 0.2) and another (seed 7,
    test size 0.35)."""
    bodies = _bodies(published.clean)
    frame = pd.DataFrame.from_records(bodies, columns=list(contract.FEATURES))
    result = {}
    for name, first in published.trained.items():
        second = training.train(published.clean, name, 0.35, 7)
        result[name] = [
            Variant(t, test_size, seed,
                    (t.pipeline.predict(frame), t.pipeline.predict_proba(frame)))
            for t, test_size, seed in ((first, 0.2, 42), (second, 0.35, 7))
        ]
    return result


def _publish(variant: Variant, directory, round_: int) -> str:
    metadata = publishing.publish_model(
        variant.trained, directory, run_id=f"manual__round_{round_}", source="test",
        test_size=variant.test_size, seed=variant.seed, key=None,
    )
    return metadata["sha256"][:12]


def test_every_answer_comes_from_a_complete_model_while_every_model_is_republished(
        published, variants, tmp_path):
    bodies = _bodies(published.clean)
    models = tmp_path / "models"
    models.mkdir()
    version_of_variant: dict[str, dict[str, int]] = defaultdict(dict)
    for name, (first, _) in variants.items():
        version_of_variant[name][_publish(first, models, 0)] = 0
    shutil.copy(published.unsigned / publishing.MANIFEST_FILE, models)
    for name, (first, second) in variants.items():
        differs = np.abs(first.expected[1] - second.expected[1]).max(axis=1) > 100 * TOLERANCE
        # Otherwise the check of the answers below could not tell the two versions apart.
        assert differs.sum() >= 5, f"{name}: the two trainings agree on almost every body"

    with run_uvicorn(models, tmp_path / "uvicorn.log") as service:
        sent = itertools.count()
        answers: list[list[tuple[str, int, int, bytes]]] = [[] for _ in range(WORKERS)]
        published_rounds = 0
        last_version: dict[str, str] = {}
        publisher_done = threading.Event()
        stop = threading.Event()
        deadline = time.monotonic() + DEADLINE_SECONDS

        def load(worker: int) -> None:
            names = sorted(variants)
            with requests.Session() as session:
                while not stop.is_set():
                    i = next(sent)
                    # Every model gets every body in turn.
                    name, body = names[i % len(names)], (i // len(names)) % len(bodies)
                    try:
                        response = session.post(f"{service.url}/predict/{name}",
                                                json=bodies[body], timeout=30)
                        answers[worker].append((name, body, response.status_code,
                                                response.content))
                    except requests.RequestException as exc:
                        answers[worker].append((name, body, -1, repr(exc).encode()))

        def publish() -> None:
            nonlocal published_rounds
            for round_ in range(1, ROUNDS + 1):
                # Round r starts once r/(ROUNDS+1) of the requests have been sent.
                while (sum(map(len, answers)) < round_ * REQUESTS // (ROUNDS + 1)
                       and not stop.is_set()):
                    time.sleep(0.01)
                for name, pair in variants.items():
                    version = _publish(pair[round_ % 2], models, round_)
                    version_of_variant[name][version] = round_ % 2
                    last_version[name] = version
                published_rounds = round_
            publisher_done.set()

        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=WORKERS + 1) as pool:
            load_futures = [pool.submit(load, worker) for worker in range(WORKERS)]
            publisher = pool.submit(publish)
            while time.monotonic() < deadline:
                if sum(map(len, answers)) >= REQUESTS and publisher_done.is_set():
                    break
                time.sleep(0.05)
            stop.set()
            for future in (*load_futures, publisher):
                future.result(timeout=60)
        elapsed = time.monotonic() - started

        every = [answer for worker in answers for answer in worker]
        print(f"\n{len(every)} predictions by {WORKERS} threads in {elapsed:.1f} s "
              f"({len(every) / elapsed:.0f}/s), every model published {published_rounds} times")
        assert published_rounds == ROUNDS, f"only {published_rounds} rounds in {elapsed:.0f} s"
        assert len(every) >= REQUESTS, (
            f"only {len(every)} requests answered within {DEADLINE_SECONDS} s")

        failed = [a for a in every if a[2] != 200]
        assert not failed, f"{len(failed)} failed, e.g. {failed[:3]}"

        served = defaultdict(Counter)
        wrong = []
        for name, body, _, content in every:
            answer = json.loads(content)
            version = answer["model"]["version"]
            served[name][version] += 1
            variant = version_of_variant[name].get(version)
            if variant is None:
                wrong.append(f"{name}: version {version} was never published")
                continue
            codes, probabilities = variants[name][variant].expected
            classes = variants[name][variant].trained.classes
            got = np.array([answer["probabilities"][c] for c in classes])
            if (answer["species"] != classes[codes[body]]
                    or not np.abs(got - probabilities[body]).max() <= TOLERANCE):
                wrong.append(f"{name} {version} on body {body}: {answer['species']} "
                             f"{got.tolist()}, its pipeline says {classes[codes[body]]} "
                             f"{probabilities[body].tolist()}")
        assert not wrong, f"{len(wrong)} answers not from a complete model: {wrong[:5]}"
        # Both versions of every model answered: the swaps happened under load.
        assert all(len(versions) >= 2 for versions in served.values()), dict(served)

        def shows_the_last_versions() -> bool:
            listing = requests.get(f"{service.url}/models", timeout=10).json()["models"]
            return {m["name"]: m["version"]["version"] for m in listing} == last_version

        wait_until(shows_the_last_versions, timeout=10)
        listing = requests.get(f"{service.url}/models", timeout=10).json()["models"]
        assert all(m["serving"] and m["load_error"] is None for m in listing), listing
