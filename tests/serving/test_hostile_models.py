"""Hostile model stores: what can be put into MODELS_DIR, by whom, and what the service does.

Two attackers, against the real service under uvicorn (one for the module, with small loader
limits: 3 s of CPU, 5 s of wall time, 256 MB), with exploits that really run a command when
plainly unpickled (``test_the_exploits_run_a_command_when_plainly_unpickled`` proves it):

- an outsider who can write MODELS_DIR but has no private key: whatever they put there fails
  the store's verification (signature, digest, names, no links), so no pickle of theirs ever
  reaches the loader, let alone the unpickler;
- an insider with the leaked key, who signs anything (``export_raw``) and promotes it: the
  isolated loader's worker refuses every global off the exact list, and the memory, CPU and
  crash of a pickle built to exhaust or break it end in the worker only. Throughout, a monitor
  asks for /health every 50 ms and for predictions, which must keep coming from the last good
  versions.
"""

from __future__ import annotations

import contextlib
import copy
import copyreg
import hashlib
import json
import os
import pickle
import shutil
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from serving.store import signing
from serving.store.layout import (
    MANIFEST_FILE,
    METADATA_FILE,
    PICKLE_FILE,
    new_version_id,
    write_atomically,
)
from serving.unpickler import ALLOWED_GLOBALS
from tests.serving.conftest import (
    PENGUIN,
    Published,
    export_raw,
    promote,
    run_uvicorn,
    sample,
    wait_until,
)

# --- Exploits: pickles that run a command, or exhaust or break what loads them --------------------


class Exploit:
    """Pickles as a call of ``os.system("touch <marker>")``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class StatsGadget:
    """Pickles as a SciPy distribution whose ``__setstate__`` runs ``exec`` on the text of one of
    its attributes (``rv_generic._attach_argparser_methods``): a class of a library every
    scikit-learn install has, which runs code merely by being unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    @property
    def __class__(self):  # pickle checks that NEWOBJ's class is the object's
        from scipy.stats._continuous_distns import norm_gen

        return norm_gen

    def __reduce__(self):
        code = f"import os\nos.system('touch {self.marker}')\n"
        return (copyreg.__newobj__, (self.__class__,), {"_parse_arg_template": code})


class Memmap:
    """Pickles as ``numpy.memmap(target, uint8, "w+", 0, (4096,))``: creates ``target``."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (np.memmap, (str(self.target), np.dtype(np.uint8), "w+", 0, (4096,)))


class Strided:
    """Pickles as NEWOBJ ``numpy.ndarray(shape, dtype, buffer, 0, strides)``: with strides of 0,
    an array of any number of elements over a few bytes; without a buffer, an allocation of the
    whole shape."""

    def __init__(self, shape: tuple[int, ...], dtype: Any, buffer: bytes | None = None,
                 strides: tuple[int, ...] | None = None) -> None:
        self.shape, self.dtype, self.buffer, self.strides = shape, np.dtype(dtype), buffer, strides

    @property
    def __class__(self):  # pickle checks that NEWOBJ's class is the object's
        return np.ndarray

    def __reduce__(self):
        if self.buffer is None:
            return (copyreg.__newobj__, (np.ndarray, self.shape, self.dtype))
        return (copyreg.__newobj__,
                (np.ndarray, self.shape, self.dtype, self.buffer, 0, self.strides))


def call_pickle(module: str, name: str, *args: str | dict) -> bytes:
    """A protocol-4 pickle of ``module.name(*args)``, which ``pickle.dumps`` will not write when
    ``name`` is a dotted path."""

    def text(value: str) -> bytes:
        data = value.encode()
        return pickle.BINUNICODE + struct.pack("<I", len(data)) + data

    arguments = [pickle.EMPTY_DICT if isinstance(a, dict) else text(a) for a in args]
    return b"".join([pickle.PROTO, b"\x04", text(module), text(name), pickle.STACK_GLOBAL,
                     pickle.MARK, *arguments, pickle.TUPLE, pickle.REDUCE, pickle.STOP])


def touching(marker: Path) -> str:
    return f"__import__('os').system('touch {marker}')"


def real_payload(published: Published, name: str) -> bytes:
    """The pickle of ``name``'s published version: a real, good model."""
    return (published.store / name / published.versions[name] / PICKLE_FILE).read_bytes()


