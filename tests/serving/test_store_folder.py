"""The store's folder itself, odd or hostile: link loops, enormous numbers, times from the future,
tens of thousands of junk entries, and MODELS_DIR vanishing and coming back.

One real service under uvicorn for the module, polling at its default interval (0.2 s). After
each odd thing is in place, another model's new version, promoted, must still be served: the
watcher kept following the store.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from serving.contract import MODEL_NAMES
from serving.store import signing
from serving.store.layout import METADATA_FILE, new_version_id
from tests.serving.conftest import (
    PENGUIN,
    Published,
    export_raw,
    private_key,
    promote,
    run_uvicorn,
    wait_until,
)
from tests.serving.test_hostile_models import LiveStore, plant, real_payload

FAR_FUTURE = 7_258_118_400  # 2200-01-01
JUNK = 20_000


@pytest.fixture(scope="module")
def service(published: Published, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[LiveStore]:
    folder = tmp_path_factory.mktemp("folder")
    models = Path(shutil.copytree(published.store, folder / "models"))
    log = folder / "uvicorn.log"
    with run_uvicorn(models, log, access_log=False) as live:
        yield LiveStore(live.url, models, log, live.process, published)


def still_reloading(service: LiveStore, name: str = "logistic_regression") -> None:
    """A new version of ``name``, promoted, is served: the watcher still follows the store, and
    every model still answers."""
    service.publish_good(name)
    for model in MODEL_NAMES:
        assert service.predicted_by(model) == service.serving(model)
    assert service.process.poll() is None
    assert "Traceback" not in service.logged()


def test_a_version_folder_that_links_to_itself_is_refused(service):
    """``svm/<version>`` is a symbolic link to itself: opening anything in it would loop (ELOOP).
    The store never follows a link, so it is refused as one, and the rest goes on."""
    version = new_version_id()
    (service.models / "svm" / version).symlink_to(version)
    served = service.serving("svm")
    assert "is a symbolic link, which the store never contains" in service.refusal("svm", version)
    assert service.predicted_by("svm") == served
    still_reloading(service)


def test_model_folders_that_are_links_are_never_read(service, tmp_path):
    """Model folders that are links: one to itself, two to each other, one to a real model's
    folder elsewhere (with a valid signed version in it). Each is listed as a model that serves
    nothing, with the reason; no version is read from any; the rest goes on."""
    links = ("loop", "ping", "pong", "alias")
    (service.models / "loop").symlink_to("loop")
    (service.models / "ping").symlink_to("pong")
    (service.models / "pong").symlink_to("ping")
    elsewhere = tmp_path / "store"
    export_raw(elsewhere, "svm", real_payload(service.published, "svm"))
    (service.models / "alias").symlink_to(elsewhere / "svm", target_is_directory=True)
    try:
        for name in links:
            info = wait_until(lambda name=name: service.get(f"/models/{name}").status_code == 200
                              and service.model(name), timeout=5)
            assert not info["serving"]
            assert info["problem"] == f"{name} is a symbolic link, which the store never contains"
            assert service.versions(name) == {}
            answer = requests.post(f"{service.url}/predict/{name}", json=PENGUIN, timeout=5)
            assert answer.status_code == 503
        still_reloading(service)
    finally:
        for name in links:
            (service.models / name).unlink()


def _signed_with(service: LiveStore, tmp_path: Path, name: str, change) -> str:
    """A real version of ``name`` whose metadata ``change`` edits, then signed again with the
    key: what a buggy (or stolen-key) writer could make. Returns the planted version."""
    staging = tmp_path / "staging"
    version = export_raw(staging, name, real_payload(service.published, name))
    path = staging / name / version / METADATA_FILE
    document = json.loads(path.read_text())
    document.pop("signature")
    change(document)
    path.write_text(json.dumps(signing.sign(document, private_key())))
    plant(service.models, name, version, staging / name / version)
    return version


HUGE = 10**399  # 400 digits


def test_a_signed_size_of_400_digits_is_refused(service, tmp_path):
    """``pickle_bytes`` a number of 400 digits, signed: refused for what it is, never used as a
    size to read, and shown without its 400 digits."""
    version = _signed_with(service, tmp_path, "knn", lambda d: d.update(pickle_bytes=HUGE))
    reason = service.refusal("knn", version)
    assert ("pickle_bytes must be a whole number from 1 to 1000000000, not a number of 400 "
            "digits") in reason
    still_reloading(service)


def test_a_version_from_the_future_loads_like_any_other(service, tmp_path):
    """A version folder, its files, its model's folder and the manifest all modified in 2200.
    Modification times mean nothing to the store (a version's id is its time; a change is seen
    by comparing stamps, not ordering them): it loads and is served once promoted, and later
    changes, with times of today, are still seen."""
    staging = tmp_path / "staging"
    version = export_raw(staging, "svm", real_payload(service.published, "svm"))
    folder = staging / "svm" / version
    for path in (*folder.iterdir(), folder):
        os.utime(path, (FAR_FUTURE, FAR_FUTURE))
    plant(service.models, "svm", version, folder)
    os.utime(service.models / "svm", (FAR_FUTURE, FAR_FUTURE))
    assert os.stat(service.models / "svm" / version).st_mtime == FAR_FUTURE

    wait_until(lambda: service.versions("svm").get(version, {}).get("loaded"), timeout=20)
    promote(service.models, "svm", version)
    os.utime(service.models / "manifest.json", (FAR_FUTURE, FAR_FUTURE))
    wait_until(lambda: service.serving("svm") == version, timeout=20)
    assert service.predicted_by("svm") == version
    still_reloading(service)
    still_reloading(service, "svm")  # a version of today, after one from the future


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _idle_cpu_share(service: LiveStore, seconds: float) -> float:
    """The share of one core the service's process uses over ``seconds`` of no requests."""
    pid = service.process.pid
    before, started = _cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (_cpu_seconds(pid) - before) / (time.monotonic() - started)


