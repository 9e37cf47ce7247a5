"""Where a source may be read from: the packaged CSV, or a regular file inside the source folder.

``source_path`` is set by whoever may trigger a run, so these are an attacker's paths. The load
opens the file afresh, so a file changed or swapped after the check must not be loaded either.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

from penguins.contract import RAW_TABLE, default_source
from penguins.database import count_rows, create_and_empty_tables, load_raw
from penguins.source import check_source
from penguins.source_location import (
    DEFAULT_SOURCE_DIR,
    SOURCE_DIR_VARIABLE,
    Location,
    SourceError,
    locate,
    source_folder,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def folder(tmp_path, monkeypatch) -> Path:
    """A source folder with one good CSV in it, and a secret file beside the folder."""
    inside = tmp_path / "sources"
    inside.mkdir()
    shutil.copy(default_source(), inside / "penguins.csv")
    (tmp_path / "secret.csv").write_bytes(default_source().read_bytes())
    monkeypatch.setenv(SOURCE_DIR_VARIABLE, str(inside))
    return inside


def test_the_default_folder_is_airflow_data_in_the_repository(monkeypatch):
    monkeypatch.delenv(SOURCE_DIR_VARIABLE, raising=False)
    assert source_folder() == DEFAULT_SOURCE_DIR == REPO / "airflow" / "data"
    assert (DEFAULT_SOURCE_DIR / ".gitkeep").is_file()


@pytest.mark.parametrize("given", [None, "", "packaged"])
def test_the_packaged_csv_is_always_allowed(folder, given):
    path = str(default_source()) if given == "packaged" else given
    source = check_source(locate(path))
    assert source.rows == 344
    assert source.path == default_source().resolve()


@pytest.mark.parametrize("given", ["penguins.csv", "./penguins.csv", "{folder}/penguins.csv",
                                   "{folder}//./penguins.csv"])
def test_a_file_inside_the_folder_is_read_by_a_relative_or_an_absolute_path(folder, given):
    location = locate(given.format(folder=folder))
    assert location == Location(folder, ("penguins.csv",))
    assert check_source(location).rows == 344


def test_a_file_in_a_subfolder_is_read(folder):
    (folder / "2025").mkdir()
    shutil.copy(default_source(), folder / "2025" / "june.csv")
    assert check_source(locate("2025/june.csv")).rows == 344


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("/proc/self/environ", "is outside the source folder"),
        ("/etc/passwd", "is outside the source folder"),
        ("{folder}/../secret.csv", "'..' is not allowed"),
        ("../secret.csv", "'..' is not allowed"),
        ("2025/../../secret.csv", "'..' is not allowed"),
        ("{folder}-evil/penguins.csv", "is outside the source folder"),
        ("{folder}", "names the source folder, not a file in it"),
        (".", "names the source folder, not a file in it"),
        ("penguins.csv\0.txt", "not a usable path"),
        ("x" * 5000, "not a usable path"),
    ],
)
def test_a_path_outside_the_folder_is_refused_before_anything_is_opened(folder, given, message):
    with pytest.raises(SourceError) as refused:
        locate(given.format(folder=folder))
    assert message in str(refused.value)
    assert len(str(refused.value)) < 400
    assert "\0" not in str(refused.value)


def test_the_refusal_names_the_folder_and_its_setting(folder):
    with pytest.raises(SourceError) as refused:
        locate("/proc/self/environ")
    assert str(folder) in str(refused.value)
    assert SOURCE_DIR_VARIABLE in str(refused.value)


def test_a_symbolic_link_is_not_followed_out_of_the_folder_nor_inside_it(folder, tmp_path):
    (folder / "out.csv").symlink_to(tmp_path / "secret.csv")
    (folder / "in.csv").symlink_to(folder / "penguins.csv")
    (folder / "environ.csv").symlink_to("/proc/self/environ")
    for name in ("out.csv", "in.csv", "environ.csv"):
        with pytest.raises(SourceError, match="a symbolic link, which is not followed"):
            check_source(locate(name))


def test_a_linked_folder_on_the_path_is_not_followed(folder, tmp_path):
    (folder / "elsewhere").symlink_to(tmp_path)
    with pytest.raises(SourceError, match="a folder on its path is a symbolic link"):
        check_source(locate("elsewhere/secret.csv"))


def test_a_folder_swapped_for_a_link_after_locate_is_not_followed(folder, tmp_path):
    # locate() only reads the path; the open walks down from the folder, name by name, with
    # O_NOFOLLOW, so a swap between the two cannot redirect it.
    (folder / "2025").mkdir()
    shutil.copy(default_source(), folder / "2025" / "secret.csv")
    location = locate("2025/secret.csv")
    shutil.rmtree(folder / "2025")
    (folder / "2025").symlink_to(tmp_path)
    with pytest.raises(SourceError, match="a folder on its path is a symbolic link"):
        check_source(location)


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_what_is_not_a_regular_file_is_refused_without_waiting(folder, kind):
    path = folder / "special.csv"
    if kind == "folder":
        path.mkdir()
    else:
        os.mkfifo(path)
    outcome: list[BaseException] = []

    def check() -> None:
        try:
            check_source(locate("special.csv"))
        except BaseException as exc:
            outcome.append(exc)

    checking = threading.Thread(target=check, daemon=True)
    checking.start()
    checking.join(timeout=10)  # opening a FIFO for reading would wait for a writer forever
    assert not checking.is_alive(), "the check waited on a FIFO"
    assert isinstance(outcome[0], SourceError)
    assert "not a regular file" in str(outcome[0])


def test_a_missing_or_relative_source_folder_is_refused_naming_it(monkeypatch, tmp_path):
    monkeypatch.setenv(SOURCE_DIR_VARIABLE, "airflow/data")
    with pytest.raises(SourceError, match=f"{SOURCE_DIR_VARIABLE} must be an absolute path"):
        locate("penguins.csv")
    monkeypatch.setenv(SOURCE_DIR_VARIABLE, str(tmp_path / "absent"))
    with pytest.raises(SourceError, match="cannot be opened"):
        check_source(locate("penguins.csv"))


def _load_after(db, location: Location, change) -> Exception:
    source = check_source(location)
    create_and_empty_tables(db)
    change()
    with pytest.raises((SourceError, RuntimeError)) as refused:
        load_raw(db, source)
    return refused.value


@pytest.mark.parametrize(
    "change",
    [
        lambda path: path.write_bytes(path.read_bytes().replace(b"Torgersen", b"Biscoe\\\\")),
        lambda path: path.write_bytes(path.read_bytes() + b"Adelie,Dream,1,2,3,4,male,2007\n"),
        lambda path: path.write_bytes(path.read_bytes()[:-500]),
    ],
    ids=["same_rows_other_values", "one_row_more", "cut_short"],
)
def test_a_file_changed_after_the_check_is_not_loaded(db, folder, change):
    path = folder / "penguins.csv"
    refused = _load_after(db, locate("penguins.csv"), lambda: change(path))
    assert "changed after check_source read it, so nothing was loaded" in str(refused)
    assert count_rows(db, RAW_TABLE) == 0


def test_a_file_swapped_for_a_link_after_the_check_is_not_followed_by_the_load(db, folder,
                                                                                tmp_path):
    path = folder / "penguins.csv"

    def swap() -> None:
        path.unlink()
        path.symlink_to(tmp_path / "secret.csv")

    refused = _load_after(db, locate("penguins.csv"), swap)
    assert "a symbolic link, which is not followed; it changed after check_source" in str(refused)
    assert count_rows(db, RAW_TABLE) == 0


def test_a_value_the_table_cannot_store_is_not_kept_when_the_server_warns(db, tmp_path):
    # A table left over from another setup, with a character set that cannot hold an emoji:
    # LOAD DATA LOCAL would store "?" with a warning; the load undoes it instead.
    with db.cursor() as cursor:
        cursor.execute(f"DROP TABLE IF EXISTS {RAW_TABLE}")
        cursor.execute(f"CREATE TABLE {RAW_TABLE} (source_row INT UNSIGNED PRIMARY KEY, "
                       "species VARCHAR(64), island VARCHAR(64), bill_length_mm VARCHAR(64), "
                       "bill_depth_mm VARCHAR(64), flipper_length_mm VARCHAR(64), "
                       "body_mass_g VARCHAR(64), sex VARCHAR(64), year VARCHAR(64)) "
                       "DEFAULT CHARSET=latin1")
    path = tmp_path / "emoji.csv"
    text = default_source().read_text()
    path.write_text(text.replace("Torgersen", "Torgersen \N{PENGUIN}", 1))
    try:
        refused = _load_after(db, Location.of(path), lambda: None)
        assert "the server warned (1 times)" in str(refused)
        assert count_rows(db, RAW_TABLE) == 0
    finally:
        with db.cursor() as cursor:
            cursor.execute(f"DROP TABLE {RAW_TABLE}")
