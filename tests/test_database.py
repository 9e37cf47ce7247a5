"""The pipeline's SQL against a real MySQL-compatible server."""

from __future__ import annotations

import os
import threading

import numpy as np
import pandas as pd
import pytest

from penguins import contract
from penguins.database import (
    count_rows,
    create_and_empty_tables,
    load_raw,
    read_chunks,
    read_table,
    read_training_rows,
    write_clean,
)
from penguins.source import check_source
from tests.data import packaged_rows, raw_frame, rows_with_repeats, write_csv


def test_create_and_empty_is_idempotent_and_recreates_dropped_tables(db):
    create_and_empty_tables(db)
    create_and_empty_tables(db)
    with db.cursor() as cursor:
        cursor.execute(f"DROP TABLE {contract.RAW_TABLE}")
    create_and_empty_tables(db)
    assert count_rows(db, contract.RAW_TABLE) == 0
    assert count_rows(db, contract.CLEAN_TABLE) == 0


def test_load_raw_keeps_every_row_and_stores_missing_values_as_null(db):
    create_and_empty_tables(db)
    loaded = load_raw(db, check_source(contract.default_source()))

    assert loaded == count_rows(db, contract.RAW_TABLE) == 344
    stored = read_table(db, contract.RAW_TABLE)
    expected = raw_frame()
    assert list(stored["source_row"]) == list(range(1, 345))
    assert stored["species"].tolist() == expected["species"].tolist()
    for column in ("bill_length_mm", "body_mass_g", "sex"):
        assert stored[column].isna().tolist() == expected[column].isna().tolist(), column
    assert stored["bill_length_mm"].dropna().astype(float).tolist() == (
        expected["bill_length_mm"].dropna().tolist()
    )
    with db.cursor() as cursor:
        cursor.execute(
            f"SELECT COUNT(*) FROM {contract.RAW_TABLE} "
            "WHERE sex IN ('NA', 'nan', '<NA>', '') OR island IN ('NA', '')"
        )
        assert cursor.fetchone() == (0,)


def test_loading_twice_after_emptying_gives_the_same_rows(db, tmp_path):
    source = tmp_path / "quoted.csv"
    packaged_rows().to_csv(source, index=False, quoting=1)  # every field in double quotes
    for _ in range(2):
        create_and_empty_tables(db)
        assert load_raw(db, check_source(source)) == 344
    assert read_table(db, contract.RAW_TABLE)["sex"].isna().sum() == 11


def test_write_clean_round_trips_the_rows(db):
    from penguins.cleaning import clean

    create_and_empty_tables(db)
    cleaned, _ = clean(raw_frame())
    assert write_clean(db, cleaned) == 333
    stored = read_table(db, contract.CLEAN_TABLE)
    assert stored["source_row"].tolist() == cleaned["source_row"].tolist()
    assert stored["body_mass_g"].astype(float).tolist() == cleaned["body_mass_g"].tolist()


def _statements_run(conn) -> int:
    """How many statements this connection has sent, counting this one."""
    with conn.cursor() as cursor:
        cursor.execute("SHOW SESSION STATUS LIKE 'Questions'")
        return int(cursor.fetchone()[1])


def _tables(conn) -> set[str]:
    with conn.cursor() as cursor:
        cursor.execute("SHOW TABLES")
        return {name for (name,) in cursor.fetchall()}


def test_the_functions_work_on_the_tables_they_are_given(db):
    """The whole load and cleaning, on scratch tables: the rows land there, nowhere else."""
    from penguins.cleaning import clean

    create_and_empty_tables(db)
    with db.cursor() as cursor:
        cursor.execute(f"INSERT INTO {contract.RAW_TABLE} (species) VALUES ('sentinel')")
        cursor.execute("DROP TABLE IF EXISTS scratch_raw, scratch_clean")
    try:
        create_and_empty_tables(db, "scratch_raw", "scratch_clean")
        assert load_raw(db, check_source(contract.default_source()), "scratch_raw") == 344
        cleaned, _ = clean(read_table(db, "scratch_raw"))
        assert write_clean(db, cleaned, "scratch_clean") == 333

        assert count_rows(db, "scratch_raw") == 344
        assert count_rows(db, "scratch_clean") == 333
        assert read_table(db, "scratch_clean")["source_row"].tolist() == (
            cleaned["source_row"].tolist())
        assert read_table(db, contract.RAW_TABLE)["species"].tolist() == ["sentinel"]
        assert count_rows(db, contract.CLEAN_TABLE) == 0
    finally:
        with db.cursor() as cursor:
            cursor.execute("DROP TABLE IF EXISTS scratch_raw, scratch_clean")


