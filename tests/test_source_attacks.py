"""The source files that broke the old check or load, as an attacker or a careless user made them.

Each accepted file goes through the check and the real load (real MySQL), and ``penguins_raw``
must hold exactly the rows the check read, value for value. Each refused file must be refused
by the check, with a short message that repeats nothing of what the file holds.
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path

import pytest

from penguins.contract import COLUMNS, NA_MARKERS, RAW_TABLE, default_source
from penguins.database import create_and_empty_tables, load_raw
from penguins.source import check_source, open_rows
from penguins.source_location import Location, SourceError

HEADER = ",".join(COLUMNS)
SECRET = "s3cr3t-Signing-Key-0123456789abcdef"
PASSWORD = "Hunter2Penguins"
"""A secret that looks like a column name."""
MYSQL_URI = "mysql://penguins:Pa55w0rd-Of-Mysql@db.internal:3306/penguins"


def _packaged_lines() -> list[str]:
    return default_source().read_text().splitlines()[1:]


def _write(path, text: str, *, newline: str = "\n", prefix: bytes = b""):
    path.write_bytes(prefix + text.replace("\n", newline).encode())
    return path


def _seen_by_the_check(path) -> list[tuple]:
    """Every row as the check's reader parsed it, laid out as penguins_raw stores it."""
    with open_rows(Location.of(path)) as reader:
        order = [reader.header.index(column) for column in COLUMNS]
        return [
            (batch.first_row + offset,
             *(None if record[i] in NA_MARKERS else record[i] for i in order))
            for batch in reader.batches()
            for offset, record in enumerate(batch.rows)
        ]


def _stored(db) -> list[tuple]:
    with db.cursor() as cursor:
        cursor.execute(f"SELECT source_row, {', '.join(COLUMNS)} FROM {RAW_TABLE} "
                       "ORDER BY source_row")
        return [tuple(row) for row in cursor.fetchall()]


def _header_with_stray_spaces(tmp_path):
    header = HEADER.replace("island", " island").replace("sex", "sex ")
    return _write(tmp_path / "spaces.csv", "\n".join([header, *_packaged_lines()]) + "\n")


def _lf_file_with_one_quoted_crlf(tmp_path):
    lines = _packaged_lines()
    lines[2] = lines[2].replace("Torgersen", '"Torger\r\nsen"', 1)
    return _write(tmp_path / "quoted_crlf.csv", "\n".join([HEADER, *lines]) + "\n")


def _backslashes_and_null_words(tmp_path):
    lines = _packaged_lines()[:5]
    lines[0] = "Adelie,Torgersen\\,39.1,18.7,181,3750,\\N,2007"
    lines[1] = 'Adelie,"say ""hi"", \\\\",39.5,17.4,186,3800,NULL,2007'
    lines[2] = "Adelie,na,40.3,18,195,3250,NA ,2007"
    return _write(tmp_path / "backslash.csv", "\n".join([HEADER, *lines]) + "\n")


def _empty_values(tmp_path):
    lines = _packaged_lines()[:3]
    lines[1] = "Adelie,,39.5,,186,3800,,2007"
    return _write(tmp_path / "empty.csv", "\n".join([HEADER, *lines]) + "\n")


def _byte_order_mark_and_crlf(tmp_path):
    return _write(tmp_path / "excel.csv", "\n".join([HEADER, *_packaged_lines()]) + "\n",
                  newline="\r\n", prefix=b"\xef\xbb\xbf")


def _blank_lines_between_rows(tmp_path):
    lines = _packaged_lines()[:4]
    return _write(tmp_path / "blank.csv", "\n".join(["", HEADER, "", lines[0], "   ", *lines[1:],
                                                     "", "\t"]) + "\n")


@pytest.mark.parametrize(
    ("make", "rows", "expected"),
    [
        (_blank_lines_between_rows, 4, {(1, "bill_length_mm"): "39.1",
                                        (4, "bill_length_mm"): None}),
        (_header_with_stray_spaces, 344, {(1, "island"): "Torgersen", (4, "sex"): None}),
        (_lf_file_with_one_quoted_crlf, 344, {(3, "island"): "Torger\r\nsen",
                                              (4, "island"): "Torgersen"}),
        (_backslashes_and_null_words, 5, {(1, "island"): "Torgersen\\", (1, "sex"): "\\N",
                                          (2, "island"): 'say "hi", \\\\', (2, "sex"): "NULL",
                                          (3, "island"): "na", (3, "sex"): "NA ",
                                          (4, "sex"): None}),
        (_empty_values, 3, {(2, "island"): None, (2, "bill_depth_mm"): None, (2, "sex"): None,
                            (2, "bill_length_mm"): "39.5", (3, "island"): "Torgersen"}),
        (_byte_order_mark_and_crlf, 344, {(1, "species"): "Adelie", (344, "year"): "2009"}),
    ],
)
def test_an_accepted_file_loads_exactly_as_the_check_read_it(db, tmp_path, make, rows, expected):
    path = make(tmp_path)

    source = check_source(path)
    create_and_empty_tables(db)
    assert load_raw(db, source) == source.rows == rows

    stored = _stored(db)
    assert stored == _seen_by_the_check(path)
    for (row, column), value in expected.items():
        assert stored[row - 1][1 + COLUMNS.index(column)] == value, (row, column)