def real_pipeline(published: Published, name: str) -> Any:
    return copy.deepcopy(published.trained[name].pipeline)


def with_extra_attribute(published: Published, name: str, value: Any) -> bytes:
    """The real ``name`` pipeline, pickled with one more attribute on its estimator."""
    pipeline = real_pipeline(published, name)
    pipeline.steps[-1][1].extra = value
    return pickle.dumps(pipeline, protocol=5)


def random_forest_with_a_child_out_of_range(published: Published) -> bytes:
    """The real forest, one leaf of its first tree given a left child at node 10**9: walked by
    scikit-learn's Cython, that reads 64 GB past the node array."""
    pipeline = real_pipeline(published, "random_forest")
    tree = pipeline.steps[-1][1].estimators_[0].tree_
    state = tree.__getstate__()
    nodes = state["nodes"].copy()
    nodes["left_child"][np.flatnonzero(nodes["left_child"] < 0)[0]] = 10**9
    tree.__setstate__({**state, "nodes": nodes})
    return pickle.dumps(pipeline, protocol=5)


def knn_with_a_kd_tree_out_of_range(published: Published) -> bytes:
    """The real KNN, its KD tree's index of training rows all 10**9: the tree's Cython query,
    which the pipeline's ``predict`` runs, reads far past the data and segfaults."""
    pipeline = real_pipeline(published, "knn")
    tree = pipeline.steps[-1][1]._tree
    state = list(tree.__getstate__())
    state[1] = np.full_like(state[1], 10**9)  # idx_array
    tree.__setstate__(tuple(state))
    return pickle.dumps(pipeline, protocol=5)


def one_hot_encoder_that_spins(published: Published) -> bytes:
    """The real logistic regression, its encoder's island categories an array of 10**12 strings
    over one 8-byte buffer (strides 0): costs nothing to unpickle, but checking that every
    category is a string takes days of CPU and no memory."""
    pipeline = real_pipeline(published, "logistic_regression")
    encoder = pipeline.named_steps["preprocess"].named_transformers_["categorical"]
    encoder.categories_[0] = Strided((10**12,), "<U2", "Bi".encode("utf-32-le"), (0,))
    return pickle.dumps(pipeline, protocol=5)


def knn_whose_training_rows_expand(published: Published) -> bytes:
    """The real KNN, its training rows 15 million rows of one 8-byte float (strides 0): small to
    unpickle, 1.2 GB once the worker makes it an array of its own to send."""
    pipeline = real_pipeline(published, "knn")
    pipeline.steps[-1][1]._fit_X = Strided((15_000_000, 10), np.float64, bytes(8), (0, 0))
    return pickle.dumps(pipeline, protocol=5)


def test_the_exploits_run_a_command_when_plainly_unpickled(published, tmp_path):
    """The exploits are real: plain ``pickle.loads`` runs every one of them (here, where all
    they do is create a file in tmp_path), so a marker missing later means the exploit was
    refused, not that it was a dud."""
    payloads = {
        "os_system": pickle.dumps(Exploit(tmp_path / "os_system")),
        "builtins_eval": call_pickle("builtins", "eval", touching(tmp_path / "builtins_eval")),
        "dotted_name": call_pickle("sklearn", "os.system", f"touch {tmp_path / 'dotted_name'}"),
        "numpy_runstring": call_pickle("numpy.testing._private.utils", "runstring",
                                       touching(tmp_path / "numpy_runstring"), {}),
        "scipy_setstate": with_extra_attribute(published, "svm",
                                               StatsGadget(tmp_path / "scipy_setstate")),
        "memmap": with_extra_attribute(published, "svm", Memmap(tmp_path / "memmap")),
    }
    for payload in payloads.values():
        with contextlib.suppress(Exception):  # the SciPy gadget fails after its code ran
            pickle.loads(payload)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(payloads)