MALICIOUS = "x`; DROP TABLE y; --"


@pytest.mark.parametrize(
    "call",
    [
        lambda conn, name: create_and_empty_tables(conn, name, "penguins_clean"),
        lambda conn, name: create_and_empty_tables(conn, "penguins_raw", name),
        lambda conn, name: load_raw(conn, check_source(contract.default_source()), name),
        lambda conn, name: read_table(conn, name),
        lambda conn, name: write_clean(conn, raw_frame().dropna(), name),
        lambda conn, name: count_rows(conn, name),
    ],
    ids=["create raw", "create clean", "load_raw", "read_table", "write_clean", "count_rows"],
)
@pytest.mark.parametrize("name", [MALICIOUS, "penguins_raw\n", "1abc", "a" * 65, "db.t", ""])
def test_a_table_name_that_is_not_a_plain_identifier_is_refused_before_any_sql(db, call, name):
    with db.cursor() as cursor:
        cursor.execute("CREATE TABLE IF NOT EXISTS y (id INT)")
    before = _statements_run(db)
    threads = threading.active_count()

    with pytest.raises(ValueError, match="is not a plain table name"):
        call(db, name)

    assert _statements_run(db) == before + 1, "a statement reached the server"
    assert threading.active_count() == threads
    assert "y" in _tables(db)


def test_the_longest_plain_name_is_accepted_and_quoted(db):
    name = "_" + "a" * 63
    create_and_empty_tables(db, name, "penguins_clean")
    try:
        assert count_rows(db, name) == 0
    finally:
        with db.cursor() as cursor:
            cursor.execute(f"DROP TABLE `{name}`")


def test_an_unreachable_server_is_a_retryable_problem_naming_the_connection():
    import MySQLdb

    from penguins.database import ConnectionProblem, open_connection
    from tests.mysql_server import free_port

    port = free_port()
    with pytest.raises(ConnectionProblem) as problem:
        open_connection(
            lambda: MySQLdb.connect(host="127.0.0.1", port=port, connect_timeout=2),
            "mysql_airflow_conn", f"127.0.0.1:{port}",
        )
    assert problem.value.retryable
    assert f"cannot reach MySQL at 127.0.0.1:{port} through connection 'mysql_airflow_conn'" in (
        str(problem.value)
    )


def test_wrong_credentials_are_a_final_problem_naming_the_connection(mysql):
    import MySQLdb

    from penguins.database import ConnectionProblem, open_connection

    def connect():
        return MySQLdb.connect(host=mysql.host, port=mysql.port, user="penguins_nobody",
                               password="wrong", connect_timeout=5)

    with pytest.raises(ConnectionProblem) as problem:
        open_connection(connect, "mysql_airflow_conn", f"{mysql.host}:{mysql.port}")
    assert not problem.value.retryable
    assert "refused connection 'mysql_airflow_conn'" in str(problem.value)
    assert "Access denied" in str(problem.value)


def test_a_load_the_client_may_not_send_fails_at_once_and_leaves_nothing_open(mysql, tmp_path):
    import MySQLdb

    # LOCAL INFILE off on the client: the load fails before the feeder's rows are read; the
    # feeder, blocked on a full pipe, must stop too (a bigger file than the pipe holds).
    source = check_source(write_csv(tmp_path / "big.csv", pd.concat([packaged_rows()] * 20)))
    conn = MySQLdb.connect(host=mysql.host, port=mysql.port, user=mysql.user,
                           password=mysql.password, database=mysql.database, local_infile=0)
    open_before = set(os.listdir("/proc/self/fd"))
    threads_before = threading.active_count()
    try:
        create_and_empty_tables(conn)
        with pytest.raises(MySQLdb.MySQLError):
            load_raw(conn, source)
        assert count_rows(conn, contract.RAW_TABLE) == 0
    finally:
        conn.close()
    assert threading.active_count() == threads_before, "the feeder thread is still running"
    assert set(os.listdir("/proc/self/fd")) <= open_before, "a pipe end was left open"


def _load(db, tmp_path, rows: pd.DataFrame) -> None:
    create_and_empty_tables(db)
    load_raw(db, check_source(write_csv(tmp_path / "source.csv", rows)))