def _environment_block(tmp_path):
    # What /proc/self/environ holds: NUL-separated, no line end, secrets among the rest.
    block = (f"PATH=/usr/bin\0MODEL_SIGNING_KEY={SECRET}\0"
             f"AIRFLOW_CONN_MYSQL_AIRFLOW_CONN={MYSQL_URI}\0")
    return _write(tmp_path / "environ", block)


def _password_json(tmp_path):
    return _write(tmp_path / "credentials.json",
                  json.dumps({"user": "penguins", "password": SECRET}, indent=2))


def _password_json_on_one_line(tmp_path):
    return _write(tmp_path / "connections.json",
                  json.dumps({"mysql_airflow_conn": MYSQL_URI, "key": SECRET}) + "\n")


def _password_alone(tmp_path):
    return _write(tmp_path / "mysql_password", f"{PASSWORD}\n")


def _passwords_as_columns(tmp_path):
    return _write(tmp_path / "passwords.csv", f"species,{PASSWORD},{PASSWORD}2\n")


def _passwd(tmp_path):
    return _write(tmp_path / "passwd", f"root:x:0:0:{SECRET}:/root:/bin/bash\n")


def _secret_as_a_column_among_penguin_ones(tmp_path):
    header = f"species,island,bill_length_mm,bill_depth_mm,{SECRET},{MYSQL_URI}"
    return _write(tmp_path / "half.csv", header + "\n")


def _secret_as_a_value(tmp_path):
    lines = _packaged_lines()
    lines[9] = lines[9].replace("Torgersen", SECRET.replace("-", ""), 1) + ","
    return _write(tmp_path / "value.csv", "\n".join([HEADER, *lines]) + "\n")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_environment_block, "its first line is not a penguins header"),
        (_password_json, "its first line is not a penguins header"),
        (_password_json_on_one_line, "its first line is not a penguins header"),
        (_password_alone, "its first line is not a penguins header"),
        (_passwords_as_columns, "its first line is not a penguins header (1 of the 8"),
        (_passwd, "its first line is not a penguins header"),
        (_secret_as_a_column_among_penguin_ones,
         "missing ['flipper_length_mm', 'body_mass_g', 'sex', 'year'], unexpected [2 others]"),
        (_secret_as_a_value, "data row 10: 9 fields, but the header has 8"),
    ],
)
def test_a_refusal_repeats_nothing_of_a_secret_the_file_holds(tmp_path, make, message):
    path = make(tmp_path)

    with pytest.raises(SourceError) as refused:
        check_source(path)

    assert message in str(refused.value)
    assert str(path) in str(refused.value)
    # The whole traceback, as a task's log shows it, chained exceptions included.
    logged = "".join(traceback.format_exception(refused.value))
    for secret in (SECRET, SECRET[:12], SECRET[-12:], PASSWORD, "Pa55w0rd", "db.internal",
                   "root:x"):
        assert secret not in logged


def test_the_real_environment_of_the_process_is_refused_without_a_word_of_it():
    with pytest.raises(SourceError) as refused:
        check_source(Location.of("/proc/self/environ"))

    message = str(refused.value)
    assert "its first line is not a penguins header" in message
    environment = Path("/proc/self/environ").read_bytes().split(b"\0")
    values = [entry.partition(b"=")[2].decode(errors="replace") for entry in environment]
    assert [value for value in values if len(value) >= 8 and value in message] == []


@pytest.mark.parametrize(
    ("name", "line"),
    [
        ("one_long_value.csv", b"x" * (64 << 20)),
        ("many_fields.csv", b"a," * (4 << 20)),
        ("quoted_lines.csv", b'"x\n",' * (2 << 20)),
    ],
)
def test_a_huge_row_is_refused_at_once_with_a_short_message(tmp_path, name, line):
    # The old check measured lines by re-joining them: one 256 MiB line took 74 s and gave a
    # 1 GiB message. Now no more than a batch of rows is ever read past the limit.
    path = tmp_path / name
    path.write_bytes(HEADER.encode() + b"\n" + line)

    started = time.perf_counter()
    with pytest.raises(SourceError) as refused:
        check_source(path)
    elapsed = time.perf_counter() - started
    path.unlink()

    assert "longer than 4096 characters" in str(refused.value)
    assert len(str(refused.value)) < 300
    assert elapsed < 2.0, f"refusing took {elapsed:.1f} s"
