"""The store's format and its writers: version folders, the signed manifest, the lock, pruning,
the gate as the pipeline applies it, the key pair, and ``python -m serving.store``."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from penguins import gate, training
from serving.store import signing, writer
from serving.store.documents import ModelEntry
from serving.store.layout import MANIFEST_FILE, StoreError, is_version_id
from serving.store.reader import Trust, read_manifest, read_metadata, read_version, version_ids
from tests.serving.conftest import (
    PUBLIC_KEY_FILE,
    REPO,
    export_raw,
    private_key,
    promote,
    publish,
)


def _trust() -> Trust:
    return Trust(signing.load_public_key(PUBLIC_KEY_FILE))


def test_a_version_is_a_folder_of_two_files_named_by_its_time(models_dir, published):
    versions = [export_raw(models_dir, "svm", b"payload one"),
                export_raw(models_dir, "svm", b"payload two")]
    assert all(is_version_id(v) for v in versions) and versions == sorted(versions)
    assert version_ids(models_dir, "svm") == sorted([published.versions["svm"], *versions])
    folder = models_dir / "svm" / versions[1]
    assert sorted(p.name for p in folder.iterdir()) == ["metadata.json", "model.pkl"]
    for path in (folder, *folder.iterdir()):
        assert stat.S_IMODE(path.stat().st_mode) in (0o755, 0o644)
    files = read_version(models_dir, "svm", versions[1], _trust(), max_pickle_bytes=100)
    assert files.payload == b"payload two"
    assert files.info.metadata["signature"]["key_id"] == signing.key_id(
        signing.load_public_key(PUBLIC_KEY_FILE))


@pytest.mark.parametrize("change", ["pickle", "metadata", "moved"])
def test_a_version_changed_after_export_does_not_verify(models_dir, change):
    version = export_raw(models_dir, "svm", b"payload")
    folder = models_dir / "svm" / version
    if change == "pickle":
        (folder / "model.pkl").write_bytes(b"PAYLOAD")
        expected = "is not the file its signed metadata describes"
    elif change == "metadata":
        metadata = json.loads((folder / "metadata.json").read_text())
        metadata["metrics"]["accuracy"] = 1.0
        (folder / "metadata.json").write_text(json.dumps(metadata))
        expected = "was changed after it was signed"
    else:
        os.rename(folder, models_dir / "svm" / "20991231T235959.999999Z")
        version = "20991231T235959.999999Z"
        expected = "describes another version"
    with pytest.raises(StoreError, match=expected):
        read_version(models_dir, "svm", version, _trust(), max_pickle_bytes=100)


def test_each_manifest_has_a_higher_sequence_and_is_signed(models_dir, published):
    before = read_manifest(models_dir, _trust()).sequence
    promote(models_dir, "svm", published.versions["svm"])
    after = read_manifest(models_dir, _trust())
    assert after.sequence > before
    document = json.loads((models_dir / MANIFEST_FILE).read_text())
    document["models"]["svm"]["promoted"] = None
    (models_dir / MANIFEST_FILE).write_text(json.dumps(document))
    with pytest.raises(StoreError, match="was changed after it was signed"):
        read_manifest(models_dir, _trust())
    # Nor does a writer build on a manifest it cannot verify.
    with pytest.raises(StoreError, match="was changed after it was signed"):
        promote(models_dir, "svm", published.versions["svm"])


def _promote_many(directory: str, name: str, version: str, times: int) -> None:
    for _ in range(times):
        promote(Path(directory), name, version)


def test_concurrent_writers_lose_no_change(models_dir, published):
    """Two processes change the manifest 20 times each, one model each: the lock serialises the
    read-modify-write, so both end promoted and the sequence grew 40 times."""
    versions = {name: export_raw(models_dir, name, b"x") for name in ("svm", "knn")}
    before = read_manifest(models_dir, _trust()).sequence
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_promote_many, args=(str(models_dir), name, v, 20))
               for name, v in versions.items()]
    for process in writers:
        process.start()
    for process in writers:
        process.join(60)
        assert process.exitcode == 0
    manifest = read_manifest(models_dir, _trust())
    assert {name: manifest.models[name].promoted for name in versions} == versions
    assert manifest.sequence >= before + 40


def test_pruning_keeps_the_newest_the_promoted_and_the_rollback_target(
        models_dir, published, monkeypatch):
    monkeypatch.setenv("MODEL_HISTORY", "2")
    first = published.versions["knn"]
    second = export_raw(models_dir, "knn", b"x")
    promote(models_dir, "knn", second)
    newer = [export_raw(models_dir, "knn", b"x") for _ in range(3)]
    promote(models_dir, "knn", second)  # a manifest write prunes
    assert version_ids(models_dir, "knn") == sorted([first, second, *newer[-2:]])
    entry = read_manifest(models_dir, _trust()).models["knn"]
    assert (entry.promoted, entry.history) == (second, (first,))
    assert not [p for p in (models_dir / "knn").iterdir() if p.name.startswith(".")]


def test_rollback_returns_to_the_previous_promotion_and_holds_back_the_current():
    entry = writer.promoted(writer.promoted(ModelEntry(), "A"), "B")
    assert (entry.promoted, entry.history) == ("B", ("A",))
    back = writer.rolled_back(entry, "svm")
    assert (back.promoted, back.history) == ("A", ())
    assert back.held_back["B"].startswith("rolled back to A")
    with pytest.raises(StoreError, match="no earlier promoted version"):
        writer.rolled_back(back, "svm")
    again = writer.promoted(back, "B")
    assert (again.promoted, again.history, again.held_back) == ("B", ("A",), {})


# --- The gate, as the pipeline applies it -----------------------------------------------------


def test_the_gate_decides_by_accuracy_and_regression():
    options = {"min_accuracy": 0.9, "max_regression": 0.01}
    assert gate.decide(0.95, None, None, **options).promote
    assert not gate.decide(0.85, None, None, **options).promote
    assert gate.decide(0.95, "V", 0.955, **options).promote
    held = gate.decide(0.95, "V", 0.97, **options)
    assert not held.promote and "0.0200 below the promoted version V" in held.reason


def test_a_version_trained_on_corrupted_labels_is_held_back(models_dir, published):
    """The served version stays; the next good run promotes."""
    good = published.versions["xgboost"]
    corrupted = published.clean.copy()
    corrupted["species"] = np.random.default_rng(0).permutation(corrupted["species"].to_numpy())
    bad = training.train(corrupted, "xgboost", 0.2, 42)
    result = publish(models_dir, bad)
    assert result["gate"]["promote"] is False
    assert "is below min_accuracy 0.9" in result["gate"]["reason"]
    entry = read_manifest(models_dir, _trust()).models["xgboost"]
    assert entry.promoted == good
    assert "below min_accuracy" in entry.held_back[result["version"]]

    retrained = publish(models_dir, published.trained["xgboost"])
    assert retrained["gate"]["promote"] is True
    assert retrained["gate"]["baseline_version"] == good
    assert read_manifest(models_dir, _trust()).models["xgboost"].promoted == \
        retrained["version"]


def test_a_regression_against_the_promoted_version_on_the_same_rows_is_held_back(
        models_dir, published):
    """A model trained on a few rows, above min_accuracy 0.5, scores below the promoted one on
    the same held-out rows by more than max_regression."""
    from dataclasses import replace

    from sklearn.metrics import accuracy_score

    promoted = published.trained["logistic_regression"]
    x_test, y_test = promoted.held_out
    few = training.train(published.clean.iloc[::25], "logistic_regression", 0.2, 42)
    accuracy = float(accuracy_score(y_test, few.pipeline.predict(x_test)))
    weaker = replace(few, metrics={**few.metrics, "accuracy": accuracy},
                     held_out=promoted.held_out)
    assert 0.5 < accuracy < promoted.metrics["accuracy"] - 0.01
    decision = publish(models_dir, weaker, min_accuracy=0.5)["gate"]
    assert decision["baseline_version"] == published.versions["logistic_regression"]
    assert decision["baseline_accuracy"] == promoted.metrics["accuracy"]
    assert decision["promote"] is False
    assert "below the promoted version" in decision["reason"]


# --- The key pair -----------------------------------------------------------------------------


def test_the_key_pair_is_made_once_with_the_private_key_for_its_owner_only(tmp_path):
    private, public = tmp_path / "keys" / "private.pem", tmp_path / "keys" / "public.pem"
    assert signing.ensure_key_pair(private, public) is True
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    before = private.read_bytes()
    assert signing.ensure_key_pair(private, public) is False
    assert private.read_bytes() == before
    public.unlink()
    signing.ensure_key_pair(private, public)
    document = signing.sign({"a": 1}, signing.load_private_key(private))
    signing.verify(document, signing.load_public_key(public), "the document")


def test_a_bad_key_file_is_refused_without_showing_its_contents(tmp_path):
    """A real private key, made here and then damaged: the refusal quotes none of it."""
    private, public = tmp_path / "private.pem", tmp_path / "public.pem"
    signing.ensure_key_pair(private, public)
    lines = private.read_text().splitlines()
    body = lines[1:-1]
    private.write_text("\n".join([lines[0], *(line[::-1] for line in body), lines[-1]]))
    with pytest.raises(StoreError) as refused:
        signing.load_private_key(private)
    assert "is not a PEM key" in str(refused.value)
    assert not any(line[::-1] in str(refused.value) or line in str(refused.value)
                   for line in body)


# --- python -m serving.store --------------------------------------------------------------------


def _cli(models: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving.store", *args], cwd=REPO,
                          env={**os.environ, "MODELS_DIR": str(models), **env},
                          capture_output=True, text=True, timeout=60)


def test_the_command_lists_promotes_and_rolls_back(models_dir, published):
    second = publish(models_dir, published.trained["svm"], min_accuracy=1.01)["version"]
    listing = _cli(models_dir, "list")
    assert listing.returncode == 0, listing.stderr
    assert f"{published.versions['svm']}  promoted" in listing.stdout
    assert f"{second}  held back" in listing.stdout and "below min_accuracy 1.01" in listing.stdout

    done = _cli(models_dir, "promote", "svm", second)
    assert done.returncode == 0 and f"svm: serving {second}" in done.stdout
    assert read_manifest(models_dir, _trust()).models["svm"].promoted == second
    done = _cli(models_dir, "rollback", "svm")
    assert done.returncode == 0 and f"svm: serving {published.versions['svm']}" in done.stdout

    missing = _cli(models_dir, "promote", "svm", "20000101T000000.000000Z")
    assert missing.returncode == 1 and "error:" in missing.stderr
    assert _cli(models_dir, "rollback", "svm").returncode == 1  # nothing before the first


def test_the_command_needs_the_private_key_to_change_anything(models_dir, published, tmp_path):
    done = _cli(models_dir, "rollback", "svm", MODEL_SIGNING_KEY_FILE=str(tmp_path / "none"))
    assert done.returncode == 1 and "no private key file" in done.stderr
    assert read_metadata(models_dir, "svm", published.versions["svm"], _trust())


# --- What the writers refuse to build on ------------------------------------------------------


def test_a_writer_refuses_to_build_on_a_manifest_put_back(models_dir, published):
    """Someone without the key copies an older signed manifest back: the service refuses it,
    and a writer must not sign its old state again with a new sequence."""
    older = (models_dir / MANIFEST_FILE).read_bytes()
    candidate = export_raw(models_dir, "svm", b"x")
    promote(models_dir, "svm", candidate)
    newer = (models_dir / MANIFEST_FILE).read_bytes()
    (models_dir / MANIFEST_FILE).write_bytes(older)
    with pytest.raises(StoreError, match="is not the one last written"):
        promote(models_dir, "knn", published.versions["knn"])
    assert (models_dir / MANIFEST_FILE).read_bytes() == older, "nothing was written"

    (models_dir / MANIFEST_FILE).write_bytes(newer)
    promote(models_dir, "knn", published.versions["knn"])
    assert read_manifest(models_dir, _trust()).models["svm"].promoted == candidate


def test_a_writer_refuses_when_the_manifest_is_gone_until_told_otherwise(models_dir, published):
    promote(models_dir, "svm", published.versions["svm"])  # this store's writers wrote one
    (models_dir / MANIFEST_FILE).unlink()
    with pytest.raises(StoreError, match="is missing"):
        publish(models_dir, published.trained["svm"])
    done = _cli(models_dir, "accept-manifest")
    assert done.returncode == 0 and "sequence 0" in done.stdout
    publish(models_dir, published.trained["svm"])
    assert list(read_manifest(models_dir, _trust()).models) == ["svm"]


def test_rollback_keeps_the_version_it_demoted(models_dir, published, monkeypatch):
    monkeypatch.setenv("MODEL_HISTORY", "1")
    bad = export_raw(models_dir, "knn", b"x")
    promote(models_dir, "knn", bad)
    for _ in range(2):
        export_raw(models_dir, "knn", b"y")  # newer candidates
    done = _cli(models_dir, "rollback", "knn", MODEL_HISTORY="1")
    assert done.returncode == 0, done.stderr
    assert bad in version_ids(models_dir, "knn")
    assert read_manifest(models_dir, _trust()).models["knn"].held_back[bad].startswith(
        writer.ROLLED_BACK)


def test_a_promoted_version_that_cannot_be_scored_keeps_the_gate_closed(models_dir, published):
    """Someone without the key spoils the promoted pickle: the gate must not then promote a
    version on its own accuracy alone."""
    promoted = models_dir / "svm" / published.versions["svm"] / "model.pkl"
    promoted.write_bytes(promoted.read_bytes() + b"\0")
    result = publish(models_dir, published.trained["svm"], min_accuracy=0.5)
    assert result["gate"]["promote"] is False
    assert "could not be scored" in result["gate"]["reason"]
    assert read_manifest(models_dir, _trust()).models["svm"].promoted == published.versions["svm"]


def test_the_gate_decision_is_taken_from_the_signed_metadata_not_the_xcom(models_dir, published):
    from penguins.publishing import record_run

    held = publish(models_dir, published.trained["knn"], min_accuracy=1.01)
    forged = {**held, "gate": {**held["gate"], "promote": True}}
    _, held_back = record_run(models_dir, private_key(), run_id="forged", results=[forged])
    assert "below min_accuracy 1.01" in held_back["knn"]
    assert read_manifest(models_dir, _trust()).models["knn"].promoted == published.versions["knn"]


def test_a_signed_document_with_a_repeated_key_is_refused(models_dir):
    version = export_raw(models_dir, "svm", b"payload")
    path = models_dir / "svm" / version / "metadata.json"
    text = path.read_text()
    path.write_text(text.replace('{', '{"pickle_sha256": "' + "e" * 64 + '", ', 1))
    with pytest.raises(StoreError, match="not valid JSON"):
        read_metadata(models_dir, "svm", version, _trust())


def test_promote_checks_the_version_under_the_lock(models_dir, published):
    missing = "20000101T000000.000000Z"
    done = _cli(models_dir, "promote", "svm", missing)
    assert done.returncode == 1 and "svm/20000101T000000.000000Z" in done.stderr
    assert read_manifest(models_dir, _trust()).models["svm"].promoted == published.versions["svm"]