def test_preprocess_in_chunks_writes_what_cleaning_the_whole_table_gives(db, tmp_path):
    """Through the server: repeats spread across chunk boundaries, chunks of 7 raw rows."""
    from penguins.cleaning import clean, preprocess

    rows, expected = rows_with_repeats()
    _load(db, tmp_path, rows)
    whole, whole_report = clean(read_table(db, contract.RAW_TABLE))
    assert whole_report == expected

    report = preprocess(db, chunk_rows=7)

    assert report == expected
    stored = read_table(db, contract.CLEAN_TABLE)
    assert len(stored) == count_rows(db, contract.CLEAN_TABLE) == 338
    pd.testing.assert_frame_equal(stored.astype(whole.dtypes.to_dict()), whole,
                                  check_dtype=False)


def test_a_preprocess_run_again_starts_over_on_an_emptied_clean_table(db, tmp_path):
    from penguins.cleaning import preprocess

    _load(db, tmp_path, packaged_rows())
    first = preprocess(db, chunk_rows=100)
    before = read_table(db, contract.CLEAN_TABLE)

    again = preprocess(db, chunk_rows=1000)  # as a retried task: the rows are there already

    assert first == again
    assert again["clean_rows"] == 333
    pd.testing.assert_frame_equal(read_table(db, contract.CLEAN_TABLE), before)


def test_a_failed_preprocess_keeps_no_clean_row(mysql, tmp_path):
    """Nothing is committed until the last chunk is written: here the server refuses rows of
    the third chunk (a check on the table), after two chunks went in."""
    from penguins.cleaning import preprocess

    conn = mysql.connect()
    try:
        _load(conn, tmp_path, packaged_rows())
        with conn.cursor() as cursor:
            cursor.execute(f"ALTER TABLE {contract.CLEAN_TABLE} "
                           "ADD CONSTRAINT early_rows_only CHECK (source_row < 250)")
        with pytest.raises(RuntimeError, match="loaded 48 clean rows, expected 96"):
            preprocess(conn, chunk_rows=100)
        assert count_rows(conn, contract.CLEAN_TABLE) == 0
    finally:
        with conn.cursor() as cursor:
            cursor.execute(f"DROP TABLE {contract.CLEAN_TABLE}")
        conn.close()


def test_read_chunks_pages_through_a_table_with_gaps_in_source_order(db):
    from penguins.cleaning import clean

    create_and_empty_tables(db)
    write_clean(db, clean(raw_frame())[0])  # 333 rows, numbered with gaps up to 344
    whole = read_table(db, contract.CLEAN_TABLE)

    chunks = list(read_chunks(db, contract.CLEAN_TABLE, 50))

    assert [len(c) for c in chunks] == [50] * 6 + [33]
    pd.testing.assert_frame_equal(pd.concat(chunks, ignore_index=True), whole)
    (only,) = read_chunks(db, contract.CLEAN_TABLE, 1000, columns=("species",))
    assert list(only.columns) == ["source_row", "species"]
    with pytest.raises(ValueError, match="are not columns"):
        next(read_chunks(db, contract.CLEAN_TABLE, 10, columns=("species`, x",)))


def test_the_compact_training_rows_train_the_same_models_as_the_full_table(db):
    """Categoricals, float64 and int16 from ``read_training_rows``: every model predicts the
    same probabilities as when trained on ``read_table``'s frame."""
    from penguins.cleaning import clean
    from penguins.training import train

    create_and_empty_tables(db)
    write_clean(db, clean(raw_frame())[0])
    full = read_table(db, contract.CLEAN_TABLE)

    compact = read_training_rows(db, chunk_rows=100)

    assert list(compact.columns) == [contract.LABEL, *contract.FEATURES]
    assert compact.memory_usage(index=False).sum() <= 40 * len(compact)
    assert compact["island"].dtype == pd.CategoricalDtype(list(contract.ISLANDS))
    assert (compact["bill_length_mm"] == full["bill_length_mm"]).all()
    for name in contract.MODEL_NAMES:
        a, b = train(full, name, 0.25, 42), train(compact, name, 0.25, 42)
        assert a.metrics == b.metrics, name
        x_test = a.held_out[0]
        np.testing.assert_array_equal(a.pipeline.predict_proba(x_test),
                                      b.pipeline.predict_proba(x_test), err_msg=name)