# --- The service, and what it says ------------------------------------------------------------


@dataclass
class LiveStore:
    """A running service and the store it serves."""

    url: str
    models: Path
    log: Path
    process: subprocess.Popen
    published: Published

    def get(self, path: str) -> requests.Response:
        return requests.get(f"{self.url}{path}", timeout=10)

    def model(self, name: str) -> dict[str, Any]:
        response = self.get(f"/models/{name}")
        assert response.status_code == 200, response.text
        return response.json()

    def serving(self, name: str) -> str | None:
        response = self.get(f"/models/{name}")
        if response.status_code != 200 or not response.json()["serving"]:
            return None
        return response.json()["version"]["version"]

    def versions(self, name: str) -> dict[str, dict[str, Any]]:
        response = self.get(f"/models/{name}/versions")
        if response.status_code != 200:
            return {}
        return {v["version"]: v for v in response.json()["versions"]}

    def refusal(self, name: str, version: str, timeout: float = 20) -> str:
        """The reason ``version`` of ``name`` is refused, once it is."""
        def refused() -> str | None:
            entry = self.versions(name).get(version, {})
            return entry.get("reason") if entry.get("state") == "refused" else None

        return wait_until(refused, timeout=timeout, interval=0.05)

    def predicted_by(self, name: str) -> str:
        """The version of ``name`` that answers a prediction (which must succeed)."""
        response = requests.post(f"{self.url}/predict/{name}", json=PENGUIN, timeout=10)
        assert response.status_code == 200, response.text
        return response.json()["model"]["version"]

    def load_errors(self, model: str) -> float:
        return sample(self.get("/metrics").text, "penguins_model_load_errors_total",
                      model=model) or 0.0

    def logged(self) -> str:
        return self.log.read_text(errors="replace")

    def publish_good(self, name: str, payload_of: str | None = None) -> str:
        """Export and promote a real version of ``name`` (made of ``payload_of``'s pickle),
        and wait until it answers: proof that the store is still followed."""
        version = export_raw(self.models, name,
                             real_payload(self.published, payload_of or name))
        promote(self.models, name, version)
        wait_until(lambda: self.serving(name) == version, timeout=20, interval=0.05)
        return version


LOADER_LIMITS = {"SERVING_LOADER_CPU_SECONDS": "3", "SERVING_LOADER_TIMEOUT_SECONDS": "5",
                 "SERVING_LOADER_MEMORY_MB": "256"}