@contextlib.contextmanager
def junk(paths: list[Path], folders: Callable[[Path], bool]) -> Iterator[None]:
    """``paths`` made (a folder where ``folders`` says, else an empty file), then removed."""
    try:
        for path in paths:
            if folders(path):
                path.mkdir()
            else:
                path.touch()
        yield
    finally:
        for path in paths:
            if path.is_dir():
                path.rmdir()
            else:
                path.unlink(missing_ok=True)


def test_tens_of_thousands_of_junk_entries_cost_no_cpu_while_idle(service):
    """20,000 junk entries in MODELS_DIR (files, some with valid model names; dot-files; folders
    with invalid names) and 20,000 in a model's folder (files, dot-folders, folders whose names
    are nearly version ids): the idle service, polling every 0.2 s, uses under 5% of one core,
    and takes none of them for a model or a version."""
    root, svm = service.models, service.models / "svm"
    versions = set(service.versions("svm"))
    paths = [root / (f"junk-{i}.txt", f"junk_{i}", f".junk{i}", f"Junk{i}")[i % 4]
             for i in range(JUNK)]
    paths += [svm / (f"not-a-version-{i}", f".incoming-{i}", f"20260101T000000.{i:06d}X")[i % 3]
              for i in range(JUNK)]
    with junk(paths, lambda p: p.name.startswith(("Junk", ".incoming", "2026"))):
        time.sleep(1.0)  # the watcher lists both folders
        assert service.predicted_by("svm") == service.serving("svm")
        share = _idle_cpu_share(service, 5.0)
        print(f"\nidle CPU with {len(paths)} junk entries: {share:.1%} of one core")
        assert share < 0.05
        listed = {m["name"] for m in service.get("/models").json()["models"]}
        assert not {name for name in listed if name.lower().startswith("junk")}
        assert set(service.versions("svm")) == versions
        still_reloading(service)


def test_thousands_of_empty_folders_with_model_names_cost_no_cpu_while_idle(service):
    """10,000 empty folders whose names are valid model names: no model, no version, and they
    should cost the idle service no more than other junk."""
    paths = [service.models / f"empty_{i}" for i in range(JUNK // 2)]
    with junk(paths, lambda p: True):
        time.sleep(1.0)
        share = _idle_cpu_share(service, 2.0)
        print(f"\nidle CPU with {len(paths)} empty folders with model names: {share:.1%}")
        assert share < 0.05


def test_models_dir_removed_and_recreated(service, tmp_path):
    """MODELS_DIR is deleted (``rm -rf``), then restored from a copy (``cp -r``): meanwhile
    every model answers with the version it served; afterwards the restored store is followed."""
    backup = Path(shutil.copytree(service.models, tmp_path / "backup", symlinks=True))
    served = {name: service.serving(name) for name in MODEL_NAMES}
    shutil.rmtree(service.models)
    try:
        wait_until(lambda: "does not exist (yet)" in service.logged(), timeout=5)
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            for name, version in served.items():
                answer = requests.post(f"{service.url}/predict/{name}", json=PENGUIN, timeout=5)
                assert answer.status_code == 200, answer.text
                assert answer.json()["model"]["version"] == version
        assert service.get("/ready").status_code == 200
    finally:
        shutil.copytree(backup, service.models, symlinks=True)
    wait_until(lambda: "is readable again" in service.logged(), timeout=5)
    for name, version in served.items():
        assert service.serving(name) == version
        assert service.predicted_by(name) == version
    still_reloading(service, "svm")
    still_reloading(service, "knn")

# --- Last: signed documents with absurd numbers.


def test_a_signed_accuracy_of_400_digits_is_refused_with_its_reason(service, tmp_path):
    """``metrics.accuracy`` a number of 400 digits, signed: refused, saying which field."""
    version = _signed_with(service, tmp_path, "knn",
                           lambda d: d["metrics"].update(accuracy=HUGE))
    reason = service.refusal("knn", version)
    assert "metrics.accuracy must be a number from 0 to 1" in reason, reason
    assert "Traceback" not in service.logged()


def test_a_signed_extra_number_of_400_digits_does_not_break_the_api(service, tmp_path):
    """A number of 400 digits where the store checks nothing (``training_seconds``, one more
    metric), signed: the version may load, but the API describing it must still answer."""
    def change(document):
        document.update(training_seconds=HUGE)
        document["metrics"]["precision"] = HUGE

    version = _signed_with(service, tmp_path, "xgboost", change)
    wait_until(lambda: f"model xgboost version {version} loaded" in service.logged(), timeout=20)
    for path in ("/models", "/models/xgboost", "/models/xgboost/versions"):
        assert service.get(path).status_code == 200, path
    promote(service.models, "xgboost", version)
    wait_until(lambda: f"model xgboost: now serving version {version}" in service.logged(),
               timeout=20)
    assert service.predicted_by("xgboost") == version
    for path in ("/models", "/models/xgboost", "/models/xgboost/versions"):
        assert service.get(path).status_code == 200, path
