"""Checking a source file before anything is emptied."""

from __future__ import annotations

import hashlib

import pytest

from penguins.contract import COLUMNS, default_source
from penguins.source import SourceError, check_source
from tests.data import packaged_rows, write_csv


def test_the_packaged_source_passes_with_its_344_rows_and_its_digest():
    source = check_source(default_source())
    assert source.rows == 344
    assert source.columns == COLUMNS
    assert source.sha256 == hashlib.sha256(default_source().read_bytes()).hexdigest()


def test_columns_in_another_order_and_crlf_lines_are_accepted(tmp_path):
    rows = packaged_rows()[list(reversed(COLUMNS))]
    path = tmp_path / "reordered.csv"
    rows.to_csv(path, index=False, lineterminator="\r\n")
    source = check_source(path)
    assert source.rows == 344
    assert source.columns == tuple(reversed(COLUMNS))


def _with(tmp_path, column, row, value):
    rows = packaged_rows()
    rows.loc[row, column] = value
    return write_csv(tmp_path / "edited.csv", rows)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "absent.csv", "no such file"),
        (lambda p: _write(p / "empty.csv", ""), "empty"),
        (lambda p: _write(p / "header.csv", ",".join(COLUMNS) + "\n"), "no data rows"),
        (
            lambda p: write_csv(p / "short.csv", packaged_rows().drop(columns=["sex"])),
            "missing ['sex']",
        ),
        (
            lambda p: write_csv(p / "extra.csv", packaged_rows().assign(colour="blue")),
            "unexpected ['colour']",
        ),
        (
            lambda p: write_csv(p / "shifted.csv", packaged_rows().assign(body_mass_g="heavy")),
            "column 'body_mass_g' is not numbers: 344 of 344 values are not "
            "(the first at data row 1)",
        ),
        (lambda p: _with(p, "island", 5, "x" * 65), "data row 6: column 'island'"),
        (lambda p: _with(p, "bill_length_mm", 7, "39." + "1" * 70),
         "data row 8: column 'bill_length_mm'"),
        (lambda p: _with(p, "species", 300, "Emperor"),
         "data row 301: column 'species' is not one of Adelie, Chinstrap, Gentoo"),
        (lambda p: _write(p / "binary.csv", b"\x00\xff\xfe" * 100), "near line 1: not UTF-8 text"),
        (lambda p: _write(p / "ragged.csv", ",".join(COLUMNS) + "\n" + "Adelie,Dream\n"),
         "data row 1: 2 fields, but the header has 8"),
        (lambda p: _write(p / "open_quote.csv", ",".join(COLUMNS) + '\n"Adelie,Dream\n'),
         "not well-formed CSV"),
        (lambda p: _write(p / "after_quote.csv", ",".join(COLUMNS) + '\n"Adelie"x,' + "," * 6),
         "line 2: not well-formed CSV"),
        (lambda p: _write(p / "twice.csv", ",".join((*COLUMNS, "island")) + "\n"),
         "repeated ['island']"),
        (lambda p: _write(p / "not_penguins.csv", "name,age\nada,36\n"),
         "its first line is not a penguins header (0 of the 8 columns found)"),
    ],
)
def test_a_bad_source_is_refused_with_the_file_and_the_problem(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(SourceError) as refused:
        check_source(path)
    assert str(path) in str(refused.value)
    assert message in str(refused.value)
    assert "Emperor" not in str(refused.value), "a refusal never quotes a value"


def _write(path, content):
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def test_a_few_dirty_values_are_left_for_preprocess(tmp_path):
    rows = packaged_rows()
    rows.loc[[3, 50, 200], "body_mass_g"] = ["heavy", "12,5", "?"]
    rows.loc[7, "species"] = " gentoo "
    source = check_source(write_csv(tmp_path / "dirty.csv", rows))
    assert source.rows == 344


def test_a_byte_order_mark_blank_lines_and_spaces_around_header_names_are_accepted(tmp_path):
    # As spreadsheets and hand edits leave them; more blank lines at the end than a batch holds.
    header = ",".join('" island "' if c == "island" else f" {c}\t" for c in COLUMNS)
    rows = packaged_rows().head(3).to_csv(index=False, header=False)
    text = f"\n{header}\n\n{rows}  \n" + "\n" * 2500
    path = _write(tmp_path / "spreadsheet.csv", b"\xef\xbb\xbf" + text.encode())

    source = check_source(path)

    assert source.columns == COLUMNS
    assert source.rows == 3