@pytest.fixture(scope="module")
def service(published: Published, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[LiveStore]:
    """The real service, small loader limits, polling every 50 ms, over a copy of the store."""
    folder = tmp_path_factory.mktemp("hostile")
    models = Path(shutil.copytree(published.store, folder / "models"))
    log = folder / "uvicorn.log"
    with run_uvicorn(models, log, access_log=False, RELOAD_INTERVAL_SECONDS="0.05",
                     **LOADER_LIMITS) as live:
        yield LiveStore(live.url, models, log, live.process, published)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder outside MODELS_DIR: where the markers would appear."""
    folder = tmp_path / "outside"
    folder.mkdir()
    return folder


def plant(models: Path, name: str, version: str, folder: Path) -> None:
    """Put ``folder`` into the store as ``name``/``version`` in one rename, as an attacker who
    can write MODELS_DIR would: the service never sees it half made."""
    (models / name).mkdir(parents=True, exist_ok=True)
    incoming = models / name / f".attacker-{version}"
    shutil.copytree(folder, incoming, symlinks=True)
    os.rename(incoming, models / name / version)


def rewrite(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


# --- Without the private key ------------------------------------------------------------------


@dataclass
class Outsider:
    """What an outsider works with: the store, a staging folder of their own, an exploit."""

    models: Path
    staging: Path
    outside: Path
    published: Published
    exploit: bytes

    def staged(self, name: str, payload: bytes, **options: Any) -> tuple[str, Path]:
        version = export_raw(self.staging, name, payload, **options)
        return version, self.staging / name / version


def _unsigned(o: Outsider, name: str) -> tuple[str, str]:
    version, folder = o.staged(name, o.exploit)
    rewrite(folder / METADATA_FILE, lambda d: d.pop("signature"))
    plant(o.models, name, version, folder)
    return version, f"{name}/{version}/metadata.json is not signed, and this service serves " \
                    "only signed models"


def _other_key(o: Outsider, name: str) -> tuple[str, str]:
    their = o.outside / "their-key.pem"
    signing.ensure_key_pair(their, o.outside / "their-key.pub")
    key = signing.load_private_key(their)
    version, folder = o.staged(name, o.exploit, key=key)
    plant(o.models, name, version, folder)
    return version, f"is signed by key {signing.key_id(key.public_key())!r}, not by this " \
                    "service's key"


def _digest_changed_in_signed_metadata(o: Outsider, name: str) -> tuple[str, str]:
    version, folder = o.staged(name, real_payload(o.published, name))
    (folder / PICKLE_FILE).write_bytes(o.exploit)

    def point_at_exploit(document: dict[str, Any]) -> None:
        document.update(pickle_sha256=hashlib.sha256(o.exploit).hexdigest(),
                        pickle_bytes=len(o.exploit))

    rewrite(folder / METADATA_FILE, point_at_exploit)
    plant(o.models, name, version, folder)
    return version, "was changed after it was signed (its signature does not verify)"


def _pickle_replaced(o: Outsider, name: str) -> tuple[str, str]:
    version, folder = o.staged(name, real_payload(o.published, name))
    (folder / PICKLE_FILE).write_bytes(o.exploit)
    plant(o.models, name, version, folder)
    return version, f"{name}/{version}/model.pkl is not the file its signed metadata describes"


def _copied_as_another_version(o: Outsider, name: str) -> tuple[str, str]:
    real = o.published.versions[name]
    version = new_version_id()
    plant(o.models, name, version, o.models / name / real)
    return version, f"describes another version (model {name!r}, version {real!r}): copied or " \
                    "moved here"


def _copied_into_another_model(o: Outsider, name: str) -> tuple[str, str]:
    real = o.published.versions["svm"]
    plant(o.models, name, real, o.models / "svm" / real)
    return real, f"{name}/{real}/metadata.json describes another version (model 'svm', " \
                 f"version {real!r})"


def _symlink_to_a_real_version(o: Outsider, name: str) -> tuple[str, str]:
    elsewhere = o.outside / "store"
    version = export_raw(elsewhere, name, real_payload(o.published, name))  # valid, signed
    (o.models / name / version).symlink_to(elsewhere / name / version, target_is_directory=True)
    return version, f"{name}/{version} is a symbolic link, which the store never contains"


OUTSIDER: dict[str, tuple[str, Callable[[Outsider, str], tuple[str, str]]]] = {
    # attack: (model it targets, put it in place -> (version, text of its refusal))
    "exploit_with_unsigned_metadata": ("svm", _unsigned),
    "exploit_in_a_new_model_folder": ("brand_new_model", _unsigned),
    "exploit_signed_by_another_key": ("svm", _other_key),
    "exploit_with_its_digest_in_signed_metadata": ("knn", _digest_changed_in_signed_metadata),
    "real_version_with_its_pickle_replaced": ("knn", _pickle_replaced),
    "real_version_copied_under_another_id": ("svm", _copied_as_another_version),
    "real_version_copied_into_another_model": ("knn", _copied_into_another_model),
    "symlink_to_a_real_version_elsewhere": ("svm", _symlink_to_a_real_version),
}


@pytest.mark.parametrize("attack", list(OUTSIDER))
def test_without_the_key_nothing_reaches_the_loader(service, outside, tmp_path, attack):
    """An outsider who can write MODELS_DIR but not sign: the version is refused by the store's
    verification, with its reason in /models/{name}/versions; the loader never sees it (had it,
    the exploit would be refused "by the loader: it names posix.system", a copied real version
    would load); no command runs; the model keeps answering with the version it served."""
    name, place = OUTSIDER[attack]
    marker = outside / "ran"
    attacker = Outsider(service.models, tmp_path / "staging", outside, service.published,
                        pickle.dumps(Exploit(marker)))
    before = service.serving(name)
    version, expected = place(attacker, name)

    reason = service.refusal(name, version)
    assert expected in reason
    assert "loader" not in reason
    assert not service.versions(name)[version]["loaded"]
    assert not marker.exists()
    if before is not None:
        assert service.serving(name) == before
        assert service.predicted_by(name) == before
    assert service.predicted_by("logistic_regression")


def _manifest_promoting(service: LiveStore, name: str, version: str) -> dict[str, Any]:
    """The current manifest, changed by hand to promote ``version``, with a sequence far above
    any the pipeline writes; unsigned."""
    document = json.loads((service.models / MANIFEST_FILE).read_text())
    document.pop("signature")
    document["sequence"] = 2**62
    document["models"][name]["promoted"] = version
    document["best_model"] = name
    return document


@pytest.mark.parametrize("signed_by", ["nobody", "another key"])
def test_without_the_key_a_manifest_cannot_promote(service, outside, tmp_path, signed_by):
    """A manifest.json written by the outsider, promoting their exploit (in a version folder of
    its own, unsigned): refused as a whole, so the model's promotion does not change, and the
    exploit version is refused for its own metadata."""
    marker = outside / "ran"
    attacker = Outsider(service.models, tmp_path / "staging", outside, service.published,
                        pickle.dumps(Exploit(marker)))
    version, _ = _unsigned(attacker, "svm")
    served = service.serving("svm")
    promoted = service.model("svm")["promoted"]
    original = (service.models / MANIFEST_FILE).read_bytes()
    errors = service.load_errors("manifest")

    document = _manifest_promoting(service, "svm", version)
    if signed_by == "another key":
        signing.ensure_key_pair(outside / "their-key.pem", outside / "their-key.pub")
        document = signing.sign(document, signing.load_private_key(outside / "their-key.pem"))
        expected = "manifest.json refused: manifest.json is signed by key"
    else:
        expected = "manifest.json refused: manifest.json is not signed"
    try:
        write_atomically(service.models / MANIFEST_FILE, json.dumps(document).encode())
        wait_until(lambda: service.load_errors("manifest") > errors, timeout=10)
        assert expected in service.logged()
        assert "is not signed" in service.refusal("svm", version)
        assert service.model("svm")["promoted"] == promoted
        assert service.serving("svm") == served and service.predicted_by("svm") == served
        assert service.get("/ready").status_code == 200
        assert not marker.exists()
    finally:
        write_atomically(service.models / MANIFEST_FILE, original)


def test_without_the_key_an_older_signed_manifest_put_back_is_refused(service):
    """A replay: the outsider keeps a copy of a signed manifest.json, and puts it back after the
    pipeline promoted something newer. Its signature is good, but its sequence is lower than the
    one followed: the service refuses it and keeps serving the newer promotion."""
    old_bytes = (service.models / MANIFEST_FILE).read_bytes()
    old_sequence = json.loads(old_bytes)["sequence"]
    old_version = service.serving("svm")
    new_version = service.publish_good("svm")
    new_bytes = (service.models / MANIFEST_FILE).read_bytes()
    new_sequence = json.loads(new_bytes)["sequence"]
    errors = service.load_errors("manifest")

    try:
        write_atomically(service.models / MANIFEST_FILE, old_bytes)
        wait_until(lambda: service.load_errors("manifest") > errors, timeout=10)
        assert (f"manifest.json refused: its sequence {old_sequence} is lower than "
                f"{new_sequence}, the one already followed") in service.logged()
        time.sleep(0.3)  # a few more looks at the store
        assert service.model("svm")["promoted"] == new_version != old_version
        assert service.serving("svm") == new_version
        assert service.predicted_by("svm") == new_version
    finally:
        write_atomically(service.models / MANIFEST_FILE, new_bytes)


def test_an_unsigned_manifest_is_why_nothing_is_served(make_client, tmp_path):
    """A store holding only the outsider's files (an unsigned manifest promoting an unsigned
    exploit): nothing is served, and /ready says that the manifest was refused, and why."""
    models, marker = tmp_path / "models", tmp_path / "ran"
    attacker = Outsider(models, tmp_path / "staging", tmp_path, None, pickle.dumps(Exploit(marker)))
    version, _ = _unsigned(attacker, "svm")
    manifest = {"format_version": 2, "sequence": 2**62, "written_at": "", "written_by": "",
                "best_model": "svm",
                "models": {"svm": {"promoted": version, "history": [], "held_back": {}}}}
    (models / MANIFEST_FILE).write_text(json.dumps(manifest))

    client = make_client(models)
    wait_until(lambda: client.get("/models/svm/versions").json()["versions"][0]["state"]
               == "refused")
    ready = client.get("/ready")
    assert ready.status_code == 503
    assert "manifest.json refused: manifest.json is not signed" in ready.json()["detail"]
    assert client.post("/predict/svm", json=PENGUIN).status_code == 503
    assert not marker.exists()


# --- With the leaked key ----------------------------------------------------------------------


class Monitor(threading.Thread):
    """Every 50 ms: GET /health, and a prediction of each model in ``expected``, which must come
    from the version given there."""

    def __init__(self, url: str, expected: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.url, self.expected = url, expected
        self.stop, self.rounds, self.failures = threading.Event(), 0, []
        self.worst_health = 0.0

    def run(self) -> None:
        with requests.Session() as session:
            while not self.stop.is_set():
                started = time.monotonic()
                try:
                    health = session.get(f"{self.url}/health", timeout=5)
                    self.worst_health = max(self.worst_health, time.monotonic() - started)
                    if health.status_code != 200:
                        self.failures.append(f"/health: {health.status_code}")
                    for name, version in self.expected.items():
                        answer = session.post(f"{self.url}/predict/{name}", json=PENGUIN,
                                              timeout=5)
                        if answer.status_code != 200:
                            self.failures.append(f"{name}: {answer.status_code} {answer.text}")
                        elif answer.json()["model"]["version"] != version:
                            self.failures.append(f"{name}: answered by "
                                                 f"{answer.json()['model']['version']}")
                except requests.RequestException as exc:
                    self.failures.append(repr(exc))
                self.rounds += 1
                self.stop.wait(max(0.0, 0.05 - (time.monotonic() - started)))


@dataclass(frozen=True)
class Insider:
    good: str
    """The model whose real pickle is the victim's last good version."""
    payload: Callable[[Published, Path], bytes]
    """The hostile pickle, given the folder where its markers would appear."""
    reason: str


