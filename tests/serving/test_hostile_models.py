"""Hostile files in MODELS_DIR: none is served, no command runs, the service stays healthy.

The main test drops some thirty kinds of hostile file into the folder of the real service under
uvicorn, running with ``MODEL_SIGNING_KEY``, while a monitor keeps asking it for its health and
for predictions of a good model. Most of them carry a valid signature, as a buggy or compromised
pipeline would make them, so that the checks behind the signature are reached too. The other
tests take the registry's loader directly: pickles that try to run a command through the
restricted unpickler when no key is set, and proof that with a key an unsigned pickle is never
unpickled at all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import random
import shutil
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from penguins import contract, training
from serving import artifacts
from serving.artifacts import ArtifactError, load_model
from tests.serving.conftest import PENGUIN, SIGNING_KEY, publish_raw, run_uvicorn, wait_until

HUGE_BYTES = 200_000_000
"""A sparse file of this size: it costs no disk, but reading it would cost this much memory."""


class Exploit:
    """Pickles as a call of ``os.system("touch <marker>")``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class PytestGadget:
    """Pickles as ``PytestTester("scipy")("fast", 0, [folder])``: a SciPy class, callable, that
    runs pytest on ``folder``, which imports the ``conftest.py`` found there."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __reduce__(self):
        from scipy._lib._testutils import PytestTester

        return (PytestTester("scipy"),
                ("fast", 0, [str(self.folder), "-q", "-p", "no:cacheprovider"]))


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


def few_features_model(published) -> Pipeline:
    """A pipeline fitted on three of the seven features: it answers any penguin, ignoring four."""
    columns = ["bill_length_mm", "bill_depth_mm", "flipper_length_mm"]
    labels, _ = training.encode_labels(published.clean[contract.LABEL])
    model = Pipeline([
        ("preprocess", ColumnTransformer([("numeric", StandardScaler(), columns)])),
        ("model", LogisticRegression(max_iter=1000)),
    ])
    return model.fit(published.clean[columns], labels)


# --- The real service, with a signing key, among hostile files ----------------------------------


@dataclasses.dataclass
class Folder:
    models: Path
    outside: Path
    published: Any

    def marker(self, name: str) -> Path:
        return self.outside / f"ran-{name}"

    def payload(self, name: str = "svm") -> bytes:
        return (self.published.signed / f"{name}.pkl").read_bytes()

    def signed(self, name: str, payload: bytes, **overrides: Any) -> dict[str, Any]:
        return publish_raw(self.models, name, payload, key=SIGNING_KEY, **overrides)

    def metadata(self, name: str, data: bytes) -> None:
        (self.models / f"{name}.json").write_bytes(data)


def _escape_link(f: Folder, name: str, suffix: str) -> None:
    publish_raw(f.outside, name, f.payload(), key=SIGNING_KEY)  # valid, but outside
    for ext in (".pkl", ".json"):
        if ext == suffix:
            (f.models / f"{name}{ext}").symlink_to(f.outside / f"{name}{ext}")
        else:
            shutil.copy(f.outside / f"{name}{ext}", f.models)


def _with_metadata(data: bytes) -> Callable[[Folder, str], None]:
    """A good signed model whose metadata is then replaced by ``data``."""

    def place(f: Folder, name: str) -> None:
        f.signed(name, f.payload())
        f.metadata(name, data)

    return place


def _after_signing(f: Folder, name: str, change: Callable[[bytes], bytes]) -> None:
    f.signed(name, f.payload())
    (f.models / f"{name}.pkl").write_bytes(change(f.payload()))


def _huge(f: Folder, name: str, *, claimed: bool) -> None:
    """A 200 MB pickle. With ``claimed``, unsigned metadata that records its size and digest."""
    if claimed:
        publish_raw(f.models, name, b"", key=None)
        metadata = json.loads((f.models / f"{name}.json").read_text())
        metadata.update(size_bytes=HUGE_BYTES, sha256=_zeros_sha256(HUGE_BYTES))
        f.metadata(name, json.dumps(metadata).encode())
    else:
        f.signed(name, f.payload())
    with open(f.models / f"{name}.pkl", "wb") as pkl:
        pkl.truncate(HUGE_BYTES)


def _zeros_sha256(size: int) -> str:
    digest, block = hashlib.sha256(), bytes(1 << 20)
    for _ in range(size >> 20):
        digest.update(block)
    return digest.hexdigest()


def _not_a_file(f: Folder, name: str, make: Callable[[Path], None]) -> None:
    f.signed(name, f.payload())
    (f.models / f"{name}.pkl").unlink()
    make(f.models / f"{name}.pkl")


def _renamed_knn(f: Folder, name: str) -> None:
    metadata = json.loads((f.published.signed / "knn.json").read_text())
    metadata.update(model_name=name, pickle_file=f"{name}.pkl")  # the signature is knn's
    shutil.copy(f.published.signed / "knn.pkl", f.models / f"{name}.pkl")
    f.metadata(name, json.dumps(metadata).encode())


HOSTILE: dict[str, tuple[Callable[[Folder, str], None], str]] = {
    # name: (put the hostile files of model `name` into the folder, text of its load error)
    "exploit_unsigned": (lambda f, n: publish_raw(f.models, n, pickle.dumps(Exploit(f.marker(n)))),
                         "is not signed"),
    "exploit_other_key": (lambda f, n: publish_raw(f.models, n, pickle.dumps(Exploit(f.marker(n))),
                                                   key=b"attacker"), "does not match"),
    "exploit_signed": (lambda f, n: f.signed(n, pickle.dumps(Exploit(f.marker(n)))),
                       "names posix.system"),
    "exploit_in_object_array": (
        lambda f, n: f.signed(n, pickle.dumps(np.array([Exploit(f.marker(n))], dtype=object))),
        "names posix.system"),
    "exploit_by_attribute_path": (
        lambda f, n: f.signed(n, call_pickle("sklearn", "os.system", f"touch {f.marker(n)}")),
        "an attribute path"),
    "exploit_by_numpy_runstring": (
        lambda f, n: f.signed(n, call_pickle("numpy.testing._private.utils", "runstring",
                                             touching(f.marker(n)), {})),
        "a test helper"),
    "exploit_by_pytest_conftest": (lambda f, n: f.signed(n, pickle.dumps(PytestGadget(f.outside))),
                                   "a test helper"),
    "exploit_by_numpy_function": (
        lambda f, n: f.signed(n, call_pickle("numpy", "load", str(f.outside / "second.pkl"))),
        "not a class"),
    "truncated": (lambda f, n: f.signed(n, f.payload()[:1000]), "could not be unpickled"),
    "truncated_after_signing": (lambda f, n: _after_signing(f, n, lambda p: p[:1000]),
                                "bytes, its metadata says"),
    "bit_flipped_after_signing": (
        lambda f, n: _after_signing(f, n, lambda p: p[:500] + bytes([p[500] ^ 1]) + p[501:]),
        "has sha256"),
    "empty_pickle": (lambda f, n: f.signed(n, b""), "no valid sha256 and size_bytes"),
    "pickle_without_metadata": (
        lambda f, n: (f.models / f"{n}.pkl").write_bytes(f.payload()), "no metadata file"),
    "empty_metadata": (_with_metadata(b""), "not valid JSON"),
    "garbage_metadata": (_with_metadata(bytes(range(256))), "not valid JSON"),
    "metadata_a_list": (_with_metadata(b"[1, 2]"), "not a JSON object"),
    "metadata_nested_deep": (_with_metadata(b"[" * 100_000 + b"]" * 100_000), "not valid JSON"),
    "metadata_with_a_huge_string": (
        lambda f, n: f.signed(n, f.payload(), source="x" * 2_000_000), "more than the 1000000"),
    "metadata_with_a_huge_number": (_with_metadata(b'{"size_bytes": 1' + b"0" * 5000 + b"}"),
                                    "not valid JSON"),
    "wrong_digest": (lambda f, n: f.signed(n, f.payload(), sha256="0" * 64), "has sha256"),
    "pickle_links_outside": (lambda f, n: _escape_link(f, n, ".pkl"), "outside MODELS_DIR"),
    "metadata_links_outside": (lambda f, n: _escape_link(f, n, ".json"), "outside MODELS_DIR"),
    "huge_pickle": (lambda f, n: _huge(f, n, claimed=False), "more than the"),
    "huge_pickle_claimed_unsigned": (lambda f, n: _huge(f, n, claimed=True), "is not signed"),
    "copy_of_knn": (lambda f, n: [shutil.copy(f.published.signed / f"knn{e}", f.models / f"{n}{e}")
                                  for e in (".pkl", ".json")], "describes model 'knn'"),
    "knn_renamed_in_signed_metadata": (_renamed_knn, "does not match"),
    "fitted_on_three_features": (lambda f, n: f.signed(n, pickle.dumps(few_features_model(
        f.published), protocol=5)), "was fitted on the features"),
    "a_dict": (lambda f, n: f.signed(n, pickle.dumps({"coef": [1.0, 2.0]})), "has no predict()"),
    "other_scikit_learn": (
        lambda f, n: f.signed(n, f.payload(), versions={"scikit-learn": "0.24.2"}),
        "trained with scikit-learn 0.24.2"),
    "fifo": (lambda f, n: _not_a_file(f, n, os.mkfifo), "not a regular file"),
    "directory": (lambda f, n: _not_a_file(f, n, os.mkdir), "not a regular file"),
    "a" * 64: (lambda f, n: f.signed(n, random.Random(0).randbytes(2048)),
               "could not be unpickled"),
}

ODD_NAMES = ["..pkl", ".pkl", "UPPER.pkl", "a b.pkl", "a" * 65 + ".pkl", "ünïcode.pkl",
             "svm.pkl.bak", "-rf.pkl", "new\nline.pkl", "manifest.pkl", "semi;colon.pkl",
             "dollar$(touch x).pkl"]
"""Files no model name matches: the service must not even list them."""


class Monitor(threading.Thread):
    """Asks for /health, /ready and a prediction of a good model, over and over, until stopped."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.stop, self.calls, self.failures = url, threading.Event(), 0, []

    def run(self) -> None:
        with requests.Session() as session:
            while not self.stop.is_set():
                for method, path, body in (("GET", "/health", None), ("GET", "/ready", None),
                                           ("POST", "/predict/svm", PENGUIN)):
                    try:
                        response = session.request(method, f"{self.url}{path}", json=body,
                                                   timeout=10)
                        if response.status_code != 200:
                            self.failures.append(f"{path}: {response.status_code}")
                    except requests.RequestException as exc:
                        self.failures.append(f"{path}: {exc!r}")
                    self.calls += 1
                time.sleep(0.02)


