"""The pipeline's SQL against a real MySQL-compatible server."""

from __future__ import annotations

import os
import threading

import pandas as pd
import pytest

from penguins import contract
from penguins.database import (
    count_rows,
    create_and_empty_tables,
    load_raw,
    read_table,
    write_clean,
)
from penguins.source import check_source
from tests.data import packaged_rows, raw_frame, write_csv


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


def test_only_the_pipelines_tables_can_be_named(db):
    with pytest.raises(ValueError, match="unknown table"):
        read_table(db, "mysql.user; DROP TABLE penguins_raw")


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