INSIDER: dict[str, Insider] = {
    "os_system": Insider("svm", lambda p, out: pickle.dumps(Exploit(out / "ran")),
                         "it names posix.system, which is not on the list"),
    "builtins_eval": Insider(
        "svm", lambda p, out: call_pickle("builtins", "eval", touching(out / "ran")),
        "it names builtins.eval, which is not on the list"),
    "dotted_name_through_an_allowed_package": Insider(
        "svm", lambda p, out: call_pickle("sklearn", "os.system", f"touch {out / 'ran'}"),
        "it names sklearn.os.system, which is not on the list"),
    "numpy_test_helper_runstring": Insider(
        "svm", lambda p, out: call_pickle("numpy.testing._private.utils", "runstring",
                                          touching(out / "ran"), {}),
        "it names numpy.testing._private.utils.runstring, which is not on the list"),
    "svm_plus_a_scipy_class_whose_setstate_runs_code": Insider(
        "svm", lambda p, out: with_extra_attribute(p, "svm", StatsGadget(out / "ran")),
        "it names scipy.stats._continuous_distns.norm_gen, which is not on the list"),
    "svm_plus_a_memmap_opened_for_writing": Insider(
        "svm", lambda p, out: with_extra_attribute(p, "svm", Memmap(out / "written")),
        "it names numpy.memmap, which is not on the list"),
    # Refused by the worker's own check of the trees (compiled_spec.forest_depth), before
    # scikit-learn's Cython walks them; the KD tree below does reach Cython, and crashes it.
    "random_forest_with_a_child_out_of_range": Insider(
        "random_forest", lambda p, out: random_forest_with_a_child_out_of_range(p),
        "the trees have a left child index outside"),
    "knn_whose_kd_tree_segfaults": Insider(
        "knn", lambda p, out: knn_with_a_kd_tree_out_of_range(p),
        "the loader crashed (SIGSEGV) while loading it"),
    "encoder_that_spins": Insider(
        "logistic_regression", lambda p, out: one_hot_encoder_that_spins(p),
        "the loader used more than 3 s of CPU (SERVING_LOADER_CPU_SECONDS); stopped"),
    "knn_whose_training_rows_expand_to_1_2_gb": Insider(
        "knn", lambda p, out: knn_whose_training_rows_expand(p),
        "loading it needed more than 256 MB (SERVING_LOADER_MEMORY_MB); stopped"),
    # 1 GiB, which this machine has, but not the worker.
    "array_of_1_gib_allocated_while_unpickling": Insider(
        "logistic_regression",
        lambda p, out: with_extra_attribute(p, "logistic_regression",
                                            Strided((2**27,), np.float64)),
        "loading it needed more than 256 MB (SERVING_LOADER_MEMORY_MB); stopped"),
    "array_of_745_gib_allocated_while_unpickling": Insider(
        "logistic_regression",
        lambda p, out: with_extra_attribute(p, "logistic_regression",
                                            Strided((10**6, 10**5), np.float64)),
        "loading it needed more than 256 MB (SERVING_LOADER_MEMORY_MB); stopped"),
}