def _peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("VmHWM")).split()[1]) / 1024


def test_no_hostile_file_is_served_and_the_service_stays_healthy(published, tmp_path):
    models = Path(shutil.copytree(published.signed, tmp_path / "models"))
    folder = Folder(models, tmp_path / "outside", published)
    folder.outside.mkdir()
    # What the gadgets would run: a conftest.py for pytest, a pickle for numpy.load.
    (folder.outside / "conftest.py").write_text(
        f"import os\nos.system('touch {folder.marker('exploit_by_pytest_conftest')}')\n")
    (folder.outside / "second.pkl").write_bytes(
        pickle.dumps(Exploit(folder.marker("exploit_by_numpy_function"))))

    with run_uvicorn(models, tmp_path / "uvicorn.log",
                     MODEL_SIGNING_KEY=SIGNING_KEY.decode()) as service:
        peak_before = _peak_rss_mb(service.process.pid)
        monitor = Monitor(service.url)
        monitor.start()
        try:
            for name, (place, _) in HOSTILE.items():
                place(folder, name)
            for odd in ODD_NAMES:
                (models / odd).write_bytes(folder.payload())
                if not (models / odd.replace(".pkl", ".json")).exists():
                    (models / odd.replace(".pkl", ".json")).write_bytes(b"{}")
            # Pickle and metadata that disagree are taken for a publish in progress for two
            # seconds after their last write; age the files rather than wait.
            past = time.time() - 60
            for path in (*models.iterdir(), *folder.outside.iterdir()):
                os.utime(path, (past, past), follow_symlinks=False)

            def listed() -> dict[str, dict]:
                response = requests.get(f"{service.url}/models", timeout=30)
                assert response.status_code == 200, response.text
                return {m["name"]: m for m in response.json()["models"]}

            def all_refused() -> bool:
                now = listed()
                return all((now.get(name) or {}).get("load_error") for name in HOSTILE)

            wait_until(all_refused, timeout=60, interval=0.2)
            time.sleep(1.0)  # a few more polls of the watcher, with everything in place
        finally:
            monitor.stop.set()
            monitor.join(timeout=30)

        models_now = listed()
        assert set(models_now) == set(HOSTILE) | set(contract.MODEL_NAMES), sorted(models_now)
        wrong = {name: models_now[name] for name, (_, expected) in HOSTILE.items()
                 if models_now[name]["serving"]
                 or expected not in models_now[name]["load_error"]["message"]}
        assert not wrong, json.dumps(wrong, indent=1)[:3000]
        for name in contract.MODEL_NAMES:
            assert models_now[name]["serving"] and models_now[name]["load_error"] is None
            answer = requests.post(f"{service.url}/predict/{name}", json=PENGUIN, timeout=10)
            assert answer.status_code == 200, answer.text
        for name in HOSTILE:
            refused = requests.post(f"{service.url}/predict/{name}", json=PENGUIN, timeout=10)
            assert refused.status_code == 503, (name, refused.status_code)

        assert not monitor.failures, monitor.failures[:10]
        assert monitor.calls >= 30, monitor.calls
        assert not sorted(p.name for p in folder.outside.glob("ran-*"))
        # The 200 MB files were refused by their size, never read into memory.
        growth = _peak_rss_mb(service.process.pid) - peak_before
        print(f"\n{len(HOSTILE)} hostile models, {len(ODD_NAMES)} odd names; "
              f"{monitor.calls} monitor calls; peak RSS grew {growth:.0f} MB")
        assert growth < 100, f"peak RSS grew by {growth:.0f} MB"
    log = (tmp_path / "uvicorn.log").read_text()
    # Every refusal was an ArtifactError with a message, not an unexpected exception's stack.
    assert "Traceback" not in log, log[log.index("Traceback") - 2000:][:5000]