def test_the_insider_globals_are_off_the_list():
    """The globals the insider's exploits name are indeed not allowed (else the attacks below
    would test the wrong thing)."""
    for module, name in [("posix", "system"), ("builtins", "eval"), ("sklearn", "os.system"),
                         ("numpy.testing._private.utils", "runstring"),
                         ("scipy.stats._continuous_distns", "norm_gen"), ("numpy", "memmap")]:
        assert (module, name) not in ALLOWED_GLOBALS
    assert ("numpy", "ndarray") in ALLOWED_GLOBALS  # the memory and CPU attacks use it


@pytest.mark.parametrize("attack", list(INSIDER))
def test_with_the_leaked_key_a_promoted_exploit_is_refused_and_the_last_good_version_answers(
        service, outside, attack):
    """The insider signs the hostile pickle and promotes it. The worker refuses it, or the limit
    or crash ends the worker alone; the model keeps answering with its last good version and
    says what is wrong; /health answers within a second throughout; the error is counted."""
    case = INSIDER[attack]
    victim = f"insider_{attack}"
    good = service.publish_good(victim, case.good)
    other = service.serving("logistic_regression")
    errors = service.load_errors(victim)
    payload = case.payload(service.published, outside)

    monitor = Monitor(service.url, {victim: good, "logistic_regression": other})
    monitor.start()
    started = time.monotonic()
    try:
        bad = export_raw(service.models, victim, payload)
        promote(service.models, victim, bad)
        reason = service.refusal(victim, bad, timeout=30)
        refused_after = time.monotonic() - started
        time.sleep(0.5)  # a few more rounds of the monitor, after the refusal
    finally:
        monitor.stop.set()
        monitor.join(timeout=30)

    print(f"\n{attack}: refused after {refused_after:.2f} s; {monitor.rounds} monitor rounds, "
          f"worst /health {monitor.worst_health * 1000:.0f} ms; {reason}")
    assert case.reason in reason
    assert not monitor.failures, monitor.failures[:5]
    assert monitor.rounds >= 3
    assert monitor.worst_health < 1.0
    info = service.model(victim)
    assert info["promoted"] == bad and info["serving"] and info["version"]["version"] == good
    assert f"the promoted version {bad} was refused" in info["problem"]
    assert f"still serving {good}" in info["problem"] and case.reason in info["problem"]
    assert service.predicted_by(victim) == good
    assert service.load_errors(victim) == errors + 1
    assert list(outside.iterdir()) == []  # no marker, no file the memmap would have made
    assert service.process.poll() is None
    assert "Traceback" not in service.logged()