# --- Without a key: the restricted unpickler ------------------------------------------------------


GADGETS: dict[str, tuple[Callable[[Path], bytes], str]] = {
    # name: (pickle that would create the marker file, text of the refusal)
    "os.system": (lambda m: pickle.dumps(Exploit(m)), "names posix.system"),
    "subprocess": (lambda m: call_pickle("subprocess", "check_call", f"touch {m}"),
                   "names subprocess.check_call"),
    "eval": (lambda m: call_pickle("builtins", "eval", touching(m)), "names builtins.eval"),
    "attribute path": (lambda m: call_pickle("sklearn", "os.system", f"touch {m}"),
                       "an attribute path"),
    "attribute path through builtins": (
        lambda m: call_pickle("builtins", "slice.__class__", "x"), "builtins.slice.__class__"),
    "numpy runstring": (
        lambda m: call_pickle("numpy.testing._private.utils", "runstring", touching(m), {}),
        "a test helper"),
    "pytest conftest": (lambda m: pickle.dumps(PytestGadget(m.parent)), "a test helper"),
    "numpy function": (lambda m: call_pickle("numpy", "load", str(m.parent / "second.pkl")),
                       "not a class"),
    "ctypes loader": (lambda m: call_pickle("numpy.ctypeslib", "load_library", "libc", "/lib"),
                      "not a class"),
    "object array": (lambda m: pickle.dumps(np.array([1, Exploit(m)], dtype=object)),
                     "names posix.system"),
    "inside a real pipeline": (
        lambda m: pickle.dumps(Pipeline([("model", LogisticRegression(C=Exploit(m)))])),
        "names posix.system"),
}


@pytest.mark.parametrize("gadget", list(GADGETS))
def test_without_a_key_no_pickle_can_run_a_command(models_dir, tmp_path, gadget):
    make, refusal = GADGETS[gadget]
    marker = tmp_path / "ran"
    (tmp_path / "conftest.py").write_text(f"import os\nos.system('touch {marker}')\n")
    (tmp_path / "second.pkl").write_bytes(pickle.dumps(Exploit(marker)))
    publish_raw(models_dir, "gadget", make(marker))
    with pytest.raises(ArtifactError, match="could not be unpickled") as refused:
        load_model(models_dir, "gadget", None)
    assert refusal in str(refused.value)
    assert not marker.exists()


def test_every_published_model_still_loads_through_the_restricted_unpickler(published):
    for name in contract.MODEL_NAMES:
        for folder, key in ((published.unsigned, None), (published.signed, SIGNING_KEY)):
            assert load_model(folder, name, key).name == name


# --- With a key: an unsigned pickle is never unpickled --------------------------------------------


def test_with_a_key_an_unsigned_or_forged_pickle_is_never_unpickled(
        signed_models_dir, tmp_path, monkeypatch):
    unpickled: list[str] = []
    real_unpickle = artifacts._unpickle

    def spy(name, payload, trained_with):
        unpickled.append(name)
        return real_unpickle(name, payload, trained_with)

    monkeypatch.setattr(artifacts, "_unpickle", spy)
    marker = tmp_path / "ran"
    for key, expected in ((None, "is not signed"), (b"attacker", "does not match")):
        publish_raw(signed_models_dir, "exploit", pickle.dumps(Exploit(marker)), key=key)
        with pytest.raises(ArtifactError, match=expected):
            load_model(signed_models_dir, "exploit", SIGNING_KEY)
    assert unpickled == []
    # The spy sees what is unpickled: a signed pickle is, and the unpickler refuses it.
    publish_raw(signed_models_dir, "exploit", pickle.dumps(Exploit(marker)), key=SIGNING_KEY)
    with pytest.raises(ArtifactError, match="names posix.system"):
        load_model(signed_models_dir, "exploit", SIGNING_KEY)
    assert unpickled == ["exploit"]
    assert not marker.exists()


# --- The manifest ----------------------------------------------------------------------------


def test_a_deeply_nested_manifest_is_ignored(make_client, models_dir):
    (models_dir / "manifest.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)
    client = make_client(models_dir)
    assert client.get("/ready").json()["models_loaded"] == len(contract.MODEL_NAMES)
    assert client.post("/predict", json=PENGUIN).status_code == 200
